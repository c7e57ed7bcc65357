//! The faults that the simulator can inject, as [`Faults`]: rate limits, overload, server
//! errors, dropped connections, latency, failed, expired and stalled batch jobs, error lines,
//! late-appearing input files and unusual status spellings. The default injects nothing.
//!
//! `batchd simulate --faults FILE` reads them from TOML, whose keys are the field names. Every
//! decision is a deterministic function of [`super::SimConfig::seed`] and the request (see
//! [`super::dice`]), so two runs with the same seed inject the same faults into the same
//! requests, whatever order concurrent clients send them in.

use std::path::Path;

use serde::Deserialize;

/// Default wait that an injected 429 announces, in seconds.
pub const DEFAULT_RETRY_AFTER_SECS: f64 = 1.0;
/// Default share of an expiring job's lines that reach the output file.
pub const DEFAULT_EXPIRE_COMPLETED_FRACTION: f64 = 0.6;
/// Default job deadline: Together's completion window is fixed at 24 hours.
pub const DEFAULT_JOB_DEADLINE_SECS: f64 = 24.0 * 60.0 * 60.0;

/// Faults to inject. Rates are shares from 0 to 1 of the requests, jobs or lines they apply to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Real-time paths, such as `/v1/chat/completions`, that the real-time faults apply to. Empty
    /// means every real-time path.
    pub realtime_paths: Vec<String>,
    /// Share of real-time requests that get a 429, on top of the per-minute windows.
    pub rate_limit_rate: f64,
    /// The first this-many times a request body is sent, it gets a 429 response; later tries go
    /// through. Makes "first attempt refused, retry succeeds" exact.
    pub rate_limit_first: u32,
    /// Error body of the injected 429s.
    pub rate_limit_kind: RateLimitKind,
    /// Style in which every 429, injected or from a per-minute window, announces the wait.
    pub retry_after: RetryAfterStyle,
    /// Wait that injected 429s announce, in seconds.
    pub retry_after_secs: f64,
    /// Time ranges, in seconds since the simulator started, in which every real-time request gets
    /// a 503.
    pub overload_windows: Vec<Window>,
    /// Models whose real-time requests always get a 503.
    pub overloaded_models: Vec<String>,
    /// Share of real-time requests that get a 500 or 502.
    pub server_error_rate: f64,
    /// Share of real-time requests whose connection is closed without any response.
    pub drop_rate: f64,
    /// Lower bound of the latency added to each real-time response, in milliseconds.
    pub latency_min_ms: u64,
    /// Upper bound of the latency added to each real-time response, in milliseconds.
    pub latency_max_ms: u64,
    /// Value of `x-should-retry` on every error response; unset sends no such header.
    pub should_retry: Option<bool>,
    /// Tokens per minute that each real-time endpoint accepts. When set, every real-time response
    /// carries `x-tokenlimit-limit` and `x-tokenlimit-remaining`.
    pub token_limit_per_minute: Option<u64>,
    /// Share of batch jobs that fail at `VALIDATING` because their model is at capacity.
    pub batch_fail_rate: f64,
    /// Models whose batch jobs always fail at `VALIDATING` because they are at capacity.
    pub capacity_fail_models: Vec<String>,
    /// Share of batch jobs that end `EXPIRED` at the deadline.
    pub batch_expire_rate: f64,
    /// The first this-many jobs created end EXPIRED, whatever the value of `batch_expire_rate`.
    pub expire_first_jobs: u32,
    /// Share of an expiring job's lines that reach the output file; the others reach no file.
    pub expire_completed_fraction: f64,
    /// Time from a job's creation to its deadline, in seconds.
    pub job_deadline_secs: f64,
    /// Share of the lines of `COMPLETED` jobs written to the error file instead of the output
    /// file.
    pub line_error_rate: f64,
    /// Number of `POST /v1/batches` calls per input file id that get a 404 response before the file is found.
    pub create_not_found: u32,
    /// Letter case of every batch status.
    pub status_case: StatusCase,
    /// Status sent instead of `IN_PROGRESS`, such as `QUEUED`.
    pub in_progress_status: Option<String>,
    /// Whether jobs stay in progress until cancelled or past their deadline.
    pub stall_batches: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            realtime_paths: Vec::new(),
            rate_limit_rate: 0.0,
            rate_limit_first: 0,
            rate_limit_kind: RateLimitKind::default(),
            retry_after: RetryAfterStyle::default(),
            retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
            overload_windows: Vec::new(),
            overloaded_models: Vec::new(),
            server_error_rate: 0.0,
            drop_rate: 0.0,
            latency_min_ms: 0,
            latency_max_ms: 0,
            should_retry: None,
            token_limit_per_minute: None,
            batch_fail_rate: 0.0,
            capacity_fail_models: Vec::new(),
            batch_expire_rate: 0.0,
            expire_first_jobs: 0,
            expire_completed_fraction: DEFAULT_EXPIRE_COMPLETED_FRACTION,
            job_deadline_secs: DEFAULT_JOB_DEADLINE_SECS,
            line_error_rate: 0.0,
            create_not_found: 0,
            status_case: StatusCase::default(),
            in_progress_status: None,
            stall_batches: false,
        }
    }
}

/// A time range in seconds since the simulator started; `start_secs` is inside, `end_secs` is
/// not.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub start_secs: f64,
    pub end_secs: f64,
}

impl Window {
    pub fn contains(&self, secs: f64) -> bool {
        self.start_secs <= secs && secs < self.end_secs
    }
}

/// Error body of an injected 429, after the error types that Together's rate-limit page names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitKind {
    /// Type `dynamic_request_limited`: too many requests.
    #[default]
    RequestLimited,
    /// Type `dynamic_token_limited`: too many tokens.
    TokenLimited,
    /// Type and code `insufficient_quota`: the account is out of credit.
    InsufficientQuota,
}

/// The form in which a 429 response announces the wait before a retry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryAfterStyle {
    /// `Retry-After` in whole seconds, rounded up.
    #[default]
    Seconds,
    /// No `Retry-After` and no `retry-after-ms`; the `x-ratelimit-*` headers stay.
    Absent,
    /// `retry-after-ms` in milliseconds, without `Retry-After`.
    Millis,
    /// `Retry-After` as an HTTP date, rounded up to the next whole second.
    HttpDate,
}

/// Letter case of batch statuses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusCase {
    /// `IN_PROGRESS`, as Together spells it.
    #[default]
    Upper,
    /// `in_progress`.
    Lower,
}

/// A fault file that cannot be read or whose values are out of range.
#[derive(Debug, thiserror::Error)]
pub enum FaultsError {
    #[error("failed to read the fault file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },

    #[error("invalid fault file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },

    #[error("invalid faults: {}", .problems.join("; "))]
    Invalid { problems: Vec<String> },
}

impl Faults {
    /// Reads and checks a TOML fault file.
    pub fn load(path: &Path) -> Result<Faults, FaultsError> {
        let display_path = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| FaultsError::Read {
            path: display_path.clone(),
            source,
        })?;
        let faults: Faults = toml::from_str(&text).map_err(|source| FaultsError::Parse {
            path: display_path,
            source: Box::new(source),
        })?;
        faults.validate()?;
        Ok(faults)
    }

    /// Checks every value and reports all the problems at once.
    pub fn validate(&self) -> Result<(), FaultsError> {
        let mut problems = Vec::new();
        let rates = [
            ("rate_limit_rate", self.rate_limit_rate),
            ("server_error_rate", self.server_error_rate),
            ("drop_rate", self.drop_rate),
            ("batch_fail_rate", self.batch_fail_rate),
            ("batch_expire_rate", self.batch_expire_rate),
            ("expire_completed_fraction", self.expire_completed_fraction),
            ("line_error_rate", self.line_error_rate),
        ];
        for (name, value) in rates {
            if !(0.0..=1.0).contains(&value) {
                problems.push(format!("`{name}` is {value}; use a share from 0 to 1"));
            }
        }
        if !(self.retry_after_secs.is_finite() && self.retry_after_secs >= 0.0) {
            problems.push(format!(
                "`retry_after_secs` is {}; use a number of seconds of 0 or more",
                self.retry_after_secs
            ));
        }
        if !(self.job_deadline_secs.is_finite() && self.job_deadline_secs > 0.0) {
            problems.push(format!(
                "`job_deadline_secs` is {}; use a number of seconds above 0",
                self.job_deadline_secs
            ));
        }
        if self.latency_min_ms > self.latency_max_ms {
            problems.push(format!(
                "`latency_min_ms` ({}) is above `latency_max_ms` ({}); swap them",
                self.latency_min_ms, self.latency_max_ms
            ));
        }
        for window in &self.overload_windows {
            let finite = window.start_secs.is_finite() && window.end_secs.is_finite();
            if !finite || window.start_secs < 0.0 || window.start_secs > window.end_secs {
                problems.push(format!(
                    "overload window {}..{} is invalid; use 0 <= start_secs <= end_secs",
                    window.start_secs, window.end_secs
                ));
            }
        }
        if self.token_limit_per_minute == Some(0) {
            problems.push(
                "`token_limit_per_minute` is 0; use a positive limit or leave it out".to_owned(),
            );
        }
        if let Some(status) = &self.in_progress_status
            && status.trim().is_empty()
        {
            problems
                .push("`in_progress_status` is empty; name a status or leave it out".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(FaultsError::Invalid { problems })
        }
    }

    /// Returns whether the real-time faults apply to `path`.
    pub fn applies_to(&self, path: &str) -> bool {
        self.realtime_paths.is_empty() || self.realtime_paths.iter().any(|p| p == path)
    }

    /// Returns whether any real-time fault needs a per-request decision, which costs a hash of
    /// the request body.
    pub(super) fn has_realtime_draws(&self) -> bool {
        self.rate_limit_rate > 0.0
            || self.rate_limit_first > 0
            || self.server_error_rate > 0.0
            || self.drop_rate > 0.0
            || self.latency_max_ms > 0
    }
}

/// Name of each injected fault in the `faults_injected` stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FaultKind {
    RateLimit,
    OverloadWindow,
    OverloadedModel,
    ServerError,
    DroppedConnection,
    Latency,
    BatchCapacity,
    BatchExpired,
    BatchStalled,
    LineError,
    CreateNotFound,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::RateLimit => "rate_limit",
            FaultKind::OverloadWindow => "overload_window",
            FaultKind::OverloadedModel => "overloaded_model",
            FaultKind::ServerError => "server_error",
            FaultKind::DroppedConnection => "dropped_connection",
            FaultKind::Latency => "latency",
            FaultKind::BatchCapacity => "batch_capacity",
            FaultKind::BatchExpired => "batch_expired",
            FaultKind::BatchStalled => "batch_stalled",
            FaultKind::LineError => "line_error",
            FaultKind::CreateNotFound => "create_not_found",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_injects_nothing() {
        let faults: Faults = toml::from_str("").unwrap();
        assert_eq!(faults, Faults::default());
        assert_eq!(faults.job_deadline_secs, 86_400.0);
        assert_eq!(faults.expire_completed_fraction, 0.6);
        assert!(faults.validate().is_ok());
    }

    #[test]
    fn file_sets_every_kind_of_field() {
        let text = r#"
            realtime_paths = ["/v1/chat/completions"]
            rate_limit_rate = 0.25
            rate_limit_kind = "insufficient_quota"
            retry_after = "http_date"
            retry_after_secs = 2
            overload_windows = [{ start_secs = 0, end_secs = 1.5 }]
            should_retry = false
            token_limit_per_minute = 1000
            status_case = "lower"
            in_progress_status = "QUEUED"
            stall_batches = true
        "#;
        let faults: Faults = toml::from_str(text).unwrap();
        assert_eq!(faults.rate_limit_kind, RateLimitKind::InsufficientQuota);
        assert_eq!(faults.retry_after, RetryAfterStyle::HttpDate);
        assert_eq!(faults.retry_after_secs, 2.0);
        assert_eq!(
            faults.overload_windows,
            [Window {
                start_secs: 0.0,
                end_secs: 1.5
            }]
        );
        assert_eq!(faults.should_retry, Some(false));
        assert_eq!(faults.status_case, StatusCase::Lower);
        assert!(faults.stall_batches);
        assert!(faults.applies_to("/v1/chat/completions"));
        assert!(!faults.applies_to("/v1/embeddings"));
    }

    #[test]
    fn unknown_key_is_rejected() {
        let error = toml::from_str::<Faults>("drop_rat = 0.5").unwrap_err();
        assert!(error.to_string().contains("drop_rat"), "{error}");
    }

    #[test]
    fn validate_reports_every_problem() {
        let faults = Faults {
            drop_rate: 1.5,
            latency_min_ms: 10,
            latency_max_ms: 5,
            job_deadline_secs: 0.0,
            ..Faults::default()
        };
        let message = faults.validate().unwrap_err().to_string();
        assert!(message.contains("`drop_rate` is 1.5"), "{message}");
        assert!(message.contains("latency_min_ms"), "{message}");
        assert!(message.contains("job_deadline_secs"), "{message}");
    }
}
