//! One server (the primary or a replica): its deadpool pool (over `manager.rs`), what the last check
//! found, and how many checkouts sent or skipped the attribution.
//!
//! Invariants:
//! - A replica serves reads only while its last check passed (reachable, in recovery, replay not
//!   paused, `healthy` and lag under the maximum, all from `tenant_scale.replica_status()`) and it is
//!   not banned. A failed checkout or a broken connection bans it for `replica_ban` and clears what the
//!   last check found, so no read goes there from that moment; checks go on meanwhile, and it is used
//!   again once the ban is over and a check made after the failure passed.
//! - Checks run on a connection of their own (application_name `tenant-scale-client monitor`), never on
//!   a pooled one: a pooled connection still carries its last user's `tenant_scale.company`, and the
//!   checks must not count as that company's statements. It is reopened when it breaks.
//! - The state mutex is a std mutex, held to read or write the fields, never across an await. The
//!   monitor connection is behind a tokio mutex, since a check holds it across its query.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deadpool::Runtime;
use deadpool::managed::{Hook, HookError};
use tokio_postgres::NoTls;

use super::config::PoolConfig;
use super::error::Error;
use super::manager::{Pool, TenantManager};
use crate::lock::locked;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

/// What the extension's replica check reports; lag in seconds as a float.
const REPLICA_CHECK: &str = "SELECT is_replica, coalesce(lag_seconds, 0)::float8, coalesce(replay_paused, false), \
                             coalesce(healthy, false) FROM tenant_scale.replica_status()";
const PRIMARY_CHECK: &str = "SELECT pg_catalog.pg_is_in_recovery()";
/// application_name of the checks' own connection.
pub const MONITOR_APPLICATION: &str = "tenant-scale-client monitor";

#[derive(Debug, Default)]
struct NodeState {
    /// The last check reached the server and found it in its expected role.
    up: bool,
    /// Replicas: the last check found it fit to serve reads.
    serves_reads: bool,
    lag: Option<Duration>,
    banned_until: Option<Instant>,
    last_error: Option<String>,
}

impl NodeState {
    fn banned(&self) -> bool {
        self.banned_until.is_some_and(|until| Instant::now() < until)
    }
}

pub(crate) struct Node {
    /// host:port/dbname, never the password.
    pub(crate) name: String,
    pub(crate) role: Role,
    pub(crate) pool: Pool,
    min: usize,
    state: Mutex<NodeState>,
    monitor_config: tokio_postgres::Config,
    monitor: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    attributions_sent: AtomicU64,
    attributions_skipped: AtomicU64,
}

/// One node as `TenantPool::health()` reports it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct NodeHealth {
    pub name: String,
    pub role: Role,
    pub up: bool,
    /// Replicas: whether reads go there now (up, lag under the maximum, not banned).
    pub serves_reads: bool,
    pub banned: bool,
    pub lag: Option<Duration>,
    pub last_error: Option<String>,
    /// Connections open, checked out, and tasks waiting for one.
    pub size: usize,
    pub max_size: usize,
    pub in_use: usize,
    pub waiting: usize,
    /// Since the pool started: `SET tenant_scale.company` statements sent, and checkouts that sent none
    /// because the server had last reported that very company on the connection (see `TenantConnection`).
    pub attributions_sent: u64,
    pub attributions_skipped: u64,
}

impl Node {
    pub(crate) fn new(
        url: &str,
        variable: &'static str,
        role: Role,
        config: &PoolConfig,
    ) -> Result<Node, Error> {
        let invalid =
            |reason: String| super::ConfigError::Invalid { variable, value: url.to_string(), reason };
        let mut pg: tokio_postgres::Config =
            url.parse().map_err(|error: tokio_postgres::Error| invalid(error.to_string()))?;
        pg.connect_timeout(config.connect_timeout);
        let name = node_name(&pg);
        let mut monitor_config = pg.clone();
        monitor_config.application_name(MONITOR_APPLICATION);
        let (max, min) = match role {
            Role::Primary => (config.primary_max, config.primary_min),
            Role::Replica => (config.replica_max, config.replica_min),
        };
        let manager = TenantManager::new(pg);
        let recycle_after = config.recycle_after_uses as usize;
        let pool = Pool::builder(manager)
            .max_size(max)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.wait_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            // recycle_count counts the checkouts after the first one.
            .pre_recycle(Hook::sync_fn(move |_, metrics| {
                if metrics.recycle_count + 1 >= recycle_after {
                    return Err(HookError::message("served its share of checkouts"));
                }
                Ok(())
            }))
            .build()
            .map_err(|error| invalid(error.to_string()))?;
        let state = NodeState { up: role == Role::Primary, ..NodeState::default() };
        Ok(Node {
            name,
            role,
            pool,
            min,
            state: Mutex::new(state),
            monitor_config,
            monitor: tokio::sync::Mutex::default(),
            attributions_sent: AtomicU64::new(0),
            attributions_skipped: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, NodeState> {
        locked(&self.state)
    }

    /// A replica fit to serve reads right now.
    pub(crate) fn serves_reads(&self) -> bool {
        let state = self.state();
        state.serves_reads && !state.banned()
    }

    pub(crate) fn ban(&self, ban: Duration, error: String) {
        let mut state = self.state();
        state.banned_until = Some(Instant::now() + ban);
        state.up = false;
        // The check that found it fit predates the failure: a ban shorter than the check interval must
        // not hand reads back to it on that old word.
        state.serves_reads = false;
        state.last_error = Some(error);
    }

    /// Counts a checkout's attribution: sent, or skipped as needless.
    pub(crate) fn count_attribution(&self, sent: bool) {
        let counter = if sent { &self.attributions_sent } else { &self.attributions_skipped };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Asks the server how it is, within `timeout`, and records the answer.
    pub(crate) async fn check(&self, max_lag: Duration, timeout: Duration) {
        let mut monitor = self.monitor.lock().await;
        let outcome = tokio::time::timeout(timeout, async {
            if monitor.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
                let (client, connection) =
                    self.monitor_config.connect(NoTls).await.map_err(|error| error.to_string())?;
                tokio::spawn(connection);
                *monitor = Some(client);
            }
            let client = monitor.as_ref().expect("connected above");
            match self.role {
                Role::Primary => {
                    let row =
                        client.query_one(PRIMARY_CHECK, &[]).await.map_err(|error| error.to_string())?;
                    let in_recovery: bool = row.get(0);
                    Ok((!in_recovery, None, if in_recovery { Some("in recovery".to_string()) } else { None }))
                }
                Role::Replica => {
                    let row =
                        client.query_one(REPLICA_CHECK, &[]).await.map_err(|error| error.to_string())?;
                    let (is_replica, lag, paused, healthy): (bool, f64, bool, bool) =
                        (row.get(0), row.get(1), row.get(2), row.get(3));
                    let lag = Duration::from_secs_f64(lag.max(0.0));
                    let problem = if !is_replica {
                        Some("not in recovery".to_string())
                    } else if paused {
                        Some("replay is paused".to_string())
                    } else if !healthy {
                        Some("replica_status() reports it unhealthy".to_string())
                    } else if lag > max_lag {
                        Some(format!("lag {lag:?} over the maximum {max_lag:?}"))
                    } else {
                        None
                    };
                    Ok((problem.is_none(), Some(lag), problem))
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        if outcome.is_err() {
            // Whatever broke, the next check starts on a fresh connection.
            *monitor = None;
        }
        drop(monitor);
        let mut state = self.state();
        match outcome {
            Ok((fit, lag, problem)) => {
                state.up = true;
                state.serves_reads = self.role == Role::Replica && fit;
                state.lag = lag;
                if problem.is_some() {
                    state.last_error = problem;
                }
            }
            Err(error) => {
                state.up = false;
                state.serves_reads = false;
                state.last_error = Some(error);
            }
        }
    }

    /// Closes the checks' own connection (at shutdown), unless a check still holds it at `deadline`:
    /// that one is abandoned and its connection closes when the node is dropped.
    pub(crate) async fn close_monitor(&self, deadline: tokio::time::Instant) {
        if let Ok(mut monitor) = tokio::time::timeout_at(deadline, self.monitor.lock()).await {
            monitor.take();
        }
    }

    /// Closes idle connections unused for `idle_timeout` above the minimum, and opens the connections
    /// missing up to the minimum when the node is up. Runs are never concurrent (the pool's monitor
    /// task runs them one after the other, and `connect()` runs the first before starting it).
    pub(crate) async fn maintain(&self, idle_timeout: Duration) {
        let mut removable = self.pool.status().size.saturating_sub(self.min);
        self.pool.retain(|_, metrics| {
            if removable > 0 && metrics.last_used() >= idle_timeout {
                removable -= 1;
                return false;
            }
            true
        });
        if !self.state().up {
            return;
        }
        let status = self.pool.status();
        if status.size >= self.min {
            return;
        }
        // `get()` hands out idle connections before opening new ones, and connections in use count in
        // `size`: taking every idle one plus the missing ones, all held together, opens exactly
        // `min - size` (asking for `min` would open `min` more whenever callers hold some).
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..status.available + (self.min - status.size) {
            let pool = self.pool.clone();
            opening.spawn(async move { pool.get().await });
        }
        let opened = opening.join_all().await;
        drop(opened);
    }

    pub(crate) fn health(&self) -> NodeHealth {
        let status = self.pool.status();
        let state = self.state();
        NodeHealth {
            name: self.name.clone(),
            role: self.role,
            up: state.up,
            serves_reads: state.serves_reads && !state.banned(),
            banned: state.banned(),
            lag: state.lag,
            last_error: state.last_error.clone(),
            size: status.size,
            max_size: status.max_size,
            in_use: status.size - status.available,
            waiting: status.waiting,
            attributions_sent: self.attributions_sent.load(Ordering::Relaxed),
            attributions_skipped: self.attributions_skipped.load(Ordering::Relaxed),
        }
    }
}

fn node_name(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("postgres"))
}
