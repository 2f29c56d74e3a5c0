//! Shared counters, one per (database, quota, company): the mode used when tenant_scale is preloaded.
//!
//! Invariants:
//! - `used` is the company's committed rows plus the rows that transactions in flight have reserved.
//!   A reservation is one compare-and-swap that never takes `used` past the limit, so two
//!   transactions can never both take the last row, and no writer waits for another's commit.
//!   Deleted rows are given back only when the deleting transaction commits.
//! - The table's rows are the truth and a counter only caches their count. A counter is built by
//!   counting the company's rows with a snapshot taken after the entry exists, by exactly one backend
//!   while the others wait; nobody reserves on an entry that is not READY. Builders and waiters meet
//!   on a heavyweight lock (an advisory lock tag, `objsubid` 29556 in pg_locks), never a spin, so the
//!   deadlock detector sees a wait for a build like any other lock wait.
//! - Every transaction with unsettled changes on a counter holds a pin on it until it settles at
//!   commit or abort. Only unpinned entries are evicted, so no change can be missing from a count
//!   that rebuilds an evicted counter.
//! - `lock`, one LWLock, protects the hash table's structure: lookups take it shared (pinning what
//!   they find), creation and removal take it exclusive. Counter fields are atomics, changed without
//!   the lock.
//! - A backend keeps the counters it used (ledger.rs) and pins one again without the lock and
//!   without a lookup: pins and a generation share one atomic word, a pin being a compare-and-swap
//!   that requires the generation the backend saw, and a removal being a compare-and-swap that
//!   requires zero pins and bumps the generation. The two exclude each other, so a counter is never
//!   removed while pinned, and a backend never pins a removed (or reused) entry. The generation of an
//!   entry's memory only ever grows, also across reuse for another key.
//! - Memory is fixed at start: `tenant_scale.max_quota_counters` entries. When all are pinned at
//!   once, a new counter cannot be created and the insert fails with SQLSTATE 53200 and a HINT.

use std::cell::Cell;
use std::mem::size_of;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

const PIN: u64 = 1;
const PINS_MASK: u64 = u32::MAX as u64;

fn generation_of(word: u64) -> u32 {
    (word >> 32) as u32
}

use pgrx::pg_sys;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use super::company::CounterKey;
use crate::backend_local::BackendLocal;
use crate::shmem::Region;

static MAX_COUNTERS: GucSetting<i32> = GucSetting::<i32>::new(50_000);

/// Only while preloading: PostgreSQL refuses (FATAL) to define a postmaster-level setting in a
/// backend that loads the library on demand, and without shared memory there are no counters to size.
pub(super) fn register_gucs() {
    if !crate::shmem::is_preloaded() {
        return;
    }
    GucRegistry::define_int_guc(
        c"tenant_scale.max_quota_counters",
        c"Number of (table, company) row counters kept in shared memory.",
        c"Each costs about 150 bytes. When all are in use, the least recently used counter nobody is \
          writing to is dropped and rebuilt from the table when needed again; only when every counter \
          is in use by transactions in flight at once does an insert fail.",
        &MAX_COUNTERS,
        16,
        100_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

#[unsafe(link_section = ".data.tenant_scale.per_statement")]
pub(super) static REGION: Region<Counters> = Region::new(c"tenant_scale_quota", shared_size, 1, init);

const EMPTY: u32 = 0;
const BUILDING: u32 = 1;
const READY: u32 = 2;

#[repr(C)]
pub(super) struct Counter {
    /// First, as the shared hash table requires.
    key: CounterKey,
    used: AtomicI64,
    reserved: AtomicI64,
    /// Generation in the high half, pins in the low half (see the top of the file).
    pins: AtomicU64,
    state: AtomicU32,
    last_use: AtomicU64,
}

pub(super) struct Counters {
    lock: *mut pg_sys::LWLock,
    table: *mut pg_sys::HTAB,
    capacity: i64,
    clock: AtomicU64,
    evicted: AtomicU64,
}

// SAFETY: the raw pointers point into shared memory (the LWLock, the hash table header inherited by
// every backend through fork) and are only dereferenced under the locking rules above.
unsafe impl Sync for Counters {}

fn shared_size() -> usize {
    // SAFETY: size arithmetic helpers that report overflow as an error.
    unsafe {
        pg_sys::add_size(
            size_of::<Counters>(),
            pg_sys::hash_estimate_size(MAX_COUNTERS.get().into(), size_of::<Counter>()),
        )
    }
}

unsafe fn init(locks: *mut pg_sys::LWLockPadded) -> *mut Counters {
    let capacity = i64::from(MAX_COUNTERS.get());
    // SAFETY: called by shmem.rs from the shmem startup hook with AddinShmemInitLock held; the hash
    // table's keys are plain bytes (HASH_BLOBS) of a padding-free struct.
    unsafe {
        let mut found = false;
        let counters =
            pg_sys::ShmemInitStruct(c"tenant_scale_quota root".as_ptr(), size_of::<Counters>(), &mut found)
                .cast::<Counters>();
        let mut info: pg_sys::HASHCTL = std::mem::zeroed();
        info.keysize = size_of::<CounterKey>();
        info.entrysize = size_of::<Counter>();
        let table = pg_sys::ShmemInitHash(
            c"tenant_scale_quota counters".as_ptr(),
            capacity,
            capacity,
            &mut info,
            (pg_sys::HASH_ELEM | pg_sys::HASH_BLOBS) as i32,
        );
        if !found {
            counters.write(Counters {
                lock: &raw mut (*locks).lock,
                table,
                capacity,
                clock: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
            });
        }
        counters
    }
}

/// Shared counters when the library was preloaded; None selects the mode without shared memory.
pub(super) fn shared() -> Option<&'static Counters> {
    REGION.try_get()
}

/// The counter this backend is building, so that an error during the count hands it back.
static BUILDING_HERE: BackendLocal<Cell<*const Counter>> = BackendLocal::new(Cell::new(std::ptr::null()));

/// Called on (sub)transaction abort: a build interrupted by an error is left for another backend.
pub(super) fn abandon_build() {
    let counter = BUILDING_HERE.with(|building| building.replace(std::ptr::null()));
    // SAFETY: a non-null pointer was set while the entry was pinned by this transaction, which has not
    // settled yet (abort callbacks run before the ledger unpins).
    if let Some(counter) = unsafe { counter.as_ref() } {
        counter.state.store(EMPTY, Ordering::Release);
    }
}

impl Counters {
    /// Finds or creates the counter of `key` and pins it for this transaction, returning it with the
    /// generation to re-pin it by later. None when every counter is pinned by a transaction in flight.
    pub fn pin(&self, key: &CounterKey) -> Option<(&'static Counter, u32)> {
        // SAFETY: hash_search under the lock as documented at the top of the file.
        unsafe {
            pg_sys::LWLockAcquire(self.lock, pg_sys::LWLockMode::LW_SHARED);
            let found = self.find(key).map(|counter| (counter, self.pin_found(counter)));
            pg_sys::LWLockRelease(self.lock);
            if found.is_some() {
                return found;
            }

            pg_sys::LWLockAcquire(self.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let counter = self.find(key).or_else(|| self.create(key));
            let pinned = counter.map(|counter| (counter, self.pin_found(counter)));
            pg_sys::LWLockRelease(self.lock);
            pinned
        }
    }

    unsafe fn find(&self, key: &CounterKey) -> Option<&'static Counter> {
        let mut found = false;
        // SAFETY: the caller holds the lock; the key is a padding-free struct of keysize bytes.
        unsafe {
            let entry = pg_sys::hash_search(
                self.table,
                std::ptr::from_ref(key).cast(),
                pg_sys::HASHACTION::HASH_FIND,
                &mut found,
            );
            entry.cast::<Counter>().as_ref()
        }
    }

    unsafe fn create(&self, key: &CounterKey) -> Option<&'static Counter> {
        // SAFETY: the caller holds the lock exclusively.
        unsafe {
            if pg_sys::hash_get_num_entries(self.table) >= self.capacity {
                self.evict();
            }
            if pg_sys::hash_get_num_entries(self.table) >= self.capacity {
                return None;
            }
            let mut found = false;
            let entry = pg_sys::hash_search(
                self.table,
                std::ptr::from_ref(key).cast(),
                pg_sys::HASHACTION::HASH_ENTER_NULL,
                &mut found,
            )
            .cast::<Counter>();
            if entry.is_null() {
                return None;
            }
            // dynahash copied the key; the other fields are ours to initialise.
            (&raw mut (*entry).used).write(AtomicI64::new(0));
            (&raw mut (*entry).reserved).write(AtomicI64::new(0));
            // Memory never used before reads as generation 0; recycled memory keeps its generation.
            let recycled = found_recycled_generation(entry);
            (&raw mut (*entry).pins).write(AtomicU64::new(u64::from(recycled) << 32));
            (&raw mut (*entry).state).write(AtomicU32::new(EMPTY));
            (&raw mut (*entry).last_use).write(AtomicU64::new(0));
            entry.as_ref()
        }
    }

    /// Pins a counter found under the lock (no removal can run meanwhile); returns its generation.
    fn pin_found(&self, counter: &Counter) -> u32 {
        let word = counter.pins.fetch_add(PIN, Ordering::AcqRel);
        counter.last_use.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        generation_of(word)
    }

    /// Removes an unpinned counter (caller holds the lock exclusively); false when it is pinned.
    unsafe fn remove_if_unpinned(&self, counter: &Counter) -> bool {
        let word = counter.pins.load(Ordering::Acquire);
        let next_generation = u64::from(generation_of(word).wrapping_add(1)) << 32;
        if word & PINS_MASK != 0
            || counter
                .pins
                .compare_exchange(word, next_generation, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        // SAFETY: the caller holds the lock exclusively.
        unsafe { self.remove_locked(&counter.key) };
        true
    }

    /// Drops the least recently used tenth of the unpinned counters (at least one), so that the
    /// sort this costs is paid once per many creations. Caller holds the lock exclusively.
    unsafe fn evict(&self) {
        let mut candidates: Vec<(u64, *const Counter)> = Vec::new();
        // SAFETY: sequential scan and removal under the exclusive lock.
        unsafe {
            self.for_each_locked(|counter| {
                if !counter.is_pinned() && counter.state.load(Ordering::Acquire) != BUILDING {
                    candidates.push((counter.last_use.load(Ordering::Relaxed), counter));
                }
            });
            candidates.sort_unstable_by_key(|(last_use, _)| *last_use);
            let mut victims = (self.capacity / 10).max(1);
            for (_, counter) in candidates {
                if victims == 0 {
                    break;
                }
                // A backend may have pinned a candidate again (without the lock) since the scan: the
                // next one in line goes instead.
                if self.remove_if_unpinned(&*counter) {
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                    victims -= 1;
                }
            }
        }
    }

    unsafe fn remove_locked(&self, key: &CounterKey) {
        let mut found = false;
        // SAFETY: caller holds the lock exclusively.
        unsafe {
            pg_sys::hash_search(
                self.table,
                std::ptr::from_ref(key).cast(),
                pg_sys::HASHACTION::HASH_REMOVE,
                &mut found,
            );
        }
    }

    unsafe fn for_each_locked(&self, mut visit: impl FnMut(&'static Counter)) {
        // SAFETY: caller holds the lock; a full scan (no early exit) needs no hash_seq_term.
        unsafe {
            let mut scan: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
            pg_sys::hash_seq_init(&mut scan, self.table);
            while let Some(counter) = pg_sys::hash_seq_search(&mut scan).cast::<Counter>().as_ref() {
                visit(counter);
            }
        }
    }

    /// Committed rows and in-flight reservations of a built counter, without pinning it.
    pub fn peek(&self, key: &CounterKey) -> Option<(i64, i64)> {
        // SAFETY: lookup under the shared lock.
        unsafe {
            pg_sys::LWLockAcquire(self.lock, pg_sys::LWLockMode::LW_SHARED);
            let seen = self.find(key).filter(|counter| counter.state.load(Ordering::Acquire) == READY).map(
                |counter| {
                    let reserved = counter.reserved.load(Ordering::Acquire);
                    (counter.used.load(Ordering::Acquire) - reserved, reserved)
                },
            );
            pg_sys::LWLockRelease(self.lock);
            seen
        }
    }

    /// Forgets every counter of a quota (after TRUNCATE or drop_quota commits): they are rebuilt from
    /// the table on next use. Called at commit, while the table's lock still excludes every writer.
    pub fn forget_quota(&self, database: pg_sys::Oid, quota_id: i64) {
        // SAFETY: scan and removal under the exclusive lock.
        unsafe {
            pg_sys::LWLockAcquire(self.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut doomed = Vec::new();
            self.for_each_locked(|counter| {
                if counter.key.quota_id() == quota_id && counter.key.database() == database {
                    doomed.push(counter);
                }
            });
            for counter in doomed {
                if !self.remove_if_unpinned(counter) {
                    counter.state.store(EMPTY, Ordering::Release);
                }
            }
            pg_sys::LWLockRelease(self.lock);
        }
    }

    /// Sets every built, unpinned counter of a quota to the row count `actual` gives for its key
    /// (zero when absent), returning (key, counter before, actual) for each one corrected. The caller
    /// holds a lock on the table that excludes writers, so no counter of it is in flight.
    pub fn correct_quota(
        &self,
        database: pg_sys::Oid,
        quota_id: i64,
        actual: impl Fn(&CounterKey) -> i64,
    ) -> Vec<(CounterKey, i64, i64)> {
        let mut corrected = Vec::new();
        // SAFETY: scan under the exclusive lock, so no counter is pinned or created meanwhile.
        unsafe {
            pg_sys::LWLockAcquire(self.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            self.for_each_locked(|counter| {
                let ours = counter.key.quota_id() == quota_id && counter.key.database() == database;
                if !ours || counter.state.load(Ordering::Acquire) != READY || counter.is_pinned() {
                    return;
                }
                let expected = actual(&counter.key);
                let before = counter.used.swap(expected, Ordering::AcqRel);
                counter.reserved.store(0, Ordering::Release);
                if before != expected {
                    corrected.push((counter.key, before, expected));
                }
            });
            pg_sys::LWLockRelease(self.lock);
        }
        corrected
    }

    /// Up to `limit` built counters of a quota that no transaction holds, as (key, rows used), for a
    /// sample recount.
    pub fn sample_idle(&self, database: pg_sys::Oid, quota_id: i64, limit: usize) -> Vec<(CounterKey, i64)> {
        let mut sample = Vec::new();
        // SAFETY: a scan under the shared lock (no entry is created or removed meanwhile).
        unsafe {
            pg_sys::LWLockAcquire(self.lock, pg_sys::LWLockMode::LW_SHARED);
            self.for_each_locked(|counter| {
                if sample.len() < limit
                    && counter.key.quota_id() == quota_id
                    && counter.key.database() == database
                    && counter.state.load(Ordering::Acquire) == READY
                    && !counter.is_pinned()
                {
                    sample.push((counter.key, counter.used.load(Ordering::Acquire)));
                }
            });
            pg_sys::LWLockRelease(self.lock);
        }
        sample
    }

    /// Rows used by the counter of `key` when it is built and no transaction holds it.
    pub fn idle_used(&self, key: &CounterKey) -> Option<i64> {
        // SAFETY: lookup under the shared lock.
        unsafe {
            pg_sys::LWLockAcquire(self.lock, pg_sys::LWLockMode::LW_SHARED);
            let used = self
                .find(key)
                .filter(|counter| counter.state.load(Ordering::Acquire) == READY && !counter.is_pinned())
                .map(|counter| counter.used.load(Ordering::Acquire));
            pg_sys::LWLockRelease(self.lock);
            used
        }
    }

    /// (counters in use, capacity, evicted since start), for health checks.
    pub fn usage(&self) -> (i64, i64, u64) {
        // SAFETY: reading the entry count under the shared lock.
        let entries = unsafe {
            pg_sys::LWLockAcquire(self.lock, pg_sys::LWLockMode::LW_SHARED);
            let entries = pg_sys::hash_get_num_entries(self.table);
            pg_sys::LWLockRelease(self.lock);
            entries
        };
        (entries, self.capacity, self.evicted.load(Ordering::Relaxed))
    }
}

/// The generation left in an entry's memory by its previous use (0 for memory never used): dynahash
/// hands out recycled elements with their old contents, key aside.
unsafe fn found_recycled_generation(entry: *mut Counter) -> u32 {
    // SAFETY: the element belongs to the hash table's memory, initialised to zero when the table was
    // created and written only through this module since; read before being overwritten.
    unsafe { generation_of((*entry).pins.load(Ordering::Acquire)) }
}

/// LOCKTAG field4 of the build locks, to tell them from user advisory locks (which use 1 and 2).
const BUILD_LOCK_TAG: u16 = 0x7374;

impl Counter {
    /// Waits until the counter is built, building it with `count` if nobody else has. `count` must
    /// count the company's rows with a snapshot taken now (after the entry exists), not before.
    pub fn ensure_built(&'static self, count: impl FnOnce() -> i64) {
        if self.state.load(Ordering::Acquire) == READY {
            return;
        }
        let tag = self.build_lock_tag();
        // SAFETY: a transaction-level lock on a tag of our own, released below or at abort.
        unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false, false) };
        if self.state.load(Ordering::Acquire) != READY {
            self.state.store(BUILDING, Ordering::Release);
            BUILDING_HERE.with(|building| building.set(self));
            let rows = count();
            self.used.store(rows + self.reserved.load(Ordering::Acquire), Ordering::Release);
            BUILDING_HERE.with(|building| building.set(std::ptr::null()));
            self.state.store(READY, Ordering::Release);
        }
        // SAFETY: releasing the lock taken above.
        unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false) };
    }

    fn build_lock_tag(&self) -> pg_sys::LOCKTAG {
        use std::hash::{Hash, Hasher};
        let mut hasher = rustc_hash::FxHasher::default();
        self.key.hash(&mut hasher);
        let hash = hasher.finish();
        pg_sys::LOCKTAG {
            locktag_field1: self.key.database().into(),
            locktag_field2: (hash >> 32) as u32,
            locktag_field3: hash as u32,
            locktag_field4: BUILD_LOCK_TAG,
            locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        }
    }

    /// Reserves `rows` unless that would take the counter past `limit` (None: unlimited). On refusal
    /// returns what is used now (committed plus in flight).
    pub fn try_reserve(&self, rows: i64, limit: Option<i64>) -> Result<(), i64> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                limit.is_none_or(|limit| used + rows <= limit).then_some(used + rows)
            })
            .map(|_| {
                self.reserved.fetch_add(rows, Ordering::AcqRel);
            })
    }

    /// Gives back reservations that will not be inserted (abort, or rows an upsert did not insert).
    pub fn release(&self, rows: i64) {
        self.used.fetch_sub(rows, Ordering::AcqRel);
        self.reserved.fetch_sub(rows, Ordering::AcqRel);
    }

    /// Commit: reserved rows became committed rows; deleted rows free their places.
    pub fn commit(&self, inserted: i64, deleted: i64) {
        self.reserved.fetch_sub(inserted, Ordering::AcqRel);
        self.used.fetch_sub(deleted, Ordering::AcqRel);
    }

    pub fn unpin(&self) {
        self.pins.fetch_sub(PIN, Ordering::AcqRel);
    }

    /// Whether a transaction in flight holds the counter (the generation half of the word aside).
    fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) & PINS_MASK != 0
    }

    /// Pins again, without the lock, a counter this backend pinned before at `generation`. False when
    /// it has been removed since (the caller then looks it up again).
    pub fn repin(&self, generation: u32) -> bool {
        self.pins
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                (generation_of(word) == generation).then_some(word + PIN)
            })
            .is_ok()
    }

    /// Rows used now: committed plus reserved in flight.
    pub fn used(&self) -> i64 {
        self.used.load(Ordering::Acquire)
    }
}
