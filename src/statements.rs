//! The executor and utility hooks and the (sub)transaction callbacks, installed once for every module
//! that watches statements, and the stack of statements running in this backend that both read.
//!
//! Quotas need to know which statement a trigger's row belongs to (an INSERT ... ON CONFLICT is
//! settled once it has run, quota/statement.rs); statistics need each statement's start and end, how
//! deeply it is nested and how long its runs take (stats/hooks.rs); both settle their state when
//! (sub)transactions end. One set of hooks and callbacks serves both, so a statement or transaction
//! event crosses into Rust once, not once per module (each crossing enters a guard).
//!
//! Invariants:
//! - ExecutorRun and ExecutorFinish push their query (BEFORE triggers fire in one or the other) and
//!   ProcessUtility pushes a marker (COPY fires triggers without the executor), popping when they
//!   return: a trigger's row belongs to the query on top, and the stack's depth is the nesting depth
//!   (0 for a statement the client sent).
//! - The clock is read around ExecutorRun and ExecutorFinish only for a query the statistics time (and
//!   around ExecutorFinish only when it can run something, see `finish_can_take_time`); a run that
//!   fails never reports its time (the statement is counted as an error instead).
//! - Every hook chains to the one installed before it (crate::hook_chain, unguarded, so nothing that
//!   needs dropping is alive across the chained call). A statement that fails never returns, so a
//!   (sub)transaction abort puts the stack back where it was when the (sub)transaction started.
//! - The statistics' parts run only when the library was preloaded (their shared memory exists).
//! - The stack lives in a RefCell borrowed only for a push, pop or read, never across a call into
//!   PostgreSQL, so an error raised anywhere never meets it borrowed (emit_log_hook only tries).
//!
//! The statics every statement reads (this module's, the statistics' and the quotas' state, the
//! settings they check, the shared-memory roots) are placed together in one linker section,
//! `.data.tenant_scale.per_statement`, instead of wherever the linker puts each: a statement then
//! brings in a handful of cache lines of them, in a row, rather than one or two per static
//! (benches/instructions counts the lines that left the first-level cache as L1 misses). How much
//! a line costs on a busy server is not settled: 16 more in a row measured as no change
//! (benches/RESULTS.md).

use std::cell::RefCell;
use std::ffi::c_void;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::backend_local::BackendLocal;
use crate::{hook_chain, quota, shmem, stats};

#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static mut PREV_EXECUTOR_RUN: pg_sys::ExecutorRun_hook_type = None;
#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static mut PREV_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;
#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static mut PREV_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

enum Running {
    Query(*mut pg_sys::QueryDesc),
    Utility,
}

struct Stack {
    running: Vec<Running>,
    /// (subtransaction, stack depth when it started), innermost last.
    subtransactions: Vec<(pg_sys::SubTransactionId, usize)>,
}

#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static STACK: BackendLocal<RefCell<Stack>> =
    BackendLocal::new(RefCell::new(Stack { running: Vec::new(), subtransactions: Vec::new() }));

pub(crate) fn install() {
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
        pg_sys::RegisterXactCallback(Some(transaction_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subtransaction_event), std::ptr::null_mut());
    }
}

/// How many executor runs and utility commands are running: 0 between statements the client sent.
/// Readable from emit_log_hook (0 if the stack happens to be borrowed).
pub(crate) fn depth() -> usize {
    STACK.with(|stack| stack.try_borrow().map_or(0, |stack| stack.running.len()))
}

/// The query whose executor runs innermost, unless a utility command runs inside it.
pub(crate) fn innermost_query() -> Option<*mut pg_sys::QueryDesc> {
    STACK.with(|stack| match stack.borrow().running.last() {
        Some(Running::Query(query)) => Some(*query),
        _ => None,
    })
}

/// No statement running and no subtransaction open: what COMMIT leaves the stack as. Never panics.
fn stack_is_empty() -> bool {
    STACK.with(|stack| {
        stack.try_borrow().is_ok_and(|stack| stack.running.is_empty() && stack.subtransactions.is_empty())
    })
}

fn push(running: Running) {
    STACK.with(|stack| stack.borrow_mut().running.push(running));
}

fn pop() {
    STACK.with(|stack| stack.borrow_mut().running.pop());
}

/// What `#[pg_guard]` does for the executor hooks, inline: a panic (a bug) becomes a PostgreSQL
/// ERROR instead of unwinding into C. `#[pg_guard]` runs the body in a function of its own, called
/// through the GOT, and returns its outcome through memory; for hooks that run for every statement
/// that is several more cache lines of code and data per statement (benches/instructions). Here
/// `catch_unwind` costs nothing until something panics, and only then is pgrx's guard entered, to
/// raise the panic as it would have.
#[inline(always)]
fn guarded<R>(body: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(panic) => raise(panic),
    }
}

#[cold]
#[inline(never)]
fn raise(panic: Box<dyn std::any::Any + Send>) -> ! {
    // SAFETY: the function `#[pg_guard]` expands to, with a body that only resumes the panic: it
    // turns it into a PostgreSQL ERROR (a long jump), exactly as for a panic inside that body.
    unsafe { pg_sys::submodules::panic::pgrx_extern_c_guard::<_, ()>(|| std::panic::resume_unwind(panic)) };
    unreachable!("pgrx raises a panic as an ERROR, which does not return")
}

unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    guarded(|| {
        let attribution = if shmem::is_preloaded() { stats::statement_starting(eflags) } else { None };
        // SAFETY: chaining with PostgreSQL's own arguments.
        unsafe { hook_chain::executor_start(PREV_EXECUTOR_START, query, eflags) };
        // SAFETY: ExecutorStart succeeded: the query has its planned statement and executor state.
        unsafe { quota::statement_started(query) };
        if let Some(attribution) = attribution {
            stats::statement_started(query, attribution);
        }
    })
}

/// The clock when a run (or the finish) of `query` starts, if the statistics time it.
fn execution_started(query: *mut pg_sys::QueryDesc) -> Option<i64> {
    (shmem::is_preloaded() && stats::is_timed(query)).then(monotonic_nanos)
}

fn execution_ended(query: *mut pg_sys::QueryDesc, started: Option<i64>) {
    if let Some(started) = started {
        stats::add_execution_time(query, monotonic_nanos() - started);
    }
}

/// Whether `query`'s ExecutorFinish can do work worth timing: AFTER triggers and the rest of writable
/// CTEs run there. A plain SELECT queues neither (a function it calls runs its statements in executors
/// of their own), so its finish is not timed: two clock reads out of a -S transaction's four.
///
/// # Safety
/// `query` is a started query.
unsafe fn finish_can_take_time(query: *mut pg_sys::QueryDesc) -> bool {
    // SAFETY: a started query has its planned statement.
    unsafe { (*query).operation != pg_sys::CmdType::CMD_SELECT || (*(*query).plannedstmt).hasModifyingCTE }
}

/// CLOCK_MONOTONIC (the clock PostgreSQL's instrumentation reads) in nanoseconds. Read directly:
/// `std::time::Instant` adds checks that cost more than the clock read itself.
fn monotonic_nanos() -> i64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes the current time into `now`; CLOCK_MONOTONIC is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec * 1_000_000_000 + now.tv_nsec
}

#[cfg(not(feature = "pg18"))]
unsafe extern "C-unwind" fn executor_run(
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    guarded(|| {
        push(Running::Query(query));
        let started = execution_started(query);
        // SAFETY: chaining with PostgreSQL's own arguments.
        unsafe { hook_chain::executor_run(PREV_EXECUTOR_RUN, query, direction, count, execute_once) };
        execution_ended(query, started);
        pop();
    })
}

#[cfg(feature = "pg18")]
unsafe extern "C-unwind" fn executor_run(
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
) {
    guarded(|| {
        push(Running::Query(query));
        let started = execution_started(query);
        // SAFETY: chaining with PostgreSQL's own arguments.
        unsafe { hook_chain::executor_run(PREV_EXECUTOR_RUN, query, direction, count) };
        execution_ended(query, started);
        pop();
    })
}

unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
    guarded(|| {
        push(Running::Query(query));
        // SAFETY: ExecutorFinish is called with a started query.
        let started = if unsafe { finish_can_take_time(query) } { execution_started(query) } else { None };
        // SAFETY: chaining with PostgreSQL's own argument.
        unsafe { hook_chain::executor_finish(PREV_EXECUTOR_FINISH, query) };
        execution_ended(query, started);
        // Still one level deeper: whatever settling the statement runs is nested in it.
        // SAFETY: the query has run to its end and its executor state is alive until ExecutorEnd.
        unsafe { quota::statement_finished(query) };
        pop();
    })
}

unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    guarded(|| {
        if shmem::is_preloaded() {
            // SAFETY: the executor state is still alive: standard_ExecutorEnd, which frees it, runs
            // below.
            unsafe { stats::statement_ending(query) };
        }
        quota::statement_ending(query);
        // SAFETY: chaining with PostgreSQL's own argument.
        unsafe { hook_chain::executor_end(PREV_EXECUTOR_END, query) };
    })
}

#[cfg(not(feature = "pg13"))]
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
    guarded(|| {
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
    })
}

#[cfg(feature = "pg13")]
unsafe extern "C-unwind" fn process_utility(
    statement: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    guarded(|| {
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
    })
}

/// PostgreSQL calls this at every event of every transaction, and a pgbench -S transaction has two:
/// PRE_COMMIT, which matters only to quotas whose counters are not in shared memory, and COMMIT,
/// which most transactions leave nothing to settle at. Both then return here, before pgrx's guard and
/// the handlers: the handlers' code is not even brought into the instruction cache, which a timed
/// run notices more than their instructions. Nothing here can panic.
unsafe extern "C-unwind" fn transaction_event(event: pg_sys::XactEvent::Type, arg: *mut c_void) {
    let nothing_to_do = match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT => !quota::writes_back_at_pre_commit(),
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            stats::settled_at_commit() && quota::settled_at_commit() && stack_is_empty()
        }
        _ => false,
    };
    if nothing_to_do {
        return;
    }
    // SAFETY: PostgreSQL's own arguments.
    unsafe { handle_transaction_event(event, arg) }
}

/// One handler for every module, called in this order (statistics, quotas, the stack): a
/// transaction event crosses into Rust once.
#[pg_guard]
unsafe extern "C-unwind" fn handle_transaction_event(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    if shmem::is_preloaded() {
        stats::transaction_event(event);
    }
    quota::transaction_event(event);
    if matches!(event, pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_ABORT) {
        STACK.with(|stack| {
            let mut stack = stack.borrow_mut();
            stack.running.clear();
            stack.subtransactions.clear();
        });
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subtransaction_event(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    if shmem::is_preloaded() {
        stats::subtransaction_event(event);
    }
    quota::subtransaction_event(event, subtransaction, parent);
    STACK.with(|stack| {
        let mut stack = stack.borrow_mut();
        match event {
            pg_sys::SubXactEvent::SUBXACT_EVENT_START_SUB => {
                let depth = stack.running.len();
                stack.subtransactions.push((subtransaction, depth));
            }
            pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
                stack.subtransactions.retain(|(started, _)| *started != subtransaction);
            }
            // The statements it was running ended with an error that skipped the hooks' own popping.
            pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
                if let Some(position) =
                    stack.subtransactions.iter().position(|(started, _)| *started == subtransaction)
                {
                    let depth = stack.subtransactions[position].1;
                    stack.subtransactions.truncate(position);
                    stack.running.truncate(depth);
                }
            }
            _ => {}
        }
    });
}
