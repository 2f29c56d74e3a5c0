//! Rate limits against a real Redis, and with Redis stopped (the in-process fallback).

use std::time::Duration;

use tenant_scale_client::RedisConfig;
use tenant_scale_client::ratelimit::{
    Backend, Decision, Quota, RateLimitConfig, RateLimitError, RateLimiter,
};
use tenant_scale_harness::Redis;

const HOUR: Duration = Duration::from_secs(3600);

fn limiter(redis: &Redis) -> RateLimiter {
    let config = RateLimitConfig::default().with_plan("tiny", Quota::new(5, HOUR));
    RateLimiter::new(RedisConfig::new(&redis.url()), config).unwrap()
}

/// Sends `n` requests of `company` on `plan`; returns how many were admitted and the last decision.
async fn burst(limiter: &RateLimiter, company: &str, plan: &str, n: usize) -> (usize, Decision) {
    let mut admitted = 0;
    let mut last = None;
    for _ in 0..n {
        let decision = limiter.check(company, plan, None).await.unwrap();
        admitted += usize::from(decision.allowed);
        last = Some(decision);
    }
    (admitted, last.unwrap())
}

/// Seconds rounded up, as the headers carry them.
fn header_seconds(duration: Duration) -> String {
    duration.as_micros().div_ceil(1_000_000).to_string()
}

/// The value of header `name` in `decision.headers()`.
fn header(decision: &Decision, name: &str) -> Option<String> {
    decision.headers().into_iter().find(|(key, _)| *key == name).map(|(_, value)| value)
}

#[tokio::test]
async fn a_plan_of_500_admits_exactly_500_in_redis_and_refuses_the_501st_with_retry_after() {
    let redis = Redis::start().unwrap();
    // 500 per 500 hours: one request is admitted every hour, so however long the 500 round trips
    // take, no refill lands inside the burst.
    let config = RateLimitConfig::default().with_plan("burst", Quota::new(500, HOUR * 500));
    let limiter = RateLimiter::new(RedisConfig::new(&redis.url()), config).unwrap();
    let (admitted, last) = burst(&limiter, "acme", "burst", 500).await;
    assert_eq!((admitted, last.remaining, last.backend), (500, 0, Backend::Redis));

    let refused = limiter.check("acme", "burst", None).await.unwrap();
    assert!(!refused.allowed);
    // The next request is one interval after the first of the burst; the bucket is whole after 500.
    let retry_after = refused.retry_after.unwrap();
    assert!(retry_after <= HOUR && retry_after > HOUR - Duration::from_secs(60), "{retry_after:?}");
    let reset_after = refused.reset_after;
    assert!(
        reset_after <= HOUR * 500 && reset_after > HOUR * 500 - Duration::from_secs(60),
        "{reset_after:?}"
    );

    let reset = header_seconds(reset_after);
    assert_eq!(header(&refused, "RateLimit-Policy").as_deref(), Some("\"burst\";q=500;w=1800000"));
    assert_eq!(header(&refused, "RateLimit"), Some(format!("\"burst\";r=0;t={reset}")));
    assert_eq!(header(&refused, "X-RateLimit-Limit").as_deref(), Some("500"));
    assert_eq!(header(&refused, "X-RateLimit-Remaining").as_deref(), Some("0"));
    assert_eq!(header(&refused, "X-RateLimit-Reset"), Some(reset));
    assert_eq!(header(&refused, "Retry-After"), Some(header_seconds(retry_after)));

    let other = limiter.check("globex", "burst", None).await.unwrap();
    assert_eq!((other.allowed, other.remaining), (true, 499), "every company has its own quota");
    assert_eq!(
        header(&other, "RateLimit"),
        Some(format!("\"burst\";r=499;t={}", header_seconds(other.reset_after)))
    );
    assert_eq!(header(&other, "Retry-After"), None, "only a refusal says when to retry");
}

#[tokio::test]
async fn in_redis_one_interval_after_a_burst_exactly_one_more_request_passes() {
    let redis = Redis::start().unwrap();
    // One request every second: far more than the few milliseconds between two round trips.
    let config = RateLimitConfig::default().with_plan("steady", Quota::new(3, Duration::from_secs(3)));
    let limiter = RateLimiter::new(RedisConfig::new(&redis.url()), config).unwrap();
    let (admitted, _) = burst(&limiter, "acme", "steady", 3).await;
    assert_eq!(admitted, 3);
    let refused = limiter.check("acme", "steady", None).await.unwrap();
    assert!(!refused.allowed);
    tokio::time::sleep(refused.retry_after.unwrap() + Duration::from_millis(20)).await;
    let refilled = limiter.check("acme", "steady", None).await.unwrap();
    assert_eq!((refilled.allowed, refilled.remaining, refilled.backend), (true, 0, Backend::Redis));
    assert!(!limiter.check("acme", "steady", None).await.unwrap().allowed, "exactly one, not two");
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
    assert_eq!(
        limiter.check("acme", "free", Some("nope")).await,
        Err(RateLimitError::UnknownLimiter("nope".into()))
    );
    assert_eq!(
        limiter.check("acme", "platinum", None).await,
        Err(RateLimitError::UnknownPlan("platinum".into()))
    );
}

#[tokio::test]
async fn with_redis_stopped_the_in_process_limit_is_exact_at_the_boundary() {
    let mut redis = Redis::start().unwrap();
    let limiter = limiter(&redis);
    redis.stop();
    let (admitted, last) = burst(&limiter, "acme", "tiny", 6).await;
    assert_eq!(admitted, 5);
    assert_eq!((last.allowed, last.remaining, last.backend), (false, 0, Backend::Local));
    // Five at once on 5 per hour: the next one is one interval (12 minutes) after the first.
    let retry_after = last.retry_after.unwrap();
    assert!(retry_after <= HOUR / 5 && retry_after > HOUR / 5 - Duration::from_secs(60), "{retry_after:?}");
    assert_eq!(header(&last, "Retry-After"), Some(header_seconds(retry_after)));
    assert_eq!(
        header(&last, "RateLimit"),
        Some(format!("\"tiny\";r=0;t={}", header_seconds(last.reset_after)))
    );
    assert!(!limiter.health().up);

    redis.resume().unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let decision = limiter.check("acme", "tiny", None).await.unwrap();
    assert_eq!(decision.backend, Backend::Redis, "back on Redis once it answers");
    assert!(limiter.health().up);
}
