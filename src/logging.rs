//! Logging to stderr, as journald takes it: no colour codes unless stderr is a terminal, and
//! JSON lines with `daemon.log_format = "json"`. The filter sits behind a reload handle so that
//! SIGHUP can change `daemon.log_level` in a running daemon.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::LogFormat;

/// Environment variable whose filter overrides `daemon.log_level`.
pub const LOG_FILTER_ENV: &str = "BATCHD_LOG";

/// Changes the log filter of the running process.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// True when `BATCHD_LOG` set the filter, which then wins over `daemon.log_level`.
    env_override: bool,
}

impl LogControl {
    /// Sets the filter to `level` (a `daemon.log_level` value), unless `BATCHD_LOG` overrides it.
    /// Returns false when the override kept the filter unchanged.
    pub fn set_level(&self, level: &str) -> Result<bool, String> {
        if self.env_override {
            return Ok(false);
        }
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// Installs the global subscriber: `BATCHD_LOG` if set, else `level`, written to stderr in
/// `format`.
pub fn init(level: &str, format: LogFormat) -> LogControl {
    let from_env = EnvFilter::try_from_env(LOG_FILTER_ENV).ok();
    let env_override = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let text = (format == LogFormat::Text)
        .then(|| fmt::layer().with_writer(std::io::stderr).with_ansi(ansi));
    let json = (format == LogFormat::Json).then(|| {
        fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(false)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    LogControl {
        handle,
        env_override,
    }
}
