//! The one way this crate takes a std mutex.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, also after a thread panicked while holding it. Every std mutex in this crate guards
/// fields that are consistent after each single write (flags, counters, maps), and none is held across
/// an await: what a panicking holder left is usable, and a poisoned lock must not take the pool, cache
/// or limiter down with it.
pub(crate) fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
