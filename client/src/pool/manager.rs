//! The pool's own deadpool manager: tokio-postgres connections whose driver task is ours, so that what
//! the server reports about each session stays readable while the connection sits in the pool.
//!
//! Invariants:
//! - deadpool-postgres spawns each tokio-postgres `Connection` into a task of its own and keeps no handle
//!   on it, which puts `Connection::parameter()` (the last ParameterStatus the server sent for each
//!   GUC_REPORT setting, `tenant_scale.company` among them) out of reach. Here the `Connection` is shared
//!   behind a std mutex: the driver task holds it for one `poll_message` at a time (which never blocks,
//!   and never across an await), and a checkout takes it for as long as it reads a parameter.
//! - The driver task is the `JoinHandle` inside the `ClientWrapper`, which aborts it when the connection
//!   is dropped, as deadpool-postgres does with its own.
//! - `Settlement` says whether every request sent on the connection has been answered in full; its mutex
//!   guards three counters and a flag and is never held across an await.
//! - Recycling is deadpool-postgres's `RecyclingMethod::Fast`: a closed client is refused, nothing is sent.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::task::{Poll, ready};

use deadpool::managed::{Metrics, RecycleError, RecycleResult};
use deadpool_postgres::ClientWrapper;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Config, Connection, NoTls, Socket};

use crate::lock::locked;

pub(crate) type Pool = deadpool::managed::Pool<TenantManager>;
pub(crate) type Object = deadpool::managed::Object<TenantManager>;

type SharedConnection = Arc<Mutex<Connection<Socket, NoTlsStream>>>;

/// Opens connections to one server for its `Pool`.
pub(crate) struct TenantManager {
    config: Config,
}

impl TenantManager {
    pub(crate) fn new(config: Config) -> TenantManager {
        TenantManager { config }
    }
}

impl deadpool::managed::Manager for TenantManager {
    type Type = PooledClient;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<PooledClient, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(NoTls).await?;
        let connection = Arc::new(Mutex::new(connection));
        let driver = tokio::spawn(drive(connection.clone()));
        Ok(PooledClient {
            client: ClientWrapper::new(client, driver),
            connection,
            settlement: Settlement::default(),
        })
    }

    async fn recycle(&self, client: &mut PooledClient, _: &Metrics) -> RecycleResult<tokio_postgres::Error> {
        if client.is_closed() {
            log::warn!("connection not recycled: it is closed");
            return Err(RecycleError::message("Connection closed"));
        }
        Ok(())
    }
}

/// Runs the connection until it closes, as tokio-postgres's `impl Future for Connection` does (notices
/// logged, notifications dropped: nothing can LISTEN through the pool), but taking the mutex for one
/// poll at a time, so that the parameters it records can be read between polls.
async fn drive(connection: SharedConnection) {
    let outcome = std::future::poll_fn(|cx| {
        let mut connection = locked(&connection);
        loop {
            match ready!(connection.poll_message(cx)) {
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    log::info!("{}: {}", notice.severity(), notice.message());
                }
                Some(Ok(_)) => {}
                // Both end the connection: tokio-postgres must not be polled again after either.
                Some(Err(error)) => return Poll::Ready(Err(error)),
                None => return Poll::Ready(Ok(())),
            }
        }
    })
    .await;
    if let Err(error) = outcome {
        log::warn!("connection error: {error}");
    }
}

/// What the pool hands out: deadpool-postgres's client (statement cache included) plus the
/// connection's reported parameters and its settlement.
pub(crate) struct PooledClient {
    client: ClientWrapper,
    connection: SharedConnection,
    pub(crate) settlement: Settlement,
}

impl PooledClient {
    /// The value the server last reported for `setting`; `None` when it never reported one (a setting
    /// without GUC_REPORT, or one not defined in that backend).
    ///
    /// Why this is never older than what the caller's last completed statement caused: the server sends
    /// a setting's ParameterStatus before the ReadyForQuery of the statement that changed it; the
    /// tokio-postgres codec never puts an asynchronous message inside a batch of ordinary ones, and the
    /// driver, under this mutex, inserts the value into the map before it forwards the ReadyForQuery
    /// that follows, which is what completes the statement's future. So the insert happens before the
    /// completion, and taking the mutex here orders this read after it (or after a later insert, which
    /// only a request still in flight can cause: see `Settlement`).
    pub(crate) fn reported(&self, setting: &str) -> Option<String> {
        locked(&self.connection).parameter(setting).map(str::to_string)
    }
}

impl Deref for PooledClient {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.client
    }
}

impl DerefMut for PooledClient {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        &mut self.client
    }
}

/// Whether every request sent on a connection has been answered in full, so that no ParameterStatus
/// can still be on its way: a connection is settled when it opens (the startup exchange ends with
/// ReadyForQuery), and again when a statement that had the connection to itself is answered with
/// ReadyForQuery. PostgreSQL answers requests in the order they were sent, so that answer means every
/// request sent before it has been answered too; and since nothing else ran meanwhile, nothing was sent
/// after it.
///
/// What cannot be proved settled is counted unsettled: a statement that failed (tokio-postgres returns
/// the error at the ErrorResponse, before the ReadyForQuery, and an aborted transaction's rollback of a
/// setting is reported in between), one whose future was dropped before its answer, statements that
/// overlapped, and anything done through a transaction (its statements bypass this tracking, and one
/// dropped unfinished sends a ROLLBACK nobody awaits).
#[derive(Debug, Default)]
pub(crate) struct Settlement(Mutex<SettlementState>);

#[derive(Debug, Default)]
struct SettlementState {
    /// Statements begun over the connection's life, and those not finished yet.
    begun: u64,
    running: u32,
    unsettled: bool,
}

impl Settlement {
    pub(crate) fn settled(&self) -> bool {
        !locked(&self.0).unsettled
    }

    /// Marks the connection unsettled until a statement begun after this is answered alone.
    pub(crate) fn unsettle(&self) {
        let mut state = locked(&self.0);
        state.unsettled = true;
        state.begun += 1;
    }

    /// To be called before a statement is sent; `Awaited::answered()` once its ReadyForQuery came. Dropped
    /// without that (an error, a cancelled future), it leaves the connection unsettled.
    pub(crate) fn begin(&self) -> Awaited<'_> {
        let mut state = locked(&self.0);
        state.unsettled = true;
        state.begun += 1;
        let alone = state.running == 0;
        state.running += 1;
        Awaited { settlement: self, number: state.begun, alone, answered: false }
    }
}

/// One statement in flight, from `Settlement::begin()`.
pub(crate) struct Awaited<'a> {
    settlement: &'a Settlement,
    number: u64,
    /// No other statement was running when it began.
    alone: bool,
    answered: bool,
}

impl Awaited<'_> {
    pub(crate) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Awaited<'_> {
    fn drop(&mut self) {
        let mut state = locked(&self.settlement.0);
        state.running -= 1;
        // Alone when it began and nothing begun since: nothing was sent after it.
        if self.answered && self.alone && state.begun == self.number {
            state.unsettled = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Settlement;

    #[test]
    fn a_statement_answered_alone_settles_the_connection() {
        let settlement = Settlement::default();
        assert!(settlement.settled(), "a new connection has nothing in flight");
        let statement = settlement.begin();
        assert!(!settlement.settled(), "in flight");
        statement.answered();
        assert!(settlement.settled());
    }

    #[test]
    fn a_failed_or_dropped_statement_leaves_it_unsettled_until_the_next_one_is_answered() {
        let settlement = Settlement::default();
        drop(settlement.begin());
        assert!(!settlement.settled());
        settlement.begin().answered();
        assert!(settlement.settled(), "answered after the dropped one: that one was answered before");
    }

    #[test]
    fn overlapping_statements_never_settle_it() {
        let settlement = Settlement::default();
        let (first, second) = (settlement.begin(), settlement.begin());
        first.answered();
        // The second may have queued a request after the first's answer (a query prepares first and
        // sends its execution later): the first's answer proves nothing about it.
        drop(second);
        assert!(!settlement.settled());
        let (first, second) = (settlement.begin(), settlement.begin());
        second.answered();
        first.answered();
        assert!(!settlement.settled(), "neither had the connection to itself");
    }

    #[test]
    fn a_transaction_unsettles_it_until_a_later_statement_is_answered() {
        let settlement = Settlement::default();
        settlement.unsettle();
        assert!(!settlement.settled());
        settlement.begin().answered();
        assert!(settlement.settled());
    }
}
