//! The snapshot worker: every `tenant_scale.snapshot_interval` seconds it calls
//! `tenant_scale.snapshot_stats()` in the database `tenant_scale.database`, in a transaction of its own.
//! It runs on primaries only (it starts once recovery has finished).
//!
//! Invariants: it only ever waits on its latch (SIGHUP re-reads the configuration and re-plans the next
//! snapshot, SIGTERM or postmaster death end it); an interval of 0 leaves it asleep until the next
//! SIGHUP. If the extension is not created in that database it logs that once and keeps waiting. An
//! error in a snapshot ends the process and the postmaster starts it again after `RESTART_AFTER`.

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::{DATABASE, SNAPSHOT_INTERVAL};

const WORKER_NAME: &str = "tenant_scale stats snapshots";
const RESTART_AFTER: Duration = Duration::from_secs(10);

pub(super) fn register() {
    BackgroundWorkerBuilder::new(WORKER_NAME)
        .set_type(WORKER_NAME)
        .set_library("tenant_scale")
        .set_function("tenant_scale_stats_worker_main")
        // Also makes it start once recovery has finished: a standby has nowhere to write history.
        .enable_spi_access()
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

fn interval() -> Option<Duration> {
    u64::try_from(SNAPSHOT_INTERVAL.get()).ok().filter(|seconds| *seconds > 0).map(Duration::from_secs)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn tenant_scale_stats_worker_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = DATABASE.get().and_then(|name| name.into_string().ok()).unwrap_or_default();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    let mut last_snapshot = Instant::now();
    let mut reported_missing_extension = false;
    loop {
        let wait = interval().map(|every| (last_snapshot + every).saturating_duration_since(Instant::now()));
        if !BackgroundWorker::wait_latch(wait) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a background worker to re-read postgresql.conf.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let Some(every) = interval() else { continue };
        if last_snapshot.elapsed() < every {
            continue;
        }
        last_snapshot = Instant::now();
        let written = BackgroundWorker::transaction(|| {
            let installed = Spi::get_one::<bool>(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'tenant_scale')",
            );
            if installed != Ok(Some(true)) {
                return None;
            }
            Spi::get_one::<i64>("SELECT count(*) FROM tenant_scale.snapshot_stats()").ok().flatten()
        });
        match written {
            Some(rows) => {
                reported_missing_extension = false;
                pgrx::debug1!("tenant_scale: snapshot wrote {rows} rows to stats_history");
            }
            None if !reported_missing_extension => {
                reported_missing_extension = true;
                pgrx::log!(
                    "tenant_scale: no snapshot of the statistics: the extension is not created in database \"{database}\" (tenant_scale.database)"
                );
            }
            None => {}
        }
    }
}
