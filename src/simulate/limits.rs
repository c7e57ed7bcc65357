//! Per-endpoint rate limits: each real-time endpoint keeps the times of the requests it accepted
//! in the last 60 seconds and rejects a request when that count has reached the endpoint's
//! requests-per-minute limit. With a token limit set, it also keeps the estimated tokens of those
//! requests and rejects a request while their sum has reached the limit.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::RateLimits;

/// Length of the sliding window that the per-minute limits count over.
pub(super) const WINDOW: Duration = Duration::from_secs(60);

/// The rate-limited real-time endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Images,
}

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Images,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Images => "/v1/images/generations",
        }
    }

    fn limit(self, limits: &RateLimits) -> u32 {
        match self {
            Endpoint::Chat => limits.chat_per_minute,
            Endpoint::Completions => limits.completions_per_minute,
            Endpoint::Embeddings => limits.embeddings_per_minute,
            Endpoint::Images => limits.images_per_minute,
        }
    }
}

/// The limit that rejected a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rejection {
    Requests,
    Tokens,
}

/// The values of the `x-tokenlimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TokenAdmission {
    pub limit: u64,
    pub remaining: u64,
    /// Whole seconds, rounded up, until the oldest tokens in the window leave it.
    pub reset_secs: u64,
}

/// The limiter's decision on one request, with the values of the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Admission {
    pub accepted: bool,
    /// The limit that rejected the request; `None` when it was accepted.
    pub rejection: Option<Rejection>,
    pub limit: u32,
    pub remaining: u32,
    /// Whole seconds, rounded up, until the oldest request in the window leaves it and frees a
    /// slot. It is the full window when the limit is 0, and 0 while the window has room.
    pub reset_secs: u64,
    /// Accepted requests in the window ending now, this one included when it was accepted.
    pub in_window: usize,
    /// The token window, when a token limit is set.
    pub tokens: Option<TokenAdmission>,
}

impl Admission {
    /// Returns the wait before a retry of a rejected request can succeed: at least one second.
    pub fn retry_after_secs(&self) -> u64 {
        let reset = match (self.rejection, self.tokens) {
            (Some(Rejection::Tokens), Some(tokens)) => tokens.reset_secs,
            _ => self.reset_secs,
        };
        reset.max(1)
    }
}

/// The accepted requests of one endpoint within the last [`WINDOW`].
#[derive(Debug)]
pub(super) struct SlidingWindow {
    limit: u32,
    accepted: VecDeque<Instant>,
}

impl SlidingWindow {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            accepted: VecDeque::new(),
        }
    }

    /// Decides on a request arriving at `now`. Calls must come with non-decreasing `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        self.decide(now, true)
    }

    /// Decides on a request arriving at `now`, which another limit already rejected unless
    /// `allowed`. A rejected request takes no slot.
    fn decide(&mut self, now: Instant, allowed: bool) -> Admission {
        // A request at time t stays in the window while now - t < WINDOW, so the window is the
        // half-open interval (now - WINDOW, now].
        while let Some(&oldest) = self.accepted.front() {
            if now.duration_since(oldest) >= WINDOW {
                self.accepted.pop_front();
            } else {
                break;
            }
        }

        let has_room = self.accepted.len() < self.limit as usize;
        let accepted = allowed && has_room;
        if accepted {
            self.accepted.push_back(now);
        }

        // A window with room left needs no wait, so only a full one announces when its oldest
        // request leaves and frees a slot.
        let room_left = self.accepted.len() < self.limit as usize;
        let reset_secs = match self.accepted.front() {
            _ if room_left => 0,
            Some(&oldest) => ceil_secs(WINDOW - now.duration_since(oldest)),
            None if self.limit == 0 => WINDOW.as_secs(),
            None => 0,
        };
        Admission {
            accepted,
            rejection: (!has_room).then_some(Rejection::Requests),
            limit: self.limit,
            remaining: self.limit.saturating_sub(self.accepted.len() as u32),
            reset_secs,
            in_window: self.accepted.len(),
            tokens: None,
        }
    }
}

/// The estimated tokens of the requests that one endpoint accepted within the last [`WINDOW`].
#[derive(Debug)]
struct TokenWindow {
    limit: u64,
    accepted: VecDeque<(Instant, u64)>,
    total: u64,
}

impl TokenWindow {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            accepted: VecDeque::new(),
            total: 0,
        }
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&(oldest, tokens)) = self.accepted.front() {
            if now.duration_since(oldest) >= WINDOW {
                self.accepted.pop_front();
                self.total -= tokens;
            } else {
                break;
            }
        }
    }

    /// Returns whether a request may start. A request is judged before its tokens are known
    /// exactly, so one large request may take the total above the limit.
    fn has_room(&self) -> bool {
        self.total < self.limit
    }

    fn record(&mut self, now: Instant, tokens: u64) {
        self.accepted.push_back((now, tokens));
        self.total += tokens;
    }

    fn admission(&self, now: Instant) -> TokenAdmission {
        TokenAdmission {
            limit: self.limit,
            remaining: self.limit.saturating_sub(self.total),
            reset_secs: self.accepted.front().map_or(0, |&(oldest, _)| {
                ceil_secs(WINDOW - now.duration_since(oldest))
            }),
        }
    }
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The request window and the optional token window of one endpoint.
#[derive(Debug)]
struct EndpointWindows {
    requests: SlidingWindow,
    tokens: Option<TokenWindow>,
}

/// The windows of every endpoint, behind one lock, so that requests are decided in the order in
/// which they took the lock.
#[derive(Debug)]
pub(super) struct Limiters {
    windows: Mutex<BTreeMap<Endpoint, EndpointWindows>>,
}

impl Limiters {
    /// Builds the windows; `tokens_per_minute` adds a token window to every endpoint.
    pub fn new(limits: &RateLimits, tokens_per_minute: Option<u64>) -> Self {
        let windows = Endpoint::ALL
            .into_iter()
            .map(|endpoint| {
                let windows = EndpointWindows {
                    requests: SlidingWindow::new(endpoint.limit(limits)),
                    tokens: tokens_per_minute.map(TokenWindow::new),
                };
                (endpoint, windows)
            })
            .collect();
        Self {
            windows: Mutex::new(windows),
        }
    }

    /// Decides on a request of about `tokens` tokens, and counts it when it is accepted.
    pub fn admit(&self, endpoint: Endpoint, tokens: u64) -> Admission {
        let mut windows = self.windows.lock().expect("rate limiter lock poisoned");
        // Reading the clock under the lock keeps `now` non-decreasing for each window.
        let now = Instant::now();
        let windows = windows
            .get_mut(&endpoint)
            .expect("every endpoint has windows");
        let Some(token_window) = &mut windows.tokens else {
            return windows.requests.admit(now);
        };

        token_window.prune(now);
        let token_room = token_window.has_room();
        let mut admission = windows.requests.decide(now, token_room);
        if admission.accepted {
            token_window.record(now, tokens);
        } else if admission.rejection.is_none() {
            admission.rejection = Some(Rejection::Tokens);
        }
        admission.tokens = Some(token_window.admission(now));
        admission
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn window_rejects_over_limit_and_frees_slots() {
        let start = Instant::now();
        let mut window = SlidingWindow::new(2);
        assert!(window.admit(at(start, 0)).accepted);
        assert!(window.admit(at(start, 10_000)).accepted);

        let rejected = window.admit(at(start, 20_000));
        assert!(!rejected.accepted);
        assert_eq!(rejected.remaining, 0);
        assert_eq!(rejected.reset_secs, 40);
        assert_eq!(rejected.retry_after_secs(), 40);

        // The first request leaves the window exactly 60 s after it was accepted.
        let freed = window.admit(at(start, 60_000));
        assert!(freed.accepted);
        assert_eq!(freed.in_window, 2);
    }

    #[test]
    fn reset_rounds_up_to_whole_seconds() {
        let start = Instant::now();
        let mut window = SlidingWindow::new(1);
        window.admit(at(start, 0));
        let rejected = window.admit(at(start, 59_500));
        assert_eq!(rejected.reset_secs, 1);
        assert_eq!(rejected.retry_after_secs(), 1);
    }

    #[test]
    fn token_window_rejects_once_full() {
        let limits = RateLimits::default();
        let limiters = Limiters::new(&limits, Some(10));
        let first = limiters.admit(Endpoint::Chat, 6);
        assert!(first.accepted);
        assert_eq!(first.tokens.unwrap().remaining, 4);

        // A request is judged before its tokens count, so this one overshoots the limit.
        let second = limiters.admit(Endpoint::Chat, 6);
        assert!(second.accepted);
        assert_eq!(second.tokens.unwrap().remaining, 0);

        let third = limiters.admit(Endpoint::Chat, 1);
        assert!(!third.accepted);
        assert_eq!(third.rejection, Some(Rejection::Tokens));
        assert_eq!(third.retry_after_secs(), 60);
        // The rejected request took no request slot.
        assert_eq!(third.in_window, 2);
    }

    #[test]
    fn zero_limit_rejects_everything() {
        let mut window = SlidingWindow::new(0);
        let admission = window.admit(Instant::now());
        assert!(!admission.accepted);
        assert_eq!(admission.retry_after_secs(), 60);
    }

    /// Returns the maximum number of timestamps inside any half-open window (end - WINDOW, end], by brute
    /// force over every window that ends on a timestamp.
    fn brute_force_max(times: &[u64]) -> usize {
        times
            .iter()
            .map(|&end| {
                times
                    .iter()
                    .filter(|&&t| t <= end && end - t < WINDOW.as_millis() as u64)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn in_window_maximum_matches_brute_force() {
        let start = Instant::now();
        // Bursts and gaps, with one pair exactly 60 s apart to check the window's open end.
        let times: Vec<u64> = vec![
            0, 100, 200, 30_000, 59_999, 60_000, 60_100, 61_000, 119_999, 120_000, 180_000,
            180_001, 180_002, 239_000,
        ];
        let mut window = SlidingWindow::new(u32::MAX);
        let max = times
            .iter()
            .map(|&t| window.admit(at(start, t)).in_window)
            .max()
            .unwrap();
        assert_eq!(max, brute_force_max(&times));
        assert_eq!(max, 5);
    }
}
