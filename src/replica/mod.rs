//! Replication lag: the `replica_lag` view (on a primary), `replica_status()` (on any server) and the
//! `replication` check of `health()`, all in sql/replica.sql.
//!
//! The only Rust here is the judgement both sides share, `replica_lag_acceptable`, and the two GUCs
//! it reads. Keeping it in the library (rather than reading the GUCs with current_setting() in SQL)
//! means calling the view loads the library first, so the settings exist even when tenant_scale is
//! not in shared_preload_libraries. No shared state, no locks.

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

static MAX_REPLICA_LAG_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
static MAX_REPLICA_LAG_BYTES: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024 * 1024);

pgrx::extension_sql_file!("../../sql/replica.sql", name = "replica", requires = [replica_lag_acceptable]);

pub(crate) fn register_gucs() {
    GucRegistry::define_int_guc(
        c"tenant_scale.max_replica_lag_ms",
        c"Replay lag (time) above which a standby is reported unhealthy.",
        c"Used by tenant_scale.replica_lag, replica_status() and health(). On a standby the lag is the time \
          since the last replayed commit while received WAL waits for replay; on a primary it is \
          pg_stat_replication.replay_lag.",
        &MAX_REPLICA_LAG_MS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"tenant_scale.max_replica_lag_bytes",
        c"Replay lag (WAL bytes) above which a standby is reported unhealthy.",
        c"Used by tenant_scale.replica_lag, replica_status() and health(). On a standby: WAL received but \
          not replayed yet; on a primary: WAL written but not replayed by the standby.",
        &MAX_REPLICA_LAG_BYTES,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_BYTE,
    );
}

/// Whether a lag is within `tenant_scale.max_replica_lag_bytes` and `tenant_scale.max_replica_lag_ms`.
/// An unknown byte lag is not acceptable; an unknown time lag (nothing replayed yet to date it) is
/// judged by bytes alone.
#[pg_extern(stable, parallel_safe)]
fn replica_lag_acceptable(lag_bytes: Option<i64>, lag_seconds: Option<f64>) -> bool {
    within_limits(lag_bytes, lag_seconds, MAX_REPLICA_LAG_BYTES.get(), MAX_REPLICA_LAG_MS.get())
}

fn within_limits(lag_bytes: Option<i64>, lag_seconds: Option<f64>, max_bytes: i32, max_ms: i32) -> bool {
    let bytes_ok = lag_bytes.is_some_and(|bytes| bytes <= i64::from(max_bytes));
    let time_ok = lag_seconds.is_none_or(|seconds| seconds * 1000.0 <= f64::from(max_ms));
    bytes_ok && time_ok
}

#[cfg(test)]
mod tests {
    use super::within_limits;

    #[test]
    fn lag_is_acceptable_only_within_both_limits() {
        assert!(within_limits(Some(0), Some(0.0), 16, 5_000));
        assert!(within_limits(Some(16), Some(5.0), 16, 5_000));
        assert!(!within_limits(Some(17), Some(0.0), 16, 5_000));
        assert!(!within_limits(Some(0), Some(5.001), 16, 5_000));
        assert!(!within_limits(None, Some(0.0), 16, 5_000), "unknown byte lag");
        assert!(within_limits(Some(0), None, 16, 5_000), "undated lag is judged by bytes");
    }
}
