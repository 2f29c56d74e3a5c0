//! Rate limits against a real Redis, and with Redis stopped (the in-process fallback).

use std::time::Duration;

use tenant_scale_client::RedisConfig;
use tenant_scale_client::ratelimit::{Backend, Quota, RateLimitConfig, RateLimiter};
use tenant_scale_harness::Redis;

const HOUR: Duration = Duration::from_secs(3600);

fn limiter(redis: &Redis) -> RateLimiter {
    let config = RateLimitConfig::default().with_plan("tiny", Quota::new(5, HOUR));
    RateLimiter::new(RedisConfig::new(&redis.url()), config).unwrap()
}

/// Sends `n` requests of `company` on `plan`; returns how many were admitted and the last decision.
async fn burst(
    limiter: &RateLimiter,
    company: &str,
    plan: &str,
    n: usize,
) -> (usize, tenant_scale_client::ratelimit::Decision) {
    let mut admitted = 0;
    let mut last = None;
    for _ in 0..n {
        let decision = limiter.check(company, plan, None).await.unwrap();
        admitted += usize::from(decision.allowed);
        last = Some(decision);
    }
    (admitted, last.unwrap())
}

#[tokio::test]
async fn free_plan_admits_exactly_500_in_redis_and_refuses_the_501st_with_retry_after() {
    let redis = Redis::start().unwrap();
    let limiter = limiter(&redis);
    let started = std::time::Instant::now();
    let (admitted, last) = burst(&limiter, "acme", "free", 500).await;
    assert_eq!((admitted, last.remaining, last.backend), (500, 0, Backend::Redis));

    let refused = limiter.check("acme", "free", None).await.unwrap();
    let elapsed = started.elapsed();
    assert!(!refused.allowed);
    // One request is admitted every 900 s / 500 = 1.8 s, counted from the first request of the burst.
    let retry_after = refused.retry_after.unwrap();
    assert!(
        retry_after <= Duration::from_millis(1_800) && retry_after + elapsed >= Duration::from_millis(1_800),
        "{retry_after:?} after {elapsed:?}"
    );
    assert!(
        refused.reset_after <= Duration::from_secs(900)
            && refused.reset_after + elapsed >= Duration::from_secs(900)
    );

    let headers = refused.headers();
    let header = |name: &str| headers.iter().find(|(key, _)| *key == name).map(|(_, value)| value.as_str());
    let reset_seconds = refused.reset_after.as_micros().div_ceil(1_000_000).to_string();
    assert_eq!(header("RateLimit-Policy"), Some("\"free\";q=500;w=900"));
    assert_eq!(header("RateLimit"), Some(format!("\"free\";r=0;t={reset_seconds}").as_str()));
    assert_eq!(header("X-RateLimit-Limit"), Some("500"));
    assert_eq!(header("X-RateLimit-Remaining"), Some("0"));
    assert_eq!(header("X-RateLimit-Reset"), Some(reset_seconds.as_str()));
    assert_eq!(
        header("Retry-After"),
        Some(retry_after.as_micros().div_ceil(1_000_000).max(1).to_string().as_str())
    );

    let other = limiter.check("globex", "free", None).await.unwrap();
    assert_eq!((other.allowed, other.remaining), (true, 499), "every company has its own quota");
}

#[tokio::test]
async fn two_processes_share_one_limit_through_redis() {
    let redis = Redis::start().unwrap();
    let (first, second) = (limiter(&redis), limiter(&redis));
    let (admitted_first, _) = burst(&first, "acme", "tiny", 3).await;
    let (admitted_second, last) = burst(&second, "acme", "tiny", 3).await;
    assert_eq!((admitted_first, admitted_second), (3, 2));
    assert!(!last.allowed);
}

#[tokio::test]
async fn named_limiters_have_their_own_quota_whatever_the_plan() {
    let redis = Redis::start().unwrap();
    let limiter = limiter(&redis);
    let mut admitted = 0;
    for _ in 0..11 {
        admitted += usize::from(limiter.check("acme", "enterprise", Some("strict")).await.unwrap().allowed);
    }
    assert_eq!(admitted, 10);
    assert!(limiter.check("acme", "enterprise", None).await.unwrap().allowed, "the plan quota is separate");
    assert!(limiter.check("acme", "free", Some("nope")).await.is_err());
    assert!(limiter.check("acme", "platinum", None).await.is_err());
}

#[tokio::test]
async fn with_redis_stopped_the_in_process_limit_is_exact_at_the_boundary() {
    let mut redis = Redis::start().unwrap();
    let limiter = limiter(&redis);
    redis.stop();
    let (admitted, last) = burst(&limiter, "acme", "tiny", 6).await;
    assert_eq!(admitted, 5);
    assert_eq!((last.allowed, last.backend), (false, Backend::Local));
    assert!(last.headers().iter().any(|(name, _)| *name == "Retry-After"));
    assert!(!limiter.health().up);

    redis.resume().unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let decision = limiter.check("acme", "tiny", None).await.unwrap();
    assert_eq!(decision.backend, Backend::Redis, "back on Redis once it answers");
    assert!(limiter.health().up);
}
