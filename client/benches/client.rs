//! What the client crate costs over the pieces it is built on, measured side by side in one run:
//! - a cache hit against a raw redis GET of the same value (target <= 1.2x latency);
//! - rate-limit decisions per second, in-process and through Redis;
//! - checkout + query through the tenant pool against raw deadpool-postgres (target <= 1.1x).
//!
//! Latencies are means over sequential operations (one client, so the round trip dominates, as it does
//! for a request handler); every figure is measured in interleaved rounds and compared round by round.
//! Started by `benches/run client`, which installs the extension into a private tree first.

use std::time::{Duration, Instant};

use anyhow::Result;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tenant_scale_benches::{Comparison, machine_header};
use tenant_scale_client::RedisConfig;
use tenant_scale_client::cache::{Cache, CacheConfig};
use tenant_scale_client::pool::{PoolConfig, TenantPool};
use tenant_scale_client::ratelimit::{Backend, RateLimitConfig, RateLimiter};
use tenant_scale_harness::{Cluster, Redis};

const ROUNDS: usize = 7;
const OPS: usize = 3_000;
const COMPANIES: usize = 100;

/// Mean microseconds per operation over `OPS` sequential runs of `op`.
async fn mean_micros<F, Fut>(mut op: F) -> Result<f64>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let started = Instant::now();
    for index in 0..OPS {
        op(index).await?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / OPS as f64)
}

/// Runs `future` to completion from the synchronous closures `Comparison::run` takes.
fn wait<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

/// Decisions per second over `OPS` sequential checks, companies in turn.
async fn decisions_per_second(limiter: &RateLimiter, expected: Backend) -> Result<f64> {
    let started = Instant::now();
    for index in 0..OPS {
        let decision = limiter.check(&format!("company-{}", index % COMPANIES), "enterprise", None).await?;
        anyhow::ensure!(decision.backend == expected, "decided by {:?}", decision.backend);
    }
    Ok(OPS as f64 / started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    print!("{}", machine_header()?);
    println!("client: {OPS} sequential operations per figure, {ROUNDS} interleaved rounds");
    let redis = Redis::start()?;
    // Preloaded: the attribution is the real setting, and the statistics hooks count every query.
    let cluster = Cluster::builder().start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        cache_hit_against_raw_get(&redis).await?;
        rate_limit_decisions(&redis).await?;
        pool_checkout_against_raw_deadpool(&cluster).await
    })
}

async fn cache_hit_against_raw_get(redis: &Redis) -> Result<()> {
    let cache = Cache::new(CacheConfig::new(RedisConfig::new(&redis.url())))?;
    let value =
        serde_json::json!({"id": 42, "name": "Ada Lovelace", "plan": "professional", "tags": ["a", "b"]});
    let stored = value.clone();
    cache.get_or_set("acme", "patients", "42", None, || async { Ok::<_, anyhow::Error>(stored) }).await?;
    let mut raw = redis::Client::open(redis.url())?.get_connection_manager().await?;
    redis::cmd("SET").arg("raw:42").arg(value.to_string()).exec_async(&mut raw).await?;

    let mut comparison = Comparison::new("cache read", &["raw redis GET", "cache hit (get_or_set)"], "us/op");
    comparison.run(ROUNDS, |variant| {
        wait(mean_micros(|_| {
            let (mut raw, cache, value) = (raw.clone(), &cache, &value);
            async move {
                if variant == 0 {
                    let got: String = redis::cmd("GET").arg("raw:42").query_async(&mut raw).await?;
                    anyhow::ensure!(!got.is_empty());
                } else {
                    let got: serde_json::Value = cache
                        .get_or_set("acme", "patients", "42", None, || async {
                            anyhow::bail!("the value is cached")
                        })
                        .await?;
                    anyhow::ensure!(&got == value);
                }
                Ok(())
            }
        }))
    })?;
    print!("{}", comparison.report());
    let stats = cache.stats().total;
    println!("cache read: {} hits, {} misses, {} errors", stats.hits, stats.misses, stats.errors);
    Ok(())
}

async fn rate_limit_decisions(redis: &Redis) -> Result<()> {
    let through_redis = RateLimiter::new(RedisConfig::new(&redis.url()), RateLimitConfig::default())?;
    // Nothing listens on port 1: the first call opens the circuit, and for an hour every decision is
    // in-process.
    let mut unreachable = RedisConfig::new("redis://127.0.0.1:1/");
    unreachable.retry_after = Duration::from_secs(3600);
    let in_process = RateLimiter::new(unreachable, RateLimitConfig::default())?;
    in_process.check("warm-up", "enterprise", None).await?;

    let mut comparison =
        Comparison::new("rate limit", &["in-process GCRA", "Redis GCRA (Lua)"], "decisions/s");
    comparison.run(ROUNDS, |variant| match variant {
        0 => wait(decisions_per_second(&in_process, Backend::Local)),
        _ => wait(decisions_per_second(&through_redis, Backend::Redis)),
    })?;
    print!("{}", comparison.report());
    Ok(())
}

async fn pool_checkout_against_raw_deadpool(cluster: &Cluster) -> Result<()> {
    const QUERY: &str = "SELECT $1::int";
    let mut config = PoolConfig::new(&cluster.url())?;
    (config.primary_max, config.primary_min) = (4, 1);
    let tenant_pool = TenantPool::connect(config).await?;
    let raw_pool = Pool::builder(Manager::from_config(
        cluster.url().parse()?,
        tokio_postgres::NoTls,
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    ))
    .max_size(4)
    .build()?;
    let companies: Vec<String> = (0..COMPANIES).map(|index| format!("company-{index}")).collect();

    let mut comparison = Comparison::new(
        "checkout + query",
        &["raw deadpool-postgres", "tenant pool write(company)"],
        "us/op",
    );
    comparison.run(ROUNDS, |variant| {
        wait(mean_micros(|index| {
            let (raw_pool, tenant_pool, company) = (&raw_pool, &tenant_pool, &companies[index % COMPANIES]);
            async move {
                let value: i32 = if variant == 0 {
                    let client = raw_pool.get().await?;
                    let statement = client.prepare_cached(QUERY).await?;
                    client.query_one(&statement, &[&(index as i32)]).await?.get(0)
                } else {
                    let connection = tenant_pool.write(Some(company)).await?;
                    let statement = connection.prepare_cached(QUERY).await?;
                    connection.query_one(&statement, &[&(index as i32)]).await?.get(0)
                };
                anyhow::ensure!(value == index as i32);
                Ok(())
            }
        }))
    })?;
    print!("{}", comparison.report());
    tenant_pool.close(Duration::from_secs(5)).await?;
    Ok(())
}
