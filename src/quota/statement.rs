//! Which statement a row change belongs to, for the one kind of statement whose rows cannot be
//! counted as they arrive: INSERT ... ON CONFLICT.
//!
//! A BEFORE INSERT trigger fires for every row an INSERT proposes; ON CONFLICT may then skip the row
//! (DO NOTHING) or update an existing row instead (DO UPDATE), silently. Within such a statement a
//! reservation the limit refuses is deferred instead of raised, every reservation is noted, and once
//! the statement has run (ExecutorFinish) its notes are settled against the rows it really added
//! (ledger::settle_upsert). Every other statement is counted row by row as its rows arrive.
//!
//! The hooks keep a stack of the statements running in this backend: ExecutorRun and ExecutorFinish
//! push their query (its BEFORE triggers fire in one or the other) and utility commands push a marker
//! (COPY fires triggers without the executor), popping when they return. A statement that fails
//! never returns (hook_chain.rs), so a (sub)transaction abort puts the stack back where it was when
//! the (sub)transaction started. A trigger's row belongs to the statement on top, however statements
//! nest (a function called by one statement runs others). Every hook chains to the one installed
//! before it.

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::PgList;
use pgrx::pg_sys;
use pgrx::prelude::*;
use rustc_hash::FxHashMap;

use super::config::{self, QuotaDef};
use super::ledger;
use crate::hook_chain;

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

enum Running {
    Query(*mut pg_sys::QueryDesc),
    Utility,
}

/// This backend's running statements; one thread-local, so that a hook looks it up once.
#[derive(Default)]
struct Statements {
    stack: Vec<Running>,
    /// (subtransaction, stack depth when it started), innermost last.
    subtransactions: Vec<(pg_sys::SubTransactionId, usize)>,
    /// Upserts between ExecutorStart and ExecutorFinish, by QueryDesc address, with their notes.
    upserts: FxHashMap<usize, FxHashMap<Vec<u8>, UpsertEntry>>,
}

thread_local! {
    static STATEMENTS: RefCell<Statements> = RefCell::new(Statements::default());
}

fn with_statements<R>(f: impl FnOnce(&mut Statements) -> R) -> R {
    STATEMENTS.with(|statements| f(&mut statements.borrow_mut()))
}

static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_EXECUTOR_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREV_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREV_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

pub(super) fn install_hooks() {
    // SAFETY: _PG_init runs once per process, before any statement; saving and replacing the hook
    // pointers is how add-ins chain them.
    unsafe {
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_EXECUTOR_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        PREV_EXECUTOR_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREV_EXECUTOR_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// True when the row being changed belongs to an INSERT ... ON CONFLICT.
pub(super) fn in_upsert() -> bool {
    current_upsert().is_some()
}

/// False when a trigger fires inside a statement the hooks never saw start: the library was loaded
/// in the middle of it (possible only when it is not preloaded).
pub(super) fn executor_hooks_saw_statement() -> bool {
    with_statements(|statements| !statements.stack.is_empty())
}

fn current_upsert() -> Option<usize> {
    with_statements(|statements| {
        // Most statements are no upsert: then the map is empty and the stack is not even looked at.
        if statements.upserts.is_empty() {
            return None;
        }
        let top = match statements.stack.last() {
            Some(Running::Query(query)) => *query as usize,
            _ => return None,
        };
        statements.upserts.contains_key(&top).then_some(top)
    })
}

/// Notes a row change of the current upsert (callers check `in_upsert` first).
pub(super) fn note(key: &[u8], def: &Rc<QuotaDef>, company: &str, noted: Noted) {
    let Some(query) = current_upsert() else { return };
    with_statements(|statements| {
        let Some(entries) = statements.upserts.get_mut(&query) else { return };
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

/// Forgets everything about running statements (the transaction ended).
pub(super) fn reset() {
    with_statements(|statements| {
        statements.stack.clear();
        statements.subtransactions.clear();
        statements.upserts.clear();
    });
}

/// A subtransaction started: remember how deep the stack was, for its abort.
pub(super) fn subtransaction_started(subtransaction: pg_sys::SubTransactionId) {
    with_statements(|statements| {
        let depth = statements.stack.len();
        statements.subtransactions.push((subtransaction, depth));
    });
}

pub(super) fn subtransaction_committed(subtransaction: pg_sys::SubTransactionId) {
    with_statements(|statements| {
        statements.subtransactions.retain(|(started, _)| *started != subtransaction)
    });
}

/// A subtransaction aborted: the statements it was running ended with an error that skipped the
/// hooks' own popping (see hook_chain.rs), so the stack goes back to where it was when it started.
pub(super) fn subtransaction_aborted(subtransaction: pg_sys::SubTransactionId) {
    with_statements(|statements| {
        let starts = &mut statements.subtransactions;
        if let Some(position) = starts.iter().position(|(started, _)| *started == subtransaction) {
            let depth = starts[position].1;
            starts.truncate(position);
            statements.stack.truncate(depth);
        }
    });
}

fn push(running: Running) {
    with_statements(|statements| statements.stack.push(running));
}

fn pop() {
    with_statements(|statements| statements.stack.pop());
}

/// The notes of `query` if it is a running upsert, which it no longer is.
fn forget_upsert(query: *mut pg_sys::QueryDesc) -> Option<FxHashMap<Vec<u8>, UpsertEntry>> {
    with_statements(|statements| {
        let upserts = &mut statements.upserts;
        if upserts.is_empty() { None } else { upserts.remove(&(query as usize)) }
    })
}

/// Whether a plan inserts with ON CONFLICT anywhere (top level or in a writable CTE).
unsafe fn has_on_conflict(statement: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: the caller passes the planned statement of a started query.
    unsafe {
        let statement = &*statement;
        if statement.commandType != pg_sys::CmdType::CMD_INSERT && !statement.hasModifyingCTE {
            return false;
        }
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

// Every hook below calls on through hook_chain with nothing alive that needs dropping.

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: chaining with PostgreSQL's own arguments.
    unsafe { hook_chain::executor_start(PREV_EXECUTOR_START, query, eflags) };
    // A QueryDesc address can be reused by a later query: whatever was noted under it is stale.
    // SAFETY: a started query has its planned statement.
    let upsert = unsafe { has_on_conflict((*query).plannedstmt) };
    with_statements(|statements| {
        let upserts = &mut statements.upserts;
        // Most statements are no upsert and none is running: nothing to forget or note.
        if !upserts.is_empty() {
            upserts.remove(&(query as usize));
        }
        if upsert {
            upserts.insert(query as usize, FxHashMap::default());
        }
    });
}

#[cfg(not(feature = "pg18"))]
#[pg_guard]
unsafe extern "C-unwind" fn executor_run(
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    push(Running::Query(query));
    // SAFETY: chaining with PostgreSQL's own arguments.
    unsafe { hook_chain::executor_run(PREV_EXECUTOR_RUN, query, direction, count, execute_once) };
    pop();
}

#[cfg(feature = "pg18")]
#[pg_guard]
unsafe extern "C-unwind" fn executor_run(
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
) {
    push(Running::Query(query));
    // SAFETY: chaining with PostgreSQL's own arguments.
    unsafe { hook_chain::executor_run(PREV_EXECUTOR_RUN, query, direction, count) };
    pop();
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
    push(Running::Query(query));
    // SAFETY: chaining with PostgreSQL's own argument.
    unsafe { hook_chain::executor_finish(PREV_EXECUTOR_FINISH, query) };
    pop();
    // The upsert (writable CTEs included) has run to the end: settle what it noted.
    let noted = forget_upsert(query);
    if let Some(entries) = noted.filter(|entries| !entries.is_empty()) {
        // SAFETY: the estate of a query between ExecutorStart and ExecutorEnd is valid.
        let command_id = unsafe { (*(*query).estate).es_output_cid };
        ledger::settle_upsert(&config::current(), entries.into_values().collect(), command_id);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    forget_upsert(query);
    // SAFETY: chaining with PostgreSQL's own argument.
    unsafe { hook_chain::executor_end(PREV_EXECUTOR_END, query) };
}

#[cfg(not(feature = "pg13"))]
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    statement: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    push(Running::Utility);
    // SAFETY: chaining with PostgreSQL's own arguments.
    unsafe {
        hook_chain::process_utility(
            PREV_PROCESS_UTILITY,
            statement,
            query_string,
            read_only_tree,
            context,
            params,
            query_env,
            dest,
            completion,
        )
    };
    pop();
}

#[cfg(feature = "pg13")]
#[pg_guard]
unsafe extern "C-unwind" fn process_utility(
    statement: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    push(Running::Utility);
    // SAFETY: chaining with PostgreSQL's own arguments.
    unsafe {
        hook_chain::process_utility(
            PREV_PROCESS_UTILITY,
            statement,
            query_string,
            context,
            params,
            query_env,
            dest,
            completion,
        )
    };
    pop();
}
