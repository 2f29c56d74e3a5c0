//! Per-company query statistics in shared memory.
//!
//! Every statement a session runs is counted for the company `tenant_scale.company` names when the
//! statement starts (empty: unattributed, only a total). Per (database, company) the table keeps calls,
//! rows, errors, total/min/max time, a latency histogram giving p50/p95/p99 within 3.125 % (see
//! `histogram.rs`), per-minute calls for the last 15 minutes and the activity since the last history
//! snapshot. Views over it: company_stats, problem_companies; history: stats_history written by
//! snapshot_stats() (called by a background worker), rolled up by stats_hourly/daily/weekly.
//!
//! Files: `histogram.rs` and `counters.rs` are the pure arithmetic (unit-tested without a server);
//! `table.rs` the shared-memory table, its locks, eviction and the file that carries it across a
//! clean restart; `hooks.rs` where statements and errors are observed; `sql.rs` the SQL functions;
//! `worker.rs` the snapshot worker; `sql/stats.sql` the views, the history table and the privileges.
//!
//! Without `shared_preload_libraries` no hook or worker is installed, the settings still exist (so
//! `SET tenant_scale.company` keeps working for other features and the client crate), and every SQL
//! entry point raises SQLSTATE 55000 with a HINT through `shmem::Region::get`.

mod counters;
mod histogram;
mod hooks;
mod sql;
mod table;
mod worker;

pub(crate) use hooks::{
    add_execution_time, is_timed, settled_at_commit, statement_ending, statement_started, statement_starting,
    subtransaction_event, transaction_event,
};

use std::ffi::{CStr, CString, c_char, c_void};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

pgrx::extension_sql_file!(
    "../../sql/stats.sql",
    name = "stats",
    requires = [sql::company_stats_raw, sql::stats_info, sql::stats_reset, sql::snapshot_intervals]
);

/// Which statements are counted (`tenant_scale.track`).
#[derive(Clone, Copy, PartialEq, Eq, PostgresGucEnum)]
pub(crate) enum Track {
    #[name = c"none"]
    None,
    #[name = c"top"]
    Top,
    #[name = c"all"]
    All,
}

static COMPANY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static TRACK: GucSetting<Track> = GucSetting::<Track>::new(Track::Top);
static MAX_COMPANIES: GucSetting<i32> = GucSetting::<i32>::new(10_000);
static PROBLEM_ERROR_RATE: GucSetting<f64> = GucSetting::<f64>::new(0.05);
static PROBLEM_P95_MS: GucSetting<f64> = GucSetting::<f64>::new(500.0);
static PROBLEM_MIN_CALLS: GucSetting<i32> = GucSetting::<i32>::new(20);
static SNAPSHOT_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static HISTORY_DAYS: GucSetting<i32> = GucSetting::<i32>::new(30);

/// Defines the `tenant_scale.*` settings of this capability; lib.rs calls it before reserving the prefix.
pub(crate) fn register_gucs() {
    // SAFETY: the check hook is a #[pg_guard] function that only inspects its argument.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"tenant_scale.company",
            c"Company the session's statements are counted for in tenant_scale's statistics.",
            c"Read when each statement starts, so SET LOCAL and set_config(..., true) apply per transaction. \
              Empty means unattributed: such statements only add to stats_info().unattributed_calls. \
              At most 63 bytes. The tenant_scale client crate sets it when a connection is checked out.",
            &COMPANY,
            GucContext::Userset,
            // Reported to the client whenever it changes (like application_name), so a pool can tell
            // which company a connection carries without asking and skip a SET that would change nothing.
            GucFlags::REPORT,
            Some(check_company),
            Some(assign_company),
            None,
        );
    }
    GucRegistry::define_enum_guc(
        c"tenant_scale.track",
        c"Which statements tenant_scale counts per company: top, all or none.",
        c"top counts statements sent by clients; all also counts statements run inside functions, \
          procedures and DO blocks; none turns per-company statistics off.",
        &TRACK,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"tenant_scale.problem_error_rate",
        c"Error rate above which problem_companies reports a company.",
        c"errors / (calls + errors), between 0 and 1.",
        &PROBLEM_ERROR_RATE,
        0.0,
        1.0,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"tenant_scale.problem_p95_ms",
        c"95th percentile latency above which problem_companies reports a company.",
        c"In milliseconds unless a unit is given.",
        &PROBLEM_P95_MS,
        0.0,
        86_400_000.0,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"tenant_scale.problem_min_calls",
        c"Statements a company must have run before problem_companies judges it.",
        c"Keeps a company with one failed or slow statement out of problem_companies.",
        &PROBLEM_MIN_CALLS,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tenant_scale.snapshot_interval",
        c"Seconds between two snapshots of the statistics into stats_history; 0 turns them off.",
        c"The tenant_scale background worker calls tenant_scale.snapshot_stats() this often in the \
          database tenant_scale.database.",
        &SNAPSHOT_INTERVAL,
        0,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"tenant_scale.history_days",
        c"Days of stats_history kept; older rows are deleted by each snapshot.",
        c"Retention of the per-interval history behind stats_hourly, stats_daily and stats_weekly.",
        &HISTORY_DAYS,
        1,
        3650,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // PostgreSQL refuses (FATAL) to define a server-start setting in a library loaded later.
    if crate::shmem::is_preloaded() {
        GucRegistry::define_int_guc(
            c"tenant_scale.max_companies",
            c"Most (database, company) pairs tenant_scale keeps statistics for.",
            c"Sizes the shared memory reserved at start (about 4 kB per company, see stats_info()). When \
              full, the least active 5 % are evicted and counted in stats_info().evicted.",
            &MAX_COMPANIES,
            100,
            1_000_000,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc(
            c"tenant_scale.database",
            c"Database the snapshot worker connects to and writes stats_history in.",
            c"The extension must be created there; until it is, the worker logs once and waits.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
}

/// Declares the shared-memory table (only takes effect while the library is being preloaded).
pub(crate) fn register_shared_memory() {
    table::REGION.register();
}

/// Installs the error hook (executor hooks and transaction callbacks, shared with quotas, are
/// crate::statements'); only when preloaded, since without shared memory there is nowhere to count.
pub(crate) fn install_hooks() {
    if crate::shmem::is_preloaded() {
        hooks::install();
    }
}

pub(crate) fn register_worker() {
    if crate::shmem::is_preloaded() {
        worker::register();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_company(
    new_value: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value (NULL only for a NULL boot value).
    let value = unsafe { *new_value };
    if value.is_null() {
        return true;
    }
    // SAFETY: a NUL-terminated string owned by the GUC machinery for the duration of the call.
    let Some(problem) = table::company_id_problem(unsafe { CStr::from_ptr(value) }) else { return true };
    let detail = CString::new(problem).unwrap_or_default();
    // SAFETY: the GUC machinery reads these after the hook returns false; the copy is palloc'd in the
    // current context, as GUC_check_errdetail does.
    unsafe {
        pg_sys::GUC_check_errcode(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr());
        pg_sys::GUC_check_errhint_string =
            pg_sys::pstrdup(c"Use a shorter id, for example the company's numeric id or UUID.".as_ptr());
    }
    false
}

#[pg_guard]
unsafe extern "C-unwind" fn assign_company(new_value: *const c_char, _extra: *mut c_void) {
    if !new_value.is_null() {
        // SAFETY: the value check_company accepted, NUL-terminated, owned by the GUC machinery.
        hooks::company_assigned(unsafe { CStr::from_ptr(new_value) });
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn settings_show_in_pg_settings_with_descriptions() {
        let described = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_settings WHERE name IN ('tenant_scale.company', 'tenant_scale.track', \
             'tenant_scale.max_companies', 'tenant_scale.problem_error_rate', 'tenant_scale.problem_p95_ms', \
             'tenant_scale.problem_min_calls', 'tenant_scale.snapshot_interval', 'tenant_scale.database', \
             'tenant_scale.history_days') AND short_desc <> '' AND extra_desc <> ''",
        );
        assert_eq!(described, Ok(Some(9)));
    }

    #[pg_test(
        error = "invalid value for parameter \"tenant_scale.company\": \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\""
    )]
    fn company_ids_longer_than_63_bytes_are_refused() {
        Spi::run(&format!("SET tenant_scale.company = '{}'", "a".repeat(64))).unwrap();
    }

    #[pg_test]
    fn nested_statements_count_only_with_track_all() {
        // Every SPI statement here runs nested inside the statement that called this test.
        Spi::run("SELECT set_config('tenant_scale.company', 'pg_test_nested', true)").unwrap();
        Spi::run("SELECT 1").unwrap();
        Spi::run("SET LOCAL tenant_scale.track = 'all'").unwrap();
        Spi::run("SELECT 1").unwrap();
        Spi::run("SELECT 1").unwrap();
        let calls = Spi::get_one::<i64>(
            "SELECT calls FROM tenant_scale.company_stats WHERE company_id = 'pg_test_nested'",
        );
        assert_eq!(calls, Ok(Some(2)), "the two statements after track = all, not the one before");
    }
}
