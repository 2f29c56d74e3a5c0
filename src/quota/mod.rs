//! Per-plan row quotas: each company may keep at most as many rows of a resource as its plan allows,
//! enforced by the database on every path a row can take, exact under concurrency.
//!
//! Design (the alternatives and why they lose are in README.md, "Row quotas"):
//! - A trigger on each enforced table (trigger.rs) sees every row inserted, deleted, or moved to
//!   another company, and TRUNCATE. The table's rows are the truth; per (table, company) a counter
//!   caches their count.
//! - With tenant_scale preloaded, counters live in shared memory (counters.rs): committed rows plus
//!   in-flight reservations, reserved atomically per row and never past the limit, so concurrent
//!   writers of one company never wait for each other and can never overshoot. Counters are built
//!   from an index count of the table on first use (after start-up or eviction), with a fresh
//!   snapshot taken once the counter exists (count.rs).
//! - Without shared memory, counters are rows of tenant_scale.quota_usage locked by the writers of a
//!   company until they commit (slow.rs): still exact, but those writers queue.
//! - Each transaction's changes are kept per subtransaction and settled by transaction callbacks at
//!   commit, abort and ROLLBACK TO SAVEPOINT (ledger.rs). INSERT ... ON CONFLICT, whose skipped rows
//!   fire the BEFORE trigger too, is settled against the rows it really added once it has run
//!   (statement.rs). PREPARE TRANSACTION is refused while quota changes are held.
//! - Plans, limits and company plans are cached per backend and reloaded after any change
//!   (config.rs); no table is read per row.

mod api;
mod company;
mod config;
mod count;
mod counters;
mod ledger;
mod refusal;
mod slow;
mod statement;
mod trigger;

pub(crate) use ledger::{
    settled_at_commit, subtransaction_event, transaction_event, writes_back_at_pre_commit,
};
pub(crate) use statement::{statement_ending, statement_finished, statement_started};

pgrx::extension_sql_file!("../../sql/quota.sql", name = "quota_tables");
pgrx::extension_sql_file!(
    "../../sql/quota_privileges.sql",
    name = "quota_privileges",
    requires = [
        "quota_tables",
        api::enforce_quota,
        api::drop_quota,
        api::reconcile,
        api::health_quotas,
        trigger::quota_trigger,
        config::quota_config_changed
    ]
);

pub(crate) fn register_gucs() {
    config::register_gucs();
    counters::register_gucs();
}

pub(crate) fn register_shared_memory() {
    counters::REGION.register();
}

/// The relcache callback; executor hooks and transaction callbacks are crate::statements'.
pub(crate) fn register_callbacks() {
    config::register_invalidation_callback();
}
