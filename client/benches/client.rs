//! What the client crate costs over the pieces it is built on, measured side by side in one run:
//! - a cache hit against a raw redis GET of the same value (target <= 1.2x latency);
//! - rate-limit decisions per second, in-process and through Redis;
//! - checkout + query through the tenant pool against raw deadpool-postgres (target <= 1.1x), with the
//!   company changing on every checkout (the attribution `SET` is sent every time) and with one company
//!   (the server's report makes it needless after the first checkout); the changing company is also
//!   compared with raw deadpool-postgres doing the same work by hand (the same `SET`, pipelined before
//!   the query as the pool sends it), which is what the pool itself adds when companies change;
//! - what that `SET` costs by itself: a raw connection running the pool's statement with and without the
//!   `SET` pipelined before it, in latency and in backend CPU.
//!
//! Latencies are means over sequential operations (one client, so the round trip dominates, as it does
//! for a request handler); every figure is measured in interleaved rounds and compared round by round.
//! The cache and database lines go further and alternate their variants operation by operation within
//! a round (each variant on a connection or pool of its own): a few hundred microseconds per operation
//! are at the mercy of whatever else runs on a shared 2-core machine, and this way it weighs on all
//! alike.
//! Started by `benches/run client`, which installs the extension into a private tree first.

use std::time::{Duration, Instant};

use anyhow::Result;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tenant_scale_benches::{BACKEND_CPU_NS, Comparison, machine_header};
use tenant_scale_client::RedisConfig;
use tenant_scale_client::cache::{Cache, CacheConfig};
use tenant_scale_client::pool::{PoolConfig, TenantPool};
use tenant_scale_client::ratelimit::{Backend, RateLimitConfig, RateLimiter};
use tenant_scale_harness::{Cluster, Redis};

const ROUNDS: usize = 7;
const OPS: usize = 3_000;
const COMPANIES: usize = 100;

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
        pool_checkout_against_raw_deadpool(&cluster).await?;
        attribution_cost(&cluster).await
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
    for _ in 0..ROUNDS {
        // As in checkout_round, the two alternate operation by operation; which goes first alternates
        // too, so that neither always follows the other.
        let mut spent = [Duration::ZERO; 2];
        for index in 0..OPS {
            for variant in [index % 2, 1 - index % 2] {
                let started = Instant::now();
                if variant == 0 {
                    let got: String = redis::cmd("GET").arg("raw:42").query_async(&mut raw).await?;
                    anyhow::ensure!(!got.is_empty());
                } else {
                    let got: serde_json::Value = cache
                        .get_or_set("acme", "patients", "42", None, || async {
                            anyhow::bail!("the value is cached")
                        })
                        .await?;
                    anyhow::ensure!(got == value);
                }
                spent[variant] += started.elapsed();
            }
        }
        comparison.record_round(&spent.map(|spent| spent.as_secs_f64() * 1e6 / OPS as f64));
    }
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

const QUERY: &str = "SELECT $1::int";

async fn pool_checkout_against_raw_deadpool(cluster: &Cluster) -> Result<()> {
    let tenant_pool = async || {
        let mut config = PoolConfig::new(&cluster.url())?;
        (config.primary_max, config.primary_min) = (4, 1);
        anyhow::Ok(TenantPool::connect(config).await?)
    };
    // A pool for each tenant variant: one pool's connection would carry the rotating variant's last
    // company into the one-company variant's next checkout.
    let (rotating, one_company) = (tenant_pool().await?, tenant_pool().await?);
    let raw_pool = || {
        anyhow::Ok(
            Pool::builder(Manager::from_config(
                cluster.url().parse()?,
                tokio_postgres::NoTls,
                ManagerConfig { recycling_method: RecyclingMethod::Fast },
            ))
            .max_size(4)
            .build()?,
        )
    };
    // The hand-attributing variant on a pool of its own: its connections carry a company, which the
    // plain variant's must not (an attributed statement costs the server more than an unattributed one).
    let raw_pools = [raw_pool()?, raw_pool()?];
    let companies: Vec<String> = (0..COMPANIES).map(|index| format!("company-{index}")).collect();

    let mut comparison = Comparison::new(
        "checkout + query",
        &[
            "raw deadpool-postgres",
            "tenant pool write(company), 100 companies in turn",
            "tenant pool write(company), one company",
            "raw deadpool-postgres, the same SET by hand, 100 companies in turn",
        ],
        "us/op",
    );
    for _ in 0..ROUNDS {
        comparison.record_round(&checkout_round(&raw_pools, [&rotating, &one_company], &companies).await?);
    }
    print!("{}", comparison.report());
    println!(
        "checkout + query: median ratio tenant pool, 100 companies in turn / raw deadpool-postgres with the \
         same SET by hand {:.3}x",
        comparison.median_ratio_to(1, 3)
    );
    for (name, pool) in [("100 companies in turn", &rotating), ("one company", &one_company)] {
        let primary = &pool.health().await[0];
        println!(
            "checkout + query: {name}: {} attributions sent, {} skipped",
            primary.attributions_sent, primary.attributions_skipped
        );
        pool.close(Duration::from_secs(5)).await?;
    }
    Ok(())
}

/// `OPS` checkouts + queries of each variant, alternating operation by operation, so that a change of
/// load on this shared machine weighs on every variant alike; returns the mean us/op of each: raw
/// deadpool-postgres, the tenant pool with companies in turn and with one company, and raw
/// deadpool-postgres attributing by hand (`raw_pools[1]`).
async fn checkout_round(
    raw_pools: &[Pool; 2],
    tenant_pools: [&TenantPool; 2],
    companies: &[String],
) -> Result<[f64; 4]> {
    let mut spent = [Duration::ZERO; 4];
    for index in 0..OPS {
        let value = index as i32;
        let company = &companies[index % COMPANIES];
        for (variant, spent) in spent.iter_mut().enumerate() {
            let started = Instant::now();
            let got: i32 = match variant {
                0 => {
                    let client = raw_pools[0].get().await?;
                    let statement = client.prepare_cached(QUERY).await?;
                    client.query_one(&statement, &[&value]).await?.get(0)
                }
                1 | 2 => {
                    let company = if variant == 1 { company } else { &companies[0] };
                    let connection = tenant_pools[variant - 1].write(Some(company)).await?;
                    let statement = connection.prepare_cached(QUERY).await?;
                    connection.query_one(&statement, &[&value]).await?.get(0)
                }
                _ => {
                    let client = raw_pools[1].get().await?;
                    let statement = client.prepare_cached(QUERY).await?;
                    let set = format!("SET tenant_scale.company = '{company}'");
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&value];
                    let query = client.query_one(&statement, &params);
                    let (set, row) = tokio::join!(biased; client.batch_execute(&set), query);
                    set?;
                    row?.get(0)
                }
            };
            *spent += started.elapsed();
            anyhow::ensure!(got == value);
        }
    }
    Ok(spent.map(|spent| spent.as_secs_f64() * 1e6 / OPS as f64))
}

/// A raw connection with the pool's statement prepared, and the query reading its backend's CPU time.
struct RawSession {
    client: tokio_postgres::Client,
    query: tokio_postgres::Statement,
    backend_cpu: tokio_postgres::Statement,
}

/// The pool's statement on a raw connection, alone or after the attribution `SET` pipelined in the same
/// write (as the pool sends it): operations per second, and per second of the backend's CPU time. One
/// connection per variant, so that each backend's CPU time is one variant's.
async fn attribution_cost(cluster: &Cluster) -> Result<()> {
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let (client, connection) = tokio_postgres::connect(&cluster.connstr(), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let (query, backend_cpu) =
            (client.prepare(QUERY).await?, client.prepare(&format!("SELECT {BACKEND_CPU_NS}")).await?);
        sessions.push(RawSession { client, query, backend_cpu });
    }
    let variants = ["SELECT $1::int", "SET tenant_scale.company, then SELECT $1::int in the same write"];
    let mut by_time = Comparison::new("one raw connection", &variants, "ops/s");
    let mut by_cpu = Comparison::new("one raw connection", &variants, "per server CPU second");
    for _ in 0..ROUNDS {
        // As in checkout_round: the variants alternate operation by operation.
        let round = attribution_round(&sessions).await?;
        by_time.record_round(&round.map(|(rate, _)| rate));
        by_cpu.record_round(&round.map(|(_, rate_per_cpu)| rate_per_cpu));
    }
    print!("{}{}", by_time.report(), by_cpu.report());
    Ok(())
}

async fn attribution_round(sessions: &[RawSession]) -> Result<[(f64, f64); 2]> {
    let backend_cpu_ns = async |session: &RawSession| -> Result<i64> {
        Ok(session.client.query_one(&session.backend_cpu, &[]).await?.get(0))
    };
    let (mut spent, mut cpu_ns) = ([Duration::ZERO; 2], [0; 2]);
    for (variant, session) in sessions.iter().enumerate() {
        cpu_ns[variant] -= backend_cpu_ns(session).await?;
    }
    for index in 0..OPS {
        let value = index as i32;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&value];
        for (variant, session) in sessions.iter().enumerate() {
            let started = Instant::now();
            let row = if variant == 0 {
                session.client.query_one(&session.query, &params).await?
            } else {
                let set = format!("SET tenant_scale.company = 'company-{}'", index % COMPANIES);
                let set = session.client.batch_execute(&set);
                let (set, row) = tokio::join!(biased; set, session.client.query_one(&session.query, &params));
                set?;
                row?
            };
            spent[variant] += started.elapsed();
            anyhow::ensure!(row.get::<_, i32>(0) == value);
        }
    }
    for (variant, session) in sessions.iter().enumerate() {
        cpu_ns[variant] += backend_cpu_ns(session).await?;
    }
    Ok([0, 1].map(|variant| {
        (OPS as f64 / spent[variant].as_secs_f64(), OPS as f64 * 1e9 / cpu_ns[variant] as f64)
    }))
}
