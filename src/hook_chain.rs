//! Chaining from tenant_scale's executor and utility hooks to the hook installed before them (or to
//! PostgreSQL's standard function), without pgrx's error conversion.
//!
//! pgrx guards every PostgreSQL function it binds: an ERROR raised inside is caught, turned into a
//! Rust panic and raised again at the outermost Rust frame, keeping only its message, detail, hint
//! and SQLSTATE. A hook sits under every statement, so that path would strip every failing
//! statement's error of its context, cursor position and schema, table, column and constraint names
//! (which applications read). The calls here are therefore unguarded: an ERROR long-jumps straight
//! through the hook to PostgreSQL's own handler, as it would through a hook written in C.
//!
//! The price is the rule every hook must keep: no Rust value that needs dropping (a RefCell borrow,
//! a Vec, a String) may be alive across these calls, and cleanup that C code would do in PG_FINALLY
//! is done by (sub)transaction abort callbacks instead, since an ERROR that escapes a hook always
//! aborts the (sub)transaction it happened in.

use std::ffi::c_char;

use pgrx::pg_sys;

unsafe extern "C-unwind" {
    #[link_name = "standard_ExecutorStart"]
    fn standard_executor_start(query: *mut pg_sys::QueryDesc, eflags: i32);
    #[cfg(not(feature = "pg18"))]
    #[link_name = "standard_ExecutorRun"]
    fn standard_executor_run(
        query: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
        execute_once: bool,
    );
    #[cfg(feature = "pg18")]
    #[link_name = "standard_ExecutorRun"]
    fn standard_executor_run(
        query: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
    );
    #[link_name = "standard_ExecutorFinish"]
    fn standard_executor_finish(query: *mut pg_sys::QueryDesc);
    #[link_name = "standard_ExecutorEnd"]
    fn standard_executor_end(query: *mut pg_sys::QueryDesc);
    #[cfg(not(feature = "pg13"))]
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        statement: *mut pg_sys::PlannedStmt,
        query_string: *const c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        completion: *mut pg_sys::QueryCompletion,
    );
    #[cfg(feature = "pg13")]
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        statement: *mut pg_sys::PlannedStmt,
        query_string: *const c_char,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        completion: *mut pg_sys::QueryCompletion,
    );
}

/// # Safety
/// Called from an ExecutorStart hook with its own arguments; see the module rule on live values.
pub(crate) unsafe fn executor_start(
    previous: pg_sys::ExecutorStart_hook_type,
    query: *mut pg_sys::QueryDesc,
    eflags: i32,
) {
    // SAFETY: per the caller's contract.
    unsafe {
        match previous {
            Some(previous) => previous(query, eflags),
            None => standard_executor_start(query, eflags),
        }
    }
}

/// # Safety
/// Called from an ExecutorRun hook with its own arguments; see the module rule on live values.
#[cfg(not(feature = "pg18"))]
pub(crate) unsafe fn executor_run(
    previous: pg_sys::ExecutorRun_hook_type,
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    // SAFETY: per the caller's contract.
    unsafe {
        match previous {
            Some(previous) => previous(query, direction, count, execute_once),
            None => standard_executor_run(query, direction, count, execute_once),
        }
    }
}

/// # Safety
/// Called from an ExecutorRun hook with its own arguments; see the module rule on live values.
#[cfg(feature = "pg18")]
pub(crate) unsafe fn executor_run(
    previous: pg_sys::ExecutorRun_hook_type,
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
) {
    // SAFETY: per the caller's contract.
    unsafe {
        match previous {
            Some(previous) => previous(query, direction, count),
            None => standard_executor_run(query, direction, count),
        }
    }
}

/// # Safety
/// Called from an ExecutorFinish hook with its own argument; see the module rule on live values.
pub(crate) unsafe fn executor_finish(
    previous: pg_sys::ExecutorFinish_hook_type,
    query: *mut pg_sys::QueryDesc,
) {
    // SAFETY: per the caller's contract.
    unsafe {
        match previous {
            Some(previous) => previous(query),
            None => standard_executor_finish(query),
        }
    }
}

/// # Safety
/// Called from an ExecutorEnd hook with its own argument; see the module rule on live values.
pub(crate) unsafe fn executor_end(previous: pg_sys::ExecutorEnd_hook_type, query: *mut pg_sys::QueryDesc) {
    // SAFETY: per the caller's contract.
    unsafe {
        match previous {
            Some(previous) => previous(query),
            None => standard_executor_end(query),
        }
    }
}

/// # Safety
/// Called from a ProcessUtility hook with its own arguments; see the module rule on live values.
#[cfg(not(feature = "pg13"))]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn process_utility(
    previous: pg_sys::ProcessUtility_hook_type,
    statement: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: per the caller's contract.
    unsafe {
        match previous {
            Some(previous) => previous(
                statement,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                completion,
            ),
            None => standard_process_utility(
                statement,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                completion,
            ),
        }
    }
}

/// # Safety
/// Called from a ProcessUtility hook with its own arguments; see the module rule on live values.
#[cfg(feature = "pg13")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn process_utility(
    previous: pg_sys::ProcessUtility_hook_type,
    statement: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: per the caller's contract.
    unsafe {
        match previous {
            Some(previous) => previous(statement, query_string, context, params, query_env, dest, completion),
            None => standard_process_utility(
                statement,
                query_string,
                context,
                params,
                query_env,
                dest,
                completion,
            ),
        }
    }
}
