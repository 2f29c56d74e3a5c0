//! The only door to shared memory.
//!
//! Shared memory exists only when the library is listed in `shared_preload_libraries`: the postmaster
//! must reserve it before any backend starts. A library loaded later (by `CREATE EXTENSION` or the first
//! call of one of its functions) has none, and touching a pgrx shared-memory object then panics.
//! Every feature that needs shared memory therefore goes through this module, which remembers how the
//! library was loaded and turns "not preloaded" into a clear SQL error (SQLSTATE 55000 with a HINT),
//! while features that do not need it keep working.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// Set in the postmaster during `shared_preload_libraries` processing and inherited by every backend
/// it forks; stays false in a backend that loaded the library on demand.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Called first thing in `_PG_init`.
pub(crate) fn note_library_load() {
    // SAFETY: a plain global flag PostgreSQL sets while it runs shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        PRELOADED.store(true, Ordering::Relaxed);
    }
}

pub(crate) fn is_preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Raises SQLSTATE 55000 unless the library was preloaded. `feature` names what the caller wanted,
/// for the message (for example "per-company statistics").
#[cfg_attr(
    not(any(test, feature = "pg_test")),
    expect(dead_code, reason = "the first shared-memory feature (quota counters) calls it")
)]
pub(crate) fn require_preloaded(feature: &str) {
    if !is_preloaded() {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{feature} needs tenant_scale in shared_preload_libraries"),
            function_name!(),
        )
        .set_detail("The tenant_scale library was loaded after server start, so it has no shared memory.")
        .set_hint(
            "Add tenant_scale to shared_preload_libraries in postgresql.conf, keeping any \
             libraries already listed there, and restart the server.",
        )
        .report(PgLogLevel::ERROR);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn test_cluster_preloads_the_library() {
        assert!(super::is_preloaded());
        super::require_preloaded("this test");
    }
}
