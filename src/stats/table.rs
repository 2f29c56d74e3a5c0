//! The shared-memory table of per-company figures: one entry per (database, company), at most
//! `tenant_scale.max_companies` of them, reached through `shmem::Region`.
//!
//! Locks, always taken in this order and never the other way round:
//! - `Shared::lock` (one LWLock) protects the hash table's structure. Finding an entry and updating it
//!   takes it SHARED; only creating an entry, evicting, resetting and reading the global figures for a
//!   reset take it EXCLUSIVE. The per-statement path therefore never waits for another statement
//!   unless it is the first statement of a company.
//! - each entry's spinlock protects its `Counters`; it is held for a few dozen instructions (no
//!   allocation, no PostgreSQL call, nothing that can raise an error).
//! - `evicted`, `unattributed_calls` and `stats_reset` are atomics; `median_usage` and `removals` are
//!   written only under the exclusive lock (`removals` is read under the shared one).
//! - Each backend remembers the last entry it found (`LAST_FOUND`) and uses it again, without a hash
//!   search, while the table has had no removal since: entries never move, so only a removal can hand
//!   an entry's memory to another company.
//!
//! Capacity policy (as pg_stat_statements): when a new company arrives and the table is full, every
//! entry's usage score (calls and errors, see `counters.rs`) decays by 1 %, and the 5 % with the lowest
//! scores are evicted and counted in `evicted`. New entries start at the median score, so a company
//! seen once is not evicted before long-idle ones. Memory never grows: the table is sized at start.
//!
//! Persistence: at a clean shutdown the postmaster writes every entry to `pg_stat/tenant_scale.stat`
//! (no lock: no other process is left); at start-up the file is read back into the new table and then
//! removed, so a later crash starts from empty rather than from stale figures.

use std::ffi::CStr;
use std::io::Write;
use std::mem::size_of;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use std::cell::Cell;

use pgrx::pg_sys;

use super::counters::{Counters, INITIAL_USAGE, Interval, Summary, USAGE_DECAY};
use crate::backend_local::BackendLocal;
use crate::shmem::Region;
use crate::unguarded::{self, SpinLock};

/// Longest company id: PostgreSQL's identifier length, long enough for UUIDs and slugs.
pub(super) const COMPANY_ID_MAX_BYTES: usize = 63;
const FEATURE: &str = "per-company statistics";
const STATS_FILE: &str = "pg_stat/tenant_scale.stat";
const STATS_FILE_TMP: &str = "pg_stat/tenant_scale.stat.tmp";
const FILE_MAGIC: u32 = 0x5453_5354; // "TSST"
const FILE_VERSION: u32 = 1;
/// Share of the table evicted in one pass when it is full.
const EVICT_PERCENT: usize = 5;

pub(super) static REGION: Region<Shared> =
    Region::new(c"tenant_scale stats", shared_size, 1, init_shared).on_clean_shutdown(save_file);

/// Who a statement is counted for.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct CompanyKey {
    database: pg_sys::Oid,
    /// The id's bytes, NUL-padded: the key is hashed and compared as plain bytes.
    company: [u8; COMPANY_ID_MAX_BYTES + 1],
}

impl CompanyKey {
    /// `None` for an empty id (unattributed) or one longer than `COMPANY_ID_MAX_BYTES`.
    pub(super) fn new(database: pg_sys::Oid, company: &[u8]) -> Option<Self> {
        if company.is_empty() || company.len() > COMPANY_ID_MAX_BYTES {
            return None;
        }
        let mut key = CompanyKey { database, company: [0; COMPANY_ID_MAX_BYTES + 1] };
        key.company[..company.len()].copy_from_slice(company);
        Some(key)
    }

    pub(super) fn database(&self) -> pg_sys::Oid {
        self.database
    }

    pub(super) fn company_bytes(&self) -> &[u8] {
        let length = self.company.iter().position(|byte| *byte == 0).unwrap_or(self.company.len());
        &self.company[..length]
    }

    pub(super) fn company(&self) -> String {
        String::from_utf8_lossy(self.company_bytes()).into_owned()
    }
}

/// A hash table element; dynahash requires the key first.
#[repr(C)]
struct Entry {
    key: CompanyKey,
    counters: SpinLock<Counters>,
}

/// The entry this backend found last: a backend's statements come mostly for one company after
/// another, and comparing the 68-byte key costs less than hashing it and searching the table again.
#[derive(Clone, Copy)]
struct LastFound {
    key: CompanyKey,
    hash: u32,
    entry: *const Entry,
    /// `Shared::removals` when `entry` was found: while the count is the same, `entry` still holds
    /// `key` (entries never move, and only a removal frees one for another key).
    removals: u64,
}

static LAST_FOUND: BackendLocal<Cell<Option<LastFound>>> = BackendLocal::new(Cell::new(None));

/// The region's root, in shared memory. The pointers are set once by the postmaster and are valid
/// at the same address in every backend (they inherit the mapping through fork).
#[repr(C)]
pub(super) struct Shared {
    lock: *mut pg_sys::LWLock,
    hash: *mut pg_sys::HTAB,
    max_companies: usize,
    bytes: usize,
    evicted: AtomicU64,
    /// Entries removed from the table since start-up; changed only under the exclusive lock. Not
    /// `evicted`: a reset zeroes that, so a value a backend remembered could come round again.
    removals: AtomicU64,
    unattributed_calls: AtomicU64,
    stats_reset: AtomicI64,
    median_usage: AtomicU64,
}

// SAFETY: every field is either immutable after start-up or an atomic; the hash table behind `hash`
// is only touched under `lock` as the module documentation says.
unsafe impl Sync for Shared {}

/// What stats_info() shows.
pub(super) struct Info {
    pub max_companies: usize,
    pub tracked: usize,
    pub evicted: u64,
    pub unattributed_calls: u64,
    pub shared_memory_bytes: usize,
    pub stats_reset: i64,
}

fn shared_size() -> usize {
    // SAFETY: hash_estimate_size is pure arithmetic.
    let table = unsafe { pg_sys::hash_estimate_size(max_companies() as _, size_of::<Entry>()) };
    size_of::<Shared>().next_multiple_of(pg_sys::MAXIMUM_ALIGNOF as usize) + table
}

fn max_companies() -> usize {
    usize::try_from(super::MAX_COMPANIES.get()).unwrap_or(1)
}

unsafe fn init_shared(locks: *mut pg_sys::LWLockPadded) -> *mut Shared {
    // SAFETY: called once by shmem::Region in the shmem startup hook, holding AddinShmemInitLock.
    unsafe {
        let mut found = false;
        let shared = pg_sys::ShmemInitStruct(c"tenant_scale stats".as_ptr(), size_of::<Shared>(), &mut found)
            .cast::<Shared>();
        let mut info: pg_sys::HASHCTL = std::mem::zeroed();
        info.keysize = size_of::<CompanyKey>();
        info.entrysize = size_of::<Entry>();
        let max = max_companies() as std::ffi::c_long;
        let hash = pg_sys::ShmemInitHash(
            c"tenant_scale stats by company".as_ptr(),
            max,
            max,
            &mut info,
            (pg_sys::HASH_ELEM | pg_sys::HASH_BLOBS) as i32,
        );
        if !found {
            shared.write(Shared {
                lock: &raw mut (*locks).lock,
                hash,
                max_companies: max_companies(),
                bytes: shared_size(),
                evicted: AtomicU64::new(0),
                removals: AtomicU64::new(0),
                unattributed_calls: AtomicU64::new(0),
                stats_reset: AtomicI64::new(pg_sys::GetCurrentTimestamp()),
                median_usage: AtomicU64::new(INITIAL_USAGE.to_bits()),
            });
            load_file(&*shared);
        }
        shared
    }
}

/// Holds `Shared::lock` until dropped (also while a PostgreSQL error unwinds through the holder).
struct Locked<'a>(&'a Shared);

impl Shared {
    fn lock(&self, mode: pg_sys::LWLockMode::Type) -> Locked<'_> {
        // SAFETY: the lock was initialised by the postmaster and is not held yet (no function here
        // takes it twice); the guard releases it.
        unsafe { unguarded::acquire_lock(self.lock, mode) };
        Locked(self)
    }

    /// The entry for `key`; the caller holds the lock in either mode.
    fn find(&self, _held: &Locked<'_>, key: &CompanyKey) -> Option<&Entry> {
        // Stable while the caller holds the lock: removals take it exclusively.
        let removals = self.removals.load(Ordering::Relaxed);
        let last = LAST_FOUND.with(Cell::get).filter(|last| last.key == *key);
        if let Some(last) = last
            && last.removals == removals
        {
            // SAFETY: the entry was found for this key and nothing was removed from the table since, so
            // it still holds the key; it lives until removed under the exclusive lock, which cannot
            // happen while the caller holds the lock.
            return unsafe { last.entry.as_ref() };
        }
        let hash = match last {
            Some(last) => last.hash,
            // SAFETY: only computes the table's hash function (the same in every backend) over the key.
            None => unsafe { pg_sys::get_hash_value(self.hash, std::ptr::from_ref(key).cast()) },
        };
        // SAFETY: a FIND never modifies the table; see above for the entry's lifetime.
        let entry = unsafe { unguarded::hash_find(self.hash, key, hash).cast::<Entry>() };
        if !entry.is_null() {
            LAST_FOUND.with(|cell| cell.set(Some(LastFound { key: *key, hash, entry, removals })));
        }
        // SAFETY: as above.
        unsafe { entry.as_ref() }
    }

    /// Every entry; the caller holds the lock in either mode.
    fn entries(&self, _held: &Locked<'_>) -> Vec<&Entry> {
        let mut entries = Vec::new();
        // SAFETY: a full scan under the lock; no entry is added or removed meanwhile.
        unsafe {
            let mut scan: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
            pg_sys::hash_seq_init(&mut scan, self.hash);
            loop {
                let entry = pg_sys::hash_seq_search(&mut scan).cast::<Entry>();
                match entry.as_ref() {
                    Some(entry) => entries.push(entry),
                    None => break,
                }
            }
        }
        entries
    }

    /// Creates the entry for `key`, evicting first when the table is full. Exclusive lock held.
    fn create(&self, held: &Locked<'_>, key: &CompanyKey, now: i64) -> Option<&Entry> {
        // SAFETY: the caller holds the exclusive lock, so nobody else reads or writes the table.
        unsafe {
            if pg_sys::hash_get_num_entries(self.hash) as usize >= self.max_companies {
                self.evict(held);
            }
            let mut found = false;
            let entry = pg_sys::hash_search(
                self.hash,
                std::ptr::from_ref(key).cast(),
                pg_sys::HASHACTION::HASH_ENTER_NULL,
                &mut found,
            )
            .cast::<Entry>();
            if entry.is_null() {
                return None;
            }
            if !found {
                let usage = f64::from_bits(self.median_usage.load(Ordering::Relaxed));
                (&raw mut (*entry).counters).write(SpinLock::new(Counters::new(now, usage)));
            }
            entry.as_ref()
        }
    }

    fn evict(&self, held: &Locked<'_>) {
        let mut scored: Vec<(f64, &Entry)> = self
            .entries(held)
            .into_iter()
            .map(|entry| {
                let mut counters = entry.counters.lock();
                counters.usage *= USAGE_DECAY;
                (counters.usage, entry)
            })
            .collect();
        scored.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let victims = (scored.len() * EVICT_PERCENT / 100).max(1).min(scored.len());
        if let Some((median, _)) = scored.get(victims + (scored.len() - victims) / 2) {
            self.median_usage.store(median.to_bits(), Ordering::Relaxed);
        }
        self.removals.fetch_add(victims as u64, Ordering::Relaxed);
        for (_, entry) in &scored[..victims] {
            // SAFETY: exclusive lock held; the entry's memory returns to the table's free list, and
            // no reference to it survives this loop.
            unsafe {
                pg_sys::hash_search(
                    self.hash,
                    std::ptr::from_ref(&entry.key).cast(),
                    pg_sys::HASHACTION::HASH_REMOVE,
                    std::ptr::null_mut(),
                );
            }
        }
        self.evicted.fetch_add(victims as u64, Ordering::Relaxed);
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: acquired in Shared::lock.
        unsafe { unguarded::release_lock(self.0.lock) };
    }
}

/// Applies `update` to the counters of `key`, creating the entry if needed. Does nothing when the
/// library was not preloaded, or when shared memory is exhausted.
pub(super) fn update(key: &CompanyKey, now: i64, update: impl FnOnce(&mut Counters)) {
    let Some(shared) = REGION.try_get() else { return };
    {
        let held = shared.lock(pg_sys::LWLockMode::LW_SHARED);
        if let Some(entry) = shared.find(&held, key) {
            update(&mut entry.counters.lock());
            return;
        }
    }
    let held = shared.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
    let entry = match shared.find(&held, key) {
        Some(entry) => Some(entry),
        None => shared.create(&held, key, now),
    };
    if let Some(entry) = entry {
        update(&mut entry.counters.lock());
    }
}

pub(super) fn count_unattributed_call() {
    if let Some(shared) = REGION.try_get() {
        shared.unattributed_calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every company's summary at `now`.
pub(super) fn summaries(now: i64) -> Vec<(CompanyKey, Summary)> {
    let shared = REGION.get(FEATURE);
    let copies: Vec<(CompanyKey, Box<Counters>)> = {
        let held = shared.lock(pg_sys::LWLockMode::LW_SHARED);
        shared.entries(&held).into_iter().map(|entry| (entry.key, Box::new(*entry.counters.lock()))).collect()
    };
    copies.into_iter().map(|(key, counters)| (key, counters.summary(now))).collect()
}

pub(super) fn info() -> Info {
    let shared = REGION.get(FEATURE);
    let tracked = {
        let _held = shared.lock(pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: reading the entry count under the lock.
        unsafe { pg_sys::hash_get_num_entries(shared.hash) as usize }
    };
    Info {
        max_companies: shared.max_companies,
        tracked,
        evicted: shared.evicted.load(Ordering::Relaxed),
        unattributed_calls: shared.unattributed_calls.load(Ordering::Relaxed),
        shared_memory_bytes: shared.bytes,
        stats_reset: shared.stats_reset.load(Ordering::Relaxed),
    }
}

/// Zeroes one company's figures in every database, or everything (the global counters included) when
/// `company` is `None`. Returns how many entries were reset.
pub(super) fn reset(company: Option<&[u8]>, now: i64) -> u64 {
    let shared = REGION.get(FEATURE);
    let held = shared.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut reset = 0;
    for entry in shared.entries(&held) {
        if company.is_none_or(|company| entry.key.company_bytes() == company) {
            entry.counters.lock().reset(now);
            reset += 1;
        }
    }
    if company.is_none() {
        shared.evicted.store(0, Ordering::Relaxed);
        shared.unattributed_calls.store(0, Ordering::Relaxed);
        shared.stats_reset.store(now, Ordering::Relaxed);
    }
    reset
}

/// Activity since the last committed snapshot, for every company that had some.
pub(super) fn intervals() -> Vec<(CompanyKey, Interval)> {
    let shared = REGION.get(FEATURE);
    let held = shared.lock(pg_sys::LWLockMode::LW_SHARED);
    shared
        .entries(&held)
        .into_iter()
        .filter_map(|entry| Some((entry.key, entry.counters.lock().interval()?)))
        .collect()
}

/// Moves the snapshot baselines past intervals whose history rows were committed. Called from a
/// commit callback, so it must not raise an error: it skips companies evicted meanwhile.
pub(super) fn commit_intervals(intervals: &[(CompanyKey, Interval)]) {
    let Some(shared) = REGION.try_get() else { return };
    let held = shared.lock(pg_sys::LWLockMode::LW_SHARED);
    for (key, interval) in intervals {
        if let Some(entry) = shared.find(&held, key) {
            entry.counters.lock().commit_interval(interval);
        }
    }
}

/// File layout: header (magic, version, record length, record count as u32; evicted, unattributed
/// calls as u64; stats_reset as i64), then per record the database oid (u32), the NUL-padded
/// company id and the encoded counters. All little-endian.
const HEADER_LEN: usize = 4 * 4 + 3 * 8;
const RECORD_LEN: usize = 4 + COMPANY_ID_MAX_BYTES + 1 + Counters::ENCODED_LEN;

fn save_file(shared: &'static Shared) {
    // No lock: this runs in the postmaster after every other process has exited.
    let entries: Vec<(CompanyKey, Counters)> = {
        let mut entries = Vec::new();
        // SAFETY: a full scan of a table nobody else can touch any more.
        unsafe {
            let mut scan: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
            pg_sys::hash_seq_init(&mut scan, shared.hash);
            while let Some(entry) = pg_sys::hash_seq_search(&mut scan).cast::<Entry>().as_ref() {
                entries.push((entry.key, *entry.counters.lock()));
            }
        }
        entries
    };
    let mut bytes = Vec::with_capacity(HEADER_LEN + entries.len() * RECORD_LEN);
    for value in [FILE_MAGIC, FILE_VERSION, RECORD_LEN as u32, entries.len() as u32] {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes.extend_from_slice(&shared.evicted.load(Ordering::Relaxed).to_le_bytes());
    bytes.extend_from_slice(&shared.unattributed_calls.load(Ordering::Relaxed).to_le_bytes());
    bytes.extend_from_slice(&shared.stats_reset.load(Ordering::Relaxed).to_le_bytes());
    for (key, counters) in &entries {
        bytes.extend_from_slice(&key.database.to_u32().to_le_bytes());
        bytes.extend_from_slice(&key.company);
        counters.encode(&mut bytes);
    }
    let written = std::fs::File::create(STATS_FILE_TMP)
        .and_then(|mut file| {
            file.write_all(&bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(STATS_FILE_TMP, STATS_FILE));
    match written {
        Ok(()) => pgrx::log!("tenant_scale: saved statistics of {} companies to {STATS_FILE}", entries.len()),
        Err(error) => {
            let _ = std::fs::remove_file(STATS_FILE_TMP);
            log_file_problem(&format!("could not write {STATS_FILE}: {error}"));
        }
    }
}

/// Reads the file `save_file` wrote into the freshly created table, then removes it.
unsafe fn load_file(shared: &Shared) {
    let bytes = match std::fs::read(STATS_FILE) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
        Err(error) => return log_file_problem(&format!("could not read {STATS_FILE}: {error}")),
    };
    let _ = std::fs::remove_file(STATS_FILE);
    let field = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let wide = |at: usize| <[u8; 8]>::try_from(&bytes[at..at + 8]).unwrap_or_default();
    if bytes.len() < HEADER_LEN
        || field(0) != FILE_MAGIC
        || field(4) != FILE_VERSION
        || field(8) as usize != RECORD_LEN
        || bytes.len() != HEADER_LEN + field(12) as usize * RECORD_LEN
    {
        return log_file_problem(&format!("ignored {STATS_FILE}: written by another version, or damaged"));
    }
    shared.evicted.store(u64::from_le_bytes(wide(16)), Ordering::Relaxed);
    shared.unattributed_calls.store(u64::from_le_bytes(wide(24)), Ordering::Relaxed);
    shared.stats_reset.store(i64::from_le_bytes(wide(32)), Ordering::Relaxed);
    let mut loaded = 0;
    for record in bytes[HEADER_LEN..].chunks_exact(RECORD_LEN) {
        let (key_bytes, counter_bytes) = record.split_at(4 + COMPANY_ID_MAX_BYTES + 1);
        let mut key = CompanyKey { database: pg_sys::Oid::INVALID, company: [0; COMPANY_ID_MAX_BYTES + 1] };
        key.database = pg_sys::Oid::from(u32::from_le_bytes(key_bytes[..4].try_into().unwrap_or_default()));
        key.company.copy_from_slice(&key_bytes[4..]);
        let Some(counters) = Counters::decode(counter_bytes) else { continue };
        if loaded >= shared.max_companies {
            // max_companies was lowered across the restart.
            shared.evicted.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // SAFETY: start-up in the postmaster, before any other process exists.
        unsafe {
            let entry = pg_sys::hash_search(
                shared.hash,
                std::ptr::from_ref(&key).cast(),
                pg_sys::HASHACTION::HASH_ENTER_NULL,
                std::ptr::null_mut(),
            )
            .cast::<Entry>();
            if entry.is_null() {
                break;
            }
            (&raw mut (*entry).counters).write(SpinLock::new(counters));
        }
        loaded += 1;
    }
    pgrx::log!("tenant_scale: loaded statistics of {loaded} companies from {STATS_FILE}");
}

fn log_file_problem(message: &str) {
    pgrx::log!("tenant_scale: {message}; statistics start empty");
}

/// For the GUC check hook and SQL arguments: the reason an id cannot name a company, if any.
pub(super) fn company_id_problem(company: &CStr) -> Option<String> {
    let length = company.to_bytes().len();
    (length > COMPANY_ID_MAX_BYTES)
        .then(|| format!("A company id is at most {COMPANY_ID_MAX_BYTES} bytes long; this one has {length}."))
}
