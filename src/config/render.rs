//! The resolved config as TOML, every key with its effective value, as `batchd validate` prints
//! it and as a reload compares old and new values. The API key is never written out.

use std::path::Path;
use std::time::Duration;

use toml::{Table, Value};

use super::{Config, LogFormat};

fn secs(d: Duration) -> Value {
    Value::Float(d.as_secs_f64())
}

fn int(n: impl TryInto<i64>) -> Value {
    Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

fn string(s: &str) -> Value {
    Value::String(s.to_string())
}

/// Text shown in place of the API key.
pub fn api_key_shown(config: &Config) -> &'static str {
    match config.provider.api_key.expose() {
        Some(_) => "<redacted>",
        None => "<unset>",
    }
}

/// Returns the config as a table of sections, without the API key.
pub fn to_table(c: &Config) -> Table {
    let mut root = Table::new();
    let mut add = |name: &str, pairs: Vec<(&str, Value)>| {
        let table = pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        root.insert(name.to_string(), Value::Table(table));
    };

    let p = &c.provider;
    add(
        "provider",
        vec![
            ("base_url", string(&p.base_url)),
            ("request_timeout_secs", secs(p.request_timeout)),
            ("connect_timeout_secs", secs(p.connect_timeout)),
        ],
    );

    let p = &c.paths;
    add(
        "paths",
        vec![
            ("inbox", path(&p.inbox)),
            ("database", path(&p.database)),
            ("processed", path(&p.processed)),
            ("rejected", path(&p.rejected)),
            ("outbox", path(&p.outbox)),
        ],
    );

    let i = &c.ingest;
    add(
        "ingest",
        vec![
            ("settle_secs", secs(i.settle)),
            ("rescan_interval_secs", secs(i.rescan_interval)),
            ("max_line_bytes", int(i.max_line_bytes)),
            ("max_file_bytes", int(i.max_file_bytes)),
            (
                "reject_file_on_error",
                Value::Boolean(i.reject_file_on_error),
            ),
            ("commit_lines", int(i.commit_lines)),
            ("check_models", Value::Boolean(i.check_models)),
        ],
    );

    let b = &c.batch;
    add(
        "batch",
        vec![
            ("max_requests", int(b.max_requests)),
            ("max_in_flight", int(b.max_in_flight)),
            ("max_bytes", int(b.max_bytes)),
            ("max_linger_secs", secs(b.max_linger)),
            ("poll_interval_secs", secs(b.poll_interval)),
            (
                "batchable_endpoints",
                Value::Array(b.batchable_endpoints.iter().map(|e| string(e)).collect()),
            ),
            ("max_attempts", int(b.max_attempts)),
            ("deadline_margin_secs", secs(b.deadline_margin)),
            ("max_job_age_secs", secs(b.max_job_age)),
            ("capacity_cooldown_secs", secs(b.capacity_cooldown)),
            ("max_create_attempts", int(b.max_create_attempts)),
        ],
    );

    let r = &c.realtime;
    add(
        "realtime",
        vec![
            ("chat_per_minute", int(r.chat_per_minute)),
            ("completions_per_minute", int(r.completions_per_minute)),
            ("embeddings_per_minute", int(r.embeddings_per_minute)),
            ("images_per_minute", int(r.images_per_minute)),
            ("max_concurrency", int(r.max_concurrency)),
            (
                "embedding_inputs_per_request",
                int(r.embedding_inputs_per_request),
            ),
            ("max_attempts", int(r.max_attempts)),
            ("lease_secs", secs(r.lease)),
            ("backoff_initial_secs", secs(r.backoff_initial)),
            ("backoff_max_secs", secs(r.backoff_max)),
            ("max_retry_wait_secs", secs(r.max_retry_wait)),
            ("out_of_credit_pause_secs", secs(r.out_of_credit_pause)),
            (
                "fallback_models",
                Value::Table(
                    r.fallback_models
                        .iter()
                        .map(|(k, v)| (k.clone(), string(v)))
                        .collect(),
                ),
            ),
            ("fallback_after_attempts", int(r.fallback_after_attempts)),
            (
                "embedding_tokens_per_request",
                int(r.embedding_tokens_per_request),
            ),
            (
                "embedding_max_input_tokens",
                int(r.embedding_max_input_tokens),
            ),
        ],
    );

    let s = &c.schedules;
    let cron = |job: &Option<super::Cron>| string(job.as_ref().map_or("", |c| &c.expression));
    add(
        "schedules",
        vec![
            ("flush", cron(&s.flush)),
            ("retention", cron(&s.retention_run)),
            (
                "retention_days",
                Value::Float(s.retention.as_secs_f64() / 86_400.0),
            ),
            ("refresh_models", cron(&s.refresh_models)),
        ],
    );
    add(
        "metrics",
        vec![(
            "listen",
            string(&c.metrics.listen.map_or(String::new(), |a| a.to_string())),
        )],
    );

    let d = &c.daemon;
    let format = match d.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    add(
        "daemon",
        vec![
            ("shutdown_grace_secs", secs(d.shutdown_grace)),
            ("log_level", string(&d.log_level)),
            ("log_format", string(format)),
        ],
    );
    root
}

/// Returns every key of the config as `section.key` with its value written as TOML, except
/// that strings are unquoted, as log fields quote them already.
pub fn flatten(c: &Config) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    for (section, table) in to_table(c) {
        let Value::Table(table) = table else { continue };
        for (key, value) in table {
            let text = match value {
                Value::String(text) => text,
                other => other.to_string(),
            };
            keys.push((format!("{section}.{key}"), text));
        }
    }
    keys
}

/// Returns the config as a TOML document, the API key shown as `<redacted>` or `<unset>`.
pub fn to_toml(c: &Config) -> String {
    let mut root = to_table(c);
    if let Some(Value::Table(provider)) = root.get_mut("provider") {
        provider.insert("api_key".into(), string(api_key_shown(c)));
    }
    let body = toml::to_string(&root).expect("a table of plain values serializes");
    format!(
        "# Resolved batchd config: defaults, then the file, then BATCHD_* variables.\n\
         # provider.api_key is shown only as set or unset; it is read from the systemd credential\n\
         # `together_api_key` or TOGETHER_API_KEY, never from the file.\n\n{body}"
    )
}
