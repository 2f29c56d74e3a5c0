//! PostgreSQL accessors called on per-row and per-statement paths, bound without pgrx's per-call guard.
//!
//! pgrx wraps every PostgreSQL function it binds in a sigsetjmp so that an ERROR raised inside
//! becomes a Rust panic. The functions here cannot raise an ERROR as they are called, so the guard
//! would only add its cost to every row or statement (callgrind: about 80 instructions a call):
//! - the accessors only read the transaction state (GetCurrentCommandId raises only when asked to
//!   mark the command used in a parallel worker, which `false` does not);
//! - LWLockAcquire raises only when a backend already holds 200 LWLocks and LWLockRelease only for a
//!   lock not held: callers take one lock and release exactly what they took;
//! - hash_search with HASH_FIND neither allocates nor raises.

use pgrx::pg_sys;

unsafe extern "C-unwind" {
    #[link_name = "GetCurrentSubTransactionId"]
    fn get_current_subtransaction_id() -> pg_sys::SubTransactionId;
    #[link_name = "GetCurrentCommandId"]
    fn get_current_command_id(used: bool) -> pg_sys::CommandId;
    #[link_name = "GetCurrentTransactionNestLevel"]
    fn get_current_transaction_nest_level() -> std::ffi::c_int;
    #[link_name = "GetCurrentStatementStartTimestamp"]
    fn get_current_statement_start_timestamp() -> pg_sys::TimestampTz;
    #[link_name = "LWLockAcquire"]
    fn lwlock_acquire(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> bool;
    #[link_name = "LWLockRelease"]
    fn lwlock_release(lock: *mut pg_sys::LWLock);
    #[link_name = "hash_search"]
    fn hash_search(
        table: *mut pg_sys::HTAB,
        key: *const std::ffi::c_void,
        action: pg_sys::HASHACTION::Type,
        found: *mut bool,
    ) -> *mut std::ffi::c_void;
}

/// Takes a lock this backend does not hold yet.
///
/// # Safety
/// `lock` is an initialised LWLock; the caller releases it with `release_lock` (PostgreSQL releases
/// it too if the transaction aborts first).
pub(crate) unsafe fn acquire_lock(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) {
    unsafe { lwlock_acquire(lock, mode) };
}

/// # Safety
/// `lock` is held by this backend (taken with `acquire_lock`).
pub(crate) unsafe fn release_lock(lock: *mut pg_sys::LWLock) {
    unsafe { lwlock_release(lock) }
}

/// The entry of `key` in `table`, or null.
///
/// # Safety
/// `table` is a valid dynahash table whose keys are `size_of::<K>()` bytes, read under whatever lock
/// protects it.
pub(crate) unsafe fn hash_find<K>(table: *mut pg_sys::HTAB, key: &K) -> *mut std::ffi::c_void {
    unsafe {
        hash_search(
            table,
            std::ptr::from_ref(key).cast(),
            pg_sys::HASHACTION::HASH_FIND,
            std::ptr::null_mut(),
        )
    }
}

pub(crate) fn transaction_nest_level() -> std::ffi::c_int {
    // SAFETY: a read of the transaction state, valid in any backend at any time.
    unsafe { get_current_transaction_nest_level() }
}

pub(crate) fn statement_start() -> pg_sys::TimestampTz {
    // SAFETY: a read of a backend-local timestamp.
    unsafe { get_current_statement_start_timestamp() }
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
