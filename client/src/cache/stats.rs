//! Cache counters per company and in total. One std mutex guards the map; it is held for an increment.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::lock::locked;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheCounters {
    pub hits: u64,
    pub misses: u64,
    /// Redis commands that failed or timed out, and stored values that no longer deserialise.
    pub errors: u64,
    /// Reads and writes served by the in-memory fallback because Redis was unavailable.
    pub fallback_uses: u64,
}

impl CacheCounters {
    /// hits / (hits + misses), 0 before any read.
    pub fn hit_rate(&self) -> f64 {
        let reads = self.hits + self.misses;
        if reads == 0 { 0.0 } else { self.hits as f64 / reads as f64 }
    }

    fn add(&mut self, other: &CacheCounters) {
        self.hits += other.hits;
        self.misses += other.misses;
        self.errors += other.errors;
        self.fallback_uses += other.fallback_uses;
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct CacheStats {
    pub total: CacheCounters,
    pub companies: BTreeMap<String, CacheCounters>,
}

#[derive(Clone, Copy)]
pub(crate) enum Event {
    Hit,
    Miss,
    Error,
    Fallback,
}

#[derive(Default)]
pub(crate) struct Recorder {
    companies: Mutex<HashMap<String, CacheCounters>>,
}

impl Recorder {
    pub(crate) fn record(&self, company: &str, event: Event) {
        let mut companies = locked(&self.companies);
        let counters = match companies.get_mut(company) {
            Some(counters) => counters,
            None => companies.entry(company.to_string()).or_default(),
        };
        match event {
            Event::Hit => counters.hits += 1,
            Event::Miss => counters.misses += 1,
            Event::Error => counters.errors += 1,
            Event::Fallback => counters.fallback_uses += 1,
        }
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        let companies = locked(&self.companies);
        let mut stats = CacheStats::default();
        for (company, counters) in companies.iter() {
            stats.total.add(counters);
            stats.companies.insert(company.clone(), *counters);
        }
        stats
    }
}
