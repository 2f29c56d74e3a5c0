//! State private to one backend process, in a plain `static` instead of a `thread_local!`.
//!
//! Why: a `thread_local!` in a shared library is reached through `__tls_get_addr` on every access,
//! and the executor hooks, transaction callbacks and quota trigger touch such state several times per
//! statement or row (callgrind: about 450 instructions per pgbench -S transaction, a quarter of what
//! the statistics cost). A plain static is one load.
//!
//! Why it is sound: a PostgreSQL backend runs every hook, callback and SQL function on its one main
//! thread (pgrx refuses calls into PostgreSQL from any other), and this extension starts no threads,
//! so a `BackendLocal` is never reached from two threads. Each forked process has its own copy, as it
//! would of a thread-local. Interior mutability (`Cell`, `RefCell`) inside works as in a thread-local:
//! re-entrancy, not concurrency, is what its borrows guard against. Plain `#[test]`s run on several
//! threads, so they must not reach one (the modules that hold one are tested inside PostgreSQL).

/// A value owned by the backend's main thread, used like `LocalKey`: `STATE.with(|state| ...)`.
pub(crate) struct BackendLocal<T>(T);

// SAFETY: see the module documentation: only the backend's main thread ever reaches the value.
unsafe impl<T> Sync for BackendLocal<T> {}

impl<T> BackendLocal<T> {
    pub(crate) const fn new(value: T) -> BackendLocal<T> {
        BackendLocal(value)
    }

    pub(crate) fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.0)
    }
}
