//! Connections to the primary and its read replicas, attributed to the company they serve.
//!
//! Invariants:
//! - Writes always go to the primary. Reads go round-robin over the replicas that currently serve reads
//!   (see `node.rs`), and to the primary when none does or when every candidate fails to hand out a
//!   connection. A replica that fails to hand one out is banned for `replica_ban`.
//! - A background task checks every node each `replica_check_interval` (replica lag from the
//!   extension's `replica_status()`), closes connections idle past `idle_timeout` above each pool's
//!   minimum and reopens up to the minimum. It holds only a weak reference: dropping the pool ends it.
//! - `close()` refuses new checkouts at once, stops the background task, then waits for checked-out
//!   connections to come back, and finally closes every pool; the one deadline covers all of it (a
//!   check still waiting on a silent server at the deadline is abandoned).
//! - Attribution: see `connection.rs`.

mod config;
mod connection;
mod error;
mod manager;
mod node;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use deadpool_postgres::PoolError;
use tokio::task::JoinHandle;

use crate::lock::locked;
pub use config::{ConfigError, PoolConfig};
pub use connection::TenantConnection;
pub use error::{Error, QuotaExceeded};
use node::Node;
pub use node::{MONITOR_APPLICATION, NodeHealth, Role};

struct Inner {
    config: PoolConfig,
    primary: Arc<Node>,
    replicas: Vec<Arc<Node>>,
    next_replica: AtomicUsize,
    closing: AtomicBool,
    stop_monitor: tokio::sync::watch::Sender<bool>,
}

/// Primary + replicas, handing out connections attributed to a company.
///
/// ```no_run
/// # async fn demo() -> Result<(), tenant_scale_client::pool::Error> {
/// use tenant_scale_client::pool::{PoolConfig, TenantPool};
///
/// let pool = TenantPool::connect(PoolConfig::from_env()?).await?;
/// let connection = pool.read(Some("acme")).await?;
/// let rows = connection.query("SELECT id, name FROM patients WHERE company_id = $1", &[&"acme"]).await?;
/// # drop(rows); Ok(()) }
/// ```
pub struct TenantPool {
    inner: Arc<Inner>,
    monitor: Mutex<Option<JoinHandle<()>>>,
}

impl TenantPool {
    /// Builds the pools, checks every node once (so reads use the replicas from the start) and starts
    /// the background checks. Unreachable servers are not an error here: they show in `health()`.
    pub async fn connect(config: PoolConfig) -> Result<TenantPool, Error> {
        let primary = Arc::new(Node::new(&config.primary_url, "DATABASE_URL", Role::Primary, &config)?);
        let replicas = config
            .replica_urls
            .iter()
            .map(|url| Node::new(url, "DATABASE_READ_REPLICAS", Role::Replica, &config).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let (stop_monitor, stopped) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            primary,
            replicas,
            next_replica: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            stop_monitor,
        });
        inner.check_and_maintain().await;
        let monitor = tokio::spawn(monitor(Arc::downgrade(&inner), stopped));
        Ok(TenantPool { inner, monitor: Mutex::new(Some(monitor)) })
    }

    /// A primary connection for `company`'s writes (and reads that must see them).
    pub async fn write(&self, company: Option<&str>) -> Result<TenantConnection, Error> {
        self.checkout(&self.inner.primary, company).await
    }

    /// A connection for `company`'s reads: a replica that serves reads, else the primary.
    pub async fn read(&self, company: Option<&str>) -> Result<TenantConnection, Error> {
        let replicas = &self.inner.replicas;
        if !replicas.is_empty() {
            let start = self.inner.next_replica.fetch_add(1, Ordering::Relaxed);
            for offset in 0..replicas.len() {
                let replica = &replicas[(start + offset) % replicas.len()];
                if !replica.serves_reads() {
                    continue;
                }
                match self.checkout(replica, company).await {
                    Ok(connection) => return Ok(connection),
                    Err(Error::Closed) => return Err(Error::Closed),
                    Err(_) => continue,
                }
            }
        }
        self.checkout(&self.inner.primary, company).await
    }

    async fn checkout(&self, node: &Arc<Node>, company: Option<&str>) -> Result<TenantConnection, Error> {
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let object = match node.pool.get().await {
            Ok(object) => object,
            Err(PoolError::Closed) => return Err(Error::Closed),
            Err(source) => {
                // An exhausted pool says nothing about the server; anything else does.
                if node.role == Role::Replica
                    && !matches!(source, PoolError::Timeout(deadpool_postgres::TimeoutType::Wait))
                {
                    node.ban(self.inner.config.replica_ban, source.to_string());
                }
                return Err(Error::Checkout { node: node.name.clone(), source });
            }
        };
        TenantConnection::attach(object, node.clone(), company, self.inner.config.replica_ban)
    }

    /// Checks every node now and reports each: up, role, lag, pool size, in use and waiting.
    pub async fn health(&self) -> Vec<NodeHealth> {
        self.inner.check().await;
        self.inner.nodes().map(|node| node.health()).collect()
    }

    /// Graceful shutdown: new checkouts fail with `Error::Closed` at once; connections checked out
    /// are waited for until `deadline` has passed (`Error::CloseTimeout` then); every pool is closed.
    pub async fn close(&self, deadline: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + deadline;
        self.inner.closing.store(true, Ordering::Release);
        self.inner.stop_monitor.send_replace(true);
        let monitor = locked(&self.monitor).take();
        if let Some(mut monitor) = monitor {
            // The stop signal is seen between rounds; a round in progress can wait up to the connect
            // timeout on a server that does not answer, so it is cut off at the deadline.
            if tokio::time::timeout_at(deadline, &mut monitor).await.is_err() {
                monitor.abort();
            }
        }
        let in_use = || self.inner.nodes().map(|node| node.health().in_use).sum::<usize>();
        let waited = tokio::time::timeout_at(deadline, async {
            while in_use() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let still_in_use = in_use();
        for node in self.inner.nodes() {
            node.pool.close();
            node.close_monitor(deadline).await;
        }
        match waited {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::CloseTimeout { in_use: still_in_use }),
        }
    }
}

impl Inner {
    fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        std::iter::once(&self.primary).chain(&self.replicas)
    }

    async fn check(&self) {
        let mut checks = tokio::task::JoinSet::new();
        for node in self.nodes() {
            let (node, max_lag, timeout) =
                (node.clone(), self.config.max_replica_lag, self.config.connect_timeout);
            checks.spawn(async move { node.check(max_lag, timeout).await });
        }
        checks.join_all().await;
    }

    async fn check_and_maintain(&self) {
        self.check().await;
        let mut maintenance = tokio::task::JoinSet::new();
        for node in self.nodes() {
            let (node, idle_timeout) = (node.clone(), self.config.idle_timeout);
            maintenance.spawn(async move { node.maintain(idle_timeout).await });
        }
        maintenance.join_all().await;
    }
}

async fn monitor(inner: Weak<Inner>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let Some(interval) = inner.upgrade().map(|inner| inner.config.replica_check_interval) else { return };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.check_and_maintain().await;
    }
}
