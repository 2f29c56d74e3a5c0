//! The one Redis connection the cache and the rate limiter share, and the rule for when not to use it.
//!
//! Invariants:
//! - Every command is bounded by `RedisConfig::timeout`. A command that fails or times out opens the
//!   circuit: for `retry_after` the callers are told "unavailable" at once (they fall back to their
//!   in-process state) instead of each paying the timeout. The first call after that window tries Redis
//!   again; success closes the circuit.
//! - `outages()` counts the times the circuit opened, so a caller can tell that Redis came back since it
//!   last looked and resynchronise (the cache replays invalidations it could not deliver).
//! - The link connects lazily: a process can start while Redis is down and picks it up when it answers.
//!   After a failure the `redis::aio::ConnectionManager` is dropped and the next try makes a new one
//!   (a manager whose reconnection failed keeps returning that failure); its own retry loop is turned
//!   off because the circuit here already decides when to try again.
//! - The state lock is a std mutex held only to read or write a few fields, never across an await.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::lock::locked;

/// Where Redis is and how long to wait for it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `REDIS_URL`, e.g. `redis://127.0.0.1:6379/`.
    pub url: String,
    /// A command slower than this counts as Redis being unavailable (default 100 ms).
    pub timeout: Duration,
    /// How long callers use their fallback before Redis is tried again (default 1 s).
    pub retry_after: Duration,
}

impl RedisConfig {
    pub fn new(url: &str) -> Self {
        RedisConfig {
            url: url.to_string(),
            timeout: Duration::from_millis(100),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// Whether Redis is in use, as `health()` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisHealth {
    /// False while the circuit is open (callers are on their fallback).
    pub up: bool,
    /// Times Redis became unavailable since the link was created.
    pub outages: u64,
    /// The last error seen, if any.
    pub last_error: Option<String>,
}

/// Why a command did not run on Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// The circuit is open: Redis was not tried.
    Skipped,
    /// Redis was tried and failed or timed out (the circuit is now open).
    Failed,
}

#[derive(Default)]
struct LinkState {
    connection: Option<ConnectionManager>,
    /// While set and in the future, Redis is not tried.
    open_until: Option<Instant>,
    outages: u64,
    last_error: Option<String>,
}

pub(crate) struct RedisLink {
    client: redis::Client,
    config: RedisConfig,
    state: Mutex<LinkState>,
}

/// `RedisConfig::url` is not a Redis URL; the cache and the rate limiter both report it as this.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid REDIS_URL {url:?}: {reason}")]
pub struct InvalidRedisUrl {
    pub url: String,
    pub reason: String,
}

impl RedisLink {
    pub(crate) fn new(config: RedisConfig) -> Result<Self, InvalidRedisUrl> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|error| InvalidRedisUrl { url: config.url.clone(), reason: error.to_string() })?;
        Ok(RedisLink { client, config, state: Mutex::default() })
    }

    fn state(&self) -> MutexGuard<'_, LinkState> {
        locked(&self.state)
    }

    /// Runs `command` on Redis unless the circuit is open; an error means "use your fallback".
    pub(crate) async fn run<T, F, Fut>(&self, command: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let connection = {
            let state = self.state();
            if state.open_until.is_some_and(|until| Instant::now() < until) {
                return Err(Unavailable::Skipped);
            }
            state.connection.clone()
        };
        let connection = match connection {
            Some(connection) => connection,
            None => match tokio::time::timeout(self.config.timeout, self.connect()).await {
                Ok(Ok(connection)) => {
                    self.state().connection = Some(connection.clone());
                    connection
                }
                Ok(Err(error)) => return self.trip(error.to_string()),
                Err(_) => return self.trip(format!("no connection within {:?}", self.config.timeout)),
            },
        };
        match tokio::time::timeout(self.config.timeout, command(connection)).await {
            Ok(Ok(value)) => {
                self.state().open_until = None;
                Ok(value)
            }
            Ok(Err(error)) => self.trip(error.to_string()),
            Err(_) => self.trip(format!("no answer within {:?}", self.config.timeout)),
        }
    }

    async fn connect(&self) -> redis::RedisResult<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(self.config.timeout)
            .set_response_timeout(self.config.timeout);
        self.client.get_connection_manager_with_config(config).await
    }

    fn trip<T>(&self, error: String) -> Result<T, Unavailable> {
        let mut state = self.state();
        let was_open = state.open_until.is_some();
        state.open_until = Some(Instant::now() + self.config.retry_after);
        // A manager whose reconnection failed keeps answering with that failure: start afresh.
        state.connection = None;
        if !was_open {
            state.outages += 1;
        }
        state.last_error = Some(error);
        Err(Unavailable::Failed)
    }

    pub(crate) fn outages(&self) -> u64 {
        self.state().outages
    }

    pub(crate) fn health(&self) -> RedisHealth {
        let state = self.state();
        RedisHealth {
            up: state.open_until.is_none(),
            outages: state.outages,
            last_error: state.last_error.clone(),
        }
    }
}

/// `ts:<kind>:<len>:<part>:<len>:<part>...`: the length prefixes keep `("a:b", "c")` and `("a", "b:c")`
/// apart, whatever characters company names hold.
pub(crate) fn scoped_key(kind: &str, parts: &[&str]) -> String {
    let mut key = format!("ts:{kind}");
    for part in parts {
        key.push_str(&format!(":{}:{part}", part.len()));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::scoped_key;

    #[test]
    fn scoped_keys_of_different_parts_never_collide() {
        assert_ne!(scoped_key("c", &["a:b", "c"]), scoped_key("c", &["a", "b:c"]));
        assert_eq!(scoped_key("rl", &["free", "acme"]), "ts:rl:4:free:4:acme");
    }
}
