//! Per-company rate limits tiered by plan, with the standard response headers.
//!
//! Every decision is GCRA (see `gcra.rs`): Redis runs it atomically in one Lua script, one round trip per
//! decision, so every process of a service shares one limit per company. When Redis is unavailable
//! (see `redis_link.rs`: down, or slower than its timeout), an in-process GCRA decides instead and the
//! limits then hold per process: N processes admit up to N times the limit until Redis is back. The
//! two states are not merged when Redis returns; Redis simply resumes from what it held.
//!
//! Keys are `ts:rl:<policy>:<company>` with each part length-prefixed, so no company name can collide
//! with another's key.

mod gcra;

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use crate::redis_link::{RedisConfig, RedisHealth, RedisLink, scoped_key};
use gcra::{LocalLimiter, Rate, Verdict};

/// `limit` requests per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub period: Duration,
}

impl Quota {
    pub const fn new(limit: u64, period: Duration) -> Self {
        Quota { limit, period }
    }

    fn rate(self) -> Rate {
        let period_us = i64::try_from(self.period.as_micros()).unwrap_or(i64::MAX);
        let limit = i64::try_from(self.limit).unwrap_or(i64::MAX).max(1);
        // Rounding the interval up never admits more than `limit` per period.
        Rate { interval_us: ((period_us + limit - 1) / limit).max(1), limit }
    }
}

const FIFTEEN_MINUTES: Duration = Duration::from_secs(15 * 60);

/// Plans and named limiters.
///
/// ```
/// use std::time::Duration;
/// use tenant_scale_client::ratelimit::{Quota, RateLimitConfig};
///
/// let config = RateLimitConfig::default().with_limiter("export", Quota::new(5, Duration::from_secs(3600)));
/// assert_eq!(config.plans["professional"].limit, 5_000);
/// assert_eq!(config.limiters["export"].limit, 5);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitConfig {
    /// General request quota of each plan: free 500, basic 2,000, professional 5,000 and enterprise
    /// 20,000 requests per 15 minutes.
    pub plans: BTreeMap<String, Quota>,
    /// Quotas of expensive routes, whatever the plan: ai 100 per hour, upload 300 per hour, strict 10
    /// per minute.
    pub limiters: BTreeMap<String, Quota>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        let plans = [("free", 500), ("basic", 2_000), ("professional", 5_000), ("enterprise", 20_000)]
            .map(|(plan, limit)| (plan.to_string(), Quota::new(limit, FIFTEEN_MINUTES)));
        let limiters = [
            ("ai", Quota::new(100, Duration::from_secs(3600))),
            ("upload", Quota::new(300, Duration::from_secs(3600))),
            ("strict", Quota::new(10, Duration::from_secs(60))),
        ]
        .map(|(name, quota)| (name.to_string(), quota));
        RateLimitConfig { plans: plans.into_iter().collect(), limiters: limiters.into_iter().collect() }
    }
}

impl RateLimitConfig {
    pub fn with_plan(mut self, plan: &str, quota: Quota) -> Self {
        self.plans.insert(plan.to_string(), quota);
        self
    }

    pub fn with_limiter(mut self, name: &str, quota: Quota) -> Self {
        self.limiters.insert(name.to_string(), quota);
        self
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateLimitError {
    #[error("no rate limit is configured for plan {0:?}")]
    UnknownPlan(String),
    #[error("no rate limiter is named {0:?}")]
    UnknownLimiter(String),
    #[error("invalid REDIS_URL: {0}")]
    Redis(String),
}

/// Which state decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Redis,
    /// Redis was unavailable: this process's own state decided.
    Local,
}

/// One decision, and what to tell the client about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The plan name, or the named limiter's name.
    pub policy: String,
    pub limit: u64,
    pub window: Duration,
    pub remaining: u64,
    /// Until the quota is whole again.
    pub reset_after: Duration,
    /// When refused: until one more request would be admitted.
    pub retry_after: Option<Duration>,
    pub backend: Backend,
}

impl Decision {
    /// Response headers for this decision: `RateLimit-Policy` and `RateLimit` as the IETF httpapi
    /// ratelimit-headers draft defines them (structured fields: `"free";q=500;w=900` and
    /// `"free";r=499;t=2`), the legacy `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
    /// `X-RateLimit-Reset` (seconds from now), and `Retry-After` (seconds) when refused. Seconds are
    /// rounded up, so a client that waits as told is never early.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let policy = sf_string(&self.policy);
        let reset = ceil_seconds(self.reset_after);
        let mut headers = vec![
            ("RateLimit-Policy", format!("{policy};q={};w={}", self.limit, ceil_seconds(self.window))),
            ("RateLimit", format!("{policy};r={};t={reset}", self.remaining)),
            ("X-RateLimit-Limit", self.limit.to_string()),
            ("X-RateLimit-Remaining", self.remaining.to_string()),
            ("X-RateLimit-Reset", reset.to_string()),
        ];
        if let Some(retry_after) = self.retry_after {
            headers.push(("Retry-After", ceil_seconds(retry_after).max(1).to_string()));
        }
        headers
    }
}

fn ceil_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// A structured-field String (RFC 8941 §3.3.3): quoted, with `\` and `"` escaped.
fn sf_string(value: &str) -> String {
    let escaped: String = value
        .chars()
        .filter(|c| (' '..='~').contains(c))
        .flat_map(|c| if c == '"' || c == '\\' { vec!['\\', c] } else { vec![c] })
        .collect();
    format!("\"{escaped}\"")
}

static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("gcra.lua")));

/// Decides requests against per-company, per-plan quotas.
pub struct RateLimiter {
    config: RateLimitConfig,
    redis: RedisLink,
    local: LocalLimiter,
}

impl RateLimiter {
    pub fn new(redis: RedisConfig, config: RateLimitConfig) -> Result<Self, RateLimitError> {
        let redis = RedisLink::new(redis).map_err(|error| RateLimitError::Redis(error.to_string()))?;
        Ok(RateLimiter { config, redis, local: LocalLimiter::new() })
    }

    /// Decides one request of `company` on `plan`: against the plan's quota when `limiter` is `None`,
    /// else against the named limiter's.
    pub async fn check(
        &self,
        company: &str,
        plan: &str,
        limiter: Option<&str>,
    ) -> Result<Decision, RateLimitError> {
        let (policy, quota) = match limiter {
            None => {
                (plan, self.config.plans.get(plan).ok_or_else(|| RateLimitError::UnknownPlan(plan.into()))?)
            }
            Some(name) => (
                name,
                self.config.limiters.get(name).ok_or_else(|| RateLimitError::UnknownLimiter(name.into()))?,
            ),
        };
        let rate = quota.rate();
        let key = scoped_key("rl", &[policy, company]);
        let from_redis = self
            .redis
            .run(|mut connection| {
                let key = key.clone();
                async move {
                    let reply: (i64, i64, i64, i64) = SCRIPT
                        .key(key)
                        .arg(rate.interval_us)
                        .arg(rate.limit)
                        .invoke_async(&mut connection)
                        .await?;
                    Ok(reply)
                }
            })
            .await;
        let (verdict, backend) = match from_redis {
            Ok((allowed, remaining, reset_after_us, retry_after_us)) => {
                (Verdict { allowed: allowed == 1, remaining, reset_after_us, retry_after_us }, Backend::Redis)
            }
            Err(_) => (self.local.check(&key, rate), Backend::Local),
        };
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        Ok(Decision {
            allowed: verdict.allowed,
            policy: policy.to_string(),
            limit: quota.limit,
            window: quota.period,
            remaining: u64::try_from(verdict.remaining).unwrap_or(0),
            reset_after: micros(verdict.reset_after_us),
            retry_after: (!verdict.allowed).then(|| micros(verdict.retry_after_us)),
            backend,
        })
    }

    pub fn health(&self) -> RedisHealth {
        self.redis.health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(allowed: bool) -> Decision {
        Decision {
            allowed,
            policy: "free".into(),
            limit: 500,
            window: FIFTEEN_MINUTES,
            remaining: if allowed { 499 } else { 0 },
            reset_after: Duration::from_millis(1_800),
            retry_after: (!allowed).then(|| Duration::from_millis(1_200)),
            backend: Backend::Redis,
        }
    }

    #[test]
    fn admitted_request_gets_draft_and_legacy_headers_without_retry_after() {
        assert_eq!(
            decision(true).headers(),
            [
                ("RateLimit-Policy", "\"free\";q=500;w=900".to_string()),
                ("RateLimit", "\"free\";r=499;t=2".to_string()),
                ("X-RateLimit-Limit", "500".to_string()),
                ("X-RateLimit-Remaining", "499".to_string()),
                ("X-RateLimit-Reset", "2".to_string()),
            ]
        );
    }

    #[test]
    fn refused_request_gets_retry_after_rounded_up() {
        let headers = decision(false).headers();
        assert!(headers.contains(&("Retry-After", "2".to_string())), "{headers:?}");
        assert!(headers.contains(&("RateLimit", "\"free\";r=0;t=2".to_string())), "{headers:?}");
    }

    #[test]
    fn policy_names_are_valid_structured_field_strings() {
        assert_eq!(sf_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(sf_string("tab\there"), "\"tabhere\"");
    }

    #[test]
    fn interval_rounds_up_so_the_period_never_admits_more_than_the_limit() {
        let rate = Quota::new(3, Duration::from_micros(10)).rate();
        assert_eq!(rate, Rate { interval_us: 4, limit: 3 });
        assert!(rate.interval_us * rate.limit >= 10);
        assert_eq!(Quota::new(20_000, FIFTEEN_MINUTES).rate().interval_us, 45_000);
    }
}
