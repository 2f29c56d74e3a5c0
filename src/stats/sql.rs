//! SQL-callable functions over the shared-memory table. The views, the history table and the
//! privileges are in `sql/stats.sql`; the functions here are the raw rows those views read.
//!
//! Each raises SQLSTATE 55000 with a HINT when the library was not preloaded (`Region::get`), and
//! validates its arguments (SQLSTATE 22023, naming the argument).

use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use super::hooks;
use super::table;

fn timestamp(value: i64) -> Option<TimestampWithTimeZone> {
    TimestampWithTimeZone::try_from(value).ok()
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// One row per (database, company): what the view tenant_scale.company_stats shows, before the
/// database name and the derived columns are added.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity, reason = "pgrx reads the column names from the signature")]
fn company_stats_raw() -> TableIterator<
    'static,
    (
        name!(database_oid, pg_sys::Oid),
        name!(company_id, String),
        name!(calls, i64),
        name!(errors, i64),
        name!(rows, i64),
        name!(total_ms, f64),
        name!(min_ms, Option<f64>),
        name!(max_ms, Option<f64>),
        name!(p50_ms, Option<f64>),
        name!(p95_ms, Option<f64>),
        name!(p99_ms, Option<f64>),
        name!(calls_last_minute, i64),
        name!(calls_last_15min, i64),
        name!(first_seen, Option<TimestampWithTimeZone>),
        name!(last_seen, Option<TimestampWithTimeZone>),
        name!(stats_since, Option<TimestampWithTimeZone>),
    ),
> {
    let now = now();
    let rows = table::summaries(now).into_iter().map(|(key, summary)| {
        (
            key.database(),
            key.company(),
            summary.calls as i64,
            summary.errors as i64,
            summary.rows as i64,
            summary.total_ms,
            summary.min_ms,
            summary.max_ms,
            summary.p50_ms,
            summary.p95_ms,
            summary.p99_ms,
            summary.calls_last_minute as i64,
            summary.calls_last_15min as i64,
            timestamp(summary.first_seen),
            timestamp(summary.last_seen),
            timestamp(summary.stats_since),
        )
    });
    TableIterator::new(rows.collect::<Vec<_>>())
}

/// The table itself: capacity, use, evictions, unattributed statements, memory, last full reset.
#[pg_extern(volatile, parallel_restricted)]
fn stats_info() -> TableIterator<
    'static,
    (
        name!(max_companies, i64),
        name!(tracked, i64),
        name!(evicted, i64),
        name!(unattributed_calls, i64),
        name!(shared_memory_bytes, i64),
        name!(stats_reset, Option<TimestampWithTimeZone>),
    ),
> {
    let info = table::info();
    TableIterator::once((
        info.max_companies as i64,
        info.tracked as i64,
        info.evicted as i64,
        info.unattributed_calls as i64,
        info.shared_memory_bytes as i64,
        timestamp(info.stats_reset),
    ))
}

/// Zeroes the figures of `company_id` in every database, or of every company (and stats_info's
/// counters) when it is NULL. Returns how many (database, company) entries were reset.
#[pg_extern(volatile, parallel_unsafe)]
fn stats_reset(company_id: default!(Option<&str>, "NULL")) -> i64 {
    if let Some(company) = company_id {
        if company.is_empty() {
            invalid_company_id("company_id must not be empty", None, "Pass NULL to reset every company.");
        }
        if let Some(problem) = CString::new(company).ok().and_then(|id| table::company_id_problem(&id)) {
            invalid_company_id(
                "company_id is too long",
                Some(&problem),
                "Pass the id exactly as tenant_scale.company was set.",
            );
        }
    }
    table::reset(company_id.map(str::as_bytes), now()) as i64
}

fn invalid_company_id(message: &'static str, detail: Option<&str>, hint: &'static str) -> ! {
    let mut report =
        ErrorReport::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, function_name!())
            .set_hint(hint);
    if let Some(detail) = detail {
        report = report.set_detail(detail);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Activity of every company since the last committed snapshot; the baselines move past it when the
/// calling transaction commits (never if it rolls back). Used by tenant_scale.snapshot_stats().
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity, reason = "pgrx reads the column names from the signature")]
fn snapshot_intervals() -> TableIterator<
    'static,
    (
        name!(snapshot_at, Option<TimestampWithTimeZone>),
        name!(database_oid, pg_sys::Oid),
        name!(company_id, String),
        name!(calls, i64),
        name!(errors, i64),
        name!(rows, i64),
        name!(total_ms, f64),
        name!(p95_ms, Option<f64>),
    ),
> {
    let taken_at = now();
    let intervals = table::intervals();
    let rows: Vec<_> = intervals
        .iter()
        .map(|(key, interval)| {
            (
                timestamp(taken_at),
                key.database(),
                key.company(),
                interval.calls as i64,
                interval.errors as i64,
                interval.rows as i64,
                interval.total_ms,
                interval.p95_ms,
            )
        })
        .collect();
    hooks::commit_with_transaction(intervals);
    TableIterator::new(rows)
}
