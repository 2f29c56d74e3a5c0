//! Pool configuration, from code or from the environment.

use std::time::Duration;

/// Sizes and timeouts of the primary and replica pools.
///
/// ```
/// use tenant_scale_client::pool::PoolConfig;
///
/// let config = PoolConfig::new("postgres://app@db.internal/app").unwrap();
/// assert_eq!(config.primary_max, 20);
/// assert!(config.replica_urls.is_empty());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Primary server (`DATABASE_URL`): all writes, and reads when no replica is usable.
    pub primary_url: String,
    /// Read replicas (`DATABASE_READ_REPLICAS`, comma-separated).
    pub replica_urls: Vec<String>,
    /// `DB_POOL_MAX`, default 20.
    pub primary_max: usize,
    /// `DB_POOL_MIN`, default 5: connections kept open while idle.
    pub primary_min: usize,
    /// `DB_REPLICA_POOL_MAX`, default 30, per replica.
    pub replica_max: usize,
    /// `DB_REPLICA_POOL_MIN`, default 10, per replica.
    pub replica_min: usize,
    /// An idle connection above the minimum is closed after this long (30 s).
    pub idle_timeout: Duration,
    /// Giving up on opening a connection (2 s).
    pub connect_timeout: Duration,
    /// Giving up on waiting for a free connection when the pool is exhausted (5 s).
    pub wait_timeout: Duration,
    /// A connection is closed and replaced after serving this many checkouts (7,500), which bounds the
    /// memory a long-lived backend accumulates in its caches.
    pub recycle_after_uses: u32,
    /// A replica whose replay lag (the extension's `replica_status()`) is above this serves no reads (5 s).
    pub max_replica_lag: Duration,
    /// How often every node is checked in the background (2 s).
    pub replica_check_interval: Duration,
    /// How long a replica that failed to hand out a connection serves no reads (10 s).
    pub replica_ban: Duration,
}

/// A configuration value that is missing or unusable; the message names the variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{variable} is not set")]
    Missing { variable: &'static str },
    #[error("{variable}={value:?} is invalid: {reason}")]
    Invalid { variable: &'static str, value: String, reason: String },
}

impl PoolConfig {
    /// Defaults for everything but the primary, whose URL is checked here.
    pub fn new(primary_url: &str) -> Result<Self, ConfigError> {
        Ok(PoolConfig {
            primary_url: checked_url("DATABASE_URL", primary_url)?,
            replica_urls: Vec::new(),
            primary_max: 20,
            primary_min: 5,
            replica_max: 30,
            replica_min: 10,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            wait_timeout: Duration::from_secs(5),
            recycle_after_uses: 7_500,
            max_replica_lag: Duration::from_secs(5),
            replica_check_interval: Duration::from_secs(2),
            replica_ban: Duration::from_secs(10),
        })
    }

    /// Reads `DATABASE_URL` (required), `DATABASE_READ_REPLICAS`, `DB_POOL_MAX`, `DB_POOL_MIN`,
    /// `DB_REPLICA_POOL_MAX` and `DB_REPLICA_POOL_MIN`.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let primary = lookup("DATABASE_URL").ok_or(ConfigError::Missing { variable: "DATABASE_URL" })?;
        let mut config = PoolConfig::new(&primary)?;
        if let Some(list) = lookup("DATABASE_READ_REPLICAS") {
            config.replica_urls = list
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(|url| checked_url("DATABASE_READ_REPLICAS", url))
                .collect::<Result<_, _>>()?;
        }
        let size = |variable: &'static str, default: usize| match lookup(variable) {
            None => Ok(default),
            Some(value) => value.trim().parse::<usize>().map_err(|error| ConfigError::Invalid {
                variable,
                value,
                reason: error.to_string(),
            }),
        };
        config.primary_max = size("DB_POOL_MAX", config.primary_max)?;
        config.primary_min = size("DB_POOL_MIN", config.primary_min)?;
        config.replica_max = size("DB_REPLICA_POOL_MAX", config.replica_max)?;
        config.replica_min = size("DB_REPLICA_POOL_MIN", config.replica_min)?;
        check_bounds("DB_POOL_MAX", "DB_POOL_MIN", config.primary_max, config.primary_min)?;
        check_bounds("DB_REPLICA_POOL_MAX", "DB_REPLICA_POOL_MIN", config.replica_max, config.replica_min)?;
        Ok(config)
    }
}

fn checked_url(variable: &'static str, url: &str) -> Result<String, ConfigError> {
    url.parse::<tokio_postgres::Config>().map_err(|error| ConfigError::Invalid {
        variable,
        value: url.to_string(),
        reason: error.to_string(),
    })?;
    Ok(url.to_string())
}

fn check_bounds(
    max_variable: &'static str,
    min_variable: &'static str,
    max: usize,
    min: usize,
) -> Result<(), ConfigError> {
    if max == 0 {
        return Err(ConfigError::Invalid {
            variable: max_variable,
            value: max.to_string(),
            reason: "a pool needs at least one connection".into(),
        });
    }
    if min > max {
        return Err(ConfigError::Invalid {
            variable: min_variable,
            value: min.to_string(),
            reason: format!("greater than {max_variable}={max}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(key, _)| *key == name).map(|(_, value)| value.to_string())
    }

    #[test]
    fn environment_with_only_database_url_gets_the_documented_defaults() {
        let config = PoolConfig::from_lookup(lookup(&[("DATABASE_URL", "postgres://app@db/app")])).unwrap();
        assert_eq!(config, PoolConfig::new("postgres://app@db/app").unwrap());
        assert_eq!(
            (config.primary_max, config.primary_min, config.replica_max, config.replica_min),
            (20, 5, 30, 10)
        );
        assert_eq!(config.recycle_after_uses, 7_500);
    }

    #[test]
    fn replicas_are_split_on_commas_and_trimmed() {
        let config = PoolConfig::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://app@db/app"),
            ("DATABASE_READ_REPLICAS", " postgres://app@r1/app, postgres://app@r2/app ,"),
        ]))
        .unwrap();
        assert_eq!(config.replica_urls, ["postgres://app@r1/app", "postgres://app@r2/app"]);
    }

    #[test]
    fn every_error_names_its_variable() {
        let missing = PoolConfig::from_lookup(lookup(&[])).unwrap_err();
        assert_eq!(missing, ConfigError::Missing { variable: "DATABASE_URL" });
        assert_eq!(missing.to_string(), "DATABASE_URL is not set");

        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[("DATABASE_URL", "postgres://db/app?connect_timeout=soon")], "DATABASE_URL"),
            (&[("DATABASE_URL", "postgres://db/app"), ("DB_POOL_MAX", "twenty")], "DB_POOL_MAX"),
            (&[("DATABASE_URL", "postgres://db/app"), ("DB_POOL_MAX", "0")], "DB_POOL_MAX"),
            (&[("DATABASE_URL", "postgres://db/app"), ("DB_REPLICA_POOL_MIN", "31")], "DB_REPLICA_POOL_MIN"),
            (
                &[
                    ("DATABASE_URL", "postgres://db/app"),
                    ("DATABASE_READ_REPLICAS", "postgres://r/app?port=x"),
                ],
                "DATABASE_READ_REPLICAS",
            ),
        ];
        for (vars, variable) in cases {
            let error = PoolConfig::from_lookup(lookup(vars)).unwrap_err();
            assert!(
                matches!(&error, ConfigError::Invalid { variable: named, .. } if *named == variable),
                "{vars:?} gave {error:?}"
            );
            assert!(error.to_string().starts_with(variable), "{error}");
        }
    }
}
