//! Which statement a row change belongs to, for the one kind of statement whose rows cannot be
//! counted as they arrive: INSERT ... ON CONFLICT.
//!
//! A BEFORE INSERT trigger fires for every row an INSERT proposes; ON CONFLICT may then skip the row
//! (DO NOTHING) or update an existing row instead (DO UPDATE), silently. Within such a statement a
//! reservation the limit refuses is deferred instead of raised, every reservation is noted, and once
//! the statement has run (ExecutorFinish) its notes are settled against the rows it really added
//! (ledger::settle_upsert). Every other statement is counted row by row as its rows arrive.
//!
//! The executor hooks (crate::statements) call in at each upsert's start, finish and end, and keep
//! the stack of running statements: a trigger's row belongs to the query on top of it, however
//! statements nest (a function called by one statement runs others).

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::PgList;
use pgrx::pg_sys;
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::backend_local::BackendLocal;

use super::config::{self, QuotaDef};
use super::ledger;

/// What a trigger noted about a row within an upsert.
#[derive(Clone, Copy)]
pub(super) enum Noted {
    /// A row proposed for insertion, or moved here by DO UPDATE, reserved its place.
    Reserved,
    /// Such a row the limit refused: decided when the statement has run.
    Deferred,
    /// A row moved away from this company by DO UPDATE (freed at commit, like a delete).
    MovedOut,
}

/// An upsert's notes about one (quota, company).
pub(super) struct UpsertEntry {
    pub key: Vec<u8>,
    pub def: Rc<QuotaDef>,
    pub company: String,
    pub reserved: i64,
    pub deferred: i64,
    pub moved_out: i64,
}

/// One upsert's notes, by (quota, company) key.
type UpsertNotes = FxHashMap<Vec<u8>, UpsertEntry>;

/// Upserts between ExecutorStart and ExecutorFinish, by QueryDesc address.
#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static UPSERTS: BackendLocal<RefCell<FxHashMap<usize, UpsertNotes>>> =
    BackendLocal::new(RefCell::new(FxHashMap::with_hasher(FxBuildHasher)));

fn with_upserts<R>(f: impl FnOnce(&mut FxHashMap<usize, UpsertNotes>) -> R) -> R {
    UPSERTS.with(|upserts| f(&mut upserts.borrow_mut()))
}

/// True when the row being changed belongs to an INSERT ... ON CONFLICT.
pub(super) fn in_upsert() -> bool {
    current_upsert().is_some()
}

/// False when a trigger fires inside a statement the hooks never saw start: the library was loaded
/// in the middle of it (possible only when it is not preloaded).
pub(super) fn executor_hooks_saw_statement() -> bool {
    crate::statements::depth() > 0
}

fn current_upsert() -> Option<usize> {
    // Most statements are no upsert: then the map is empty and the stack is not even looked at.
    if with_upserts(|upserts| upserts.is_empty()) {
        return None;
    }
    let top = crate::statements::innermost_query()? as usize;
    with_upserts(|upserts| upserts.contains_key(&top)).then_some(top)
}

/// Notes a row change of the current upsert (callers check `in_upsert` first).
pub(super) fn note(key: &[u8], def: &Rc<QuotaDef>, company: &str, noted: Noted) {
    let Some(query) = current_upsert() else { return };
    with_upserts(|upserts| {
        let Some(entries) = upserts.get_mut(&query) else { return };
        let entry = entries.entry(key.to_vec()).or_insert_with(|| UpsertEntry {
            key: key.to_vec(),
            def: def.clone(),
            company: company.to_string(),
            reserved: 0,
            deferred: 0,
            moved_out: 0,
        });
        match noted {
            Noted::Reserved => entry.reserved += 1,
            Noted::Deferred => entry.deferred += 1,
            Noted::MovedOut => entry.moved_out += 1,
        }
    });
}

/// Forgets every upsert (the transaction ended).
pub(super) fn reset() {
    with_upserts(|upserts| upserts.clear());
}

/// Whether no upsert is running (has notes), which is the case for nearly every statement and is what
/// `reset` leaves. Never panics. The executor hooks check this inline and call out only otherwise, so
/// that the map's code stays out of the instruction cache of ordinary statements
/// (benches/instructions counts the misses).
#[inline(always)]
pub(super) fn no_upsert_running() -> bool {
    UPSERTS.with(|upserts| upserts.try_borrow().is_ok_and(|upserts| upserts.is_empty()))
}

/// The notes of `query` if it is a running upsert, which it no longer is.
#[cold]
#[inline(never)]
fn forget_upsert(query: *mut pg_sys::QueryDesc) -> Option<UpsertNotes> {
    with_upserts(|upserts| upserts.remove(&(query as usize)))
}

/// Whether a plan inserts with ON CONFLICT anywhere (top level or in a writable CTE).
#[inline(always)]
unsafe fn has_on_conflict(statement: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: the caller passes the planned statement of a started query.
    unsafe {
        ((*statement).commandType == pg_sys::CmdType::CMD_INSERT || (*statement).hasModifyingCTE)
            && plan_has_on_conflict(statement)
    }
}

/// `has_on_conflict` for a statement that inserts, or may in a writable CTE: the plan is walked out
/// of line.
#[inline(never)]
unsafe fn plan_has_on_conflict(statement: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: the caller passes the planned statement of a started query.
    unsafe {
        let statement = &*statement;
        let is_upsert = |plan: *mut pg_sys::Plan| {
            !plan.is_null()
                && (*plan).type_ == pg_sys::NodeTag::T_ModifyTable
                && (*plan.cast::<pg_sys::ModifyTable>()).onConflictAction
                    != pg_sys::OnConflictAction::ONCONFLICT_NONE
        };
        is_upsert(statement.planTree)
            || PgList::<pg_sys::Plan>::from_pg(statement.subplans).iter_ptr().any(is_upsert)
    }
}

/// ExecutorStart has prepared `query`: an upsert starts collecting notes.
///
/// # Safety
/// `query` has been started (it has its planned statement).
#[inline(always)]
pub(crate) unsafe fn statement_started(query: *mut pg_sys::QueryDesc) {
    // SAFETY: per the caller's contract.
    let upsert = unsafe { has_on_conflict((*query).plannedstmt) };
    // Most statements are no upsert and none is running: nothing to forget or note.
    if upsert || !no_upsert_running() {
        upsert_started(query, upsert);
    }
}

#[cold]
#[inline(never)]
fn upsert_started(query: *mut pg_sys::QueryDesc, upsert: bool) {
    with_upserts(|upserts| {
        // A QueryDesc address can be reused by a later query: whatever was noted under it is stale.
        upserts.remove(&(query as usize));
        if upsert {
            upserts.insert(query as usize, FxHashMap::default());
        }
    });
}

/// ExecutorFinish has run `query` to its end (writable CTEs included): an upsert settles its notes.
///
/// # Safety
/// `query` is between ExecutorStart and ExecutorEnd.
#[inline(always)]
pub(crate) unsafe fn statement_finished(query: *mut pg_sys::QueryDesc) {
    if !no_upsert_running() {
        // SAFETY: per the caller's contract.
        unsafe { upsert_finished(query) };
    }
}

/// # Safety
/// As `statement_finished`.
#[inline(never)]
unsafe fn upsert_finished(query: *mut pg_sys::QueryDesc) {
    let noted = forget_upsert(query);
    if let Some(entries) = noted.filter(|entries| !entries.is_empty()) {
        // SAFETY: the estate of a query between ExecutorStart and ExecutorEnd is valid.
        let command_id = unsafe { (*(*query).estate).es_output_cid };
        ledger::settle_upsert(&config::current(), entries.into_values().collect(), command_id);
    }
}

/// ExecutorEnd: an upsert that did not finish (an error, a cursor closed early) leaves nothing.
#[inline(always)]
pub(crate) fn statement_ending(query: *mut pg_sys::QueryDesc) {
    if !no_upsert_running() {
        forget_upsert(query);
    }
}
