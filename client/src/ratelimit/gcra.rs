//! The generic cell rate algorithm (GCRA) in integer microseconds, and the in-process limiter built on
//! it that takes over while Redis is unavailable.
//!
//! A limiter of `limit` requests per `period` admits one request every `interval = ceil(period / limit)`
//! and lets `limit` of them arrive at once. Its whole state is one number per key, the theoretical
//! arrival time (TAT): the instant the bucket would be full again. A request is admitted when pushing
//! the TAT one interval further keeps it within `limit * interval` of now. Integers make the boundary
//! exact: after `limit` requests at one instant the TAT is exactly `limit * interval` ahead, so request
//! `limit + 1` is refused, and it is admitted again exactly one interval later.
//!
//! What "limit per period" means here: the (N+1)th request of a burst is refused, but over any span of
//! one period up to 2N−1 requests can pass (a full bucket plus its refill). A bucket full at the span's
//! start admits N at once, then one every interval; since `interval >= period / N`, at most N−1 of
//! those fall inside the rest of the span. Over a long run the rate is N per period.
//!
//! `gcra.lua` is the same arithmetic executed inside Redis; the two must stay in step (the tests of
//! both modes in tests/ratelimit.rs check the same boundaries).
//!
//! The in-process state is a map from key to TAT behind one std mutex, held for the decision only.
//! Entries whose TAT has passed carry no information (absent means full), so they are pruned when the
//! map grows. Its bound: once it holds `PRUNE_ABOVE` keys, a new key first drops every full bucket, so
//! it holds at most 10,000 keys or the (policy, company) pairs whose bucket is not full, which all made
//! a request within the last period of their quota, whichever is more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::lock::locked;

/// The shape of one limiter, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rate {
    pub interval_us: i64,
    pub limit: i64,
}

/// The outcome of one decision, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub allowed: bool,
    pub remaining: i64,
    /// Until the bucket is full again.
    pub reset_after_us: i64,
    /// Until one more request would be admitted (0 when admitted).
    pub retry_after_us: i64,
}

/// Decides one request at `now` against the stored TAT; returns the verdict and the TAT to store
/// (`None` when refused: a refused request costs nothing).
pub(crate) fn decide(rate: Rate, stored_tat: Option<i64>, now: i64) -> (Verdict, Option<i64>) {
    let tat = stored_tat.unwrap_or(now).max(now);
    let new_tat = tat + rate.interval_us;
    let burst = rate.limit * rate.interval_us;
    if new_tat - now <= burst {
        let verdict = Verdict {
            allowed: true,
            remaining: (burst - (new_tat - now)) / rate.interval_us,
            reset_after_us: new_tat - now,
            retry_after_us: 0,
        };
        (verdict, Some(new_tat))
    } else {
        let verdict = Verdict {
            allowed: false,
            remaining: 0,
            reset_after_us: tat - now,
            retry_after_us: new_tat - now - burst,
        };
        (verdict, None)
    }
}

/// Limits held in this process only: exact per process, so N processes admit up to N times the limit.
pub(crate) struct LocalLimiter {
    epoch: Instant,
    tats: Mutex<HashMap<String, i64>>,
}

/// Above this many keys, expired ones are pruned before inserting.
const PRUNE_ABOVE: usize = 10_000;

impl LocalLimiter {
    pub(crate) fn new() -> Self {
        LocalLimiter { epoch: Instant::now(), tats: Mutex::default() }
    }

    pub(crate) fn check(&self, key: &str, rate: Rate) -> Verdict {
        let now = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        let mut tats = locked(&self.tats);
        let (verdict, new_tat) = decide(rate, tats.get(key).copied(), now);
        if let Some(new_tat) = new_tat {
            if tats.len() >= PRUNE_ABOVE && !tats.contains_key(key) {
                tats.retain(|_, tat| *tat > now);
            }
            tats.insert(key.to_string(), new_tat);
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_PER_SECOND: Rate = Rate { interval_us: 200_000, limit: 5 };

    #[test]
    fn limit_requests_at_one_instant_pass_and_the_next_is_refused() {
        let mut tat = None;
        for expected_remaining in (0..5).rev() {
            let (verdict, stored) = decide(FIVE_PER_SECOND, tat, 1_000);
            assert!(verdict.allowed);
            assert_eq!(verdict.remaining, expected_remaining);
            tat = stored;
        }
        let (refused, stored) = decide(FIVE_PER_SECOND, tat, 1_000);
        assert_eq!(
            refused,
            Verdict { allowed: false, remaining: 0, reset_after_us: 1_000_000, retry_after_us: 200_000 }
        );
        assert_eq!(stored, None, "a refused request must not consume capacity");
    }

    #[test]
    fn one_interval_later_exactly_one_more_request_passes() {
        let mut tat = None;
        for _ in 0..5 {
            tat = decide(FIVE_PER_SECOND, tat, 0).1;
        }
        assert!(!decide(FIVE_PER_SECOND, tat, 199_999).0.allowed, "one microsecond early");
        let (verdict, tat) = decide(FIVE_PER_SECOND, tat, 200_000);
        assert!(verdict.allowed);
        assert_eq!(verdict.remaining, 0);
        assert!(!decide(FIVE_PER_SECOND, tat, 200_000).0.allowed);
    }

    #[test]
    fn a_span_of_one_period_admits_at_most_2n_minus_1() {
        // Greedy: at every instant, as many requests as are admitted. Over [0, period) that is the most
        // any schedule gets: the full bucket at 0 and each refill as soon as it is there.
        let (period, mut tat, mut admitted) = (1_000_000, None, 0);
        for now in (0..period).step_by(1_000) {
            loop {
                let (verdict, stored) = decide(FIVE_PER_SECOND, tat, now);
                if !verdict.allowed {
                    break;
                }
                (tat, admitted) = (stored, admitted + 1);
            }
        }
        assert_eq!(admitted, 2 * 5 - 1);
        assert!(decide(FIVE_PER_SECOND, tat, period).0.allowed, "the next refill falls on the span's end");
    }

    #[test]
    fn an_idle_key_is_full_again_after_the_period() {
        let mut tat = None;
        for _ in 0..5 {
            tat = decide(FIVE_PER_SECOND, tat, 0).1;
        }
        let (verdict, _) = decide(FIVE_PER_SECOND, tat, 1_000_000);
        assert_eq!((verdict.allowed, verdict.remaining), (true, 4));
    }

    #[test]
    fn local_limiter_keeps_keys_apart_and_is_exact_at_the_boundary() {
        let limiter = LocalLimiter::new();
        let rate = Rate { interval_us: 3_600_000_000, limit: 3 };
        let outcomes: Vec<bool> = (0..4).map(|_| limiter.check("a", rate).allowed).collect();
        assert_eq!(outcomes, [true, true, true, false]);
        assert!(limiter.check("b", rate).allowed, "another key has its own bucket");
    }
}
