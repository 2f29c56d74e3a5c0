//! One company's figures and the arithmetic on them (pure Rust, no PostgreSQL calls).
//!
//! A `Counters`, and a `Batch`, live in shared memory inside a spinlock (see `table.rs`). What runs
//! with that spinlock held (recording a call, adding a batch, resetting) must stay short: no
//! allocation, no I/O, no PostgreSQL call, and adding a batch walks only the histogram buckets the
//! batch used. Timestamps are PostgreSQL `TimestampTz` values (microseconds since 2000-01-01).
//!
//! Statements arrive in `Batch`es (a backend's calls for one company in one minute, see `Batch`).
//! Three views of the same calls are kept:
//! - cumulative totals since `stats_since` (company_stats);
//! - a ring of per-minute call counts for the last 15 minutes (calls_last_minute, calls_last_15min);
//! - what happened since the last committed snapshot (stats_history): totals minus the `snapshot`
//!   baseline, and a histogram of only those calls, so each history row has its own p95.

use super::histogram::{self, Histogram};

const MICROS_PER_MINUTE: i64 = 60_000_000;
/// Minutes kept: the current one and the 15 before it (the oldest is only partly inside the window).
const MINUTE_SLOTS: usize = 16;

/// A new entry's eviction score starts here, as pg_stat_statements' entries start at the median: a
/// company seen once is not evicted before a company that has been idle for a long time.
pub const INITIAL_USAGE: f64 = 10.0;
/// Applied to every score at each eviction pass, so old activity counts for less than recent.
pub const USAGE_DECAY: f64 = 0.99;

#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct MinuteRing {
    minute: [u32; MINUTE_SLOTS],
    calls: [u32; MINUTE_SLOTS],
}

impl MinuteRing {
    fn add(&mut self, minute: u32, calls: u64) {
        let slot = minute as usize % MINUTE_SLOTS;
        // Batches can arrive late, after calls of a later minute were counted: one older than the
        // minute its slot holds is outside every window, and must not wipe that minute out.
        if self.minute[slot] > minute {
            return;
        }
        if self.minute[slot] < minute {
            self.minute[slot] = minute;
            self.calls[slot] = 0;
        }
        self.calls[slot] = self.calls[slot].saturating_add(u32::try_from(calls).unwrap_or(u32::MAX));
    }

    /// Calls in the `minutes` minutes before `now`, as a sliding window: the current minute so far and
    /// the whole minutes before it count fully; the minute the window starts in counts for the part of
    /// it inside the window (the rate limiters' sliding-window estimate, exact when calls were even).
    fn window(&self, now: i64, minutes: u32) -> u64 {
        let current = minute_of(now);
        let fraction_elapsed = now.rem_euclid(MICROS_PER_MINUTE) as f64 / MICROS_PER_MINUTE as f64;
        let mut total = 0.0;
        for (minute, calls) in self.minute.iter().zip(self.calls) {
            let age = current.saturating_sub(*minute);
            if calls == 0 || age > minutes {
                continue;
            }
            let weight = if age == minutes { 1.0 - fraction_elapsed } else { 1.0 };
            total += f64::from(calls) * weight;
        }
        total.round() as u64
    }
}

fn minute_of(at: i64) -> u32 {
    at.div_euclid(MICROS_PER_MINUTE).clamp(0, i64::from(u32::MAX)) as u32
}

/// Totals at the last committed snapshot, and the calls since then.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct SnapshotBase {
    calls: u64,
    errors: u64,
    rows: u64,
    total_micros: f64,
    latency_since: Histogram,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct Counters {
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub total_micros: f64,
    pub min_micros: f64,
    pub max_micros: f64,
    /// Eviction score: +1 per call or error, decayed at each eviction pass.
    pub usage: f64,
    pub first_seen: i64,
    pub last_seen: i64,
    pub stats_since: i64,
    latency: Histogram,
    recent: MinuteRing,
    snapshot: SnapshotBase,
}

/// Statements one backend completed for one company within one minute, not yet added to the
/// company's `Counters`. It lives in the backend's own slot of shared memory (`table.rs`), so a
/// statement writes only cache lines no other backend writes, instead of lines every backend of a
/// busy company shares; `Counters::add` takes a whole batch at once.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct Batch {
    calls: u64,
    rows: u64,
    total_micros: f64,
    min_micros: f64,
    max_micros: f64,
    first_at: i64,
    last_at: i64,
    minute: u32,
    /// Every count of `latency` lies between these buckets, so adding and clearing skip the rest.
    lowest_bucket: u16,
    highest_bucket: u16,
    latency: Histogram,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.calls == 0
    }

    /// Whether a call at `at` belongs in this batch: it is empty or holds calls of the same minute.
    #[inline]
    pub fn accepts(&self, at: i64) -> bool {
        self.calls == 0 || self.minute == minute_of(at)
    }

    /// When the batch's first call started.
    pub fn first_at(&self) -> i64 {
        self.first_at
    }

    /// One statement that completed: `micros` as measured (fractional), `rows` processed. The caller
    /// checked `accepts(at)`.
    #[inline]
    pub fn record_call(&mut self, micros: f64, rows: u64, at: i64) {
        // Rounded half up without f64::round (a libm call); `as` saturates a negative or NaN to 0.
        let rounded = ((micros + 0.5) as u64).min(histogram::MAX_TRACKED_MICROS);
        let bucket = self.latency.record(rounded) as u16;
        if self.calls == 0 {
            self.start(micros, at, bucket);
        } else {
            if micros < self.min_micros {
                self.min_micros = micros;
            }
            if micros > self.max_micros {
                self.max_micros = micros;
            }
            self.lowest_bucket = self.lowest_bucket.min(bucket);
            self.highest_bucket = self.highest_bucket.max(bucket);
            self.last_at = self.last_at.max(at);
        }
        self.calls += 1;
        self.rows += rows;
        self.total_micros += micros;
    }

    /// The first call of a batch, once a minute at most per backend: out of line, so that the code
    /// every statement runs spans fewer cache lines.
    #[cold]
    #[inline(never)]
    fn start(&mut self, micros: f64, at: i64, bucket: u16) {
        self.minute = minute_of(at);
        self.first_at = at;
        self.last_at = at;
        self.min_micros = micros;
        self.max_micros = micros;
        self.lowest_bucket = bucket;
        self.highest_bucket = bucket;
    }

    /// Empties the batch once it was added, touching only the buckets it used.
    pub fn clear(&mut self) {
        self.latency.clear(self.buckets());
        (self.calls, self.rows, self.total_micros) = (0, 0, 0.0);
    }

    fn buckets(&self) -> std::ops::RangeInclusive<usize> {
        usize::from(self.lowest_bucket)..=usize::from(self.highest_bucket)
    }
}

/// What company_stats shows of one entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub total_ms: f64,
    pub min_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub calls_last_minute: u64,
    pub calls_last_15min: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    pub stats_since: i64,
}

/// Activity since the last committed snapshot: one stats_history row, and what to subtract once the
/// snapshot's transaction commits.
#[derive(Clone, Debug, PartialEq)]
pub struct Interval {
    pub stats_since: i64,
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub total_ms: f64,
    pub p95_ms: Option<f64>,
    /// Totals at the time of reading, the next baseline.
    base: (u64, u64, u64, f64),
    latency_taken: Vec<(u16, u32)>,
}

impl Counters {
    pub fn new(now: i64, usage: f64) -> Self {
        Counters { first_seen: now, last_seen: now, stats_since: now, usage, ..Counters::default() }
    }

    /// Adds a batch of completed statements.
    pub fn add(&mut self, batch: &Batch) {
        if batch.calls == 0 {
            return;
        }
        if self.calls == 0 || batch.min_micros < self.min_micros {
            self.min_micros = batch.min_micros;
        }
        if self.calls == 0 || batch.max_micros > self.max_micros {
            self.max_micros = batch.max_micros;
        }
        self.calls += batch.calls;
        self.rows += batch.rows;
        self.total_micros += batch.total_micros;
        self.latency.add(&batch.latency, batch.buckets());
        self.snapshot.latency_since.add(&batch.latency, batch.buckets());
        self.recent.add(batch.minute, batch.calls);
        self.usage += batch.calls as f64;
        self.last_seen = self.last_seen.max(batch.last_at);
    }

    pub fn record_errors(&mut self, errors: u64, at: i64) {
        self.errors += errors;
        self.usage += errors as f64;
        self.last_seen = self.last_seen.max(at);
    }

    /// Zeroes every figure; the company stays known (first_seen, last_seen) and counting restarts now.
    pub fn reset(&mut self, now: i64) {
        *self =
            Counters { first_seen: self.first_seen, last_seen: self.last_seen, ..Counters::new(now, 0.0) };
    }

    pub fn summary(&self, now: i64) -> Summary {
        let [p50, p95, p99] = self.latency.quantiles([0.50, 0.95, 0.99]);
        let clamp = |quantile: Option<f64>| quantile.map(|micros| self.clamp_to_seen(micros) / 1000.0);
        let seen = |micros: f64| (self.calls > 0).then_some(micros / 1000.0);
        Summary {
            calls: self.calls,
            errors: self.errors,
            rows: self.rows,
            total_ms: self.total_micros / 1000.0,
            min_ms: seen(self.min_micros),
            max_ms: seen(self.max_micros),
            p50_ms: clamp(p50),
            p95_ms: clamp(p95),
            p99_ms: clamp(p99),
            calls_last_minute: self.recent.window(now, 1),
            calls_last_15min: self.recent.window(now, 15),
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            stats_since: self.stats_since,
        }
    }

    /// A bucket's middle can lie outside what was measured; the exact extremes are better answers.
    fn clamp_to_seen(&self, micros: f64) -> f64 {
        micros.clamp(self.min_micros, self.max_micros)
    }

    /// Activity since the last committed snapshot, or `None` when there was none.
    pub fn interval(&self) -> Option<Interval> {
        let base = &self.snapshot;
        let calls = self.calls.saturating_sub(base.calls);
        let errors = self.errors.saturating_sub(base.errors);
        if calls == 0 && errors == 0 {
            return None;
        }
        let [p95] = base.latency_since.quantiles([0.95]);
        Some(Interval {
            stats_since: self.stats_since,
            calls,
            errors,
            rows: self.rows.saturating_sub(base.rows),
            total_ms: (self.total_micros - base.total_micros).max(0.0) / 1000.0,
            p95_ms: p95.map(|micros| self.clamp_to_seen(micros) / 1000.0),
            base: (self.calls, self.errors, self.rows, self.total_micros),
            latency_taken: base.latency_since.nonzero(),
        })
    }

    /// Moves the baseline past an interval whose history row was committed. Does nothing if the
    /// entry was reset (or evicted and created again) since the interval was read.
    pub fn commit_interval(&mut self, interval: &Interval) {
        if interval.stats_since != self.stats_since {
            return;
        }
        let base = &mut self.snapshot;
        (base.calls, base.errors, base.rows, base.total_micros) = interval.base;
        base.latency_since.subtract(&interval.latency_taken);
    }

    /// Fixed little-endian layout for the stats file written at shutdown.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for value in [self.calls, self.errors, self.rows] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        for value in [self.total_micros, self.min_micros, self.max_micros, self.usage] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        for value in [self.first_seen, self.last_seen, self.stats_since] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        encode_histogram(&self.latency, out);
        for value in self.recent.minute.iter().chain(&self.recent.calls) {
            out.extend_from_slice(&value.to_le_bytes());
        }
        let base = &self.snapshot;
        for value in [base.calls, base.errors, base.rows] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&base.total_micros.to_le_bytes());
        encode_histogram(&base.latency_since, out);
    }

    pub const ENCODED_LEN: usize = 10 * 8 + BUCKET_BYTES + MINUTE_SLOTS * 8 + 4 * 8 + BUCKET_BYTES;

    /// Reads what `encode` wrote; `None` if `bytes` is not exactly one encoded entry.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::ENCODED_LEN {
            return None;
        }
        let mut reader = Reader(bytes);
        let mut counters = Counters {
            calls: reader.u64(),
            errors: reader.u64(),
            rows: reader.u64(),
            total_micros: reader.f64(),
            min_micros: reader.f64(),
            max_micros: reader.f64(),
            usage: reader.f64(),
            first_seen: reader.i64(),
            last_seen: reader.i64(),
            stats_since: reader.i64(),
            latency: reader.histogram(),
            ..Counters::default()
        };
        counters.recent.minute = std::array::from_fn(|_| reader.u32());
        counters.recent.calls = std::array::from_fn(|_| reader.u32());
        counters.snapshot.calls = reader.u64();
        counters.snapshot.errors = reader.u64();
        counters.snapshot.rows = reader.u64();
        counters.snapshot.total_micros = reader.f64();
        counters.snapshot.latency_since = reader.histogram();
        Some(counters)
    }
}

const BUCKET_BYTES: usize = histogram::BUCKETS * 4;

fn encode_histogram(histogram: &Histogram, out: &mut Vec<u8>) {
    for count in histogram.counts() {
        out.extend_from_slice(&count.to_le_bytes());
    }
}

/// Reads fixed-size little-endian fields; the caller checked the total length.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().unwrap_or([0; N])
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take())
    }
    fn f64(&mut self) -> f64 {
        f64::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn histogram(&mut self) -> Histogram {
        Histogram::from_counts(std::array::from_fn(|_| self.u32()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = MICROS_PER_MINUTE;
    /// 10:00:00 on some day, in PostgreSQL's epoch: any whole minute would do.
    const T0: i64 = 1_000 * MINUTE;

    /// One statement, added as a batch of its own.
    fn call(counters: &mut Counters, micros: f64, rows: u64, at: i64) {
        let mut batch = Batch::default();
        batch.record_call(micros, rows, at);
        counters.add(&batch);
    }

    #[test]
    fn calls_rows_time_and_extremes_add_up() {
        let mut counters = Counters::new(T0, INITIAL_USAGE);
        call(&mut counters, 1500.0, 3, T0 + 1);
        call(&mut counters, 250.0, 0, T0 + 2);
        counters.record_errors(2, T0 + 3);
        let summary = counters.summary(T0 + 4);
        assert_eq!((summary.calls, summary.errors, summary.rows), (2, 2, 3));
        assert_eq!((summary.min_ms, summary.max_ms), (Some(0.25), Some(1.5)));
        assert!((summary.total_ms - 1.75).abs() < 1e-9);
        assert_eq!(summary.last_seen, T0 + 3);
        assert_eq!(counters.usage, INITIAL_USAGE + 4.0);
    }

    #[test]
    fn percentiles_are_clamped_to_the_measured_extremes() {
        let mut counters = Counters::new(T0, 0.0);
        // 1030.2 µs lands in the bucket [1024, 1088), whose middle (1055.5) was never measured.
        call(&mut counters, 1030.2, 0, T0);
        let summary = counters.summary(T0);
        assert_eq!(summary.p99_ms, summary.max_ms);
        assert_eq!(summary.p50_ms, summary.max_ms);
        assert!((summary.p50_ms.unwrap() - 1.0302).abs() < 1e-12);
    }

    #[test]
    fn durations_are_rounded_to_the_nearest_microsecond_before_bucketing() {
        let mut counters = Counters::new(T0, 0.0);
        for micros in [2.49, 2.5, 0.2, -0.0, f64::NAN, 1e12] {
            call(&mut counters, micros, 0, T0);
        }
        let nonzero = counters.latency.nonzero();
        let top = (histogram::bucket_of(histogram::MAX_TRACKED_MICROS) as u16, 1);
        assert_eq!(nonzero, vec![(0, 3), (2, 1), (3, 1), top]);
    }

    #[test]
    fn no_calls_means_no_percentiles_or_extremes() {
        let mut counters = Counters::new(T0, 0.0);
        counters.record_errors(1, T0);
        let summary = counters.summary(T0);
        assert_eq!((summary.min_ms, summary.p95_ms), (None, None));
    }

    #[test]
    fn minute_windows_count_the_current_minute_and_slide_over_older_ones() {
        let mut counters = Counters::new(T0, 0.0);
        for _ in 0..6 {
            call(&mut counters, 10.0, 0, T0 - 20 * MINUTE); // outside every window
        }
        for _ in 0..10 {
            call(&mut counters, 10.0, 0, T0 - 15 * MINUTE + 1); // the minute the 15-minute window starts in
        }
        for _ in 0..4 {
            call(&mut counters, 10.0, 0, T0 - 3 * MINUTE);
        }
        for _ in 0..60 {
            call(&mut counters, 10.0, 0, T0 - MINUTE + 5); // the previous minute
        }
        for _ in 0..7 {
            call(&mut counters, 10.0, 0, T0 + 1000);
        }
        // A quarter into the current minute: three quarters of the previous minute are in the window.
        let summary = counters.summary(T0 + MINUTE / 4);
        assert_eq!(summary.calls_last_minute, 7 + 45);
        assert_eq!(summary.calls_last_15min, 7 + 60 + 4 + 8); // 10 * 0.75 rounds to 8
        // Exactly at a minute boundary the previous minute is wholly inside.
        assert_eq!(counters.summary(T0).calls_last_minute, 7 + 60);
    }

    #[test]
    fn intervals_cover_each_call_once_and_only_after_commit() {
        let mut counters = Counters::new(T0, 0.0);
        call(&mut counters, 100.0, 1, T0);
        call(&mut counters, 5000.0, 1, T0);
        let first = counters.interval().unwrap();
        assert_eq!((first.calls, first.errors, first.rows), (2, 0, 2));
        assert!((first.p95_ms.unwrap() - 5.0).abs() / 5.0 <= histogram::RELATIVE_ERROR_BOUND);
        // Not committed (the snapshot's transaction rolled back): the same calls are offered again.
        assert_eq!(counters.interval().unwrap(), first);
        call(&mut counters, 200.0, 0, T0);
        counters.commit_interval(&first);
        let second = counters.interval().unwrap();
        assert_eq!((second.calls, second.rows), (1, 0));
        assert!((second.total_ms - 0.2).abs() < 1e-9);
        assert!((second.p95_ms.unwrap() - 0.2).abs() / 0.2 <= histogram::RELATIVE_ERROR_BOUND);
        counters.commit_interval(&second);
        assert_eq!(counters.interval(), None);
    }

    #[test]
    fn an_interval_read_before_a_reset_is_not_applied_after_it() {
        let mut counters = Counters::new(T0, 0.0);
        call(&mut counters, 100.0, 0, T0);
        let stale = counters.interval().unwrap();
        counters.reset(T0 + 1);
        call(&mut counters, 100.0, 0, T0 + 2);
        counters.commit_interval(&stale);
        assert_eq!(counters.interval().map(|interval| interval.calls), Some(1));
    }

    #[test]
    fn reset_keeps_first_and_last_seen_and_restarts_counting() {
        let mut counters = Counters::new(T0, 5.0);
        call(&mut counters, 100.0, 4, T0 + 10);
        counters.reset(T0 + 20);
        let summary = counters.summary(T0 + 20);
        assert_eq!((summary.calls, summary.rows, summary.p50_ms), (0, 0, None));
        assert_eq!((summary.first_seen, summary.last_seen, summary.stats_since), (T0, T0 + 10, T0 + 20));
        assert_eq!(summary.calls_last_minute, 0);
    }

    #[test]
    fn encoding_round_trips_and_rejects_other_lengths() {
        let mut counters = Counters::new(T0, 3.5);
        call(&mut counters, 123.4, 7, T0 + MINUTE);
        counters.record_errors(2, T0 + MINUTE);
        let mut bytes = Vec::new();
        counters.encode(&mut bytes);
        assert_eq!(bytes.len(), Counters::ENCODED_LEN);
        let decoded = Counters::decode(&bytes).unwrap();
        assert_eq!(decoded.summary(T0 + MINUTE), counters.summary(T0 + MINUTE));
        assert_eq!(decoded.interval(), counters.interval());
        assert_eq!(decoded.usage, 3.5 + 3.0);
        assert!(Counters::decode(&bytes[1..]).is_none());
    }

    #[test]
    fn a_batch_adds_up_as_its_calls_one_by_one() {
        let durations = [3.0, 1500.0, 250.4, 98_000.0, 7.5, 250.4];
        let mut one_by_one = Counters::new(T0, 0.0);
        let mut batched = Counters::new(T0, 0.0);
        let mut batch = Batch::default();
        for (i, micros) in durations.into_iter().enumerate() {
            let at = T0 + 1_000 * i as i64;
            assert!(batch.accepts(at));
            call(&mut one_by_one, micros, i as u64, at);
            batch.record_call(micros, i as u64, at);
        }
        batched.add(&batch);
        assert_eq!(batched.summary(T0 + MINUTE / 2), one_by_one.summary(T0 + MINUTE / 2));
        assert_eq!(batched.interval(), one_by_one.interval());
        assert_eq!(batched.latency, one_by_one.latency);
        assert_eq!(batched.usage, one_by_one.usage);
    }

    #[test]
    fn a_batch_takes_only_calls_of_its_minute_and_is_empty_once_cleared() {
        let mut batch = Batch::default();
        assert!(batch.is_empty() && batch.accepts(T0 - 5 * MINUTE));
        batch.record_call(40.0, 1, T0 + 10);
        batch.record_call(90_000.0, 1, T0 + 20);
        assert!(batch.accepts(T0 + MINUTE - 1));
        assert!(!batch.accepts(T0 + MINUTE) && !batch.accepts(T0 - 1));
        batch.clear();
        assert!(batch.is_empty() && batch.accepts(T0 + 7 * MINUTE));
        assert_eq!(batch.latency, Histogram::default());
        // A cleared batch starts over: its old extremes and minute are forgotten.
        batch.record_call(5.0, 0, T0 + 2 * MINUTE);
        let mut counters = Counters::new(T0, 0.0);
        counters.add(&batch);
        let summary = counters.summary(T0 + 2 * MINUTE);
        assert_eq!((summary.calls, summary.max_ms, summary.calls_last_minute), (1, Some(0.005), 1));
    }

    #[test]
    fn a_late_batch_counts_in_the_totals_but_never_wipes_a_later_minute() {
        let mut counters = Counters::new(T0, 0.0);
        for _ in 0..5 {
            call(&mut counters, 10.0, 0, T0 + 16 * MINUTE); // same ring slot as T0's minute
        }
        call(&mut counters, 10.0, 0, T0); // sixteen minutes late
        let summary = counters.summary(T0 + 16 * MINUTE);
        assert_eq!((summary.calls, summary.calls_last_minute, summary.calls_last_15min), (6, 5, 5));
        assert_eq!(summary.last_seen, T0 + 16 * MINUTE);
    }
}
