//! PostgreSQL accessors called on per-row paths, bound without pgrx's per-call guard.
//!
//! pgrx wraps every PostgreSQL function it binds in a sigsetjmp so that an ERROR raised inside
//! becomes a Rust panic. These accessors only read the transaction state and cannot raise an ERROR
//! (GetCurrentCommandId raises only when asked to mark the command used in a parallel worker, which
//! `false` does not), so the guard would only add its cost to every row.

use pgrx::pg_sys;

unsafe extern "C-unwind" {
    #[link_name = "GetCurrentSubTransactionId"]
    fn get_current_subtransaction_id() -> pg_sys::SubTransactionId;
    #[link_name = "GetCurrentCommandId"]
    fn get_current_command_id(used: bool) -> pg_sys::CommandId;
}

pub(crate) fn current_subtransaction() -> pg_sys::SubTransactionId {
    // SAFETY: a read of the transaction state, valid in any backend at any time.
    unsafe { get_current_subtransaction_id() }
}

/// The command id of the current statement, without marking it used.
pub(crate) fn current_command() -> pg_sys::CommandId {
    // SAFETY: with `used = false` it only reads the transaction state.
    unsafe { get_current_command_id(false) }
}
