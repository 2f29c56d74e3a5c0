//! Cache counters per company and in total. One std mutex guards the map; it is held for an increment.
//!
//! Company names come from callers, so the map is bounded: the first `MAX_COMPANIES` companies seen get
//! counters of their own, and the events of any other company are counted together in `other`
//! (the total still counts everything).

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
    /// At most `MAX_COMPANIES` (1,000) companies: the first seen.
    pub companies: BTreeMap<String, CacheCounters>,
    /// Every company beyond those, together.
    pub other: CacheCounters,
}

/// Companies with counters of their own at most.
pub const MAX_COMPANIES: usize = 1_000;

#[derive(Clone, Copy)]
pub(crate) enum Event {
    Hit,
    Miss,
    Error,
    Fallback,
}

#[derive(Default)]
struct Counted {
    companies: HashMap<String, CacheCounters>,
    other: CacheCounters,
}

#[derive(Default)]
pub(crate) struct Recorder {
    counted: Mutex<Counted>,
}

impl Recorder {
    pub(crate) fn record(&self, company: &str, event: Event) {
        let mut counted = locked(&self.counted);
        let Counted { companies, other } = &mut *counted;
        // Two lookups for a known company rather than an allocated key on every event.
        let counters = match companies.contains_key(company) {
            true => companies.get_mut(company).expect("present"),
            false if companies.len() >= MAX_COMPANIES => other,
            false => companies.entry(company.to_string()).or_default(),
        };
        match event {
            Event::Hit => counters.hits += 1,
            Event::Miss => counters.misses += 1,
            Event::Error => counters.errors += 1,
            Event::Fallback => counters.fallback_uses += 1,
        }
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        let counted = locked(&self.counted);
        let mut stats = CacheStats { other: counted.other, ..CacheStats::default() };
        stats.total.add(&counted.other);
        for (company, counters) in &counted.companies {
            stats.total.add(counters);
            stats.companies.insert(company.clone(), *counters);
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn companies_beyond_the_bound_are_counted_together_and_in_the_total() {
        let recorder = Recorder::default();
        for company in 0..MAX_COMPANIES + 5 {
            recorder.record(&company.to_string(), Event::Miss);
        }
        recorder.record("0", Event::Hit);
        recorder.record("new", Event::Hit);
        let stats = recorder.snapshot();
        assert_eq!(stats.companies.len(), MAX_COMPANIES);
        assert_eq!(
            (stats.companies["0"].hits, stats.companies["0"].misses),
            (1, 1),
            "the first seen keep theirs"
        );
        assert!(!stats.companies.contains_key("new"));
        assert_eq!((stats.other.hits, stats.other.misses), (1, 5));
        assert_eq!((stats.total.hits, stats.total.misses), (2, MAX_COMPANIES as u64 + 5));
    }
}
