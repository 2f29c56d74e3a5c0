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
//!
//! Burst semantics (GCRA, in both modes): with a quota of N per period, the (N+1)th request of a burst
//! is refused, but over any span of one period up to 2N−1 requests can pass (a full bucket plus its
//! refill: N at once, then one every `ceil(period / N)`, of which N−1 fit in the rest of the span).
//! Quotas are checked by [`RateLimiter::new`], so every decision's arithmetic is exact (see
//! [`RateLimitError::InvalidQuota`]).

mod gcra;

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use crate::redis_link::{InvalidRedisUrl, RedisConfig, RedisHealth, RedisLink, scoped_key};
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

    /// The limiter's shape in microseconds, or why this quota cannot be enforced exactly.
    fn rate(self) -> Result<Rate, &'static str> {
        let period_us = self.period.as_micros();
        if self.limit == 0 {
            return Err("the limit must be at least 1 request");
        }
        if period_us == 0 {
            return Err("the period must be at least 1 microsecond");
        }
        if u128::from(self.limit) > period_us {
            return Err("more than one request per microsecond cannot be timed");
        }
        if self.period > MAX_PERIOD {
            return Err("the period must be at most 50 years");
        }
        // Rounding the interval up never admits more than `limit` per period. Both casts are exact:
        // limit <= period_us <= MAX_PERIOD in microseconds, far below i64::MAX.
        let interval_us = period_us.div_ceil(u128::from(self.limit));
        Ok(Rate { interval_us: interval_us as i64, limit: self.limit as i64 })
    }
}

const FIFTEEN_MINUTES: Duration = Duration::from_secs(15 * 60);

/// The longest period a quota may have. TATs are microsecond timestamps that the Lua script holds as
/// doubles, exact below 2^53 µs: now (about 2^50.7 µs since 1970) plus a burst of at most twice the
/// period stays below that for decades.
const MAX_PERIOD: Duration = Duration::from_secs(50 * 365 * 24 * 3600);

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
    /// Sets `plan`'s quota; [`RateLimiter::new`] checks it.
    pub fn with_plan(mut self, plan: &str, quota: Quota) -> Self {
        self.plans.insert(plan.to_string(), quota);
        self
    }

    /// Sets the named limiter's quota; [`RateLimiter::new`] checks it.
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
    /// A quota that cannot be enforced exactly: limit 0, period 0, more than one request per
    /// microsecond, or a period over 50 years. `kind` is "plan" or "limiter".
    #[error("{kind} {name:?}: {} requests per {:?} cannot be enforced: {reason}", quota.limit, quota.period)]
    InvalidQuota { kind: &'static str, name: String, quota: Quota, reason: &'static str },
    #[error(transparent)]
    Redis(#[from] InvalidRedisUrl),
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

/// A checked quota and its shape in microseconds.
#[derive(Clone, Copy)]
struct Policy {
    quota: Quota,
    rate: Rate,
}

/// Checks every quota of `quotas`, naming the first that cannot be enforced.
fn policies(
    kind: &'static str,
    quotas: BTreeMap<String, Quota>,
) -> Result<BTreeMap<String, Policy>, RateLimitError> {
    quotas
        .into_iter()
        .map(|(name, quota)| match quota.rate() {
            Ok(rate) => Ok((name, Policy { quota, rate })),
            Err(reason) => Err(RateLimitError::InvalidQuota { kind, name, quota, reason }),
        })
        .collect()
}

/// Decides requests against per-company, per-plan quotas.
pub struct RateLimiter {
    plans: BTreeMap<String, Policy>,
    limiters: BTreeMap<String, Policy>,
    redis: RedisLink,
    local: LocalLimiter,
}

impl RateLimiter {
    /// Checks every quota (`RateLimitError::InvalidQuota` names the first bad one) and the Redis URL.
    pub fn new(redis: RedisConfig, config: RateLimitConfig) -> Result<Self, RateLimitError> {
        let plans = policies("plan", config.plans)?;
        let limiters = policies("limiter", config.limiters)?;
        Ok(RateLimiter { plans, limiters, redis: RedisLink::new(redis)?, local: LocalLimiter::new() })
    }

    /// Decides one request of `company` on `plan`: against the plan's quota when `limiter` is `None`,
    /// else against the named limiter's.
    pub async fn check(
        &self,
        company: &str,
        plan: &str,
        limiter: Option<&str>,
    ) -> Result<Decision, RateLimitError> {
        let (policy, Policy { quota, rate }) = match limiter {
            None => (plan, *self.plans.get(plan).ok_or_else(|| RateLimitError::UnknownPlan(plan.into()))?),
            Some(name) => {
                (name, *self.limiters.get(name).ok_or_else(|| RateLimitError::UnknownLimiter(name.into()))?)
            }
        };
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
        let rate = Quota::new(3, Duration::from_micros(10)).rate().unwrap();
        assert_eq!(rate, Rate { interval_us: 4, limit: 3 });
        assert!(rate.interval_us * rate.limit >= 10);
        assert_eq!(Quota::new(20_000, FIFTEEN_MINUTES).rate().unwrap().interval_us, 45_000);
        assert_eq!(Quota::new(10, Duration::from_micros(10)).rate(), Ok(Rate { interval_us: 1, limit: 10 }));
        assert!(Quota::new(1, MAX_PERIOD).rate().is_ok());
    }

    fn refusal(config: RateLimitConfig) -> RateLimitError {
        RateLimiter::new(RedisConfig::new("redis://127.0.0.1:1/"), config).err().unwrap()
    }

    #[test]
    fn quotas_that_cannot_be_enforced_exactly_are_refused_naming_the_plan_or_limiter() {
        let second = Duration::from_secs(1);
        let cases = [
            (Quota::new(0, second), "the limit must be at least 1 request"),
            (Quota::new(5, Duration::ZERO), "the period must be at least 1 microsecond"),
            (Quota::new(5, Duration::from_nanos(999)), "the period must be at least 1 microsecond"),
            (
                Quota::new(11, Duration::from_micros(10)),
                "more than one request per microsecond cannot be timed",
            ),
            (Quota::new(u64::MAX, second), "more than one request per microsecond cannot be timed"),
            (Quota::new(1, MAX_PERIOD + Duration::from_micros(1)), "the period must be at most 50 years"),
            (Quota::new(u64::MAX, Duration::MAX), "the period must be at most 50 years"),
        ];
        for (quota, reason) in cases {
            let plan = refusal(RateLimitConfig::default().with_plan("odd", quota));
            assert_eq!(
                plan,
                RateLimitError::InvalidQuota { kind: "plan", name: "odd".into(), quota, reason },
                "{quota:?}"
            );
            assert!(plan.to_string().starts_with("plan \"odd\": "), "{plan}");
            let limiter = refusal(RateLimitConfig::default().with_limiter("export", quota));
            assert!(
                matches!(&limiter, RateLimitError::InvalidQuota { kind: "limiter", name, .. } if name == "export"),
                "{limiter:?}"
            );
        }
        assert_eq!(
            refusal(RateLimitConfig::default().with_plan("free", Quota::new(0, second))).to_string(),
            "plan \"free\": 0 requests per 1s cannot be enforced: the limit must be at least 1 request"
        );
    }

    #[test]
    fn a_bad_redis_url_is_an_error_naming_the_url() {
        let error =
            RateLimiter::new(RedisConfig::new("http://nowhere"), RateLimitConfig::default()).err().unwrap();
        assert!(matches!(error, RateLimitError::Redis(_)), "{error:?}");
        assert!(error.to_string().starts_with("invalid REDIS_URL \"http://nowhere\": "), "{error}");
    }
}
