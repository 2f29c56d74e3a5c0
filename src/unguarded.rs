//! PostgreSQL accessors called on per-row and per-statement paths, bound without pgrx's per-call guard.
//!
//! pgrx wraps every PostgreSQL function it binds in a sigsetjmp so that an ERROR raised inside
//! becomes a Rust panic. The functions here cannot raise an ERROR as they are called, so the guard
//! would only add its cost to every row or statement (callgrind: about 80 instructions a call):
//! - the accessors only read the transaction state (GetCurrentCommandId raises only when asked to
//!   mark the command used in a parallel worker, which `false` does not);
//! - LWLockAcquire raises only when a backend already holds 200 LWLocks and LWLockRelease only for a
//!   lock not held: callers take one lock and release exactly what they took;
//! - hash_search with HASH_FIND neither allocates nor raises;
//! - a spinlock never raises an ERROR (one stuck for about a minute is a PANIC, which ends the
//!   process without unwinding).

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};
#[cfg(target_arch = "x86_64")]
use std::sync::atomic::Ordering;

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
    #[link_name = "hash_search_with_hash_value"]
    fn hash_search_with_hash_value(
        table: *mut pg_sys::HTAB,
        key: *const std::ffi::c_void,
        hash: u32,
        action: pg_sys::HASHACTION::Type,
        found: *mut bool,
    ) -> *mut std::ffi::c_void;
    #[link_name = "SpinLockInit__pgrx_cshim"]
    fn spin_lock_init(lock: *mut pg_sys::slock_t);
    #[cfg(not(target_arch = "x86_64"))]
    #[link_name = "SpinLockAcquire__pgrx_cshim"]
    fn spin_lock_acquire(lock: *mut pg_sys::slock_t);
    #[cfg(not(target_arch = "x86_64"))]
    #[link_name = "SpinLockRelease__pgrx_cshim"]
    fn spin_lock_release(lock: *mut pg_sys::slock_t);
    #[cfg(target_arch = "x86_64")]
    #[link_name = "s_lock"]
    fn s_lock(
        lock: *mut pg_sys::slock_t,
        file: *const std::ffi::c_char,
        line: std::ffi::c_int,
        func: *const std::ffi::c_char,
    ) -> std::ffi::c_int;
}

/// PostgreSQL's SpinLockAcquire on x86-64, inline: one `lock xchg` of the lock byte (its TAS), and
/// only when that finds the lock taken, s_lock, which spins, backs off and reports a stuck lock as
/// PostgreSQL's own callers do. The cshim's out-of-line function, reached through the GOT, is two
/// more calls into code of its own on every statement's slot update.
///
/// # Safety
/// `lock` is an initialised slock_t in memory every process maps.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn spin_lock_acquire(lock: *mut pg_sys::slock_t) {
    // slock_t is an unsigned char on x86-64, and PostgreSQL's TAS an atomic exchange of it with 1.
    // SAFETY: the lock byte is only ever accessed atomically (or by PostgreSQL's own lock code, whose
    // xchg and plain release store are atomic byte accesses too).
    let taken = unsafe { std::sync::atomic::AtomicU8::from_ptr(lock) }.swap(1, Ordering::Acquire) != 0;
    if taken {
        // SAFETY: as PostgreSQL's S_LOCK macro calls it, after a failed TAS.
        unsafe {
            s_lock(lock, c"unguarded.rs".as_ptr(), line!() as std::ffi::c_int, c"spin_lock_acquire".as_ptr())
        };
    }
}

/// PostgreSQL's SpinLockRelease on x86-64: a store of 0 with release ordering (a compiler barrier
/// and a plain store there).
///
/// # Safety
/// This backend holds `lock`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn spin_lock_release(lock: *mut pg_sys::slock_t) {
    // SAFETY: as in `spin_lock_acquire`.
    unsafe { std::sync::atomic::AtomicU8::from_ptr(lock) }.store(0, Ordering::Release);
}

/// A value in shared memory behind PostgreSQL's spinlock, as pgrx's `PgSpinLock` but taken and
/// released without its per-call guard.
#[repr(C)]
pub(crate) struct SpinLock<T> {
    lock: UnsafeCell<pg_sys::slock_t>,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through `lock()`, which holds the spinlock, in any process.
unsafe impl<T> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub(crate) fn new(value: T) -> SpinLock<T> {
        let mut lock = MaybeUninit::<pg_sys::slock_t>::zeroed();
        // SAFETY: initialises the lock in place; an initialised slock_t may then be moved as bytes,
        // as PostgreSQL itself does when it copies structures holding one before first use.
        unsafe {
            spin_lock_init(lock.as_mut_ptr());
            SpinLock { lock: UnsafeCell::new(lock.assume_init()), value: UnsafeCell::new(value) }
        }
    }

    /// Holds the lock until the guard is dropped. Callers do nothing under it that could raise or
    /// take another lock.
    pub(crate) fn lock(&self) -> SpinLockGuard<'_, T> {
        // SAFETY: the lock was initialised in `new`; this backend does not hold it (guards are never
        // nested).
        unsafe { spin_lock_acquire(self.lock.get()) };
        SpinLockGuard { held: self }
    }
}

pub(crate) struct SpinLockGuard<'a, T> {
    held: &'a SpinLock<T>,
}

impl<T> Deref for SpinLockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the spinlock is held for the guard's lifetime.
        unsafe { &*self.held.value.get() }
    }
}

impl<T> DerefMut for SpinLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the spinlock is held for the guard's lifetime, and the guard is borrowed mutably.
        unsafe { &mut *self.held.value.get() }
    }
}

impl<T> Drop for SpinLockGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: taken in `SpinLock::lock`.
        unsafe { spin_lock_release(self.held.lock.get()) };
    }
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

/// The entry of `key`, whose hash value in `table` is `hash`, or null.
///
/// # Safety
/// `table` is a valid dynahash table whose keys are `size_of::<K>()` bytes, read under whatever lock
/// protects it; `hash` is `get_hash_value(table, key)`.
pub(crate) unsafe fn hash_find<K>(table: *mut pg_sys::HTAB, key: &K, hash: u32) -> *mut std::ffi::c_void {
    unsafe {
        hash_search_with_hash_value(
            table,
            std::ptr::from_ref(key).cast(),
            hash,
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
