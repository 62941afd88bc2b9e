//! Shared pieces of the forkd benchmarks: latency summaries.

use std::time::Duration;

use serde::Serialize;

/// Percentiles and mean of a set of latencies, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub min_us: f64,
    pub max_us: f64,
}

/// Nearest-rank percentile (`q` in 0..=1) of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    assert!(!sorted.is_empty(), "no samples");
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

/// Summarizes `samples` (sorted in place).
pub fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    Summary {
        n: samples.len(),
        p50_us: us(percentile(samples, 0.50)),
        p90_us: us(percentile(samples, 0.90)),
        p99_us: us(percentile(samples, 0.99)),
        mean_us: us(total) / samples.len() as f64,
        min_us: us(samples[0]),
        max_us: us(samples[samples.len() - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let s = summarize(&mut v);
        assert_eq!(s.n, 100);
        assert_eq!((s.p50_us, s.p90_us, s.p99_us), (50.0, 90.0, 99.0));
        assert_eq!((s.min_us, s.max_us), (1.0, 100.0));
        assert_eq!(s.mean_us, 50.5);
    }

    #[test]
    fn one_sample() {
        let s = summarize(&mut [Duration::from_nanos(1500)]);
        assert_eq!((s.p50_us, s.p99_us, s.mean_us), (1.5, 1.5, 1.5));
    }
}
