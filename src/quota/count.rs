//! Counting a company's rows in an enforced table: the truth every counter caches.
//!
//! Counts never use the statement's snapshot. A counter built from a snapshot taken when the statement
//! began would miss rows that other transactions committed since, and let the company overshoot; so
//! every count runs on a fresh copy of the latest snapshot (see counters.rs for why no change can be
//! missing from it). The copy's command id selects which of this transaction's own rows it sees.

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::config::{Config, QuotaDef};
use crate::elevated::as_extension_owner;

/// FirstCommandId in PostgreSQL's headers (a macro, so not in the bindings).
const FIRST_COMMAND_ID: pg_sys::CommandId = 0;

/// Whose rows a count includes besides everything committed.
pub(super) enum Seeing {
    /// Only committed rows: what a shared counter must hold, since this transaction's own changes are
    /// kept apart (as reservations) until it commits, and vanish if it aborts.
    Committed,
    /// Also this transaction's rows from its earlier commands: for a table it truncated, where its own
    /// view is the whole truth until it ends.
    Ours,
}

/// Rows of `company` (given as a value of the column's type and as text) as of now.
pub(super) fn count_rows(
    config: &Config,
    def: &QuotaDef,
    company_datum: pg_sys::Datum,
    company: &str,
    seeing: Seeing,
) -> i64 {
    // SAFETY: snapshot registration and release around the count, within the current transaction;
    // the snapshot is our private copy, so its command id is ours to set.
    unsafe {
        let snapshot = private_latest_snapshot();
        if let Seeing::Committed = seeing {
            // No command of this transaction precedes command 0, so none of its changes is visible.
            (*snapshot).curcid = FIRST_COMMAND_ID;
        }
        let rows = count_with_snapshot(config, def, company_datum, company, snapshot);
        pg_sys::UnregisterSnapshot(snapshot);
        rows
    }
}

/// Rows of `company` inserted by the command `command_id` of this transaction (the statement that just
/// ran): the count seeing that command minus the count just before it, on one snapshot. A row the
/// command updated counts once in each and nets out; only rows it added remain.
pub(super) fn count_added_by_command(
    config: &Config,
    def: &QuotaDef,
    company_datum: pg_sys::Datum,
    company: &str,
    command_id: pg_sys::CommandId,
) -> i64 {
    // SAFETY: as in count_now; the snapshot is our private copy, so its command id is ours to set.
    unsafe {
        let snapshot = private_latest_snapshot();
        (*snapshot).curcid = command_id + 1;
        let with_command = count_with_snapshot(config, def, company_datum, company, snapshot);
        (*snapshot).curcid = command_id;
        let before_command = count_with_snapshot(config, def, company_datum, company, snapshot);
        pg_sys::UnregisterSnapshot(snapshot);
        with_command - before_command
    }
}

/// A registered copy of the latest snapshot that nobody else holds.
unsafe fn private_latest_snapshot() -> pg_sys::Snapshot {
    // SAFETY: GetLatestSnapshot returns a static snapshot that is not "copied"; RegisterSnapshot then
    // makes a fresh copy registered once, which is ours alone.
    unsafe {
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        debug_assert_eq!((*snapshot).regd_count, 1);
        snapshot
    }
}

unsafe fn count_with_snapshot(
    config: &Config,
    def: &QuotaDef,
    company_datum: pg_sys::Datum,
    company: &str,
    snapshot: pg_sys::Snapshot,
) -> i64 {
    let sql = std::ffi::CString::new(def.count_sql.as_str()).expect("generated SQL has no NUL");
    let company_text = company.into_datum().expect("text is never NULL");
    as_extension_owner(config.owner, || {
        // SAFETY: a balanced SPI_connect/SPI_finish; SPI_execute_snapshot with read_only runs the plan
        // on exactly `snapshot`; the result is read before SPI_finish releases it.
        unsafe {
            pg_sys::SPI_connect();
            let mut argument_types = [def.company_type, pg_sys::TEXTOID];
            let plan = pg_sys::SPI_prepare(sql.as_ptr(), 2, argument_types.as_mut_ptr());
            if plan.is_null() {
                error!("tenant_scale: could not prepare the row count of {}", def.relation);
            }
            let mut values = [company_datum, company_text];
            let status = pg_sys::SPI_execute_snapshot(
                plan,
                values.as_mut_ptr(),
                std::ptr::null(),
                snapshot,
                std::ptr::null_mut(),
                true,
                false,
                1,
            );
            if status != pg_sys::SPI_OK_SELECT as i32 || pg_sys::SPI_processed != 1 {
                error!("tenant_scale: counting the rows of {} failed (SPI status {status})", def.relation);
            }
            let table = &*pg_sys::SPI_tuptable;
            let mut is_null = false;
            let count = pg_sys::SPI_getbinval(*table.vals, table.tupdesc, 1, &mut is_null);
            let rows = if is_null { 0 } else { count.value() as i64 };
            pg_sys::SPI_finish();
            rows
        }
    })
}
