//! Validation of each section into its typed config, one function per section. Adding a section
//! means a struct in `mod.rs`, a function here, a line in [`SECTIONS`] and in [`validate`], and
//! its keys in `render.rs`.

use std::path::PathBuf;

use toml::Table;

use super::check::{Checker, Section};
use super::layers::Origins;
use super::{
    ApiKey, BatchConfig, Config, Cron, DEFAULT_BASE_URL, DaemonConfig, IngestConfig, LogFormat,
    MetricsConfig, PROVIDER_MAX_BATCH_BYTES, PROVIDER_MAX_BATCH_LINES, PathsConfig, ProviderConfig,
    RealtimeConfig, SUPPORTED_ENDPOINTS, SchedulesConfig,
};

/// The sections of a config file, in the order they are validated and rendered.
pub const SECTIONS: [&str; 8] = [
    "provider",
    "paths",
    "ingest",
    "batch",
    "realtime",
    "schedules",
    "metrics",
    "daemon",
];

/// Validates the merged table into a [`Config`], or returns every problem found. Also returns
/// every key the validation reads, as `section.key`.
pub(super) fn validate(
    mut root: Table,
    api_key: ApiKey,
    origins: &Origins,
    mut problems: Vec<String>,
) -> (Result<Config, Vec<String>>, Vec<String>) {
    let mut c = Checker::new(origins);
    let provider = provider(c.section(&mut root, "provider"), api_key);
    let paths = paths(c.section(&mut root, "paths"));
    let ingest = ingest(c.section(&mut root, "ingest"));
    let batch = batch(c.section(&mut root, "batch"));
    let realtime = realtime(c.section(&mut root, "realtime"));
    let schedules = schedules(c.section(&mut root, "schedules"));
    let metrics = metrics(c.section(&mut root, "metrics"));
    let daemon = daemon(c.section(&mut root, "daemon"));
    c.unknown_sections(root, &SECTIONS);

    // Rules that tie keys of different sections together.
    if realtime.lease <= provider.request_timeout {
        c.problem(
            "realtime.lease_secs",
            format!(
                "`realtime.lease_secs` = {} must be longer than `provider.request_timeout_secs` = {}, or a slow call could be sent twice",
                realtime.lease.as_secs_f64(),
                provider.request_timeout.as_secs_f64()
            ),
        );
    }

    problems.append(&mut c.problems);
    let config = Config {
        provider,
        paths,
        ingest,
        batch,
        realtime,
        schedules,
        metrics,
        daemon,
    };
    let result = if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    };
    (result, c.known_keys)
}

fn provider(mut s: Section, api_key: ApiKey) -> ProviderConfig {
    let base_url = s
        .string("base_url")
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
    match reqwest::Url::parse(&base_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => {}
        _ => s.problem(
            "base_url",
            format!(
                "`provider.base_url` = {base_url:?} is not an http(s) URL: use e.g. {DEFAULT_BASE_URL:?}"
            ),
        ),
    }
    let config = ProviderConfig {
        base_url: base_url.trim_end_matches('/').to_string(),
        api_key,
        request_timeout: s.secs("request_timeout_secs", 120.0),
        connect_timeout: s.secs("connect_timeout_secs", 10.0),
    };
    s.finish();
    config
}

fn paths(mut s: Section) -> PathsConfig {
    let inbox = s.path("inbox").unwrap_or_else(|| {
        s.problem(
            "inbox",
            "`paths.inbox` is missing: set it to a directory path such as \"/var/lib/batchd/inbox\"".into(),
        );
        PathBuf::new()
    });
    let database = s.path("database").unwrap_or_else(|| {
        s.problem(
            "database",
            "`paths.database` is missing: set it to a file path such as \"/var/lib/batchd/batchd.db\"".into(),
        );
        PathBuf::new()
    });
    let sibling = |name: &str| {
        inbox
            .parent()
            .map(|p| p.join(name))
            .unwrap_or_else(|| PathBuf::from(name))
    };
    let config = PathsConfig {
        processed: s.path("processed").unwrap_or_else(|| sibling("processed")),
        rejected: s.path("rejected").unwrap_or_else(|| sibling("rejected")),
        outbox: s.path("outbox").unwrap_or_else(|| sibling("outbox")),
        inbox,
        database,
    };
    s.finish();
    config
}

fn ingest(mut s: Section) -> IngestConfig {
    let config = IngestConfig {
        settle: s.secs("settle_secs", 2.0),
        rescan_interval: s.secs("rescan_interval_secs", 30.0),
        max_line_bytes: s.count("max_line_bytes", 8 << 20, 1 << 30) as usize,
        max_file_bytes: s.count("max_file_bytes", 1 << 30, 1 << 40) as u64,
        reject_file_on_error: s.bool("reject_file_on_error", false),
        commit_lines: s.whole("commit_lines", 0, 0, 1 << 40) as u64,
        check_models: s.bool("check_models", true),
    };
    s.finish();
    config
}

fn batch(mut s: Section) -> BatchConfig {
    let batchable_endpoints = s
        .string_list("batchable_endpoints")
        .unwrap_or_else(|| vec!["/v1/chat/completions".to_string()]);
    for endpoint in &batchable_endpoints {
        if !SUPPORTED_ENDPOINTS.contains(&endpoint.as_str()) {
            s.problem(
                "batchable_endpoints",
                format!(
                    "`batch.batchable_endpoints` contains {endpoint:?}, which batchd does not serve: use some of {}",
                    SUPPORTED_ENDPOINTS.join(", ")
                ),
            );
        }
    }
    let config = BatchConfig {
        max_requests: s.count("max_requests", 100, PROVIDER_MAX_BATCH_LINES as i64) as usize,
        max_in_flight: s.count("max_in_flight", 10, 10_000) as usize,
        max_bytes: s.count(
            "max_bytes",
            PROVIDER_MAX_BATCH_BYTES as i64,
            PROVIDER_MAX_BATCH_BYTES as i64,
        ) as u64,
        max_linger: s.secs("max_linger_secs", 300.0),
        poll_interval: s.secs("poll_interval_secs", 30.0),
        batchable_endpoints,
        max_attempts: s.count("max_attempts", 5, 1000) as u32,
        deadline_margin: s.secs("deadline_margin_secs", 86_400.0),
        max_job_age: s.secs("max_job_age_secs", 259_200.0),
        capacity_cooldown: s.secs("capacity_cooldown_secs", 600.0),
        max_create_attempts: s.count("max_create_attempts", 5, 1000) as u32,
    };
    s.finish();
    config
}

fn realtime(mut s: Section) -> RealtimeConfig {
    let config = RealtimeConfig {
        chat_per_minute: s.count("chat_per_minute", 500, 1_000_000) as u32,
        completions_per_minute: s.count("completions_per_minute", 500, 1_000_000) as u32,
        embeddings_per_minute: s.count("embeddings_per_minute", 250, 1_000_000) as u32,
        images_per_minute: s.count("images_per_minute", 50, 1_000_000) as u32,
        // Calls in flight = rate x mean latency (Little's law), so the cap bounds the rate that
        // slow responses reach: 128 keeps the default chat rate of 8.3 per second at its limit up
        // to a mean latency of about 15 s.
        max_concurrency: s.count("max_concurrency", 128, 1024) as usize,
        embedding_inputs_per_request: s.count("embedding_inputs_per_request", 20, 2048) as usize,
        max_attempts: s.count("max_attempts", 8, 1000) as u32,
        lease: s.secs("lease_secs", 600.0),
        backoff_initial: s.secs("backoff_initial_secs", 1.0),
        backoff_max: s.secs("backoff_max_secs", 60.0),
        max_retry_wait: s.secs("max_retry_wait_secs", 300.0),
        out_of_credit_pause: s.secs("out_of_credit_pause_secs", 900.0),
        fallback_models: s.string_map("fallback_models").unwrap_or_default(),
        fallback_after_attempts: s.count("fallback_after_attempts", 2, 1000) as u32,
        embedding_tokens_per_request: s.count("embedding_tokens_per_request", 65_536, 1 << 40)
            as u64,
        embedding_max_input_tokens: s.count("embedding_max_input_tokens", 8192, 1 << 40) as u64,
    };
    if config.embedding_max_input_tokens > config.embedding_tokens_per_request {
        s.problem(
            "embedding_max_input_tokens",
            format!(
                "`realtime.embedding_max_input_tokens` = {} is larger than `realtime.embedding_tokens_per_request` = {}: one input must fit in a request",
                config.embedding_max_input_tokens, config.embedding_tokens_per_request
            ),
        );
    }
    for (from, to) in &config.fallback_models {
        if from == to {
            s.problem(
                "fallback_models",
                format!("`realtime.fallback_models` maps {from:?} to itself: name another model"),
            );
        }
    }
    s.finish();
    config
}

/// Reads a cron expression; an empty string switches the job off.
fn cron(s: &mut Section, key: &'static str, default: &str) -> Option<Cron> {
    let expression = s.string(key).unwrap_or_else(|| default.to_string());
    if expression.trim().is_empty() {
        return None;
    }
    match crate::schedule::parse_cron(&expression) {
        Ok(schedule) => Some(Cron {
            expression,
            schedule,
        }),
        Err(reason) => {
            s.problem(
                key,
                format!("`schedules.{key}` = {reason}, or \"\" to switch the job off"),
            );
            None
        }
    }
}

fn schedules(mut s: Section) -> SchedulesConfig {
    let config = SchedulesConfig {
        flush: cron(&mut s, "flush", ""),
        retention_run: cron(&mut s, "retention", "0 3 * * *"),
        retention: s.days("retention_days", 30.0),
        refresh_models: cron(&mut s, "refresh_models", "0 * * * *"),
    };
    s.finish();
    config
}

fn metrics(mut s: Section) -> MetricsConfig {
    let listen = s.string("listen").filter(|text| !text.is_empty());
    let listen = listen.and_then(|text| match text.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() => Some(addr),
        Ok(addr) => {
            s.problem(
                "listen",
                format!("`metrics.listen` = \"{addr}\" is not a loopback address: the endpoint has no authentication, so use 127.0.0.1 or [::1] and a reverse proxy for remote scrapes"),
            );
            None
        }
        Err(_) => {
            s.problem(
                "listen",
                format!("`metrics.listen` = {text:?} is not an address and port: use for example \"127.0.0.1:9187\""),
            );
            None
        }
    });
    s.finish();
    MetricsConfig { listen }
}

fn daemon(mut s: Section) -> DaemonConfig {
    let log_level = s.string("log_level").unwrap_or_else(|| "info".to_string());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        s.problem(
            "log_level",
            format!(
                "`daemon.log_level` = {log_level:?} is not a valid filter: use error, warn, info, debug or trace"
            ),
        );
    }
    let log_format = match s.string("log_format").as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            s.problem(
                "log_format",
                format!(
                    "`daemon.log_format` = {other:?} is not a log format: use \"text\" or \"json\""
                ),
            );
            LogFormat::Text
        }
    };
    let config = DaemonConfig {
        shutdown_grace: s.secs("shutdown_grace_secs", 20.0),
        log_level,
        log_format,
    };
    s.finish();
    config
}
