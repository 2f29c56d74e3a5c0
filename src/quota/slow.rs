//! Counters without shared memory, for servers where tenant_scale is not preloaded.
//!
//! One row per (quota, company) in tenant_scale.quota_usage. The first change a transaction makes to
//! a company's rows locks that row (FOR UPDATE) and reads the company's committed count from it; the
//! lock is held until the transaction ends, so every other writer of that company waits, and the
//! count the holder read stays true. The holder checks the limit against that count plus its own
//! changes, and writes the new count back just before it commits. Exact, but writers of one company
//! queue behind each other's commits: the price of not having shared memory, announced by a NOTICE
//! at enforce_quota.
//!
//! A row is only trusted within the server life that built it (`built_at` = the server's start
//! time): the table is unlogged and counts made while the server ran with shared memory are not
//! kept here, so after any restart a company's row is recounted from the table on first use.

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::config::{Config, QuotaDef};
use super::count::{Seeing, count_rows};
use crate::elevated::{OrRaise, as_extension_owner};

/// Locks the company's usage row for this transaction and returns its committed count.
pub(super) fn lock_committed_count(
    config: &Config,
    def: &QuotaDef,
    company_datum: pg_sys::Datum,
    company: &str,
) -> i64 {
    let locked = as_extension_owner(config.owner, || {
        let select = "SELECT used, built_at OPERATOR(pg_catalog.=) pg_catalog.pg_postmaster_start_time()
                      FROM tenant_scale.quota_usage
                      WHERE quota_id OPERATOR(pg_catalog.=) $1 AND company_id OPERATOR(pg_catalog.=) $2
                      FOR UPDATE";
        let read = || Spi::get_two_with_args::<i64, bool>(select, &[def.quota_id.into(), company.into()]);
        match read() {
            Ok((Some(used), Some(current))) => (used, current),
            _ => {
                // Created as already stale, so that it is counted below; a concurrent creator makes
                // this wait for its commit, and the second read then locks the row it made.
                Spi::run_with_args(
                    "INSERT INTO tenant_scale.quota_usage (quota_id, company_id, used, built_at)
                     VALUES ($1, $2, 0, '-infinity') ON CONFLICT DO NOTHING",
                    &[def.quota_id.into(), company.into()],
                )
                .or_raise("creating a usage row");
                match read() {
                    Ok((Some(used), Some(current))) => (used, current),
                    _ => error!("tenant_scale: could not lock the usage row of company \"{company}\""),
                }
            }
        }
    });
    match locked {
        (used, true) => used,
        (_, false) => {
            let rows = count_rows(config, def, company_datum, company, Seeing::Committed);
            write_committed_count(config, def.quota_id, company, rows);
            rows
        }
    }
}

/// Stores the company's count; called with its row locked by this transaction.
pub(super) fn write_committed_count(config: &Config, quota_id: i64, company: &str, rows: i64) {
    as_extension_owner(config.owner, || {
        Spi::run_with_args(
            "UPDATE tenant_scale.quota_usage SET used = $3, built_at = pg_catalog.pg_postmaster_start_time()
             WHERE quota_id OPERATOR(pg_catalog.=) $1 AND company_id OPERATOR(pg_catalog.=) $2",
            &[quota_id.into(), company.into(), rows.into()],
        )
        .or_raise("writing a usage row");
    });
}

/// Committed count of a company when no transaction of ours holds it, without locking (for status).
pub(super) fn peek_committed_count(config: &Config, quota_id: i64, company: &str) -> Option<i64> {
    as_extension_owner(config.owner, || {
        Spi::get_one_with_args::<i64>(
            "SELECT used FROM tenant_scale.quota_usage
             WHERE quota_id OPERATOR(pg_catalog.=) $1 AND company_id OPERATOR(pg_catalog.=) $2
               AND built_at OPERATOR(pg_catalog.=) pg_catalog.pg_postmaster_start_time()",
            &[quota_id.into(), company.into()],
        )
        .ok()
        .flatten()
    })
}

/// Forgets every usage row of a quota (TRUNCATE or drop_quota): recounted on next use.
pub(super) fn forget_quota(config: &Config, quota_id: i64) {
    as_extension_owner(config.owner, || {
        Spi::run_with_args(
            "DELETE FROM tenant_scale.quota_usage WHERE quota_id OPERATOR(pg_catalog.=) $1",
            &[quota_id.into()],
        )
        .or_raise("forgetting usage rows");
    });
}
