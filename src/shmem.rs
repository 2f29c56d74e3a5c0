//! The only door to shared memory.
//!
//! Shared memory exists only when the library is listed in `shared_preload_libraries`: the postmaster
//! must reserve it before any backend starts. A library loaded later (by `CREATE EXTENSION` or the first
//! call of one of its functions) has none. Every feature that keeps state in shared memory therefore
//! declares a [`Region`] here in `_PG_init` and reaches it only through [`Region::get`], which turns
//! "not preloaded" into a clear SQL error (SQLSTATE 55000 with a HINT), or through
//! [`Region::try_get`] when the feature has a slower fallback. Features that do not need shared
//! memory keep working either way.
//!
//! Lifecycle (as in pg_stat_statements): `_PG_init` registers regions; the shmem request hook (PG 15+,
//! or `_PG_init` itself before) reserves their bytes and named LWLock tranches; the shmem startup hook
//! runs each region's `init` under `AddinShmemInitLock`, in the postmaster at start and again after
//! every crash restart, and backends inherit the resulting pointers through fork. A region may also
//! ask to be saved at a clean shutdown ([`Region::on_clean_shutdown`]): the postmaster calls it once
//! every other process has exited, never after a crash (as pg_stat_statements saves its file).

use std::ffi::CStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// Set in the postmaster during `shared_preload_libraries` processing and inherited by every backend
/// it forks; stays false in a backend that loaded the library on demand.
#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Regions declared by the features, in registration order. Only the postmaster writes it, in
/// `_PG_init`, before any backend exists.
static REGIONS: Mutex<Vec<&'static dyn Reserve>> = Mutex::new(Vec::new());

static mut PREV_SHMEM_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_SHMEM_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;

/// Called first thing in `_PG_init`.
pub(crate) fn note_library_load() {
    // SAFETY: a plain global flag PostgreSQL sets while it runs shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        PRELOADED.store(true, Ordering::Relaxed);
    }
}

pub(crate) fn is_preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Raises SQLSTATE 55000 unless the library was preloaded. `feature` names what the caller wanted,
/// for the message (for example "per-company statistics").
pub(crate) fn require_preloaded(feature: &str) {
    if !is_preloaded() {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{feature} needs tenant_scale in shared_preload_libraries"),
            function_name!(),
        )
        .set_detail("The tenant_scale library was loaded after server start, so it has no shared memory.")
        .set_hint(
            "Add tenant_scale to shared_preload_libraries in postgresql.conf, keeping any \
             libraries already listed there, and restart the server.",
        )
        .report(PgLogLevel::ERROR);
    }
}

/// A feature's piece of shared memory: a root structure `T` (which may point to further structures,
/// such as a shared hash table, that `init` creates) and optionally a named tranche of LWLocks.
pub(crate) struct Region<T: Sync + 'static> {
    name: &'static CStr,
    /// Bytes to reserve, everything `init` allocates included. Called in the postmaster after
    /// `_PG_init`, so it may read postmaster-level GUCs.
    size: fn() -> usize,
    lwlocks: i32,
    /// Creates (or, when `ShmemInitStruct` reports it found, attaches to) the feature's structures.
    /// `locks` is the region's LWLock tranche, or null when it asked for none.
    init: unsafe fn(locks: *mut pg_sys::LWLockPadded) -> *mut T,
    /// Runs in the postmaster at a clean shutdown, when no other process can touch the region.
    save: Option<fn(&'static T)>,
    root: AtomicPtr<T>,
}

impl<T: Sync + 'static> Region<T> {
    pub(crate) const fn new(
        name: &'static CStr,
        size: fn() -> usize,
        lwlocks: i32,
        init: unsafe fn(locks: *mut pg_sys::LWLockPadded) -> *mut T,
    ) -> Self {
        Region { name, size, lwlocks, init, save: None, root: AtomicPtr::new(std::ptr::null_mut()) }
    }

    /// Has `save` called with the region at a clean server shutdown (not after a crash).
    pub(crate) const fn on_clean_shutdown(mut self, save: fn(&'static T)) -> Self {
        self.save = Some(save);
        self
    }

    /// Declares the region; does nothing unless the library is being preloaded.
    pub(crate) fn register(&'static self) {
        if !is_preloaded() {
            return;
        }
        let mut regions = REGIONS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if regions.is_empty() {
            install_hooks();
        }
        regions.push(self);
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        // SAFETY: before PostgreSQL 15 add-ins reserve shared memory directly from _PG_init.
        unsafe {
            self.reserve();
        }
    }

    /// The region, or SQLSTATE 55000 naming `feature` when the library was not preloaded.
    pub(crate) fn get(&self, feature: &str) -> &'static T {
        require_preloaded(feature);
        self.try_get().unwrap_or_else(|| {
            // Preloaded but not initialised would be a bug in this module, not a user error.
            pgrx::error!("tenant_scale: shared memory region {:?} was not initialised", self.name)
        })
    }

    /// The region when the library was preloaded, for features that have a fallback without it.
    pub(crate) fn try_get(&self) -> Option<&'static T> {
        // SAFETY: the pointer is either null or was set once by `init` to a structure in shared
        // memory that lives as long as the server.
        unsafe { self.root.load(Ordering::Acquire).as_ref() }
    }
}

/// What the hooks need of a region, whatever its root type.
trait Reserve: Sync {
    unsafe fn reserve(&self);
    unsafe fn start(&self);
    fn save(&self);
}

impl<T: Sync + 'static> Reserve for Region<T> {
    unsafe fn reserve(&self) {
        // SAFETY: called from the shmem request hook (or _PG_init before PG 15), as PostgreSQL requires.
        unsafe {
            pg_sys::RequestAddinShmemSpace((self.size)());
            if self.lwlocks > 0 {
                pg_sys::RequestNamedLWLockTranche(self.name.as_ptr(), self.lwlocks);
            }
        }
    }

    unsafe fn start(&self) {
        // SAFETY: called from the shmem startup hook with AddinShmemInitLock held.
        unsafe {
            let locks = if self.lwlocks > 0 {
                pg_sys::GetNamedLWLockTranche(self.name.as_ptr())
            } else {
                std::ptr::null_mut()
            };
            self.root.store((self.init)(locks), Ordering::Release);
        }
    }

    fn save(&self) {
        if let (Some(save), Some(root)) = (self.save, self.try_get()) {
            save(root);
        }
    }
}

fn install_hooks() {
    // SAFETY: _PG_init runs single-threaded in the postmaster; saving and replacing hook pointers is
    // how PostgreSQL add-ins chain their hooks.
    unsafe {
        PREV_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        {
            PREV_SHMEM_REQUEST_HOOK = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(shmem_request);
        }
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by PostgreSQL in the postmaster at the point add-ins must reserve memory.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST_HOOK {
            prev();
        }
        for region in REGIONS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter() {
            region.reserve();
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: called by PostgreSQL once shared memory exists; AddinShmemInitLock (MainLWLockArray
    // slot 21 in every supported version) serialises add-ins that initialise shared structures.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP_HOOK {
            prev();
        }
        let addin_shmem_init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(addin_shmem_init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        for region in REGIONS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter() {
            region.start();
        }
        pg_sys::LWLockRelease(addin_shmem_init_lock);
        // Only the postmaster saves: it outlives every backend. After a crash restart this hook runs
        // again, after shmem_exit has run and forgotten the previous registration.
        if !pg_sys::IsUnderPostmaster {
            pg_sys::on_shmem_exit(Some(shmem_shutdown), pg_sys::Datum::from(0));
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_shutdown(code: i32, _arg: pg_sys::Datum) {
    // A non-zero code is a crash or a failed start: the regions may be inconsistent, keep nothing.
    if code != 0 {
        return;
    }
    for region in REGIONS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter() {
        region.save();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn test_cluster_preloads_the_library() {
        assert!(super::is_preloaded());
        super::require_preloaded("this test");
    }
}
