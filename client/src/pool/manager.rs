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
        Ok(PooledClient { client: ClientWrapper::new(client, driver), connection })
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
/// connection its driver task polls.
pub(crate) struct PooledClient {
    client: ClientWrapper,
    #[expect(dead_code, reason = "read by the attribution, in the next commit")]
    connection: SharedConnection,
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
