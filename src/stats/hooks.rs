//! Where statements are observed: their start and end (calls, time, rows), called from the executor
//! hooks of crate::statements, whose stack also gives each statement's nesting depth; emit_log_hook
//! (errors) and transaction callbacks (flushing errors, committing snapshot baselines).
//!
//! Invariants:
//! - emit_log_hook chains to the hook it replaced (saved in `PREV_EMIT_LOG`, set once in the
//!   postmaster's `_PG_init`), as pg_stat_statements does.
//! - The nesting depth is crate::statements' stack, which a (sub)transaction abort puts back where it
//!   was (plpgsql EXCEPTION blocks; a SAVEPOINT starts its subtransaction at depth 0, when its
//!   statement ends).
//! - `Backend` is this backend's private state, touched only from the main thread. No `RefCell`
//!   borrow is held across a call that can raise a PostgreSQL error, and emit_log_hook only
//!   `try_borrow`s, so an error raised anywhere can never meet a borrowed cell.
//! - Attribution is read when a statement starts (ExecutorStart): `SET LOCAL` and
//!   `set_config(.., true)` apply to the statements that start after them.
//! - `tenant_scale.company`'s assign hook keeps `Backend::company` (the id and a generation that
//!   changes with every assignment), so that a statement's start reads a number instead of measuring
//!   and copying the setting. A capture names its company by generation; when the setting changes
//!   while statements started under the old value still run, the hook hands them its key.
//! - A statement that fails never reaches ExecutorEnd. Its error is seen in emit_log_hook (which must
//!   not touch shared memory: it may run while this backend holds the table's lock), kept in
//!   `Backend::pending_errors`, and written at the (sub)transaction abort that always follows an
//!   ERROR, after PostgreSQL released every LWLock; its capture is dropped there too.
//! - Errors are seen only when PostgreSQL logs them (`log_min_messages` at `error` or below, the
//!   default `warning` included); errors caught by a PL/pgSQL EXCEPTION block did not end a statement
//!   and are not counted.

use std::cell::RefCell;
use std::ffi::{CStr, c_int};

use pgrx::GucEnum;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use super::counters::Interval;
use super::table::{self, COMPANY_ID_MAX_BYTES, CompanyKey};
use super::{TRACK, Track};
use crate::backend_local::BackendLocal;
use crate::{statements, unguarded};

static mut PREV_EMIT_LOG: pg_sys::emit_log_hook_type = None;

/// Who a tracked statement is counted for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attribution {
    /// The company `tenant_scale.company` named at that `CurrentCompany::generation`.
    Company(u64),
    /// `tenant_scale.company` was empty: only counted in stats_info().unattributed_calls.
    Unattributed,
}

/// The value of `tenant_scale.company`, as its assign hook last saw it.
struct CurrentCompany {
    /// Different for every assignment, even of the same value; never 0.
    generation: u64,
    length: usize,
    id: [u8; COMPANY_ID_MAX_BYTES],
}

impl CurrentCompany {
    fn attribution(&self) -> Attribution {
        if self.length == 0 { Attribution::Unattributed } else { Attribution::Company(self.generation) }
    }

    /// The key of the company named, in this backend's database (`None` when unattributed).
    fn key(&self) -> Option<CompanyKey> {
        // SAFETY: a plain global, set before any statement runs.
        CompanyKey::new(unsafe { pg_sys::MyDatabaseId }, &self.id[..self.length])
    }
}

/// A statement seen at ExecutorStart and not yet at ExecutorEnd.
struct Capture {
    query: *const pg_sys::QueryDesc,
    attribution: Attribution,
    /// The key of its company, handed over by the assign hook when the setting changed while it ran
    /// (its generation is no longer current).
    superseded: Option<Box<CompanyKey>>,
    started: i64,
    /// Nanoseconds spent in its ExecutorRun and ExecutorFinish so far (what pg_stat_statements counts
    /// as execution time: not the time a cursor waits between fetches).
    executing_nanos: i64,
    /// Transaction nesting level at start: a subtransaction abort drops the captures it started.
    xact_level: c_int,
}

/// Snapshot intervals read by this transaction, applied to the baselines only if it commits.
struct PendingSnapshot {
    xact_level: c_int,
    intervals: Vec<(CompanyKey, Interval)>,
}

struct Backend {
    company: RefCell<CurrentCompany>,
    captures: RefCell<Vec<Capture>>,
    pending_errors: RefCell<Vec<(CompanyKey, i64)>>,
    pending_snapshots: RefCell<Vec<PendingSnapshot>>,
}

#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static BACKEND: BackendLocal<Backend> = BackendLocal::new(Backend {
    company: RefCell::new(CurrentCompany { generation: 0, length: 0, id: [0; COMPANY_ID_MAX_BYTES] }),
    captures: RefCell::new(Vec::new()),
    pending_errors: RefCell::new(Vec::new()),
    pending_snapshots: RefCell::new(Vec::new()),
});

pub(super) fn install() {
    // SAFETY: _PG_init runs once, single-threaded, in the postmaster; saving the previous hook and
    // installing ours is how PostgreSQL add-ins chain.
    unsafe {
        PREV_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log);
    }
}

/// `tenant_scale.company` takes `company` (checked: at most COMPANY_ID_MAX_BYTES bytes). Called by
/// its assign hook, also when a transaction, subtransaction or function ends and restores an earlier
/// value; never raises.
pub(super) fn company_assigned(company: &CStr) {
    let company = company.to_bytes();
    BACKEND.with(|backend| {
        let Ok(mut current) = backend.company.try_borrow_mut() else { return };
        // Only the latest captures can have started under the value being replaced: generations
        // only grow, and captures are stacked in the order their statements started.
        if let (Attribution::Company(replaced), Ok(mut captures)) =
            (current.attribution(), backend.captures.try_borrow_mut())
        {
            let replaced_key = current.key();
            for capture in captures
                .iter_mut()
                .rev()
                .take_while(|capture| capture.attribution == Attribution::Company(replaced))
            {
                capture.superseded = replaced_key.map(Box::new);
            }
        }
        let length = company.len().min(COMPANY_ID_MAX_BYTES);
        current.generation += 1;
        current.length = length;
        current.id[..length].copy_from_slice(&company[..length]);
    });
}

/// The key of a statement's company, from its capture.
fn company_of(capture: &Capture) -> Option<CompanyKey> {
    let Attribution::Company(generation) = capture.attribution else { return None };
    if let Some(key) = &capture.superseded {
        return Some(**key);
    }
    BACKEND.with(|backend| {
        let current = backend.company.try_borrow().ok()?;
        (current.generation == generation).then(|| current.key()).flatten()
    })
}

/// Whether statements at this nesting depth are tracked in this process.
fn tracking(nesting: usize) -> bool {
    // SAFETY: plain globals; parallel workers report to their leader, which counts the statement.
    let ordinary_backend =
        unsafe { pg_sys::ParallelWorkerNumber < 0 && pg_sys::MyDatabaseId != pg_sys::Oid::INVALID };
    // Read raw: `GucSetting::get` checks the calling thread through a thread-local lookup on every
    // statement, and hooks only ever run on the backend's main thread.
    // Compared as an ordinal: `Track::from_ordinal` is a generated match with a panic arm, one more
    // cache line of code per statement. `none` (or anything else) tracks nothing.
    // SAFETY: a plain read of the setting's variable.
    let track = unsafe { *TRACK.as_ptr() };
    ordinary_backend
        && (track == Track::All.to_ordinal() || (track == Track::Top.to_ordinal() && nesting == 0))
}

/// Who a statement about to start (ExecutorStart) is counted for, `None` when it is not counted.
pub(crate) fn statement_starting(eflags: c_int) -> Option<Attribution> {
    let explain_only = eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as c_int != 0;
    (!explain_only && tracking(statements::depth()))
        .then(|| BACKEND.with(|backend| backend.company.borrow().attribution()))
}

/// ExecutorStart has prepared `query`, counted for `attribution`.
///
/// Its execution time is measured by crate::statements around ExecutorRun and ExecutorFinish (see
/// `is_timed`), not with PostgreSQL's instrumentation in `queryDesc->totaltime`: that also sums buffer
/// and WAL usage on every run, which these statistics do not keep (about 600 instructions per
/// statement), and a timer allocated there with less than INSTRUMENT_ALL would hand zero buffer
/// usage to pg_stat_statements or auto_explain when they find it already allocated.
pub(crate) fn statement_started(query: *mut pg_sys::QueryDesc, attribution: Attribution) {
    let capture = Capture {
        query,
        attribution,
        superseded: None,
        started: unguarded::statement_start(),
        executing_nanos: 0,
        xact_level: unguarded::transaction_nest_level(),
    };
    BACKEND.with(|backend| backend.captures.borrow_mut().push(capture));
}

/// Whether `query`'s runs are timed: it is counted for a company (unattributed statements are only
/// counted).
pub(crate) fn is_timed(query: *const pg_sys::QueryDesc) -> bool {
    BACKEND.with(|backend| {
        let captures = backend.captures.borrow();
        capture_of(&captures, query)
            .is_some_and(|position| matches!(captures[position].attribution, Attribution::Company(_)))
    })
}

/// Adds a run's (or the finish's) time to `query`'s capture. The capture may be gone: a procedure's
/// COMMIT drops the captures of the transaction that ended, holdable cursors' included.
pub(crate) fn add_execution_time(query: *const pg_sys::QueryDesc, nanos: i64) {
    BACKEND.with(|backend| {
        let mut captures = backend.captures.borrow_mut();
        if let Some(position) = capture_of(&captures, query) {
            captures[position].executing_nanos += nanos;
        }
    });
}

/// Where `query`'s capture is, searching from the innermost statement.
fn capture_of(captures: &[Capture], query: *const pg_sys::QueryDesc) -> Option<usize> {
    captures.iter().rposition(|capture| std::ptr::eq(capture.query, query))
}

/// ExecutorEnd is about to free `query`: errors noted meanwhile, and the statement's figures.
///
/// # Safety
/// `query`'s executor state is still alive.
pub(crate) unsafe fn statement_ending(query: *mut pg_sys::QueryDesc) {
    flush_pending_errors();
    let capture = BACKEND.with(|backend| {
        let mut captures = backend.captures.borrow_mut();
        let position = capture_of(&captures, query)?;
        // Nearly always the innermost: popped, without the memmove (a library call) of a remove.
        if position + 1 == captures.len() { captures.pop() } else { Some(captures.remove(position)) }
    });
    if let Some(capture) = capture {
        // SAFETY: per the caller's contract.
        unsafe { record_completed(query, &capture) };
    }
}

unsafe fn record_completed(query: *mut pg_sys::QueryDesc, capture: &Capture) {
    let Attribution::Company(generation) = capture.attribution else {
        table::count_unattributed_call();
        return;
    };
    // SAFETY: the caller guarantees the query descriptor and its estate are alive.
    let rows = unsafe { (*(*query).estate).es_processed };
    let micros = capture.executing_nanos as f64 / 1_000.0;
    table::record_call(generation, || company_of(capture), micros, rows, capture.started);
}

#[pg_guard]
unsafe extern "C-unwind" fn emit_log(error: *mut pg_sys::ErrorData) {
    // SAFETY: PostgreSQL passes the error being reported.
    if unsafe { (*error).elevel } == PgLogLevel::ERROR as c_int {
        note_error();
    }
    // SAFETY: chaining as PostgreSQL documents.
    unsafe {
        if let Some(prev) = PREV_EMIT_LOG {
            prev(error);
        }
    }
}

/// Remembers an ERROR for the company of the outermost statement running, or, before any statement
/// started (a parse or planning error, a utility command), the company the setting names now.
fn note_error() {
    BACKEND.with(|backend| {
        let nesting = statements::depth();
        let Ok(captures) = backend.captures.try_borrow() else { return };
        let key = match captures.first() {
            Some(outermost) => company_of(outermost),
            None if tracking(nesting) => backend.company.try_borrow().ok().and_then(|current| current.key()),
            None => None,
        };
        drop(captures);
        if let (Some(key), Ok(mut pending)) = (key, backend.pending_errors.try_borrow_mut()) {
            pending.push((key, unguarded::statement_start()));
        }
    });
}

/// Every statement's end checks inline; the writing, which only follows an error, stays out of line
/// and out of the instruction cache of ordinary statements.
#[inline(always)]
fn flush_pending_errors() {
    if !BACKEND.with(|backend| backend.pending_errors.borrow().is_empty()) {
        write_pending_errors();
    }
}

#[cold]
#[inline(never)]
fn write_pending_errors() {
    let pending = BACKEND.with(|backend| std::mem::take(&mut *backend.pending_errors.borrow_mut()));
    for (key, at) in pending {
        table::update(&key, at, |counters| counters.record_errors(1, at));
    }
}

/// Has `intervals` applied to the snapshot baselines if, and only if, the current transaction commits.
pub(super) fn commit_with_transaction(intervals: Vec<(CompanyKey, Interval)>) {
    let xact_level = unguarded::transaction_nest_level();
    BACKEND.with(|backend| {
        backend.pending_snapshots.borrow_mut().push(PendingSnapshot { xact_level, intervals })
    });
}

/// Whether COMMIT has nothing to settle for the statistics: no capture left over, no snapshot waiting
/// for it. Never panics (crate::statements calls it before pgrx's guard); false when the state is
/// borrowed, so the full handler decides.
pub(crate) fn settled_at_commit() -> bool {
    BACKEND.with(|backend| {
        backend.captures.try_borrow().is_ok_and(|captures| captures.is_empty())
            && backend.pending_snapshots.try_borrow().is_ok_and(|pending| pending.is_empty())
    })
}

/// A transaction event, from crate::statements' transaction callback (only when preloaded).
pub(crate) fn transaction_event(event: pg_sys::XactEvent::Type) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            // Every executor of the transaction has ended by now (portals are closed or persisted
            // before this event), so a capture left over could only be a leak: never let them pile up.
            let pending = BACKEND.with(|backend| {
                backend.captures.borrow_mut().clear();
                std::mem::take(&mut *backend.pending_snapshots.borrow_mut())
            });
            for snapshot in pending {
                table::commit_intervals(&snapshot.intervals);
            }
        }
        pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE
            if BACKEND.with(|backend| !backend.pending_snapshots.borrow().is_empty()) =>
        {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "cannot PREPARE a transaction that has run tenant_scale.snapshot_stats()",
                function_name!(),
            )
            .set_detail("The snapshot's baselines move only when its own transaction commits.")
            .set_hint("Run snapshot_stats() in an ordinary transaction.")
            .report(PgLogLevel::ERROR);
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT => {
            BACKEND.with(|backend| {
                backend.captures.borrow_mut().clear();
                backend.pending_snapshots.borrow_mut().clear();
            });
            flush_pending_errors();
        }
        _ => {}
    }
}

/// A subtransaction event, from crate::statements' subtransaction callback (only when preloaded).
pub(crate) fn subtransaction_event(event: pg_sys::SubXactEvent::Type) {
    // The callback runs inside the subtransaction that is ending.
    let level = unguarded::transaction_nest_level();
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            BACKEND.with(|backend| {
                backend.captures.borrow_mut().retain(|capture| capture.xact_level < level);
                backend.pending_snapshots.borrow_mut().retain(|snapshot| snapshot.xact_level < level);
            });
            flush_pending_errors();
        }
        // What the committed subtransaction started now belongs to its parent.
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => BACKEND.with(|backend| {
            for capture in backend.captures.borrow_mut().iter_mut() {
                capture.xact_level = capture.xact_level.min(level - 1);
            }
            for snapshot in backend.pending_snapshots.borrow_mut().iter_mut() {
                snapshot.xact_level = snapshot.xact_level.min(level - 1);
            }
        }),
        _ => {}
    }
}
