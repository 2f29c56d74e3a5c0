//! A pooled connection attributed to one company (or to none).
//!
//! How attribution works, and why this way:
//! - A checkout for a company (or for none: '') guarantees that the session's `tenant_scale.company`
//!   names it when the caller's first statement runs, whatever the connection's previous users did. The
//!   pool does not trust its own memory of what it set: the server reports the setting (GUC_REPORT, a
//!   ParameterStatus message when the session starts and after every change, whatever caused it: SET,
//!   set_config, RESET, a SET undone by a rollback, DISCARD ALL), and a checkout sends a session-level
//!   `SET` unless both hold: the server's last report for this connection is exactly the company, and
//!   the connection is settled, that is every request sent on it has been answered in full, so no
//!   report can still be on its way (`Settlement` in manager.rs; the memory-ordering argument is at
//!   `PooledClient::reported`). A connection stops being settled when a statement is sent and becomes
//!   settled again only when a statement that had the connection to itself has been answered in full:
//!   a failed statement, a future dropped before its answer, overlapping statements and
//!   `transaction()` all leave it unsettled, and its next checkout sends the `SET`. When the server
//!   never reported the setting (the extension not preloaded, or an older extension without
//!   GUC_REPORT), every checkout sends it. `TenantPool::health()` counts, per node, the `SET`s sent and
//!   the checkouts that skipped it.
//! - Nothing is undone on return, so nothing is left for a recycle step (a `RESET` on recycle would cost
//!   a round trip and would fail, leaving the old value, on a connection whose transaction had failed).
//! - The setting runs as its own statement, before any statement of the caller, so it commits on its
//!   own: a caller's transaction that fails or rolls back cannot take it back, and the statements after
//!   the rollback stay attributed. `SET LOCAL` would attribute only the statements inside an explicit
//!   transaction and nothing in autocommit.
//! - It is a utility statement sent with the simple protocol, not `SELECT set_config(...)`: it needs no
//!   prepared statement (no round trip on a connection's first checkout), and statistics that follow
//!   the executor (as the extension's do) do not count it as a call of the previous company, which
//!   the value at its start still names. The company is sent as an escaped `E''` literal; a name the
//!   setting cannot hold (a NUL byte, more than 63 bytes) is refused before anything is sent.
//! - It is not awaited on its own: it is queued together with the caller's first statement
//!   (tokio-postgres writes both in one go, and PostgreSQL answers them in order), and both results are
//!   awaited together. It is still one more statement for the server (see benches/RESULTS.md). The
//!   setting can then only fail when the statement behind it fails too (an aborted transaction, a lost
//!   connection) or when the server has no such setting (nothing could be attributed before either);
//!   the caller gets `Error::Attribution` and the connection is discarded instead of going back to the
//!   pool. A connection left in a failed transaction is never skipped: the failure left it unsettled.
//! - A `Transaction` from `transaction()` rolls back when dropped unfinished (tokio-postgres queues the
//!   ROLLBACK), so it is over before the next checkout's statements run. The pool cannot read a
//!   connection's transaction status (tokio-postgres does not expose it), but it knows which checkouts
//!   took a raw path (`batch_execute`, `client()`), the usual ways to leave a `BEGIN` open: those
//!   connections are closed when returned, never handed to the next checkout, whose `SET` and
//!   statements would otherwise run (and commit) inside that transaction. A `BEGIN` sent as a single
//!   statement through `execute`/`query` is not seen; use `transaction()`.
//! - One case the reports cannot cover: a value that comes from the server's configuration (a session
//!   that never set it, or reset it) changes on a configuration reload without a report until the
//!   session's next statement has run. It only matters if `tenant_scale.company` is set in
//!   postgresql.conf (or by ALTER SYSTEM), which names one company for every unattributed session
//!   anyway; don't.

use std::future::Future;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement, ToStatement};

use super::error::{Error, QuotaExceeded};
use super::manager::Object;
use super::node::{Node, Role};
use crate::lock::locked;

const COMPANY_SETTING: &str = "tenant_scale.company";

/// The longest company name the setting takes (NAMEDATALEN - 1 bytes, as the extension checks).
const MAX_COMPANY_BYTES: usize = 63;

/// Why the server would refuse `company` as the setting's value. Refused here, before anything is sent:
/// a refused attribution would leave the previous value in place for a statement already queued.
fn unattributable(company: &str) -> Option<&'static str> {
    if company.contains('\0') {
        Some("it contains a NUL byte")
    } else if company.len() > MAX_COMPANY_BYTES {
        Some("it is longer than 63 bytes")
    } else {
        None
    }
}

/// The statement that attributes a session to `company`.
fn attribution_sql(company: &str) -> String {
    format!("SET {COMPANY_SETTING} = E'{}'", company.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Whether a checkout for `company` must send the attribution: unless the server's last report of the
/// setting on the connection (`reported`, `None` when it never sent one) names exactly that company and
/// no request can still change it (`settled`).
fn attribution_needed(company: &str, reported: Option<&str>, settled: bool) -> bool {
    !(settled && reported == Some(company))
}

/// A connection checked out of a `TenantPool`; it goes back to the pool when dropped.
///
/// Its statement methods mirror tokio-postgres's and return [`Error`], with quota errors typed.
pub struct TenantConnection {
    object: Option<Object>,
    node: Arc<Node>,
    company: String,
    /// The attribution statement, until it has been sent; none when the connection already carries
    /// the company.
    pending_attribution: Mutex<Option<String>>,
    /// Set when the connection must not go back to the pool: it broke, or the caller took a raw path
    /// that may have left a transaction open.
    discard: std::sync::atomic::AtomicBool,
    ban: std::time::Duration,
}

impl TenantConnection {
    pub(crate) fn attach(
        object: Object,
        node: Arc<Node>,
        company: Option<&str>,
        ban: std::time::Duration,
    ) -> Result<TenantConnection, Error> {
        let company = company.unwrap_or_default();
        if let Some(reason) = unattributable(company) {
            return Err(Error::InvalidCompany { company: company.to_string(), reason });
        }
        // Nothing of ours runs on the connection between this decision and the first statement: it is
        // checked out to this caller alone.
        let needed = attribution_needed(
            company,
            object.reported(COMPANY_SETTING).as_deref(),
            object.settlement.settled(),
        );
        if !needed {
            node.count_attribution(false);
        }
        Ok(TenantConnection {
            object: Some(object),
            node,
            company: company.to_string(),
            pending_attribution: Mutex::new(needed.then(|| attribution_sql(company))),
            discard: false.into(),
            ban,
        })
    }

    /// The company this connection's statements are attributed to ('' for none).
    pub fn company(&self) -> &str {
        &self.company
    }

    /// Name (host:port/dbname) and role of the server this connection is on.
    pub fn server(&self) -> (&str, Role) {
        (&self.node.name, self.node.role)
    }

    fn object(&self) -> &Object {
        self.object.as_ref().expect("present until drop")
    }

    pub async fn query<T>(&self, statement: &T, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.run(self.object().query(statement, params)).await
    }

    pub async fn query_one<T>(&self, statement: &T, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.run(self.object().query_one(statement, params)).await
    }

    pub async fn query_opt<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.run(self.object().query_opt(statement, params)).await
    }

    pub async fn execute<T>(&self, statement: &T, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.run(self.object().execute(statement, params)).await
    }

    /// Several statements in one simple-protocol message (no parameters).
    ///
    /// What they leave behind (a `BEGIN` not ended) cannot be seen from here, so the connection is
    /// closed when this checkout ends instead of going back to the pool; the next checkout opens a new
    /// one. Use [`transaction()`](Self::transaction) for transactions.
    pub async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
        self.discard_on_return();
        self.run(self.object().batch_execute(sql)).await
    }

    /// Prepares `sql` once per connection (deadpool's statement cache). Preparing runs nothing, so it
    /// does not wait for the attribution (that still goes out with the first statement executed), and
    /// it changes no setting, so the settlement does not track it.
    pub async fn prepare_cached(&self, sql: &str) -> Result<Statement, Error> {
        self.object().prepare_cached(sql).await.map_err(|error| self.failed(error))
    }

    /// A transaction; dropped without `commit()`, it rolls back. Errors of its statements are plain
    /// tokio-postgres errors: [`QuotaExceeded::from_error`] reads a quota error out of them.
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        self.flush_attribution().await?;
        // Its statements, and the ROLLBACK it queues when dropped unfinished, bypass `run()`.
        self.object().settlement.unsettle();
        let node = self.node.name.clone();
        self.object
            .as_mut()
            .expect("present until drop")
            .transaction()
            .await
            .map_err(|source| Error::Database { node, source })
    }

    /// The underlying client, once the attribution has been applied, for what the methods above do not
    /// cover (COPY, notifications, ...). As after `batch_execute`, the connection is closed when this
    /// checkout ends.
    pub async fn client(&self) -> Result<&deadpool_postgres::ClientWrapper, Error> {
        self.discard_on_return();
        self.flush_attribution().await?;
        Ok(self.object())
    }

    /// Closes the connection when this checkout ends instead of returning it to the pool.
    fn discard_on_return(&self) {
        self.discard.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs the caller's statement, preceded on the wire by the attribution when it is still pending.
    async fn run<R>(
        &self,
        statement: impl Future<Output = Result<R, tokio_postgres::Error>>,
    ) -> Result<R, Error> {
        let attribution = locked(&self.pending_attribution).take();
        self.send(attribution, statement).await
    }

    /// Sends the attribution alone if it is still pending, for the paths whose statements bypass `run()`.
    async fn flush_attribution(&self) -> Result<(), Error> {
        let attribution = locked(&self.pending_attribution).take();
        match attribution {
            Some(attribute) => self.send(Some(attribute), async { Ok(()) }).await,
            None => Ok(()),
        }
    }

    /// Sends `statement`, after `attribution` when there is one, and awaits both, tracking them in the
    /// connection's settlement: each statement future this module passes (tokio-postgres's query,
    /// query_one, query_opt, execute, batch_execute) resolves `Ok` only once its ReadyForQuery came, and
    /// resolves `Err` possibly before it.
    async fn send<R>(
        &self,
        attribution: Option<String>,
        statement: impl Future<Output = Result<R, tokio_postgres::Error>>,
    ) -> Result<R, Error> {
        let awaited = self.object().settlement.begin();
        let result = match attribution {
            None => statement.await.map_err(|error| self.failed(error)),
            Some(attribute) => {
                self.node.count_attribution(true);
                // `biased` polls the attribution first, so it is queued on the connection before the
                // caller's statement and PostgreSQL runs them in that order.
                let (attributed, result) =
                    tokio::join!(biased; self.object().batch_execute(&attribute), statement);
                if let Err(source) = attributed {
                    self.discard_on_return();
                    return Err(Error::Attribution {
                        node: self.node.name.clone(),
                        company: self.company.clone(),
                        source,
                    });
                }
                result.map_err(|error| self.failed(error))
            }
        };
        if result.is_ok() {
            awaited.answered();
        }
        result
    }

    /// Types a failed statement's error; a broken connection is discarded and its replica banned.
    fn failed(&self, source: tokio_postgres::Error) -> Error {
        // The company is the one the server named, not this connection's: a connection attributed to
        // one company (or none) may insert another's rows.
        if let Some(quota) = QuotaExceeded::from_error(&source) {
            return Error::Quota(Box::new(quota));
        }
        if source.as_db_error().is_none() && self.object().is_closed() {
            self.discard_on_return();
            if self.node.role == Role::Replica {
                self.node.ban(self.ban, source.to_string());
            }
        }
        Error::Database { node: self.node.name.clone(), source }
    }
}

impl Drop for TenantConnection {
    fn drop(&mut self) {
        if let Some(object) = self.object.take()
            && *self.discard.get_mut()
        {
            drop(Object::take(object));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{attribution_needed, attribution_sql, unattributable};

    #[test]
    fn company_names_are_escaped_inside_the_literal() {
        assert_eq!(attribution_sql("acme"), "SET tenant_scale.company = E'acme'");
        assert_eq!(attribution_sql(""), "SET tenant_scale.company = E''");
        assert_eq!(attribution_sql(r"o'brien\x"), r"SET tenant_scale.company = E'o\'brien\\x'");
    }

    #[test]
    fn the_attribution_is_skipped_only_for_a_settled_report_of_the_same_company() {
        assert!(!attribution_needed("acme", Some("acme"), true));
        assert!(!attribution_needed("", Some(""), true), "none, reported none at connection start");
        assert!(attribution_needed("acme", Some("acme"), false), "a report may still be on its way");
        assert!(attribution_needed("acme", Some("globex"), true));
        assert!(attribution_needed("acme", Some("ACME"), true), "company names are compared exactly");
        assert!(attribution_needed("", None, true), "never reported: not preloaded, or an older extension");
        assert!(attribution_needed("acme", None, true));
    }

    #[test]
    fn names_the_setting_cannot_hold_are_refused_before_sending() {
        assert_eq!(unattributable(&"a".repeat(63)), None);
        assert_eq!(unattributable(&"a".repeat(64)), Some("it is longer than 63 bytes"));
        assert_eq!(unattributable("a\0b"), Some("it contains a NUL byte"));
    }
}
