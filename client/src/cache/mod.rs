//! Company-scoped values in Redis, with an in-memory fallback that keeps callers served when Redis is
//! down or slow.
//!
//! Invariants:
//! - Every key is scoped by company and namespace (`ts:c:<company>:<namespace>:<key>`, length-prefixed).
//!   The company and the namespace each have a generation; a value is stored tagged with the two
//!   generations that were current when its load began, and a read (one MGET: both generations and the
//!   value, one round trip) takes a value whose tag is not the current pair for a miss. Invalidating a
//!   company or a namespace is one SET of its generation key to a fresh random token (O(1), no SCAN, no
//!   DEL); stale values are overwritten by the next load or expire with their TTL. A value loaded
//!   across an invalidation carries the old tag, so it is never served. Tokens rather than a counter:
//!   a counter restarts when Redis loses its key (a restart without persistence that kept values, a
//!   failover to a replica behind) and would hand an old tag back to values it had invalidated.
//! - Generation keys have no TTL (a value's tag is only as good as the key behind it), so Redis must
//!   not evict them: run it with `maxmemory-policy` `noeviction` or a `volatile-*` policy (values all
//!   carry a TTL, generation keys none), never `allkeys-*`, under which an evicted generation key would
//!   make values stored before that scope's first invalidation current again.
//! - Single flight: concurrent misses of one key in this process run the loader once; the others wait
//!   for it and read what it stored. Different keys never wait for each other. A flight is left by a
//!   guard's Drop, also when the caller's future is dropped mid-load, so the map of flights holds only
//!   keys some call is working on (at most one entry per call in progress).
//! - Every map keyed by caller input is bounded: flights (above), the in-process generations (at most
//!   `MAX_LOCAL_GENERATIONS`; when full, they are forgotten together with the whole fallback, whose
//!   keys they scope, so nothing stale becomes current) and the per-company stats (see `stats.rs`).
//! - Redis unavailable (see `redis_link.rs`): reads and writes go to a bounded moka cache with the same
//!   TTLs, scoped by in-process generations, and the caller sees no error. The in-process generations
//!   are counters: they live as long as the fallback entries they scope. Invalidations that could not
//!   reach Redis are kept and replayed when it answers again, before it serves anything, and the
//!   fallback is emptied then (it may hold values Redis never saw). Other processes' invalidations made
//!   during the outage reach this process's fallback only through the TTL.
//! - Values are serde_json text in both places.

mod stats;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::lock::locked;
use crate::redis_link::{InvalidRedisUrl, RedisConfig, RedisHealth, RedisLink, Unavailable, scoped_key};
pub use stats::{CacheCounters, CacheStats, MAX_COMPANIES};
use stats::{Event, Recorder};

#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheConfig {
    pub redis: RedisConfig,
    /// TTL of `get_or_set` calls that give none (300 s).
    pub default_ttl: Duration,
    /// Entries the in-memory fallback holds at most (10,000).
    pub fallback_capacity: u64,
}

impl CacheConfig {
    pub fn new(redis: RedisConfig) -> Self {
        CacheConfig { redis, default_ttl: Duration::from_secs(300), fallback_capacity: 10_000 }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error(transparent)]
    Redis(#[from] InvalidRedisUrl),
}

/// What `health()` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheHealth {
    pub redis: RedisHealth,
    /// Entries currently held by the in-memory fallback.
    pub fallback_entries: u64,
}

#[derive(Clone)]
struct Stored {
    json: Arc<str>,
    ttl: Duration,
}

struct TtlPerEntry;

impl moka::Expiry<String, Stored> for TtlPerEntry {
    fn expire_after_create(&self, _key: &String, value: &Stored, _created_at: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// What one lookup found, and where a value loaded now would go.
enum Lookup {
    Hit { json: Arc<str>, store_at: StoreAt },
    Miss(StoreAt),
}

enum StoreAt {
    /// The key, and the generation tag the value goes under.
    Redis {
        key: String,
        tag: String,
    },
    Fallback(String),
}

/// A scope an invalidation applies to: a company, or one namespace of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Scope {
    company: String,
    namespace: Option<String>,
}

impl Scope {
    fn generation_key(&self) -> String {
        match &self.namespace {
            None => scoped_key("gen", &[&self.company]),
            Some(namespace) => scoped_key("gen", &[&self.company, namespace]),
        }
    }
}

/// A fresh generation token: 64 bits from std's randomly keyed hasher (its keys come from the OS once
/// per thread), over a process-wide counter and the clock. Unguessable is not needed, only that a
/// token never comes back: no crate for that.
fn new_generation() -> String {
    static ISSUED: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(ISSUED.fetch_add(1, Ordering::Relaxed));
    hasher
        .write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
    format!("{:016x}", hasher.finish())
}

/// In-process generations kept at most; see the module's invariants for what happens beyond.
const MAX_LOCAL_GENERATIONS: usize = 10_000;

/// This call's place in the single flight of its key; leaving it (on drop) removes the key from the
/// map when nobody else is in it, whether the call finished or was cancelled.
struct Flight<'a> {
    flights: &'a Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    key: &'a str,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = locked(self.flights);
        // The map's Weak does not count: when ours is the last strong reference nobody else waits.
        // Joining happens under the same lock, so nobody can join between this check and the removal.
        if Arc::strong_count(&self.turn) == 1 {
            flights.remove(self.key);
        }
    }
}

pub struct Cache {
    config: CacheConfig,
    redis: RedisLink,
    fallback: moka::future::Cache<String, Stored>,
    /// In-process generations for the fallback, by generation key.
    local_generations: Mutex<HashMap<String, u64>>,
    /// Invalidations Redis has not seen yet.
    pending: Mutex<HashSet<Scope>>,
    /// `redis.outages()` when this cache last resynchronised with Redis.
    synced_outages: AtomicU64,
    flights: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    stats: Recorder,
}

impl Cache {
    pub fn new(config: CacheConfig) -> Result<Self, CacheError> {
        let redis = RedisLink::new(config.redis.clone())?;
        let fallback = moka::future::Cache::builder()
            .max_capacity(config.fallback_capacity)
            .expire_after(TtlPerEntry)
            .build();
        Ok(Cache {
            config,
            redis,
            fallback,
            local_generations: Mutex::default(),
            pending: Mutex::default(),
            synced_outages: AtomicU64::new(0),
            flights: Mutex::default(),
            stats: Recorder::default(),
        })
    }

    /// The value of `key` in `company`'s `namespace`, or what `loader` returns, stored for `ttl` (the
    /// configured default when `None`). A loader error is returned as is and nothing is stored.
    pub async fn get_or_set<T, E, F, Fut>(
        &self,
        company: &str,
        namespace: &str,
        key: &str,
        ttl: Option<Duration>,
        loader: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let base = scoped_key("c", &[company, namespace, key]);
        // Each call counts one hit or one miss, and one error at most however often it meets a value
        // `T` cannot read (before and inside the flight).
        let mut undecodable = false;
        if let Lookup::Hit { json, .. } = self.lookup(company, namespace, &base).await {
            match serde_json::from_str(&json) {
                Ok(value) => {
                    self.stats.record(company, Event::Hit);
                    return Ok(value);
                }
                Err(_) => undecodable = true,
            }
        }
        let flight = self.join_flight(&base);
        let _turn = flight.turn.lock().await;
        // Whoever held the turn before may have stored the value meanwhile.
        let store_at = match self.lookup(company, namespace, &base).await {
            Lookup::Hit { json, store_at } => match serde_json::from_str(&json) {
                Ok(value) => {
                    self.count_undecodable(company, undecodable);
                    self.stats.record(company, Event::Hit);
                    return Ok(value);
                }
                // A value this version of `T` cannot read is replaced by a fresh load.
                Err(_) => {
                    undecodable = true;
                    store_at
                }
            },
            Lookup::Miss(store_at) => store_at,
        };
        self.count_undecodable(company, undecodable);
        self.stats.record(company, Event::Miss);
        let value = loader().await?;
        match serde_json::to_string(&value) {
            Ok(json) => self.store(company, store_at, json, ttl.unwrap_or(self.config.default_ttl)).await,
            Err(_) => self.stats.record(company, Event::Error),
        }
        Ok(value)
    }

    /// Forgets every value of `company`, in O(1).
    pub async fn invalidate_company(&self, company: &str) {
        self.invalidate(Scope { company: company.to_string(), namespace: None }).await;
    }

    /// Forgets every value of one namespace of `company`, in O(1).
    pub async fn invalidate_namespace(&self, company: &str, namespace: &str) {
        self.invalidate(Scope { company: company.to_string(), namespace: Some(namespace.to_string()) }).await;
    }

    pub fn stats(&self) -> CacheStats {
        self.stats.snapshot()
    }

    pub fn health(&self) -> CacheHealth {
        CacheHealth { redis: self.redis.health(), fallback_entries: self.fallback.entry_count() }
    }

    async fn invalidate(&self, scope: Scope) {
        self.bump_local_generation(scope.generation_key());
        self.resync().await;
        let key = scope.generation_key();
        let outcome = self
            .redis
            .run(|mut connection| async move {
                redis::cmd("SET").arg(key).arg(new_generation()).exec_async(&mut connection).await
            })
            .await;
        if let Err(unavailable) = outcome {
            self.count_unavailable(&scope.company, unavailable);
            locked(&self.pending).insert(scope);
        }
    }

    async fn lookup(&self, company: &str, namespace: &str, base: &str) -> Lookup {
        self.resync().await;
        let company_key = scoped_key("gen", &[company]);
        let namespace_key = scoped_key("gen", &[company, namespace]);
        let found = self
            .redis
            .run(|mut connection| {
                let keys = [company_key.clone(), namespace_key.clone(), base.to_string()];
                async move {
                    redis::cmd("MGET")
                        .arg(&keys)
                        .query_async::<(Option<String>, Option<String>, Option<String>)>(&mut connection)
                        .await
                }
            })
            .await;
        match found {
            Ok((company_gen, namespace_gen, value)) => {
                let tag = format!(
                    "{}.{}",
                    company_gen.as_deref().unwrap_or("0"),
                    namespace_gen.as_deref().unwrap_or("0")
                );
                let current =
                    value.as_deref().and_then(|value| value.strip_prefix(tag.as_str())?.strip_prefix('|'));
                match current {
                    Some(json) => Lookup::Hit {
                        json: json.into(),
                        store_at: StoreAt::Redis { key: base.to_string(), tag },
                    },
                    None => Lookup::Miss(StoreAt::Redis { key: base.to_string(), tag }),
                }
            }
            Err(unavailable) => {
                self.count_unavailable(company, unavailable);
                let key = self.fallback_key(base, &company_key, &namespace_key);
                match self.fallback.get(&key).await {
                    Some(stored) => Lookup::Hit { json: stored.json, store_at: StoreAt::Fallback(key) },
                    None => Lookup::Miss(StoreAt::Fallback(key)),
                }
            }
        }
    }

    async fn store(&self, company: &str, at: StoreAt, json: String, ttl: Duration) {
        let json: Arc<str> = json.into();
        match at {
            StoreAt::Redis { key, tag } => {
                let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                let value = format!("{tag}|{json}");
                let stored = self
                    .redis
                    .run(|mut connection| async move {
                        redis::cmd("SET")
                            .arg(key)
                            .arg(value)
                            .arg("PX")
                            .arg(millis)
                            .exec_async(&mut connection)
                            .await
                    })
                    .await;
                if let Err(unavailable) = stored {
                    self.count_unavailable(company, unavailable);
                }
            }
            StoreAt::Fallback(key) => self.fallback.insert(key, Stored { json, ttl }).await,
        }
    }

    fn fallback_key(&self, base: &str, company_key: &str, namespace_key: &str) -> String {
        let generations = locked(&self.local_generations);
        let generation = |key: &str| generations.get(key).copied().unwrap_or(0);
        format!("{base}:l{}.{}", generation(company_key), generation(namespace_key))
    }

    /// Moves the fallback's generation of one scope on. When the map is full and the scope new, every
    /// in-process generation is forgotten and the fallback emptied with them: its keys were scoped by
    /// those generations, and a forgotten one restarts at 0, where an old value would be current.
    fn bump_local_generation(&self, key: String) {
        let mut generations = locked(&self.local_generations);
        if generations.len() >= MAX_LOCAL_GENERATIONS && !generations.contains_key(&key) {
            generations.clear();
            self.fallback.invalidate_all();
        }
        *generations.entry(key).or_default() += 1;
    }

    fn count_undecodable(&self, company: &str, undecodable: bool) {
        if undecodable {
            self.stats.record(company, Event::Error);
        }
    }

    fn count_unavailable(&self, company: &str, unavailable: Unavailable) {
        if unavailable == Unavailable::Failed {
            self.stats.record(company, Event::Error);
        }
        self.stats.record(company, Event::Fallback);
    }

    /// After an outage, before Redis serves anything: deliver the invalidations it missed and drop the
    /// fallback's values. Nothing is sent while the circuit is open.
    async fn resync(&self) {
        let outages = self.redis.outages();
        if outages == self.synced_outages.load(Ordering::Acquire) {
            return;
        }
        let delivered = self
            .redis
            .run(|mut connection| {
                let scopes: Vec<Scope> = locked(&self.pending).iter().cloned().collect();
                async move {
                    // PING makes even an empty resync a real round trip.
                    let mut pipeline = redis::pipe();
                    pipeline.cmd("PING").ignore();
                    for scope in &scopes {
                        pipeline.cmd("SET").arg(scope.generation_key()).arg(new_generation()).ignore();
                    }
                    pipeline.exec_async(&mut connection).await.map(|()| scopes)
                }
            })
            .await;
        if let Ok(scopes) = delivered {
            let mut pending = locked(&self.pending);
            for scope in &scopes {
                pending.remove(scope);
            }
            self.fallback.invalidate_all();
            self.synced_outages.store(outages, Ordering::Release);
        }
    }

    fn join_flight<'a>(&'a self, key: &'a str) -> Flight<'a> {
        let mut flights = locked(&self.flights);
        let turn = match flights.get(key).and_then(Weak::upgrade) {
            Some(turn) => turn,
            None => {
                let turn = Arc::new(tokio::sync::Mutex::new(()));
                flights.insert(key.to_string(), Arc::downgrade(&turn));
                turn
            }
        };
        Flight { flights: &self.flights, key, turn }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache whose Redis refuses connections: everything goes through the fallback.
    fn cache_without_redis() -> Cache {
        Cache::new(CacheConfig::new(RedisConfig::new("redis://127.0.0.1:1/"))).unwrap()
    }

    #[tokio::test]
    async fn a_call_cancelled_mid_load_leaves_its_flight() {
        let cache = cache_without_redis();
        let slow = cache.get_or_set("acme", "n", "k", None, || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, std::convert::Infallible>(1u32)
        });
        assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err(), "cancelled");
        assert!(locked(&cache.flights).is_empty(), "{:?}", locked(&cache.flights).keys());
        let value =
            cache.get_or_set("acme", "n", "k", None, || async { Ok::<_, std::convert::Infallible>(2u32) });
        assert_eq!(value.await, Ok(2), "the next call is not held up by the cancelled one");
        assert!(locked(&cache.flights).is_empty());
    }

    #[tokio::test]
    async fn in_process_generations_stay_bounded_and_never_revive_a_stale_value() {
        let cache = cache_without_redis();
        let load = |value: u32| move || async move { Ok::<_, std::convert::Infallible>(value) };
        // Stored at generation 0, then invalidated: forgetting the generation would make it current.
        assert_eq!(cache.get_or_set("acme", "n", "k", None, load(1)).await, Ok(1));
        cache.invalidate_namespace("acme", "n").await;
        for company in 0..MAX_LOCAL_GENERATIONS {
            cache.invalidate_company(&company.to_string()).await;
        }
        assert!(locked(&cache.local_generations).len() <= MAX_LOCAL_GENERATIONS);
        assert_eq!(
            cache.get_or_set("acme", "n", "k", None, load(2)).await,
            Ok(2),
            "forgetting acme's generations did not make the value stored before its invalidation current"
        );
    }

    #[test]
    fn generation_tokens_do_not_repeat() {
        let tokens: HashSet<String> = (0..10_000).map(|_| new_generation()).collect();
        assert_eq!(tokens.len(), 10_000);
        assert!(tokens.iter().all(|token| token.len() == 16 && token != "0"));
    }
}
