//! Per-endpoint request rate limits.
//!
//! Each endpoint gets a GCRA limiter (`governor`) sized so that no 60-second window contains more
//! requests than the configured per-minute rate: a small burst of one second's worth, and the
//! rest spread evenly. The provider enforces its limits per second internally, so a full
//! minute's burst at once would be refused anyway. A 429 pauses the whole endpoint for the
//! wait the provider asked for, not only the request that got it.
//!
//! A reload can change an endpoint's rate: [`EndpointLimiter::set_rate`] swaps in a fresh GCRA
//! and keeps any pause. The fresh one starts with its burst available, so a change lets up to
//! one second's worth through at once.
//!
//! The limiter reads time from tokio's clock, so tests with paused time drive it exactly.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

/// A `governor` clock that follows tokio's (pausable) time.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

type Gcra = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

/// The limiter of one endpoint.
#[derive(Debug)]
pub struct EndpointLimiter {
    /// The current rate per minute and its GCRA.
    gcra: Mutex<(u32, Arc<Gcra>)>,
    clock: TokioClock,
    paused_until: Mutex<Option<Instant>>,
}

/// Returns the burst and the spacing of the rest, so that burst + 60 s / spacing ≤ rate.
fn quota(per_minute: u32) -> Quota {
    let per_minute = per_minute.max(1);
    let burst = (per_minute / 60).max(1);
    let spread = (per_minute - burst).max(1);
    let period = Duration::from_secs(60) / spread;
    Quota::with_period(period)
        .expect("a positive period")
        .allow_burst(NonZeroU32::new(burst).expect("burst is at least 1"))
}

impl EndpointLimiter {
    pub fn per_minute(per_minute: u32) -> Self {
        let clock = TokioClock {
            start: Instant::now(),
        };
        let gcra = RateLimiter::direct_with_clock(quota(per_minute), clock.clone());
        EndpointLimiter {
            gcra: Mutex::new((per_minute, Arc::new(gcra))),
            clock,
            paused_until: Mutex::new(None),
        }
    }

    pub fn rate_per_minute(&self) -> u32 {
        self.gcra.lock().expect("limiter lock").0
    }

    /// Changes the rate; a no-op when it is unchanged.
    pub fn set_rate(&self, per_minute: u32) {
        let mut current = self.gcra.lock().expect("limiter lock");
        if current.0 != per_minute {
            let gcra = RateLimiter::direct_with_clock(quota(per_minute), self.clock.clone());
            *current = (per_minute, Arc::new(gcra));
        }
    }

    /// Waits while the endpoint is paused after a 429.
    pub async fn wait_unpaused(&self) {
        loop {
            let paused = *self.paused_until.lock().expect("limiter lock");
            match paused.filter(|until| *until > Instant::now()) {
                Some(until) => tokio::time::sleep_until(until).await,
                None => return,
            }
        }
    }

    /// Waits until one more request may be sent.
    pub async fn acquire(&self) {
        loop {
            self.wait_unpaused().await;
            let gcra = self.gcra.lock().expect("limiter lock").1.clone();
            match gcra.check() {
                Ok(()) => return,
                Err(not_until) => {
                    tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
                }
            }
        }
    }

    /// Holds every request of this endpoint back for `wait`.
    pub fn pause(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut paused = self.paused_until.lock().expect("limiter lock");
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the largest number of `times` inside any half-open window of `window`.
    fn max_in_window(times: &[Duration], window: Duration) -> usize {
        let mut best = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end] - times[start] >= window {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    #[tokio::test(start_paused = true)]
    async fn no_minute_exceeds_the_rate() {
        for rate in [1u32, 7, 60, 250, 500] {
            let limiter = EndpointLimiter::per_minute(rate);
            let origin = Instant::now();
            let mut times = Vec::new();
            for _ in 0..(rate * 3 + 5) {
                limiter.acquire().await;
                times.push(origin.elapsed());
            }
            let max_count = max_in_window(&times, Duration::from_secs(60));
            assert!(
                max_count <= rate as usize,
                "rate {rate}: {max_count} requests in one minute"
            );
            assert!(
                max_count + 2 >= rate as usize,
                "rate {rate}: only {max_count} requests in one minute"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn changed_rate_holds_from_then_on() {
        let limiter = EndpointLimiter::per_minute(6000);
        for _ in 0..10 {
            limiter.acquire().await;
        }
        limiter.set_rate(30);
        assert_eq!(limiter.rate_per_minute(), 30);
        let origin = Instant::now();
        let mut times = Vec::new();
        for _ in 0..65 {
            limiter.acquire().await;
            times.push(origin.elapsed());
        }
        let max_count = max_in_window(&times, Duration::from_secs(60));
        assert!(max_count <= 30, "{max_count} requests in one minute at 30");
        assert!(
            max_count >= 28,
            "only {max_count} requests in one minute at 30"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_requests_back() {
        let limiter = EndpointLimiter::per_minute(6000);
        limiter.acquire().await;
        let before = Instant::now();
        limiter.pause(Duration::from_secs(5));
        limiter.acquire().await;
        assert!(before.elapsed() >= Duration::from_secs(5));
    }
}
