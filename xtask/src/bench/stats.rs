//! Latency summaries: every sample is kept (runs are bounded), sorted once, and read at
//! nearest-rank percentiles.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub(crate) struct Samples {
    micros: Vec<u64>,
}

/// Percentiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
pub(crate) struct Summary {
    /// Number of samples.
    pub(crate) count: usize,
    /// Median.
    pub(crate) p50_ms: f64,
    /// 90th percentile.
    pub(crate) p90_ms: f64,
    /// 99th percentile.
    pub(crate) p99_ms: f64,
    /// Largest sample.
    pub(crate) max_ms: f64,
    /// Mean.
    pub(crate) mean_ms: f64,
}

impl Samples {
    /// Adds one sample.
    pub(crate) fn push(&mut self, latency: Duration) {
        self.micros
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Adds every sample of `other`.
    pub(crate) fn extend(&mut self, other: Samples) {
        self.micros.extend(other.micros);
    }

    /// The percentiles.
    pub(crate) fn summary(&self) -> Summary {
        let mut sorted = self.micros.clone();
        sorted.sort_unstable();
        let millis = |micros: u64| micros as f64 / 1000.0;
        let at = |p: f64| {
            if sorted.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            millis(sorted[rank.clamp(1, sorted.len()) - 1])
        };
        Summary {
            count: sorted.len(),
            p50_ms: at(50.0),
            p90_ms: at(90.0),
            p99_ms: at(99.0),
            max_ms: sorted.last().copied().map_or(0.0, millis),
            mean_ms: if sorted.is_empty() {
                0.0
            } else {
                millis(sorted.iter().sum::<u64>()) / sorted.len() as f64
            },
        }
    }
}

/// Percentiles of signed values (lateness can be negative), nearest rank.
pub(crate) fn signed_summary(values: &mut [f64]) -> serde_json::Value {
    values.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if values.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values[rank.clamp(1, values.len()) - 1]
    };
    serde_json::json!({
        "count": values.len(),
        "min_ms": values.first().copied(),
        "p50_ms": at(50.0),
        "p99_ms": at(99.0),
        "max_ms": values.last().copied(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut samples = Samples::default();
        for millis in 1..=100 {
            samples.push(Duration::from_millis(millis));
        }
        let summary = samples.summary();
        assert_eq!(summary.count, 100);
        assert_eq!(summary.p50_ms, 50.0);
        assert_eq!(summary.p99_ms, 99.0);
        assert_eq!(summary.max_ms, 100.0);
        assert_eq!(summary.mean_ms, 50.5);
    }

    #[test]
    fn signed_values_keep_their_sign() {
        let mut values = vec![3.0, -1.0, 2.0];
        let summary = signed_summary(&mut values);
        assert_eq!(summary["min_ms"], -1.0);
        assert_eq!(summary["p50_ms"], 2.0);
        assert_eq!(summary["max_ms"], 3.0);
    }
}
