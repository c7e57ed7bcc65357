//! A log-normal distribution of real-time response latency, given by its median and its 99th
//! percentile. The distribution is right-skewed: most latencies fall near the median, and a few
//! take several times as long, as with responses from a loaded inference service.
//!
//! The simulator draws one latency per accepted real-time request from a generator seeded with
//! [`super::SimConfig::seed`], in the order the requests are accepted. Two simulators with the
//! same seed therefore hand the same sequence of latencies to their clients.

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The 0.99 quantile of the standard normal distribution.
const Z_99: f64 = 2.326_347_874_040_841;

/// Invalid parameters of a [`LogNormalLatency`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LatencyError {
    #[error("invalid latency median of 0 ms: the median must be at least 1 ms")]
    ZeroMedian,

    #[error(
        "invalid latency p99 of {p99:?}: it is below the median of {median:?}; give a p99 at \
         least as large as the median"
    )]
    P99BelowMedian { median: Duration, p99: Duration },
}

/// The latency distribution of real-time responses: log-normal with a given median and 99th
/// percentile. A p99 equal to the median makes every latency equal to the median.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogNormalLatency {
    median: Duration,
    p99: Duration,
    /// Natural logarithm of the median in seconds (the distribution's μ).
    mu: f64,
    /// Standard deviation of the latency's logarithm (the distribution's σ).
    sigma: f64,
}

impl LogNormalLatency {
    /// Builds the distribution whose median and 99th percentile are `median` and `p99`.
    pub fn new(median: Duration, p99: Duration) -> Result<Self, LatencyError> {
        if median.is_zero() {
            return Err(LatencyError::ZeroMedian);
        }
        if p99 < median {
            return Err(LatencyError::P99BelowMedian { median, p99 });
        }
        let mu = median.as_secs_f64().ln();
        let sigma = (p99.as_secs_f64().ln() - mu) / Z_99;
        Ok(Self {
            median,
            p99,
            mu,
            sigma,
        })
    }

    pub fn median(&self) -> Duration {
        self.median
    }

    pub fn p99(&self) -> Duration {
        self.p99
    }

    /// Returns the mean latency, exp(μ + σ²/2). By Little's law, a client that keeps a rate of
    /// r requests per second needs about r times this many requests in flight.
    pub fn mean(&self) -> Duration {
        Duration::from_secs_f64((self.mu + self.sigma * self.sigma / 2.0).exp())
    }

    /// Returns the latency at the standard normal quantile `z`; 0 gives the median.
    fn at_quantile(&self, z: f64) -> Duration {
        if self.sigma == 0.0 {
            return self.median;
        }
        // Far tails give values that do not fit a Duration; a day stands for them.
        Duration::try_from_secs_f64((self.mu + self.sigma * z).exp())
            .unwrap_or(Duration::from_secs(86_400))
    }
}

/// Draws latencies from a [`LogNormalLatency`] with a seeded generator.
#[derive(Debug)]
pub(super) struct LatencySampler {
    distribution: LogNormalLatency,
    rng: Mutex<StdRng>,
}

impl LatencySampler {
    pub fn new(distribution: LogNormalLatency, seed: u64) -> Self {
        Self {
            distribution,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    /// Returns the next latency of the sequence.
    pub fn next(&self) -> Duration {
        let (u1, u2): (f64, f64) = {
            let mut rng = self.rng.lock().expect("latency generator lock poisoned");
            (rng.random(), rng.random())
        };
        self.distribution.at_quantile(standard_normal(u1, u2))
    }
}

/// Turns two uniform draws from [0, 1) into one standard normal draw (Box–Muller transform).
fn standard_normal(u1: f64, u2: f64) -> f64 {
    // 1 - u1 lies in (0, 1], so its logarithm is finite.
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn quantiles_match_the_parameters() {
        let latency = LogNormalLatency::new(millis(1000), millis(5000)).unwrap();
        assert_eq!(latency.at_quantile(0.0), millis(1000));
        let p99 = latency.at_quantile(Z_99).as_secs_f64();
        assert!((p99 - 5.0).abs() < 1e-9, "p99 {p99} s");
    }

    #[test]
    fn samples_follow_the_median_and_p99() {
        let latency = LogNormalLatency::new(millis(1000), millis(5000)).unwrap();
        let sampler = LatencySampler::new(latency, 7);
        let mut samples: Vec<Duration> = (0..20_000).map(|_| sampler.next()).collect();
        samples.sort();
        let median = samples[samples.len() / 2].as_secs_f64();
        let p99 = samples[samples.len() * 99 / 100].as_secs_f64();
        assert!((0.95..1.05).contains(&median), "median {median} s");
        assert!((4.5..5.5).contains(&p99), "p99 {p99} s");
    }

    #[test]
    fn same_seed_gives_same_sequence() {
        let latency = LogNormalLatency::new(millis(200), millis(900)).unwrap();
        let first = LatencySampler::new(latency, 3);
        let second = LatencySampler::new(latency, 3);
        let other = LatencySampler::new(latency, 4);
        let a: Vec<Duration> = (0..50).map(|_| first.next()).collect();
        let b: Vec<Duration> = (0..50).map(|_| second.next()).collect();
        let c: Vec<Duration> = (0..50).map(|_| other.next()).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn equal_median_and_p99_give_a_fixed_latency() {
        let latency = LogNormalLatency::new(millis(300), millis(300)).unwrap();
        let sampler = LatencySampler::new(latency, 1);
        for _ in 0..100 {
            assert_eq!(sampler.next(), millis(300));
        }
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        assert_eq!(
            LogNormalLatency::new(Duration::ZERO, millis(10)),
            Err(LatencyError::ZeroMedian)
        );
        let error = LogNormalLatency::new(millis(500), millis(100)).unwrap_err();
        assert!(error.to_string().contains("below the median"), "{error}");
    }

    #[test]
    fn mean_is_above_the_median() {
        let latency = LogNormalLatency::new(millis(1000), millis(5000)).unwrap();
        let mean = latency.mean().as_secs_f64();
        // σ = ln 5 / 2.326 = 0.692, so the mean is exp(0.239) s.
        assert!((1.26..1.28).contains(&mean), "mean {mean} s");
    }
}
