//! Settings: built-in defaults, then the TOML file, validated into one typed [`Config`].
//!
//! The raw file is parsed into `Raw*` structs where every field is optional, then each value is
//! checked and converted (seconds to [`Duration`], paths resolved). Every invalid value is
//! reported at once, each naming its key, so an operator fixes a file in one pass.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Together's production API.
pub const DEFAULT_BASE_URL: &str = "https://api.together.xyz/v1";

/// Environment variable that carries the API key.
pub const API_KEY_ENV: &str = "TOGETHER_API_KEY";

/// Endpoints batchd accepts in input lines.
pub const SUPPORTED_ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/images/generations",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to parse config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config{}:\n  {}", path_suffix(.path), .problems.join("\n  "))]
    Invalid {
        path: Option<PathBuf>,
        problems: Vec<String>,
    },
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

/// An API key that never shows up in `Debug` output or logs.
#[derive(Clone, Default)]
pub struct ApiKey(Option<String>);

impl ApiKey {
    pub fn new(key: Option<String>) -> Self {
        Self(key.filter(|k| !k.trim().is_empty()))
    }

    pub fn expose(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str("ApiKey(<redacted>)"),
            None => f.write_str("ApiKey(<unset>)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub provider: ProviderConfig,
    pub paths: PathsConfig,
    pub ingest: IngestConfig,
    pub batch: BatchConfig,
    pub realtime: RealtimeConfig,
    pub daemon: DaemonConfig,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub base_url: String,
    pub api_key: ApiKey,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct PathsConfig {
    pub inbox: PathBuf,
    pub database: PathBuf,
    pub processed: PathBuf,
    pub rejected: PathBuf,
    pub outbox: PathBuf,
}

#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// How long a file's size and mtime must stay unchanged before it is read.
    pub settle: Duration,
    /// Full rescans of the inbox, in case a filesystem event was missed.
    pub rescan_interval: Duration,
    /// Maximum input line length in bytes. Longer lines are reported and skipped.
    pub max_line_bytes: usize,
    /// Larger files are rejected unread.
    pub max_file_bytes: u64,
    /// Reject a whole file when any of its lines is bad.
    pub reject_file_on_error: bool,
    /// Fail items at ingest whose model is not in the provider's catalogue.
    pub check_models: bool,
    /// How often the model catalogue is fetched again.
    pub models_refresh: Duration,
}

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub max_requests: usize,
    pub max_in_flight: usize,
    pub max_bytes: u64,
    /// A partial batch is sent once its oldest item has waited this long.
    pub max_linger: Duration,
    pub poll_interval: Duration,
    pub batchable_endpoints: Vec<String>,
    pub max_attempts: u32,
    /// Items whose deadline is closer than this take the real-time path.
    pub deadline_margin: Duration,
    /// A job older than this is cancelled and harvested in its current state, whatever its status.
    pub max_job_age: Duration,
    /// After a job fails for capacity, no job for its model is created for this long.
    pub capacity_cooldown: Duration,
    /// Create calls tried for one uploaded file before its items go back to the queue.
    pub max_create_attempts: u32,
}

#[derive(Debug, Clone)]
pub struct RealtimeConfig {
    pub chat_per_minute: u32,
    pub completions_per_minute: u32,
    pub embeddings_per_minute: u32,
    pub images_per_minute: u32,
    pub max_concurrency: usize,
    pub embedding_inputs_per_request: usize,
    pub max_attempts: u32,
    /// A claimed item whose call has not finished in this time returns to the queue.
    pub lease: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Maximum wait obeyed from a `Retry-After` style header.
    pub max_retry_wait: Duration,
    /// Pause of an endpoint after a 429 saying the account is out of credit.
    pub out_of_credit_pause: Duration,
    /// Model to use instead of a model that keeps failing, by model name.
    pub fallback_models: BTreeMap<String, String>,
    /// Failed attempts on the requested model before the fallback is used.
    pub fallback_after_attempts: u32,
    /// Estimated tokens per coalesced embeddings request.
    pub embedding_tokens_per_request: u64,
    /// Estimated tokens of one embedding input; longer inputs fail as too long.
    pub embedding_max_input_tokens: u64,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub shutdown_grace: Duration,
    pub log_level: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    provider: RawProvider,
    #[serde(default)]
    paths: RawPaths,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    batch: RawBatch,
    #[serde(default)]
    realtime: RawRealtime,
    #[serde(default)]
    daemon: RawDaemon,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    base_url: Option<String>,
    request_timeout_secs: Option<f64>,
    connect_timeout_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    inbox: Option<PathBuf>,
    database: Option<PathBuf>,
    processed: Option<PathBuf>,
    rejected: Option<PathBuf>,
    outbox: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    settle_secs: Option<f64>,
    rescan_interval_secs: Option<f64>,
    max_line_bytes: Option<i64>,
    max_file_bytes: Option<i64>,
    reject_file_on_error: Option<bool>,
    check_models: Option<bool>,
    models_refresh_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    max_requests: Option<i64>,
    max_in_flight: Option<i64>,
    max_bytes: Option<i64>,
    max_linger_secs: Option<f64>,
    poll_interval_secs: Option<f64>,
    batchable_endpoints: Option<Vec<String>>,
    max_attempts: Option<i64>,
    deadline_margin_secs: Option<f64>,
    max_job_age_secs: Option<f64>,
    capacity_cooldown_secs: Option<f64>,
    max_create_attempts: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRealtime {
    chat_per_minute: Option<i64>,
    completions_per_minute: Option<i64>,
    embeddings_per_minute: Option<i64>,
    images_per_minute: Option<i64>,
    max_concurrency: Option<i64>,
    embedding_inputs_per_request: Option<i64>,
    max_attempts: Option<i64>,
    lease_secs: Option<f64>,
    backoff_initial_secs: Option<f64>,
    backoff_max_secs: Option<f64>,
    max_retry_wait_secs: Option<f64>,
    out_of_credit_pause_secs: Option<f64>,
    fallback_models: Option<BTreeMap<String, String>>,
    fallback_after_attempts: Option<i64>,
    embedding_tokens_per_request: Option<i64>,
    embedding_max_input_tokens: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    shutdown_grace_secs: Option<f64>,
    log_level: Option<String>,
}

/// Provider ceilings for one batch input file.
pub const PROVIDER_MAX_BATCH_LINES: usize = 50_000;
pub const PROVIDER_MAX_BATCH_BYTES: u64 = 100_000_000;

impl Config {
    /// Reads and validates a TOML config file. The API key comes from the environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let api_key = ApiKey::new(std::env::var(API_KEY_ENV).ok());
        Self::from_toml(&text, api_key).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                path: Some(path.to_path_buf()),
                problems,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str, api_key: ApiKey) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        validate(raw, api_key)
    }
}

/// Collects validation problems so that all of them are reported together.
#[derive(Default)]
struct Checker {
    problems: Vec<String>,
}

impl Checker {
    fn secs(&mut self, key: &str, value: Option<f64>, default: f64) -> Duration {
        let secs = value.unwrap_or(default);
        if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
            self.problems.push(format!(
                "`{key}` = {secs} is out of range: expected a positive number of seconds"
            ));
            return Duration::from_secs_f64(default);
        }
        Duration::from_secs_f64(secs)
    }

    fn count(&mut self, key: &str, value: Option<i64>, default: i64, max: i64) -> i64 {
        let n = value.unwrap_or(default);
        if n < 1 || n > max {
            self.problems.push(format!(
                "`{key}` = {n} is out of range: expected a whole number from 1 to {max}"
            ));
            return default;
        }
        n
    }

    fn required_path(&mut self, key: &str, value: Option<PathBuf>) -> PathBuf {
        match value {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => {
                self.problems
                    .push(format!("`{key}` is missing: set it to a directory path"));
                PathBuf::new()
            }
        }
    }
}

fn validate(raw: RawConfig, api_key: ApiKey) -> Result<Config, ConfigError> {
    let mut c = Checker::default();

    let base_url = raw
        .provider
        .base_url
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
    match reqwest::Url::parse(&base_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => {}
        _ => c.problems.push(format!(
            "`provider.base_url` = {base_url:?} is not an http(s) URL: use e.g. {DEFAULT_BASE_URL:?}"
        )),
    }
    let provider = ProviderConfig {
        base_url: base_url.trim_end_matches('/').to_string(),
        api_key,
        request_timeout: c.secs(
            "provider.request_timeout_secs",
            raw.provider.request_timeout_secs,
            120.0,
        ),
        connect_timeout: c.secs(
            "provider.connect_timeout_secs",
            raw.provider.connect_timeout_secs,
            10.0,
        ),
    };

    let inbox = c.required_path("paths.inbox", raw.paths.inbox);
    let database = match raw.paths.database {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => {
            c.problems.push("`paths.database` is missing: set it to a file path such as \"/var/lib/batchd/batchd.db\"".into());
            PathBuf::new()
        }
    };
    let sibling = |name: &str| {
        inbox
            .parent()
            .map(|p| p.join(name))
            .unwrap_or_else(|| PathBuf::from(name))
    };
    let paths = PathsConfig {
        processed: raw.paths.processed.unwrap_or_else(|| sibling("processed")),
        rejected: raw.paths.rejected.unwrap_or_else(|| sibling("rejected")),
        outbox: raw.paths.outbox.unwrap_or_else(|| sibling("outbox")),
        inbox,
        database,
    };

    let ingest = IngestConfig {
        settle: c.secs("ingest.settle_secs", raw.ingest.settle_secs, 2.0),
        rescan_interval: c.secs(
            "ingest.rescan_interval_secs",
            raw.ingest.rescan_interval_secs,
            30.0,
        ),
        max_line_bytes: c.count(
            "ingest.max_line_bytes",
            raw.ingest.max_line_bytes,
            8 << 20,
            1 << 30,
        ) as usize,
        max_file_bytes: c.count(
            "ingest.max_file_bytes",
            raw.ingest.max_file_bytes,
            1 << 30,
            1 << 40,
        ) as u64,
        reject_file_on_error: raw.ingest.reject_file_on_error.unwrap_or(false),
        check_models: raw.ingest.check_models.unwrap_or(true),
        models_refresh: c.secs(
            "ingest.models_refresh_secs",
            raw.ingest.models_refresh_secs,
            3600.0,
        ),
    };

    let b = raw.batch;
    let batchable_endpoints = b
        .batchable_endpoints
        .unwrap_or_else(|| vec!["/v1/chat/completions".to_string()]);
    for endpoint in &batchable_endpoints {
        if !SUPPORTED_ENDPOINTS.contains(&endpoint.as_str()) {
            c.problems.push(format!(
                "`batch.batchable_endpoints` contains {endpoint:?}, which batchd does not serve: use some of {}",
                SUPPORTED_ENDPOINTS.join(", ")
            ));
        }
    }
    let batch = BatchConfig {
        max_requests: c.count(
            "batch.max_requests",
            b.max_requests,
            100,
            PROVIDER_MAX_BATCH_LINES as i64,
        ) as usize,
        max_in_flight: c.count("batch.max_in_flight", b.max_in_flight, 10, 10_000) as usize,
        max_bytes: c.count(
            "batch.max_bytes",
            b.max_bytes,
            PROVIDER_MAX_BATCH_BYTES as i64,
            PROVIDER_MAX_BATCH_BYTES as i64,
        ) as u64,
        max_linger: c.secs("batch.max_linger_secs", b.max_linger_secs, 300.0),
        poll_interval: c.secs("batch.poll_interval_secs", b.poll_interval_secs, 30.0),
        batchable_endpoints,
        max_attempts: c.count("batch.max_attempts", b.max_attempts, 5, 1000) as u32,
        deadline_margin: c.secs(
            "batch.deadline_margin_secs",
            b.deadline_margin_secs,
            86_400.0,
        ),
        max_job_age: c.secs("batch.max_job_age_secs", b.max_job_age_secs, 259_200.0),
        capacity_cooldown: c.secs(
            "batch.capacity_cooldown_secs",
            b.capacity_cooldown_secs,
            600.0,
        ),
        max_create_attempts: c.count("batch.max_create_attempts", b.max_create_attempts, 5, 1000)
            as u32,
    };

    let r = raw.realtime;
    let realtime = RealtimeConfig {
        chat_per_minute: c.count(
            "realtime.chat_per_minute",
            r.chat_per_minute,
            500,
            1_000_000,
        ) as u32,
        completions_per_minute: c.count(
            "realtime.completions_per_minute",
            r.completions_per_minute,
            500,
            1_000_000,
        ) as u32,
        embeddings_per_minute: c.count(
            "realtime.embeddings_per_minute",
            r.embeddings_per_minute,
            250,
            1_000_000,
        ) as u32,
        images_per_minute: c.count(
            "realtime.images_per_minute",
            r.images_per_minute,
            50,
            1_000_000,
        ) as u32,
        max_concurrency: c.count("realtime.max_concurrency", r.max_concurrency, 16, 1024) as usize,
        embedding_inputs_per_request: c.count(
            "realtime.embedding_inputs_per_request",
            r.embedding_inputs_per_request,
            20,
            2048,
        ) as usize,
        max_attempts: c.count("realtime.max_attempts", r.max_attempts, 8, 1000) as u32,
        lease: c.secs("realtime.lease_secs", r.lease_secs, 600.0),
        backoff_initial: c.secs("realtime.backoff_initial_secs", r.backoff_initial_secs, 1.0),
        backoff_max: c.secs("realtime.backoff_max_secs", r.backoff_max_secs, 60.0),
        max_retry_wait: c.secs("realtime.max_retry_wait_secs", r.max_retry_wait_secs, 300.0),
        out_of_credit_pause: c.secs(
            "realtime.out_of_credit_pause_secs",
            r.out_of_credit_pause_secs,
            900.0,
        ),
        fallback_models: r.fallback_models.unwrap_or_default(),
        fallback_after_attempts: c.count(
            "realtime.fallback_after_attempts",
            r.fallback_after_attempts,
            2,
            1000,
        ) as u32,
        embedding_tokens_per_request: c.count(
            "realtime.embedding_tokens_per_request",
            r.embedding_tokens_per_request,
            65_536,
            1 << 40,
        ) as u64,
        embedding_max_input_tokens: c.count(
            "realtime.embedding_max_input_tokens",
            r.embedding_max_input_tokens,
            8192,
            1 << 40,
        ) as u64,
    };
    if realtime.embedding_max_input_tokens > realtime.embedding_tokens_per_request {
        c.problems.push(format!(
            "`realtime.embedding_max_input_tokens` = {} is larger than `realtime.embedding_tokens_per_request` = {}: one input must fit in a request",
            realtime.embedding_max_input_tokens, realtime.embedding_tokens_per_request
        ));
    }
    for (from, to) in &realtime.fallback_models {
        if from == to {
            c.problems.push(format!(
                "`realtime.fallback_models` maps {from:?} to itself: name another model"
            ));
        }
    }
    if realtime.lease <= provider.request_timeout {
        c.problems.push(format!(
            "`realtime.lease_secs` = {} must be longer than `provider.request_timeout_secs` = {}, or a slow call could be sent twice",
            realtime.lease.as_secs_f64(),
            provider.request_timeout.as_secs_f64()
        ));
    }

    let log_level = raw.daemon.log_level.unwrap_or_else(|| "info".to_string());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        c.problems.push(format!(
            "`daemon.log_level` = {log_level:?} is not a valid filter: use error, warn, info, debug or trace"
        ));
    }
    let daemon = DaemonConfig {
        shutdown_grace: c.secs(
            "daemon.shutdown_grace_secs",
            raw.daemon.shutdown_grace_secs,
            20.0,
        ),
        log_level,
    };

    if !c.problems.is_empty() {
        return Err(ConfigError::Invalid {
            path: None,
            problems: c.problems,
        });
    }
    Ok(Config {
        provider,
        paths,
        ingest,
        batch,
        realtime,
        daemon,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [paths]
        inbox = "/srv/batchd/inbox"
        database = "/srv/batchd/batchd.db"
    "#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = Config::from_toml(MINIMAL, ApiKey::default()).unwrap();
        assert_eq!(config.provider.base_url, DEFAULT_BASE_URL);
        assert_eq!(config.batch.max_requests, 100);
        assert_eq!(config.batch.max_in_flight, 10);
        assert_eq!(config.realtime.chat_per_minute, 500);
        assert_eq!(config.realtime.embeddings_per_minute, 250);
        assert_eq!(config.realtime.images_per_minute, 50);
        assert_eq!(config.realtime.embedding_inputs_per_request, 20);
        assert_eq!(
            config.paths.processed,
            PathBuf::from("/srv/batchd/processed")
        );
        assert_eq!(
            config.batch.batchable_endpoints,
            vec!["/v1/chat/completions"]
        );
    }

    #[test]
    fn every_invalid_key_is_reported_at_once() {
        let text = r#"
            [paths]
            inbox = "/srv/inbox"
            [batch]
            max_requests = 0
            poll_interval_secs = -1
            [realtime]
            chat_per_minute = 0
        "#;
        let err = Config::from_toml(text, ApiKey::default())
            .unwrap_err()
            .to_string();
        for key in [
            "paths.database",
            "batch.max_requests",
            "batch.poll_interval_secs",
            "realtime.chat_per_minute",
        ] {
            assert!(err.contains(key), "{key} missing from: {err}");
        }
    }

    #[test]
    fn unknown_key_is_a_parse_error() {
        let text = format!("{MINIMAL}\n[batch]\nmax_request = 5\n");
        let err = Config::from_toml(&text, ApiKey::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_request"), "{err}");
    }

    #[test]
    fn api_key_is_redacted_in_debug() {
        let config = Config::from_toml(MINIMAL, ApiKey::new(Some("sk-secret".into()))).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("sk-secret"));
        assert!(shown.contains("<redacted>"));
    }
}
