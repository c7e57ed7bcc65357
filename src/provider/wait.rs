//! How long to wait before retrying a provider call.
//!
//! A server-requested wait comes first: `retry-after-ms` (milliseconds), then `Retry-After`
//! (seconds, fractions allowed as the official Python SDK reads them, or an HTTP date), then
//! `x-ratelimit-reset` (seconds until the limit resets). A value that is missing, negative or
//! unreadable, or a date already past, leaves the choice to exponential backoff with full
//! jitter. Every wait is capped at the configured maximum.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// Backoff settings for retryable failures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Base of the exponential backoff.
    pub initial: Duration,
    /// Ceiling of the exponential backoff.
    pub max_backoff: Duration,
    /// Ceiling of a server-requested wait.
    pub max_wait: Duration,
}

impl RetryPolicy {
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        initial: Duration::from_secs(1),
        max_backoff: Duration::from_secs(60),
        max_wait: Duration::from_secs(300),
    };

    /// Returns the full-jitter backoff before retry number `attempt` (0-based): a uniform
    /// random time between zero and `initial * 2^attempt`, capped at `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(30)))
            .min(self.max_backoff);
        ceiling.mul_f64(rand::random_range(0.0..=1.0))
    }

    /// Returns the wait before the next try: the server's wait plus up to 10% jitter when it
    /// asked for one, otherwise the backoff.
    pub fn delay(&self, server_wait: Option<Duration>, attempt: u32) -> Duration {
        match server_wait {
            Some(wait) if !wait.is_zero() => wait + wait.mul_f64(rand::random_range(0.0..=0.1)),
            _ => self.backoff(attempt),
        }
    }
}

/// Reads the wait a response requests, capped at `max_wait`. `Some(ZERO)` means the server
/// named a time already past, and `None` that it named none that could be read.
pub fn server_wait(headers: &HeaderMap, now: SystemTime, max_wait: Duration) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let wait = header("retry-after-ms")
        .and_then(|v| seconds(v, 1000.0))
        .or_else(|| header("retry-after").and_then(|v| retry_after(v, now)))
        .or_else(|| header("x-ratelimit-reset").and_then(|v| seconds(v, 1.0)))?;
    Some(wait.min(max_wait))
}

/// Parses a `Retry-After` value: seconds (fractions allowed) or an HTTP date.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if let Some(wait) = seconds(value, 1.0) {
        return Some(wait);
    }
    if value.starts_with(['-', '+']) || value.parse::<f64>().is_ok() {
        return None;
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses a non-negative number of `per_second` units into a duration.
fn seconds(value: &str, per_second: f64) -> Option<Duration> {
    let n: f64 = value.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64((n / per_second).min(1e9)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    const MAX_WAIT: Duration = Duration::from_secs(300);

    fn wait_for(name: &'static str, value: &str, now: SystemTime) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_str(value).unwrap());
        server_wait(&headers, now, MAX_WAIT)
    }

    fn clock() -> SystemTime {
        // Whole seconds, because HTTP dates carry no fractions.
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(
            wait_for("retry-after", "120", clock()),
            Some(Duration::from_secs(120))
        );
    }

    #[test]
    fn retry_after_http_date_ahead() {
        let date = httpdate::fmt_http_date(clock() + Duration::from_secs(30));
        assert_eq!(
            wait_for("retry-after", &date, clock()),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn retry_after_past_date() {
        let date = httpdate::fmt_http_date(clock() - Duration::from_secs(30));
        let wait = wait_for("retry-after", &date, clock());
        assert_eq!(wait, Some(Duration::ZERO));
        let policy = RetryPolicy {
            initial: Duration::from_secs(2),
            ..RetryPolicy::DEFAULT
        };
        assert!(policy.delay(wait, 0) <= Duration::from_secs(2));
    }

    #[test]
    fn retry_after_unreadable() {
        assert_eq!(wait_for("retry-after", "-3", clock()), None);
        assert_eq!(wait_for("retry-after", "soon", clock()), None);
        let policy = RetryPolicy {
            initial: Duration::from_secs(1),
            ..RetryPolicy::DEFAULT
        };
        for attempt in 0..4 {
            assert!(policy.delay(None, attempt) <= Duration::from_secs(1 << attempt));
        }
    }

    #[test]
    fn retry_after_fraction_is_seconds() {
        assert_eq!(
            wait_for("retry-after", "1.5", clock()),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn retry_after_huge_is_clamped() {
        assert_eq!(wait_for("retry-after", "99999", clock()), Some(MAX_WAIT));
    }

    #[test]
    fn retry_after_ms_takes_precedence() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        headers.insert("retry-after", HeaderValue::from_static("120"));
        assert_eq!(
            server_wait(&headers, clock(), MAX_WAIT),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn ratelimit_reset_used_when_nothing_else() {
        assert_eq!(
            wait_for("x-ratelimit-reset", "7", clock()),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            initial: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            max_wait: MAX_WAIT,
        };
        for _ in 0..100 {
            assert!(policy.backoff(20) <= Duration::from_secs(10));
        }
    }

    #[test]
    fn server_wait_gets_bounded_jitter() {
        let policy = RetryPolicy::DEFAULT;
        for _ in 0..100 {
            let delay = policy.delay(Some(Duration::from_secs(10)), 0);
            assert!(delay >= Duration::from_secs(10));
            assert!(delay <= Duration::from_secs(11));
        }
    }
}
