//! Settings: built-in defaults, then the TOML file, then `BATCHD_*` environment variables,
//! validated into one typed [`Config`].
//!
//! The file is parsed into a plain TOML table, the environment is merged into it
//! ([`layers`]), and each section is then read key by key and converted (seconds to
//! [`Duration`], paths resolved) by [`validate`]. Every unknown key, wrong type and invalid value
//! is reported at once, each naming its key and where it came from, so an operator fixes a
//! config in one pass.
//!
//! [`LiveSettings`] is the part a running daemon can change on SIGHUP; the rest needs a restart.

mod check;
pub mod layers;
pub mod render;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use layers::{API_KEY_CREDENTIAL, API_KEY_ENV, Environment};
pub use validate::SECTIONS;

/// Together's production API.
pub const DEFAULT_BASE_URL: &str = "https://api.together.xyz/v1";

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
    #[error(
        "invalid config{} ({} {}):\n  {}",
        path_suffix(.path),
        .problems.len(),
        if .problems.len() == 1 { "problem" } else { "problems" },
        .problems.join("\n  ")
    )]
    Invalid {
        path: Option<PathBuf>,
        problems: Vec<String>,
    },
}

impl ConfigError {
    /// Returns the message on one line, problems separated by "; ", for a log field.
    pub fn one_line(&self) -> String {
        self.to_string()
            .replace(":\n  ", ": ")
            .replace("\n  ", "; ")
    }
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
    pub schedules: SchedulesConfig,
    pub metrics: MetricsConfig,
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
    /// A larger file is committed in parts of this many lines, and 0 commits each file at once.
    pub commit_lines: u64,
    /// Fail items at ingest whose model is not in the provider's catalogue.
    pub check_models: bool,
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

/// A cron schedule with the expression it was read from.
#[derive(Debug, Clone)]
pub struct Cron {
    pub expression: String,
    pub schedule: cron::Schedule,
}

/// Two schedules are the same when their expressions are.
impl PartialEq for Cron {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression
    }
}

impl Eq for Cron {}

/// Housekeeping jobs; a job without a schedule does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulesConfig {
    /// Sends partial batches at these times, before `batch.max_linger_secs` has passed.
    pub flush: Option<Cron>,
    /// Deletes the items of files exported more than `retention` ago.
    pub retention_run: Option<Cron>,
    pub retention: Duration,
    /// Fetches the provider's model list again, when models are checked.
    pub refresh_models: Option<Cron>,
}

/// The Prometheus endpoint, off unless `listen` is set.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub shutdown_grace: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// The format of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Provider ceilings for one batch input file.
pub const PROVIDER_MAX_BATCH_LINES: usize = 50_000;
pub const PROVIDER_MAX_BATCH_BYTES: u64 = 100_000_000;

impl Config {
    /// Reads and validates a config file with this process's environment: `BATCHD_*`
    /// variables, and the API key from the systemd credential or `TOGETHER_API_KEY`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, &Environment::from_process())
    }

    /// Reads and validates a config file with the environment `env`.
    pub fn load_with(path: &Path, env: &Environment) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::layered(&text, Some(path), env)
    }

    /// Parses and validates TOML text alone, with no environment layer.
    pub fn from_toml(text: &str, api_key: ApiKey) -> Result<Config, ConfigError> {
        let root = parse(text, None)?;
        let origins = layers::Origins::default();
        finish(
            validate::validate(root, api_key, &origins, Vec::new()).0,
            None,
        )
    }

    /// Parses TOML text, merges the environment into it and validates the result.
    fn layered(text: &str, path: Option<&Path>, env: &Environment) -> Result<Config, ConfigError> {
        let mut root = parse(text, path)?;
        let mut origins = layers::Origins {
            file: path.map(Path::to_path_buf),
            ..Default::default()
        };
        let mut problems = layers::merge_env(&mut root, env, &SECTIONS, &mut origins);
        let api_key = layers::read_api_key(env).unwrap_or_else(|problem| {
            problems.push(problem);
            ApiKey::default()
        });
        let (result, _) = validate::validate(root, api_key, &origins, problems);
        finish(result, path)
    }

    /// Returns the resolved config as TOML with the API key hidden, as `batchd validate` prints it.
    pub fn to_toml(&self) -> String {
        render::to_toml(self)
    }
}

fn parse(text: &str, path: Option<&Path>) -> Result<toml::Table, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.map(Path::to_path_buf).unwrap_or_default(),
        message: e.to_string(),
    })
}

fn finish(result: Result<Config, Vec<String>>, path: Option<&Path>) -> Result<Config, ConfigError> {
    result.map_err(|problems| ConfigError::Invalid {
        path: path.map(Path::to_path_buf),
        problems,
    })
}

/// The settings a running daemon applies on SIGHUP without a restart. The packer and the
/// real-time workers read them from a `watch` channel each time they use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSettings {
    pub max_requests: usize,
    pub max_bytes: u64,
    pub max_in_flight: usize,
    pub chat_per_minute: u32,
    pub completions_per_minute: u32,
    pub embeddings_per_minute: u32,
    pub images_per_minute: u32,
    pub log_level: String,
    pub schedules: SchedulesConfig,
}

impl LiveSettings {
    /// The keys of these settings, as `section.key`.
    pub const KEYS: [&str; 12] = [
        "batch.max_requests",
        "batch.max_bytes",
        "batch.max_in_flight",
        "realtime.chat_per_minute",
        "realtime.completions_per_minute",
        "realtime.embeddings_per_minute",
        "realtime.images_per_minute",
        "daemon.log_level",
        "schedules.flush",
        "schedules.retention",
        "schedules.retention_days",
        "schedules.refresh_models",
    ];

    pub fn from_config(c: &Config) -> Self {
        LiveSettings {
            max_requests: c.batch.max_requests,
            max_bytes: c.batch.max_bytes,
            max_in_flight: c.batch.max_in_flight,
            chat_per_minute: c.realtime.chat_per_minute,
            completions_per_minute: c.realtime.completions_per_minute,
            embeddings_per_minute: c.realtime.embeddings_per_minute,
            images_per_minute: c.realtime.images_per_minute,
            log_level: c.daemon.log_level.clone(),
            schedules: c.schedules.clone(),
        }
    }

    /// Writes these settings into `c`, leaving every other key as it is.
    pub fn apply_to(&self, c: &mut Config) {
        c.batch.max_requests = self.max_requests;
        c.batch.max_bytes = self.max_bytes;
        c.batch.max_in_flight = self.max_in_flight;
        c.realtime.chat_per_minute = self.chat_per_minute;
        c.realtime.completions_per_minute = self.completions_per_minute;
        c.realtime.embeddings_per_minute = self.embeddings_per_minute;
        c.realtime.images_per_minute = self.images_per_minute;
        c.daemon.log_level = self.log_level.clone();
        c.schedules = self.schedules.clone();
    }

    /// Returns the per-minute rate of a real-time endpoint.
    pub fn rate_for(&self, endpoint: &str) -> u32 {
        match endpoint {
            "/v1/chat/completions" => self.chat_per_minute,
            "/v1/completions" => self.completions_per_minute,
            "/v1/embeddings" => self.embeddings_per_minute,
            _ => self.images_per_minute,
        }
    }
}

/// The receiving side of the live settings, as the stages hold it.
pub type LiveReceiver = tokio::sync::watch::Receiver<std::sync::Arc<LiveSettings>>;

/// Returns a receiver that always contains the settings of `config`, for stages run without a
/// reloading daemon (tests, single passes).
pub fn fixed_live(config: &Config) -> LiveReceiver {
    let (sender, receiver) =
        tokio::sync::watch::channel(std::sync::Arc::new(LiveSettings::from_config(config)));
    // Keeping the sender alive is not needed: a receiver still reads the last value.
    drop(sender);
    receiver
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
        assert_eq!(config.realtime.max_concurrency, 128);
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

    fn layered(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let path = Path::new("/etc/batchd/batchd.toml");
        Config::layered(
            text,
            Some(path),
            &Environment::from_vars(vars.iter().copied()),
        )
    }

    fn problems(result: Result<Config, ConfigError>) -> Vec<String> {
        match result {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn unknown_type_range_and_env_problems_reported_together() {
        let text = format!(
            "{MINIMAL}\n[batch]\nmax_request = 5\nmax_in_flight = \"ten\"\n[realtime]\nchat_per_minute = 0\n"
        );
        let found = problems(layered(&text, &[("BATCHD_BATCH__MAX_BYTES", "lots")]));
        assert_eq!(found.len(), 4, "{found:#?}");
        let expected = [
            (
                "`batch.max_request`",
                "/etc/batchd/batchd.toml",
                "did you mean `batch.max_requests`?",
            ),
            (
                "`batch.max_in_flight` = \"ten\"",
                "/etc/batchd/batchd.toml",
                "expected a whole number",
            ),
            (
                "`realtime.chat_per_minute` = 0",
                "/etc/batchd/batchd.toml",
                "out of range",
            ),
            (
                "`batch.max_bytes` = \"lots\"",
                "BATCHD_BATCH__MAX_BYTES",
                "expected a whole number",
            ),
        ];
        for (key, origin, fix) in expected {
            let line = found
                .iter()
                .find(|p| p.contains(key))
                .unwrap_or_else(|| panic!("{key} missing from {found:#?}"));
            assert!(line.starts_with(origin), "{line}");
            assert!(line.contains(fix), "{line}");
        }
    }

    #[test]
    fn env_variable_overrides_file() {
        let text = format!("{MINIMAL}\n[batch]\nmax_requests = 100\n");
        let config = layered(
            &text,
            &[
                ("BATCHD_BATCH__MAX_REQUESTS", "50"),
                ("BATCHD_DAEMON__LOG_LEVEL", "debug"),
                ("BATCHD_INGEST__SETTLE_SECS", "0.5"),
                ("BATCHD_PATHS__OUTBOX", "/srv/out"),
                ("BATCHD_LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(config.batch.max_requests, 50);
        assert_eq!(config.daemon.log_level, "debug");
        assert_eq!(config.ingest.settle, Duration::from_millis(500));
        assert_eq!(config.paths.outbox, PathBuf::from("/srv/out"));
        assert_eq!(config.daemon.log_format, LogFormat::Json);
    }

    #[test]
    fn reserved_and_foreign_env_variables_ignored() {
        let vars = [
            ("BATCHD_LOG", "debug"),
            ("BATCHD_FAULT_POINT", "after-upload"),
            ("BATCHD_SDK_PYTHON", "/usr/bin/python3"),
        ];
        let config = layered(MINIMAL, &vars).unwrap();
        assert_eq!(config.daemon.log_level, "info");
    }

    #[test]
    fn single_underscore_env_variable_is_flagged() {
        let found = problems(layered(MINIMAL, &[("BATCHD_BATCH_MAX_REQUESTS", "5")]));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].contains("BATCHD_BATCH__MAX_REQUESTS"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn unknown_env_key_suggests_variable() {
        let found = problems(layered(MINIMAL, &[("BATCHD_BATCH__MAX_REQUEST", "5")]));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("BATCHD_BATCH__MAX_REQUEST:"),
            "{}",
            found[0]
        );
        assert!(
            found[0].contains("did you mean BATCHD_BATCH__MAX_REQUESTS?"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn unknown_section_suggests_section() {
        let text = format!("{MINIMAL}\n[bacth]\nmax_requests = 5\n");
        let found = problems(layered(&text, &[]));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("did you mean [batch]?"), "{}", found[0]);
    }

    #[test]
    fn api_key_in_file_points_to_credential() {
        let text = format!("{MINIMAL}\n[provider]\napi_key = \"sk-in-file\"\n");
        let found = problems(layered(&text, &[]));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("together_api_key"), "{}", found[0]);
        assert!(!found[0].contains("sk-in-file"), "{}", found[0]);
    }

    #[test]
    fn rendered_config_lists_every_known_key() {
        let root = parse(MINIMAL, None).unwrap();
        let (result, known) =
            validate::validate(root, ApiKey::default(), &Default::default(), Vec::new());
        let config = result.unwrap();
        let mut rendered: Vec<String> = render::flatten(&config)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut known = known;
        rendered.sort();
        known.sort();
        assert_eq!(rendered, known);
    }

    #[test]
    fn rendered_config_reads_back_the_same() {
        let text = format!(
            "{MINIMAL}\n[batch]\nmax_requests = 7\n[realtime]\nfallback_models = {{ \"a/b\" = \"a/c\" }}\n"
        );
        let config = Config::from_toml(&text, ApiKey::new(Some("sk-secret".into()))).unwrap();
        let rendered = config.to_toml();
        assert!(rendered.contains("api_key = \"<redacted>\""), "{rendered}");
        assert!(!rendered.contains("sk-secret"), "{rendered}");
        let without_key: String = rendered
            .lines()
            .filter(|l| !l.starts_with("api_key"))
            .map(|l| format!("{l}\n"))
            .collect();
        let again = Config::from_toml(&without_key, ApiKey::default()).unwrap();
        assert_eq!(render::flatten(&again), render::flatten(&config));
    }

    #[test]
    fn api_key_is_redacted_in_debug() {
        let config = Config::from_toml(MINIMAL, ApiKey::new(Some("sk-secret".into()))).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("sk-secret"));
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn schedules_default_to_daily_retention_and_hourly_models() {
        let config = Config::from_toml(MINIMAL, ApiKey::default()).unwrap();
        let s = &config.schedules;
        assert!(s.flush.is_none(), "no scheduled flush by default");
        assert_eq!(s.retention_run.as_ref().unwrap().expression, "0 3 * * *");
        assert_eq!(s.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(s.refresh_models.as_ref().unwrap().expression, "0 * * * *");
        assert_eq!(config.metrics.listen, None, "metrics are off by default");
    }

    #[test]
    fn bad_schedules_and_metrics_address_name_their_keys() {
        let text = format!(
            "{MINIMAL}\n[schedules]\nflush = \"every hour\"\nretention = \"0 25 * * *\"\nretention_days = 0\n[metrics]\nlisten = \"0.0.0.0:9187\"\n"
        );
        let found = problems(layered(&text, &[]));
        assert_eq!(found.len(), 4, "{found:#?}");
        let expected = [
            "`schedules.flush` = \"every hour\" has 2 fields",
            "`schedules.retention` = \"0 25 * * *\" is not a valid cron expression",
            "`schedules.retention_days` = 0 is out of range",
            "`metrics.listen` = \"0.0.0.0:9187\" is not a loopback address",
        ];
        for text in expected {
            assert!(
                found.iter().any(|p| p.contains(text)),
                "{text} in {found:#?}"
            );
        }
    }

    #[test]
    fn empty_schedule_switches_the_job_off() {
        let text = format!("{MINIMAL}\n[schedules]\nretention = \"\"\n");
        let config = Config::from_toml(&text, ApiKey::default()).unwrap();
        assert!(config.schedules.retention_run.is_none());
    }
}
