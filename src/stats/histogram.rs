//! Latency histogram with a proven relative-error bound (pure Rust, no PostgreSQL calls).
//!
//! Log-linear ("HDR-style") buckets over whole microseconds: durations below 32 µs each have a bucket
//! of their own; above that, every power of two [2^e, 2^(e+1)) is split into 16 equal buckets, so a
//! bucket's width is at most 1/16 of its lower bound. A quantile is answered with the middle of the
//! bucket holding the sample of that rank, which is therefore within half a width of the sample:
//!
//! **relative error bound**: for durations from 1 µs to 2^32 µs (71.6 minutes), the reported
//! p50/p95/p99 differ from the true nearest-rank quantile of the recorded durations (rounded to the
//! microsecond) by at most 1/32 = 3.125 % of it. Durations above 2^32 µs share the top bucket; callers
//! clamp answers to the exact minimum and maximum, so a quantile there is never above the true maximum.
//!
//! The tests at the bottom prove the bound: exhaustively for every duration below 2^20 µs and at every
//! bucket edge above, and on skewed random samples against sorted exact quantiles.
//!
//! Counts are u32 (the histogram lives in shared memory, one or two per company). When a bucket would
//! overflow, every bucket is halved: quantiles depend only on proportions, which halving keeps.

use std::ops::RangeInclusive;

/// log2 of the number of linear sub-buckets per power of two.
const SUB_BUCKET_BITS: u32 = 4;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
/// Largest duration with a bucket of its own; anything longer is counted in the top bucket.
pub const MAX_TRACKED_MICROS: u64 = u32::MAX as u64;
/// Buckets needed to reach `MAX_TRACKED_MICROS`: 16 exact ones, then 16 per power of two from 2^4 to 2^31.
pub const BUCKETS: usize = (32 - SUB_BUCKET_BITS as usize) * SUB_BUCKETS + SUB_BUCKETS;
/// The bound stated above, which the tests check.
#[cfg(test)]
pub const RELATIVE_ERROR_BOUND: f64 = 1.0 / (2 * SUB_BUCKETS) as f64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct Histogram {
    counts: [u32; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: [0; BUCKETS] }
    }
}

/// Index of the bucket holding `micros`.
#[inline]
pub fn bucket_of(micros: u64) -> usize {
    let micros = micros.min(MAX_TRACKED_MICROS);
    if micros < SUB_BUCKETS as u64 {
        return micros as usize;
    }
    let exponent = 63 - micros.leading_zeros();
    let shift = exponent - SUB_BUCKET_BITS;
    let sub_bucket = (micros >> shift) as usize; // in [SUB_BUCKETS, 2 * SUB_BUCKETS)
    shift as usize * SUB_BUCKETS + sub_bucket
}

/// The durations bucket `index` holds: `[low, low + width)`.
#[inline]
pub fn bucket_bounds(index: usize) -> (u64, u64) {
    if index < SUB_BUCKETS {
        return (index as u64, 1);
    }
    let shift = index / SUB_BUCKETS - 1;
    let low = ((SUB_BUCKETS + index % SUB_BUCKETS) as u64) << shift;
    (low, 1 << shift)
}

/// The value reported for a sample in bucket `index`: the middle of the durations it can hold.
pub fn representative(index: usize) -> f64 {
    let (low, width) = bucket_bounds(index);
    low as f64 + (width - 1) as f64 / 2.0
}

impl Histogram {
    /// Counts one sample; returns the index of its bucket.
    #[inline]
    pub fn record(&mut self, micros: u64) -> usize {
        let bucket = bucket_of(micros);
        if self.counts[bucket] == u32::MAX {
            self.halve();
        }
        self.counts[bucket] += 1;
        bucket
    }

    /// Adds `other`'s counts, all of which lie in `buckets`, halving first if a bucket would overflow.
    pub fn add(&mut self, other: &Histogram, buckets: RangeInclusive<usize>) {
        let Some(theirs) = other.counts.get(buckets.clone()) else { return };
        // `get` checked the range against the same length.
        let ours = &self.counts[*buckets.start()..];
        if ours.iter().zip(theirs).any(|(ours, theirs)| ours.checked_add(*theirs).is_none()) {
            self.halve();
        }
        for (ours, theirs) in self.counts[*buckets.start()..].iter_mut().zip(theirs) {
            *ours = ours.saturating_add(*theirs);
        }
    }

    /// Zeroes `buckets`, which hold every count: cheaper than zeroing all of them.
    pub fn clear(&mut self, buckets: RangeInclusive<usize>) {
        if let Some(counts) = self.counts.get_mut(buckets) {
            counts.fill(0);
        }
    }

    fn halve(&mut self) {
        for count in &mut self.counts {
            *count = count.div_ceil(2);
        }
    }

    /// Nearest-rank quantiles (`fractions` in (0, 1]), each the representative of the bucket holding
    /// the sample of rank ceil(fraction * n); `None` for an empty histogram.
    pub fn quantiles<const N: usize>(&self, fractions: [f64; N]) -> [Option<f64>; N] {
        let total: u64 = self.counts.iter().map(|count| u64::from(*count)).sum();
        let mut answers = [None; N];
        if total == 0 {
            return answers;
        }
        for (answer, fraction) in answers.iter_mut().zip(fractions) {
            let rank = ((fraction * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0u64;
            for (index, count) in self.counts.iter().enumerate() {
                seen += u64::from(*count);
                if seen >= rank {
                    *answer = Some(representative(index));
                    break;
                }
            }
        }
        answers
    }

    /// Non-empty buckets as (index, count), the compact form a pending snapshot keeps.
    pub fn nonzero(&self) -> Vec<(u16, u32)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(index, count)| (index as u16, *count))
            .collect()
    }

    /// Removes counts taken earlier with `nonzero`; saturates if the histogram was halved meanwhile.
    pub fn subtract(&mut self, taken: &[(u16, u32)]) {
        for (index, count) in taken {
            if let Some(slot) = self.counts.get_mut(usize::from(*index)) {
                *slot = slot.saturating_sub(*count);
            }
        }
    }

    pub fn counts(&self) -> &[u32; BUCKETS] {
        &self.counts
    }

    pub fn from_counts(counts: [u32; BUCKETS]) -> Self {
        Histogram { counts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative_error(reported: f64, truth: u64) -> f64 {
        (reported - truth as f64).abs() / truth as f64
    }

    #[test]
    fn every_duration_below_2_pow_20_is_reported_within_the_bound() {
        for micros in 1..(1u64 << 20) {
            let (low, width) = bucket_bounds(bucket_of(micros));
            assert!(low <= micros && micros < low + width, "{micros} outside its bucket [{low}, +{width})");
            let error = relative_error(representative(bucket_of(micros)), micros);
            assert!(error <= RELATIVE_ERROR_BOUND, "{micros} µs reported with error {error}");
        }
    }

    #[test]
    fn bucket_edges_up_to_the_top_are_within_the_bound() {
        for index in SUB_BUCKETS..BUCKETS {
            let (low, width) = bucket_bounds(index);
            for micros in [low, low + width / 2, low + width - 1] {
                assert_eq!(bucket_of(micros), index, "{micros} µs");
                assert!(relative_error(representative(index), micros) <= RELATIVE_ERROR_BOUND);
            }
            assert!(width as f64 / low as f64 <= 2.0 * RELATIVE_ERROR_BOUND, "bucket {index} too wide");
        }
    }

    #[test]
    fn buckets_tile_the_range_without_gaps_and_the_top_one_saturates() {
        let mut next = 0;
        for index in 0..BUCKETS {
            let (low, width) = bucket_bounds(index);
            assert_eq!(low, next, "gap before bucket {index}");
            next = low + width;
        }
        assert_eq!(next, MAX_TRACKED_MICROS + 1);
        assert_eq!(bucket_of(MAX_TRACKED_MICROS), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_of(0), 0);
    }

    /// xorshift64*: deterministic samples without a dependency.
    struct Samples(u64);
    impl Samples {
        fn next_unit(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn exact_quantile(sorted: &[u64], fraction: f64) -> u64 {
        let rank = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    #[test]
    fn quantiles_of_skewed_samples_are_within_the_bound_of_the_exact_ones() {
        let mut samples = Samples(0x9E37_79B9_7F4A_7C15);
        // Log-uniform from 1 µs to ~20 s, a bimodal mix, and a heavy tail: each draws on a different
        // region of the buckets.
        let shapes: [&dyn Fn(&mut Samples) -> u64; 3] = [
            &|s| (s.next_unit() * 24.0).exp2() as u64 + 1,
            &|s| if s.next_unit() < 0.9 { 200 + (s.next_unit() * 50.0) as u64 } else { 80_000 },
            &|s| (1000.0 / (1.0 - s.next_unit()).max(1e-6)) as u64,
        ];
        for (shape_index, shape) in shapes.iter().enumerate() {
            for size in [1usize, 7, 100, 5_000] {
                let mut histogram = Histogram::default();
                let mut values: Vec<u64> = (0..size).map(|_| shape(&mut samples)).collect();
                for value in &values {
                    histogram.record(*value);
                }
                values.sort_unstable();
                let fractions = [0.5, 0.95, 0.99, 1.0];
                for (reported, fraction) in histogram.quantiles(fractions).into_iter().zip(fractions) {
                    let truth = exact_quantile(&values, fraction);
                    let error = relative_error(reported.unwrap(), truth);
                    assert!(
                        error <= RELATIVE_ERROR_BOUND,
                        "shape {shape_index}, n={size}, q={fraction}: {reported:?} vs {truth} ({error})"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_histogram_has_no_quantiles() {
        assert_eq!(Histogram::default().quantiles([0.5, 0.99]), [None, None]);
    }

    #[test]
    fn halving_on_overflow_keeps_proportions_and_nonempty_buckets() {
        let mut histogram = Histogram::default();
        histogram.counts[bucket_of(100)] = u32::MAX;
        histogram.counts[bucket_of(5000)] = 3;
        histogram.record(100);
        assert_eq!(histogram.counts[bucket_of(100)], u32::MAX / 2 + 2);
        assert_eq!(histogram.counts[bucket_of(5000)], 2);
        assert_eq!(histogram.quantiles([0.5]), [Some(representative(bucket_of(100)))]);
    }

    #[test]
    fn subtracting_what_was_taken_leaves_only_later_samples() {
        let mut histogram = Histogram::default();
        for value in [10, 10, 300] {
            histogram.record(value);
        }
        let taken = histogram.nonzero();
        histogram.record(300);
        histogram.subtract(&taken);
        assert_eq!(histogram.nonzero(), vec![(bucket_of(300) as u16, 1)]);
    }

    #[test]
    fn adding_sums_the_range_and_halves_rather_than_overflow() {
        let mut ours = Histogram::default();
        let mut theirs = Histogram::default();
        ours.counts[40] = 10;
        theirs.counts[3] = 4;
        theirs.counts[5] = 2;
        ours.add(&theirs, 3..=5);
        assert_eq!(ours.nonzero(), vec![(3, 4), (5, 2), (40, 10)]);
        ours.counts[3] = u32::MAX - 1;
        ours.add(&theirs, 3..=5);
        assert_eq!(ours.nonzero(), vec![(3, u32::MAX / 2 + 4), (5, 1 + 2), (40, 5)]);
        ours.clear(0..=BUCKETS - 1);
        assert_eq!(ours, Histogram::default());
    }
}
