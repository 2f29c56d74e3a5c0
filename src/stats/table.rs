//! The shared-memory table of per-company figures: one entry per (database, company), at most
//! `tenant_scale.max_companies` of them, reached through `shmem::Region`.
//!
//! A statement is first counted in its backend's own slot (`BackendSlot`, one per possible client
//! backend): a `Batch` of the calls it completed for one company within one minute. The batch moves
//! to the company's entry when the backend next counts a call for another company or minute, and
//! whenever someone reads the table (`flush_all`): a statement touches no lock or cache line that
//! another backend writes, even when every backend works for the same company, and every read sees
//! every statement that completed before it.
//!
//! Locks, always taken in this order and never the other way round:
//! - `Shared::lock` (one LWLock) protects the hash table's structure. Finding an entry and updating it
//!   takes it SHARED; creating an entry, evicting, resetting, and moving every slot's batch before a
//!   read take it EXCLUSIVE. Counting a statement in a slot takes it not at all.
//! - a slot's spinlock protects its batch. Moving a batch to an entry holds the slot's spinlock, then
//!   the entry's, and empties the slot before letting go of it, so a batch is always in exactly one
//!   place; nothing ever waits for a slot while holding an entry.
//! - each entry's spinlock protects its `Counters`; it is held for a few dozen instructions (no
//!   allocation, no PostgreSQL call, nothing that can raise an error).
//! - `evicted`, `unattributed_calls` and `stats_reset` are atomics; `median_usage` is written only
//!   under the exclusive lock.
//!
//! Capacity policy (as pg_stat_statements): when a new company arrives and the table is full, every
//! entry's usage score (calls and errors, see `counters.rs`) decays by 1 %, and the 5 % with the lowest
//! scores are evicted and counted in `evicted`. New entries start at the median score, so a company
//! seen once is not evicted before long-idle ones. Memory never grows: the table is sized at start.
//!
//! Persistence: at a clean shutdown the postmaster writes every entry, with the batches backends left
//! in their slots added, to `pg_stat/tenant_scale.stat` (no lock: no other process is left); at
//! start-up the file is read back into the new table and then removed, so a later crash starts from
//! empty rather than from stale figures.

use std::cell::Cell;
use std::ffi::CStr;
use std::io::Write;
use std::mem::size_of;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use pgrx::pg_sys;

use super::counters::{Batch, Counters, INITIAL_USAGE, Interval, Summary, USAGE_DECAY};
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

#[unsafe(link_section = ".data.tenant_scale.per_statement")]
pub(super) static REGION: Region<Shared> =
    Region::new(c"tenant_scale stats", shared_size, 1, init_shared).on_clean_shutdown(save_file);

/// Who a statement is counted for.
#[repr(C)]
#[derive(Clone, Copy, Eq, Debug)]
pub(crate) struct CompanyKey {
    database: pg_sys::Oid,
    /// The id's bytes, NUL-padded: the key is hashed and compared as plain bytes.
    company: [u8; COMPANY_ID_MAX_BYTES + 1],
}

/// Compared word by word, inline: every statement compares its company with its slot's, and a
/// derived comparison calls memcmp, whose code is three more cache lines per statement. Equal exactly
/// when the bytes are, as `Hash` hashes them.
impl PartialEq for CompanyKey {
    fn eq(&self, other: &CompanyKey) -> bool {
        const { assert!((COMPANY_ID_MAX_BYTES + 1).is_multiple_of(8), "the id's bytes are whole words") };
        let (ours, theirs) = (self.company.as_chunks::<8>().0, other.company.as_chunks::<8>().0);
        let differing = ours
            .iter()
            .zip(theirs)
            .fold(0, |bits, (a, b)| bits | (u64::from_ne_bytes(*a) ^ u64::from_ne_bytes(*b)));
        self.database == other.database && differing == 0
    }
}

impl std::hash::Hash for CompanyKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.database.hash(state);
        self.company.hash(state);
    }
}

impl CompanyKey {
    /// No company: what a slot that never held a batch names, and a record's key before it is read.
    const UNSET: CompanyKey =
        CompanyKey { database: pg_sys::Oid::INVALID, company: [0; COMPANY_ID_MAX_BYTES + 1] };

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

/// A backend's calls not yet in the table: at most one batch, for one company. Aligned so that no two
/// backends' slots share a cache line.
#[repr(C, align(64))]
struct BackendSlot(SpinLock<Pending>);

/// The batch comes first: with the spinlock, its counts share the first cache lines, and a statement
/// for the company the backend counted last does not read the key.
#[derive(Clone, Copy)]
#[repr(C)]
struct Pending {
    batch: Batch,
    /// Whose calls `batch` holds; meaningless while it is empty.
    key: CompanyKey,
}

/// The attribution generation (stats/hooks.rs) whose company this backend last wrote into its slot's
/// key: while the batch holds calls, a call of that generation belongs to it without comparing keys.
/// Only this backend writes its slot's key; 0 matches no generation.
#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static SLOT_KEY_GENERATION: BackendLocal<Cell<u64>> = BackendLocal::new(Cell::new(0));

/// The region's root, in shared memory. The pointers are set once by the postmaster and are valid
/// at the same address in every backend (they inherit the mapping through fork).
#[repr(C)]
pub(super) struct Shared {
    lock: *mut pg_sys::LWLock,
    hash: *mut pg_sys::HTAB,
    /// One per client backend, indexed by its PGPROC number (the first `MaxConnections` PGPROCs are
    /// the client backends'). Other processes (background workers) update the table directly.
    slots: *mut BackendSlot,
    slot_count: usize,
    max_companies: usize,
    bytes: usize,
    evicted: AtomicU64,
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
    // ShmemInitStruct aligns every structure to a cache line.
    let aligned = |bytes: usize| bytes.next_multiple_of(pg_sys::PG_CACHE_LINE_SIZE as usize);
    aligned(size_of::<Shared>()) + aligned(slot_count() * size_of::<BackendSlot>()) + table
}

fn slot_count() -> usize {
    // SAFETY: a postmaster-level setting, read from the configuration before shared memory is sized.
    usize::try_from(unsafe { pg_sys::MaxConnections }).unwrap_or(0)
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
        let mut slots_found = false;
        let slots = pg_sys::ShmemInitStruct(
            c"tenant_scale stats backend slots".as_ptr(),
            slot_count() * size_of::<BackendSlot>(),
            &mut slots_found,
        )
        .cast::<BackendSlot>();
        if !slots_found {
            let empty = Pending { batch: Batch::default(), key: CompanyKey::UNSET };
            for index in 0..slot_count() {
                slots.add(index).write(BackendSlot(SpinLock::new(empty)));
            }
        }
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
                slots,
                slot_count: slot_count(),
                max_companies: max_companies(),
                bytes: shared_size(),
                evicted: AtomicU64::new(0),
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
        // SAFETY: only computes the table's hash function (the same in every backend) over the key.
        let hash = unsafe { pg_sys::get_hash_value(self.hash, std::ptr::from_ref(key).cast()) };
        // SAFETY: a FIND never modifies the table; the entry lives until removed under the exclusive
        // lock, which cannot happen while the caller holds the lock.
        unsafe { unguarded::hash_find(self.hash, key, hash).cast::<Entry>().as_ref() }
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

    /// This backend's slot, if it is a client backend.
    fn own_slot(&self) -> Option<&BackendSlot> {
        // SAFETY: MyProc is this process's PGPROC (null before it has one); its number never changes.
        #[cfg(not(any(feature = "pg17", feature = "pg18")))]
        let number = unsafe { pg_sys::MyProc.as_ref()?.pgprocno };
        // SAFETY: as above.
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        let number = unsafe { pg_sys::MyProcNumber };
        self.slots().get(usize::try_from(number).ok()?)
    }

    fn slots(&self) -> &[BackendSlot] {
        // SAFETY: `slot_count` slots were initialised by the postmaster and live as long as the server.
        unsafe { std::slice::from_raw_parts(self.slots, self.slot_count) }
    }

    /// The entry for `key`, created if it is missing. Exclusive lock held.
    fn find_or_create(&self, held: &Locked<'_>, key: &CompanyKey, now: i64) -> Option<&Entry> {
        match self.find(held, key) {
            Some(entry) => Some(entry),
            None => self.create(held, key, now),
        }
    }

    /// Moves `slot`'s batch, if it holds one for `key`, to `entry` (or drops it when no entry could
    /// be made: shared memory ran out). The caller holds the lock in either mode.
    fn move_batch(&self, _held: &Locked<'_>, slot: &BackendSlot, key: &CompanyKey, entry: Option<&Entry>) {
        let mut pending = slot.0.lock();
        if pending.batch.is_empty() || pending.key != *key {
            return;
        }
        if let Some(entry) = entry {
            entry.counters.lock().add(&pending.batch);
        }
        pending.batch.clear();
    }

    /// Moves every slot's batch to the table, so that what is read next includes every statement
    /// that completed before. Exclusive lock held (an entry may have to be created).
    fn flush_all(&self, held: &Locked<'_>) {
        for slot in self.slots() {
            let (key, first_at) = {
                let pending = slot.0.lock();
                if pending.batch.is_empty() {
                    continue;
                }
                (pending.key, pending.batch.first_at())
            };
            let entry = self.find_or_create(held, &key, first_at);
            self.move_batch(held, slot, &key, entry);
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: acquired in Shared::lock.
        unsafe { unguarded::release_lock(self.0.lock) };
    }
}

/// Applies `update` to the entry of `key`, created if needed (`None` when shared memory is
/// exhausted), with the lock held in either mode.
fn with_entry(shared: &Shared, key: &CompanyKey, now: i64, update: impl FnOnce(&Locked<'_>, Option<&Entry>)) {
    {
        let held = shared.lock(pg_sys::LWLockMode::LW_SHARED);
        if let Some(entry) = shared.find(&held, key) {
            return update(&held, Some(entry));
        }
    }
    let held = shared.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
    let entry = shared.find_or_create(&held, key, now);
    update(&held, entry);
}

/// Applies `update` to the counters of `key`, creating the entry if needed. Does nothing when the
/// library was not preloaded, or when shared memory is exhausted.
pub(super) fn update(key: &CompanyKey, now: i64, update: impl FnOnce(&mut Counters)) {
    let Some(shared) = REGION.try_get() else { return };
    with_entry(shared, key, now, |_, entry| {
        if let Some(entry) = entry {
            update(&mut entry.counters.lock());
        }
    });
}

/// Counts a completed statement for the company of attribution `generation`, whose key `key` gives
/// (`None`: not counted): `micros` of execution, `rows` processed, started `at`. Does nothing when
/// the library was not preloaded.
pub(super) fn record_call(
    generation: u64,
    key: impl FnOnce() -> Option<CompanyKey>,
    micros: f64,
    rows: u64,
    at: i64,
) {
    let Some(shared) = REGION.try_get() else { return };
    let Some(slot) = shared.own_slot() else {
        if let Some(key) = key() {
            record_call_without_slot(&key, micros, rows, at);
        }
        return;
    };
    let mut pending = slot.0.lock();
    let same_batch = !pending.batch.is_empty()
        && SLOT_KEY_GENERATION.with(|slot_key| slot_key.get() == generation)
        && pending.batch.accepts(at);
    if !same_batch {
        drop(pending);
        let Some(key) = key() else { return };
        prepare_slot(shared, slot, generation, &key, at);
        pending = slot.0.lock();
    }
    pending.batch.record_call(micros, rows, at);
}

// The paths below are rare (a change of company or minute, a batch a reader moved; a process without
// a slot) and may take the table's lock: out of line, they keep the code every statement runs within
// fewer cache lines.

/// Makes `slot` ready for a call of `key` at `at`: its batch, if it holds calls of another company
/// or minute, moves to the table, and its key names `key`, of attribution `generation`.
#[cold]
#[inline(never)]
fn prepare_slot(shared: &Shared, slot: &BackendSlot, generation: u64, key: &CompanyKey, at: i64) {
    let mut pending = slot.0.lock();
    if !pending.batch.is_empty() && (pending.key != *key || !pending.batch.accepts(at)) {
        let (previous, first_at) = (pending.key, pending.batch.first_at());
        drop(pending);
        with_entry(shared, &previous, first_at, |held, entry| {
            shared.move_batch(held, slot, &previous, entry)
        });
        // Only this backend fills its slot, so it is empty now.
        pending = slot.0.lock();
    }
    if pending.batch.is_empty() {
        pending.key = *key;
    }
    SLOT_KEY_GENERATION.with(|slot_key| slot_key.set(generation));
}

#[cold]
#[inline(never)]
fn record_call_without_slot(key: &CompanyKey, micros: f64, rows: u64, at: i64) {
    let mut batch = Batch::default();
    batch.record_call(micros, rows, at);
    update(key, at, |counters| counters.add(&batch));
}

pub(super) fn count_unattributed_call() {
    if let Some(shared) = REGION.try_get() {
        shared.unattributed_calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every company's summary at `now`.
pub(super) fn summaries(now: i64) -> Vec<(CompanyKey, Summary)> {
    let shared = REGION.get(FEATURE);
    shared.flush_all(&shared.lock(pg_sys::LWLockMode::LW_EXCLUSIVE));
    let copies: Vec<(CompanyKey, Box<Counters>)> = {
        let held = shared.lock(pg_sys::LWLockMode::LW_SHARED);
        shared.entries(&held).into_iter().map(|entry| (entry.key, Box::new(*entry.counters.lock()))).collect()
    };
    copies.into_iter().map(|(key, counters)| (key, counters.summary(now))).collect()
}

pub(super) fn info() -> Info {
    let shared = REGION.get(FEATURE);
    let tracked = {
        let held = shared.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
        // Companies whose calls are still in a backend's slot are tracked too.
        shared.flush_all(&held);
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
    // What completed before the reset is zeroed with the rest.
    shared.flush_all(&held);
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
    shared.flush_all(&shared.lock(pg_sys::LWLockMode::LW_EXCLUSIVE));
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
    let entries = with_batches_left_in_slots(shared, entries);
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

/// `entries` with the batches the backends left in their slots added (creating entries as needed:
/// `load_file` keeps `max_companies` of them). No lock: nobody else is left.
fn with_batches_left_in_slots(
    shared: &Shared,
    mut entries: Vec<(CompanyKey, Counters)>,
) -> Vec<(CompanyKey, Counters)> {
    let mut positions: std::collections::HashMap<CompanyKey, usize> =
        entries.iter().enumerate().map(|(position, (key, _))| (*key, position)).collect();
    for slot in shared.slots() {
        let pending = *slot.0.lock();
        if pending.batch.is_empty() {
            continue;
        }
        let position = *positions.entry(pending.key).or_insert_with(|| {
            entries.push((pending.key, Counters::new(pending.batch.first_at(), INITIAL_USAGE)));
            entries.len() - 1
        });
        entries[position].1.add(&pending.batch);
    }
    entries
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
        let mut key = CompanyKey::UNSET;
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

#[cfg(test)]
mod tests {
    use super::{COMPANY_ID_MAX_BYTES, CompanyKey};
    use pgrx::pg_sys::Oid;

    fn key(database: u32, company: &[u8]) -> CompanyKey {
        CompanyKey::new(Oid::from(database), company).expect("a valid id")
    }

    #[test]
    fn keys_are_equal_exactly_when_database_and_every_byte_are() {
        let longest = vec![b'x'; COMPANY_ID_MAX_BYTES];
        assert!(key(5, b"acme") == key(5, b"acme"));
        assert!(key(5, &longest) == key(5, &longest));
        assert!(key(5, b"acme") != key(6, b"acme"), "another database");
        assert!(key(5, b"acme") != key(5, b"acm"), "a prefix");
        assert!(key(5, b"acme") != key(5, b"acmf"), "the last byte");
        let mut last_differs = longest.clone();
        last_differs[COMPANY_ID_MAX_BYTES - 1] = b'y';
        assert!(key(5, &longest) != key(5, &last_differs), "the last byte of the longest id");
        assert!(key(5, b"bcme") != key(5, b"acme"), "the first byte");
    }
}
