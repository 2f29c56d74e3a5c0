//! This transaction's changes to quota counters, and their settling.
//!
//! For each (quota, company) the transaction changes, a `Touch` holds the counter it works on (see
//! `Held`), the limit that applies, and its inserted and deleted rows per subtransaction, so that
//! ROLLBACK TO SAVEPOINT and errors caught by a subtransaction give back exactly what they took.
//! The transaction callbacks settle everything: at commit, reservations become committed rows and
//! deletions free their places; at abort, reservations are given back. PREPARE TRANSACTION is
//! refused while the transaction holds quota changes: a prepared transaction outlives the backend
//! that would settle it.
//!
//! Touches outlive their transaction: at its end a touch on a shared counter stays, unpinned, as
//! this backend's cache of that company (the counter to pin again without a lookup, the limit, the
//! key), so that the next transaction writing for the same company does no lookup and no allocation
//! (counters.rs explains how a kept counter is pinned again safely). The cache is dropped when the
//! configuration changes and when it grows past `MAX_KEPT_TOUCHES`.
//!
//! TRUNCATE: the truncating transaction holds the only lock on the table until it ends, so after a
//! TRUNCATE its own view of the table is the whole truth, and its later changes are counted privately
//! (`Exclusive`). At commit the table's shared counters are forgotten and rebuilt from the table on
//! next use. Changes made before the TRUNCATE are kept until then, because ROLLBACK TO SAVEPOINT can
//! undo the TRUNCATE and bring their rows back: touches are keyed by how many truncations of their
//! table precede them.

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use rustc_hash::{FxBuildHasher, FxHashMap};

use super::company::CounterKey;
use super::config::{self, Config, Limit, QuotaDef};
use super::count::{Seeing, count_added_by_command, count_rows};
use super::counters::{self, Counter};
use super::refusal::raise_quota_exceeded;
use super::slow;
use super::statement::{self, Noted};
use crate::backend_local::BackendLocal;
use crate::unguarded;

#[derive(Clone, Copy)]
pub(super) enum Change {
    /// A new row, or an existing one moved here from another company. Refused (53400) past the
    /// limit, except within an upsert, which decides once it has run (its proposed rows may turn out
    /// to be conflicts that take no place).
    Insert,
    /// A row deleted, or moved to another company: its place is free once the transaction commits.
    Delete,
}

enum Held {
    /// A shared counter and the generation it was pinned at (to pin it again in later
    /// transactions): inserts are reserved on it at once, deletes wait for the commit.
    Shared { counter: &'static Counter, generation: u32 },
    /// A usage row this transaction has locked (no shared memory); `committed` was read under the lock.
    Row { committed: i64 },
    /// A table this transaction truncated; `base` is what it saw when it first touched the company.
    Exclusive { base: i64 },
}

struct Frame {
    subtransaction: pg_sys::SubTransactionId,
    inserted: i64,
    deleted: i64,
}

struct Touch {
    key: Vec<u8>,
    def: Rc<QuotaDef>,
    company: String,
    held: Held,
    /// Part of the current transaction (listed in `Ledger::active`; a shared counter is pinned).
    active: bool,
    /// The subtransaction that first touched the company in this transaction: if it aborts,
    /// everything here goes.
    origin: pg_sys::SubTransactionId,
    limit: Limit,
    limit_generation: u64,
    frames: Vec<Frame>,
    /// Rows the current statement (command) has reserved, for the refusal's DETAIL.
    statement_rows: (pg_sys::CommandId, i64),
    /// Set when a change came from a statement the executor hooks did not see (the library was
    /// loaded in the middle of it): its upsert, if it was one, could not be settled, so the
    /// company is recounted before commit (only possible without shared memory).
    recount_at_commit: bool,
}

impl Touch {
    fn inserted(&self) -> i64 {
        self.frames.iter().map(|frame| frame.inserted).sum()
    }

    fn deleted(&self) -> i64 {
        self.frames.iter().map(|frame| frame.deleted).sum()
    }

    /// Rows that count against the limit now, for this transaction.
    fn used(&self) -> i64 {
        match self.held {
            Held::Shared { counter, .. } => counter.used(),
            Held::Row { committed } => committed + self.inserted(),
            Held::Exclusive { base } => base + self.inserted() - self.deleted(),
        }
    }

    fn try_reserve(&mut self, rows: i64) -> Result<(), i64> {
        match self.held {
            Held::Shared { counter, .. } => counter.try_reserve(rows, self.limit.max_rows),
            Held::Row { .. } | Held::Exclusive { .. } => {
                let used = self.used();
                if self.limit.max_rows.is_none_or(|max_rows| used + rows <= max_rows) {
                    Ok(())
                } else {
                    Err(used)
                }
            }
        }
    }

    fn frame(&mut self, subtransaction: pg_sys::SubTransactionId) -> &mut Frame {
        if self.frames.last().is_none_or(|frame| frame.subtransaction != subtransaction) {
            self.frames.push(Frame { subtransaction, inserted: 0, deleted: 0 });
        }
        self.frames.last_mut().expect("pushed above")
    }

    /// Gives back reservations that will not become rows.
    fn give_back(&self, rows: i64) {
        if let Held::Shared { counter, .. } = self.held {
            counter.release(rows);
        }
    }

    /// Ends the touch's part in the transaction; returns whether it is kept for the next one.
    fn finish(&mut self, committed: bool, truncated: bool) -> bool {
        if let Held::Shared { counter, .. } = self.held {
            if committed && !truncated {
                counter.commit(self.inserted(), self.deleted());
            } else {
                // Aborted, or its rows went with a TRUNCATE (whose counters are forgotten anyway).
                counter.release(self.inserted());
            }
            counter.unpin();
        }
        self.frames.clear();
        self.active = false;
        self.statement_rows = (pg_sys::InvalidCommandId, 0);
        self.recount_at_commit = false;
        matches!(self.held, Held::Shared { .. })
    }
}

/// A backend keeps at most this many idle touches (about 200 bytes each).
const MAX_KEPT_TOUCHES: usize = 10_000;

struct Ledger {
    /// Touches by slot; `index` maps a key (quota id, truncation count, company text) to its slot.
    slots: Vec<Option<Touch>>,
    free_slots: Vec<usize>,
    index: FxHashMap<Vec<u8>, usize>,
    /// Slots touched by the current transaction.
    active: Vec<usize>,
    /// (quota id, subtransaction) of every TRUNCATE so far.
    truncations: Vec<(i64, pg_sys::SubTransactionId)>,
    /// The key of the row at hand, rebuilt in place for every row.
    key: Vec<u8>,
    /// Configuration generation the kept touches were made under.
    generation: u64,
}

#[unsafe(link_section = ".data.tenant_scale.per_statement")]
static LEDGER: BackendLocal<RefCell<Ledger>> = BackendLocal::new(RefCell::new(Ledger::EMPTY));

impl Ledger {
    const EMPTY: Ledger = Ledger {
        slots: Vec::new(),
        free_slots: Vec::new(),
        index: FxHashMap::with_hasher(FxBuildHasher),
        active: Vec::new(),
        truncations: Vec::new(),
        key: Vec::new(),
        generation: 0,
    };

    fn truncations_of(&self, quota_id: i64) -> u32 {
        if self.truncations.is_empty() {
            return 0;
        }
        self.truncations.iter().filter(|(quota, _)| *quota == quota_id).count() as u32
    }

    fn truncated(&self, quota_id: i64) -> bool {
        self.truncations.iter().any(|(quota, _)| *quota == quota_id)
    }

    fn set_key(&mut self, quota_id: i64, company: &[u8]) {
        let truncations = self.truncations_of(quota_id);
        self.key.clear();
        self.key.extend_from_slice(&quota_id.to_le_bytes());
        self.key.extend_from_slice(&truncations.to_le_bytes());
        self.key.extend_from_slice(company);
    }

    fn touch(&mut self, slot: usize) -> &mut Touch {
        self.slots[slot].as_mut().expect("an occupied slot")
    }

    fn insert(&mut self, touch: Touch) -> usize {
        let key = touch.key.clone();
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot] = Some(touch);
                slot
            }
            None => {
                self.slots.push(Some(touch));
                self.slots.len() - 1
            }
        };
        self.index.insert(key, slot);
        slot
    }

    fn remove(&mut self, slot: usize) {
        if let Some(touch) = self.slots[slot].take() {
            self.index.remove(&touch.key);
            self.free_slots.push(slot);
        }
    }

    /// Whether the kept touches must go at the end of a transaction: made under another
    /// configuration, or too many of them.
    fn is_stale(&self) -> bool {
        self.generation != config::generation() || self.index.len() > MAX_KEPT_TOUCHES
    }

    /// Ends the transaction for every touch in it, keeping the shared ones as idle cache.
    fn finish_transaction(&mut self, committed: bool) {
        // Taken and put back so that the list keeps its allocation from one transaction to the next.
        let mut active = std::mem::take(&mut self.active);
        for &slot in &active {
            let quota_id = self.touch(slot).def.quota_id;
            let truncated = self.truncated(quota_id);
            if !self.touch(slot).finish(committed, truncated) {
                self.remove(slot);
            }
        }
        active.clear();
        self.active = active;
        self.truncations.clear();
        if self.is_stale() {
            *self = Ledger {
                key: std::mem::take(&mut self.key),
                generation: config::generation(),
                ..Ledger::EMPTY
            };
        }
    }
}

/// Applies one row's change to the counter of (quota of `def`, `company`). `company_datum` is the
/// company as a value of the column's type. Raises 53400 for an insert past the limit.
pub(super) fn record_row(
    config: &Config,
    def: &Rc<QuotaDef>,
    company: &[u8],
    company_datum: pg_sys::Datum,
    change: Change,
) {
    let subtransaction = unguarded::current_subtransaction();
    let in_upsert = statement::in_upsert();
    let refused = LEDGER.with(|ledger| {
        let mut ledger = ledger.borrow_mut();
        let ledger = &mut *ledger;
        ledger.set_key(def.quota_id, company);
        let slot = match ledger.index.get(ledger.key.as_slice()).copied() {
            None => {
                let company = String::from_utf8_lossy(company);
                open_touch(ledger, config, def, &company, company_datum, subtransaction)
            }
            Some(slot) if !ledger.touch(slot).active => {
                rejoin(ledger, slot, config, def, company_datum, subtransaction);
                slot
            }
            Some(slot) => slot,
        };
        let touch = ledger.touch(slot);
        if touch.limit_generation != config.generation() {
            touch.def = def.clone();
            touch.limit = config.limit(&touch.company, def);
            touch.limit_generation = config.generation();
        }
        if counters::shared().is_none() && !statement::executor_hooks_saw_statement() {
            touch.recount_at_commit = true;
        }
        match change {
            Change::Delete => {
                touch.frame(subtransaction).deleted += 1;
                if in_upsert {
                    statement::note(&touch.key, def, &touch.company, Noted::MovedOut);
                }
                None
            }
            Change::Insert => {
                let command = unguarded::current_command();
                if touch.statement_rows.0 != command {
                    touch.statement_rows = (command, 0);
                }
                match touch.try_reserve(1) {
                    Ok(()) => {
                        touch.frame(subtransaction).inserted += 1;
                        touch.statement_rows.1 += 1;
                        if in_upsert {
                            statement::note(&touch.key, def, &touch.company, Noted::Reserved);
                        }
                        None
                    }
                    Err(_) if in_upsert => {
                        statement::note(&touch.key, def, &touch.company, Noted::Deferred);
                        None
                    }
                    Err(used) => Some((touch.company.clone(), touch.limit, used, touch.statement_rows.1)),
                }
            }
        }
    });
    if let Some((company, limit, used, reserved_by_statement)) = refused {
        raise_quota_exceeded(config, &company, def, limit, used, reserved_by_statement, 1);
    }
}

/// A new touch for the company whose key is `ledger.key`, part of the current transaction.
fn open_touch(
    ledger: &mut Ledger,
    config: &Config,
    def: &Rc<QuotaDef>,
    company: &str,
    company_datum: pg_sys::Datum,
    subtransaction: pg_sys::SubTransactionId,
) -> usize {
    let held = if ledger.truncations_of(def.quota_id) > 0 {
        Held::Exclusive { base: count_rows(config, def, company_datum, company, Seeing::Ours) }
    } else if let Some(shared) = counters::shared() {
        let (counter, generation) = pin(shared, def, company);
        Held::Shared { counter, generation }
    } else {
        Held::Row { committed: slow::lock_committed_count(config, def, company_datum, company) }
    };
    let slot = ledger.insert(Touch {
        key: ledger.key.clone(),
        def: def.clone(),
        company: company.to_string(),
        held,
        active: true,
        origin: subtransaction,
        limit: config.limit(company, def),
        limit_generation: config.generation(),
        frames: Vec::new(),
        statement_rows: (pg_sys::InvalidCommandId, 0),
        recount_at_commit: false,
    });
    ledger.active.push(slot);
    // Built only once the touch holds the pin, so that an error while counting still unpins it.
    if let Held::Shared { counter, .. } = ledger.touch(slot).held {
        counter.ensure_built(|| count_rows(config, def, company_datum, company, Seeing::Committed));
    }
    slot
}

/// Brings a touch kept from an earlier transaction into this one: its counter is pinned again (found
/// again if it was removed meanwhile). Only touches on shared counters are kept.
fn rejoin(
    ledger: &mut Ledger,
    slot: usize,
    config: &Config,
    def: &Rc<QuotaDef>,
    company_datum: pg_sys::Datum,
    subtransaction: pg_sys::SubTransactionId,
) {
    let touch = ledger.touch(slot);
    let Held::Shared { counter, generation } = touch.held else {
        unreachable!("only touches on shared counters are kept between transactions")
    };
    let counter = if counter.repin(generation) {
        counter
    } else {
        let shared = counters::shared().expect("shared counters exist when a touch holds one");
        let (counter, generation) = pin(shared, def, &touch.company);
        touch.held = Held::Shared { counter, generation };
        counter
    };
    touch.active = true;
    touch.origin = subtransaction;
    ledger.active.push(slot);
    let touch = ledger.touch(slot);
    counter.ensure_built(|| count_rows(config, def, company_datum, &touch.company, Seeing::Committed));
}

/// Pins the shared counter of (quota of `def`, `company`), raising 53200 when none is free.
fn pin(shared: &counters::Counters, def: &QuotaDef, company: &str) -> (&'static Counter, u32) {
    // SAFETY: MyDatabaseId is set for the life of a backend connected to a database.
    let database = unsafe { pg_sys::MyDatabaseId };
    shared.pin(&CounterKey::new(database, def.quota_id, company.as_bytes())).unwrap_or_else(|| {
        ErrorReport::new(PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY, "no free tenant_scale quota counter", function_name!())
            .set_detail(format!("All {} counters are in use by transactions in flight.", shared.usage().1))
            .set_hint(
                "Increase tenant_scale.max_quota_counters (requires a restart), or change fewer companies per transaction.",
            )
            .report(PgLogLevel::ERROR);
        unreachable!()
    })
}

/// A TRUNCATE of the quota's table, in the current subtransaction.
pub(super) fn record_truncate(config: &Config, def: &QuotaDef) {
    let subtransaction = unguarded::current_subtransaction();
    LEDGER.with(|ledger| ledger.borrow_mut().truncations.push((def.quota_id, subtransaction)));
    if counters::shared().is_none() {
        // Transactional, so undone with the TRUNCATE if it is rolled back.
        slow::forget_quota(config, def.quota_id);
    }
}

/// True while this transaction holds unsettled changes to the quota `quota_id`.
pub(super) fn holds_changes(quota_id: i64) -> bool {
    LEDGER.with(|ledger| {
        let ledger = ledger.borrow();
        ledger.truncated(quota_id)
            || ledger
                .active
                .iter()
                .any(|slot| ledger.slots[*slot].as_ref().is_some_and(|touch| touch.def.quota_id == quota_id))
    })
}

/// Settles an upsert once it has run: its reservations are replaced by the places it really took,
/// the rows it added to the company plus those it moved away (which are freed only at commit, like
/// deletes). ON CONFLICT skipped or updated the other proposed rows. Raises 53400 when the places
/// taken exceed the limit.
pub(super) fn settle_upsert(
    config: &Config,
    noted: Vec<statement::UpsertEntry>,
    command_id: pg_sys::CommandId,
) {
    let subtransaction = unguarded::current_subtransaction();
    for entry in noted.into_iter().filter(|entry| entry.reserved > 0 || entry.deferred > 0) {
        let Some(company_datum) = entry.def.company_datum(&entry.company) else { continue };
        let added = count_added_by_command(config, &entry.def, company_datum, &entry.company, command_id);
        let inserted = added + entry.moved_out;
        let refused = LEDGER.with(|ledger| {
            let mut ledger = ledger.borrow_mut();
            let slot = *ledger.index.get(&entry.key)?;
            let touch = ledger.touch(slot);
            if inserted < entry.reserved {
                let unused = entry.reserved - inserted;
                touch.give_back(unused);
                touch.frame(subtransaction).inserted -= unused;
                None
            } else if inserted > entry.reserved {
                let needed = inserted - entry.reserved;
                match touch.try_reserve(needed) {
                    Ok(()) => {
                        touch.frame(subtransaction).inserted += needed;
                        None
                    }
                    Err(used) => Some((touch.limit, used, needed)),
                }
            } else {
                None
            }
        });
        if let Some((limit, used, needed)) = refused {
            raise_quota_exceeded(config, &entry.company, &entry.def, limit, used, entry.reserved, needed);
        }
    }
}

/// A transaction event, from crate::statements' transaction callback.
pub(crate) fn transaction_event(event: pg_sys::XactEvent::Type) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => refuse_prepare(),
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT => write_back_locked_counts(),
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            statement::reset();
            let forgotten = LEDGER.with(|ledger| {
                let mut ledger = ledger.borrow_mut();
                let forgotten: Vec<i64> = ledger.truncations.iter().map(|(quota, _)| *quota).collect();
                ledger.finish_transaction(true);
                forgotten
            });
            if let Some(shared) = counters::shared() {
                // SAFETY: MyDatabaseId is set for the life of a backend connected to a database.
                let database = unsafe { pg_sys::MyDatabaseId };
                for quota_id in forgotten {
                    shared.forget_quota(database, quota_id);
                }
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT => {
            statement::reset();
            counters::abandon_build();
            LEDGER.with(|ledger| ledger.borrow_mut().finish_transaction(false));
        }
        _ => {}
    }
}

fn refuse_prepare() {
    let holds = LEDGER.with(|ledger| {
        let ledger = ledger.borrow();
        !ledger.active.is_empty() || !ledger.truncations.is_empty()
    });
    if holds {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "cannot PREPARE a transaction that changed tables under tenant_scale quotas",
            function_name!(),
        )
        .set_detail("A prepared transaction outlives the session that holds its quota reservations.")
        .set_hint("Commit the transaction without two-phase commit, or make the quota-enforced changes in a transaction of their own.")
        .report(PgLogLevel::ERROR);
    }
}

/// Whether COMMIT would change nothing of the quotas' backend state: no upsert noted, no counter
/// touched or table truncated by the transaction, and the kept touches still of the current
/// configuration and within bounds (see `Ledger::finish_transaction`). Never panics (crate::statements
/// calls it before pgrx's guard); false when the state is borrowed, so the full handler decides.
pub(crate) fn settled_at_commit() -> bool {
    statement::no_upsert_running()
        && LEDGER.with(|ledger| {
            ledger.try_borrow().is_ok_and(|ledger| {
                ledger.active.is_empty() && ledger.truncations.is_empty() && !ledger.is_stale()
            })
        })
}

/// Whether pre-commit has work for quotas: writing usage back to the table, which holds it only when
/// the counters are not in shared memory (the library was not preloaded).
pub(crate) fn writes_back_at_pre_commit() -> bool {
    counters::shared().is_none()
}

/// Without shared memory, the new counts go into the usage rows this transaction has locked, while
/// it can still fail.
fn write_back_locked_counts() {
    if !writes_back_at_pre_commit() {
        return;
    }
    // A truncated table's usage rows were deleted with the TRUNCATE: nothing to write for it.
    let writes: Vec<_> = LEDGER.with(|ledger| {
        let ledger = ledger.borrow();
        ledger
            .active
            .iter()
            .filter_map(|slot| ledger.slots[*slot].as_ref())
            .filter_map(|touch| match touch.held {
                Held::Row { committed } if !ledger.truncated(touch.def.quota_id) => Some((
                    touch.def.clone(),
                    touch.company.clone(),
                    committed + touch.inserted() - touch.deleted(),
                    touch.recount_at_commit,
                )),
                _ => None,
            })
            .collect()
    });
    if writes.is_empty() {
        return;
    }
    // The statement's snapshot is gone by pre-commit; SPI needs one.
    // SAFETY: pushed here and popped below, within the transaction.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let config = config::current();
    for (def, company, rows, recount) in writes {
        let rows = match (recount, def.company_datum(&company)) {
            (true, Some(datum)) => count_rows(&config, &def, datum, &company, Seeing::Ours),
            _ => rows,
        };
        slow::write_committed_count(&config, def.quota_id, &company, rows);
    }
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
}

/// A subtransaction event, from crate::statements' subtransaction callback.
pub(crate) fn subtransaction_event(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
) {
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => LEDGER.with(|ledger| {
            let mut ledger = ledger.borrow_mut();
            for slot in ledger.active.clone() {
                let touch = ledger.touch(slot);
                if touch.origin == subtransaction {
                    touch.origin = parent;
                }
                if touch.frames.last().is_some_and(|frame| frame.subtransaction == subtransaction) {
                    let frame = touch.frames.pop().expect("checked above");
                    let merged = touch.frame(parent);
                    merged.inserted += frame.inserted;
                    merged.deleted += frame.deleted;
                }
            }
            for (_, truncated_in) in ledger.truncations.iter_mut() {
                if *truncated_in == subtransaction {
                    *truncated_in = parent;
                }
            }
        }),
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            counters::abandon_build();
            LEDGER.with(|ledger| {
                let mut ledger = ledger.borrow_mut();
                let ledger = &mut *ledger;
                let mut still_active = Vec::with_capacity(ledger.active.len());
                for slot in std::mem::take(&mut ledger.active) {
                    let touch = ledger.touch(slot);
                    if touch.origin == subtransaction {
                        // Everything of this company in the transaction came from the aborted part.
                        if !touch.finish(false, false) {
                            ledger.remove(slot);
                        }
                        continue;
                    }
                    if touch.frames.last().is_some_and(|frame| frame.subtransaction == subtransaction) {
                        let frame = touch.frames.pop().expect("checked above");
                        touch.give_back(frame.inserted);
                    }
                    still_active.push(slot);
                }
                ledger.active = still_active;
                ledger.truncations.retain(|(_, truncated_in)| *truncated_in != subtransaction);
            });
        }
        _ => {}
    }
}
