//! The cache against a real Redis: hits, misses, invalidation, single flight, and outages.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tenant_scale_client::RedisConfig;
use tenant_scale_client::cache::{Cache, CacheConfig};
use tenant_scale_harness::Redis;

/// A cache on `redis` that only an outage sends to its fallback: the 2 s command timeout (100 ms by
/// default) keeps a loaded machine from looking like a slow Redis, so counts stay exact.
fn cache(redis: &Redis) -> Cache {
    cache_with_timeout(redis, Duration::from_secs(2))
}

fn cache_with_timeout(redis: &Redis, timeout: Duration) -> Cache {
    let mut redis_config = RedisConfig::new(&redis.url());
    redis_config.retry_after = Duration::from_millis(300);
    redis_config.timeout = timeout;
    Cache::new(CacheConfig::new(redis_config)).unwrap()
}

fn redis_connection(redis: &Redis) -> redis::Connection {
    redis::Client::open(redis.url()).unwrap().get_connection().unwrap()
}

/// Reads `key` with a loader that counts its runs and returns `value`.
async fn read(
    cache: &Cache,
    company: &str,
    namespace: &str,
    key: &str,
    value: u32,
    loads: &AtomicUsize,
) -> u32 {
    cache
        .get_or_set(company, namespace, key, None, || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(value)
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn second_read_hits_and_keys_are_scoped_by_company_and_namespace() {
    let redis = Redis::start().unwrap();
    let cache = cache(&redis);
    let loads = AtomicUsize::new(0);
    assert_eq!(read(&cache, "acme", "patients", "1", 10, &loads).await, 10);
    assert_eq!(read(&cache, "acme", "patients", "1", 99, &loads).await, 10, "served from Redis");
    assert_eq!(read(&cache, "globex", "patients", "1", 20, &loads).await, 20, "another company's key");
    assert_eq!(read(&cache, "acme", "orders", "1", 30, &loads).await, 30, "another namespace's key");
    assert_eq!(loads.load(Ordering::SeqCst), 3);

    let stats = cache.stats();
    assert_eq!(
        (stats.total.hits, stats.total.misses, stats.total.errors, stats.total.fallback_uses),
        (1, 3, 0, 0)
    );
    assert_eq!((stats.companies["acme"].hits, stats.companies["acme"].misses), (1, 2));
    assert!((stats.companies["acme"].hit_rate() - 1.0 / 3.0).abs() < 1e-9);
}

#[tokio::test]
async fn values_expire_with_their_ttl() {
    let redis = Redis::start().unwrap();
    let cache = cache(&redis);
    let load = |value: u32| move || async move { Ok::<_, std::convert::Infallible>(value) };
    let (short, long) = (Duration::from_millis(300), Duration::from_secs(3600));
    assert_eq!(cache.get_or_set("acme", "n", "short", Some(short), load(1)).await.unwrap(), 1);
    assert_eq!(cache.get_or_set("acme", "n", "long", Some(long), load(1)).await.unwrap(), 1);
    assert_eq!(
        cache.get_or_set("acme", "n", "long", Some(long), load(2)).await.unwrap(),
        1,
        "within its TTL"
    );

    // Redis holds each value for its own TTL: ask it rather than race the clock.
    let mut connection = redis_connection(&redis);
    let pttl = |key: &str, connection: &mut redis::Connection| -> i64 {
        let key = format!("ts:c:4:acme:1:n:{}:{key}", key.len());
        redis::cmd("PTTL").arg(key).query(connection).unwrap()
    };
    assert!((1..=300).contains(&pttl("short", &mut connection)));
    assert!((3_590_000..=3_600_000).contains(&pttl("long", &mut connection)));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pttl("short", &mut connection) != -2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cache.get_or_set("acme", "n", "short", Some(short), load(3)).await.unwrap(), 3, "expired");
}

#[tokio::test]
async fn invalidating_a_namespace_or_company_forgets_exactly_its_values() {
    let redis = Redis::start().unwrap();
    let (cache, other_process) = (cache(&redis), cache(&redis));
    let loads = AtomicUsize::new(0);
    for (company, namespace) in [("acme", "patients"), ("acme", "orders"), ("globex", "patients")] {
        read(&cache, company, namespace, "1", 1, &loads).await;
    }
    other_process.invalidate_namespace("acme", "patients").await;
    assert_eq!(read(&cache, "acme", "patients", "1", 2, &loads).await, 2, "reloaded");
    assert_eq!(read(&cache, "acme", "orders", "1", 2, &loads).await, 1, "other namespace kept");

    other_process.invalidate_company("acme").await;
    assert_eq!(read(&cache, "acme", "patients", "1", 3, &loads).await, 3);
    assert_eq!(read(&cache, "acme", "orders", "1", 3, &loads).await, 3);
    assert_eq!(read(&cache, "globex", "patients", "1", 3, &loads).await, 1, "other company kept");

    // O(1): an invalidation wrote one generation key, nothing was scanned or deleted.
    let mut connection = redis_connection(&redis);
    let keys: Vec<String> = redis::cmd("KEYS").arg("ts:gen:*").query(&mut connection).unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_key_run_the_loader_once() {
    let redis = Redis::start().unwrap();
    let cache = Arc::new(cache(&redis));
    let loads = Arc::new(AtomicUsize::new(0));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (cache, loads) = (cache.clone(), loads.clone());
        readers.spawn(async move {
            cache
                .get_or_set("acme", "reports", "slow", None, || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, std::convert::Infallible>("report".to_string())
                })
                .await
                .unwrap()
        });
    }
    let values = readers.join_all().await;
    assert!(values.iter().all(|value| value == "report"));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn loader_errors_reach_the_caller_and_nothing_is_stored() {
    let redis = Redis::start().unwrap();
    let cache = cache(&redis);
    let failed: Result<u32, &str> =
        cache.get_or_set("acme", "n", "k", None, || async { Err("database down") }).await;
    assert_eq!(failed, Err("database down"));
    let loaded: Result<u32, &str> = cache.get_or_set("acme", "n", "k", None, || async { Ok(7) }).await;
    assert_eq!(loaded, Ok(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_fails_no_call_and_redis_is_used_again_when_back() {
    let mut redis = Redis::start().unwrap();
    let cache = cache(&redis);
    let loads = AtomicUsize::new(0);
    let mut failed = 0;
    for round in 0..300u32 {
        if round == 100 {
            redis.stop();
        }
        if round == 200 {
            redis.resume().unwrap();
            // Past the circuit's retry window: the next call tries Redis again.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let key = (round % 10).to_string();
        let result = cache
            .get_or_set("acme", "items", &key, None, || async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(round % 10)
            })
            .await;
        failed += usize::from(result != Ok(round % 10));
        if round == 150 {
            // Invalidated while Redis is down: delivered when it is back.
            cache.invalidate_company("acme").await;
        }
    }
    assert_eq!(failed, 0);
    let stats = cache.stats().total;
    assert!(stats.fallback_uses >= 100, "{stats:?}");
    assert!(stats.errors >= 1, "{stats:?}");
    assert!(cache.health().redis.up, "{:?}", cache.health());
    // 10 loads before the outage, 10 into the fallback, 10 after the invalidation, 10 after the
    // return to Redis (it came back empty).
    assert_eq!(loads.load(Ordering::SeqCst), 40);

    // Redis came back empty: the generation key there is the replayed invalidation's token.
    let mut connection = redis_connection(&redis);
    let generation: Option<String> = redis::cmd("GET").arg("ts:gen:4:acme").query(&mut connection).unwrap();
    assert!(
        generation.is_some_and(|token| token.len() == 16),
        "the invalidation made during the outage was replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_is_bypassed_within_the_timeout() {
    let redis = Redis::start().unwrap();
    let cache = cache_with_timeout(&redis, Duration::from_millis(100));
    let loads = AtomicUsize::new(0);
    read(&cache, "acme", "n", "k", 1, &loads).await;
    let mut admin = redis_connection(&redis);
    redis::cmd("CLIENT").arg("PAUSE").arg(2_000).arg("ALL").exec(&mut admin).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        read(&cache, "acme", "n", "k", 2, &loads).await,
        2,
        "served by the loader through the fallback"
    );
    assert!(started.elapsed() < Duration::from_millis(1_000), "{:?}", started.elapsed());
    assert!(!cache.health().redis.up);
    redis::cmd("CLIENT").arg("UNPAUSE").exec(&mut admin).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_loaded_across_an_invalidation_is_never_served() {
    let redis = Redis::start().unwrap();
    let cache = Arc::new(cache(&redis));
    let (started, loading) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let slow_load = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_set("acme", "n", "k", None, || async move {
                    started.send(()).unwrap();
                    released.await.unwrap();
                    Ok::<_, std::convert::Infallible>(1u32)
                })
                .await
                .unwrap()
        }
    });
    loading.await.unwrap();
    cache.invalidate_namespace("acme", "n").await;
    release.send(()).unwrap();
    assert_eq!(slow_load.await.unwrap(), 1, "its caller still gets what it loaded");
    let loads = AtomicUsize::new(0);
    assert_eq!(
        read(&cache, "acme", "n", "k", 2, &loads).await,
        2,
        "but it was stored under the old generation"
    );
}

#[tokio::test]
async fn a_value_t_cannot_read_counts_one_error_and_one_miss() {
    let redis = Redis::start().unwrap();
    let cache = cache(&redis);
    let number =
        cache.get_or_set("acme", "n", "k", None, || async { Ok::<_, std::convert::Infallible>(1u32) });
    assert_eq!(number.await, Ok(1));
    // Stored as a JSON number, read as a string: reloaded and replaced.
    let text = cache.get_or_set("acme", "n", "k", None, || async {
        Ok::<_, std::convert::Infallible>("one".to_string())
    });
    assert_eq!(text.await.as_deref(), Ok("one"));
    let again = cache.get_or_set("acme", "n", "k", None, || async {
        Ok::<_, std::convert::Infallible>("two".to_string())
    });
    assert_eq!(again.await.as_deref(), Ok("one"), "the replacement is served");
    let stats = cache.stats().total;
    assert_eq!((stats.hits, stats.misses, stats.errors, stats.fallback_uses), (1, 2, 1, 0));
}

#[tokio::test]
async fn a_generation_key_lost_by_redis_never_revives_an_invalidated_value() {
    let redis = Redis::start().unwrap();
    let cache = cache(&redis);
    let loads = AtomicUsize::new(0);
    cache.invalidate_namespace("acme", "n").await;
    assert_eq!(read(&cache, "acme", "n", "k", 1, &loads).await, 1);
    cache.invalidate_namespace("acme", "n").await;
    // Redis loses the generation key (an eviction, a restart that kept the values), and the next
    // invalidation writes it again: a counter would restart where the stale value's tag was.
    let mut connection = redis_connection(&redis);
    let deleted: i64 = redis::cmd("DEL").arg("ts:gen:4:acme:1:n").query(&mut connection).unwrap();
    assert_eq!(deleted, 1);
    cache.invalidate_namespace("acme", "n").await;
    assert_eq!(read(&cache, "acme", "n", "k", 2, &loads).await, 2, "reloaded, not the invalidated 1");
}
