//! Config reload on SIGHUP: read the file and the environment again, validate, and apply the
//! settings that can change live ([`LiveSettings`]). Every other changed key keeps its running
//! value and is reported as needing a restart. An invalid config is rejected whole.
//!
//! NOTE: the environment of a running process does not change, so a changed `BATCHD_*`
//! variable takes effect only at a restart. A reload reads the same values as the start did.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, ConfigError, Environment, LiveReceiver, LiveSettings, render};
use crate::logging::LogControl;
use crate::wake::Signal;

/// The keys a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Keys applied live.
    pub applied: Vec<String>,
    /// Changed keys kept at their running value until a restart.
    pub needs_restart: Vec<String>,
}

/// Holds the running config and the sender of its live part.
pub struct Reloader {
    path: PathBuf,
    running: Config,
    live: watch::Sender<Arc<LiveSettings>>,
    log: Option<LogControl>,
    /// Raised after a change, so the packer looks at its queue under the new caps.
    work: Signal,
}

impl Reloader {
    /// Starts from the running `config`, read from `path`.
    pub fn new(path: PathBuf, config: Config, log: Option<LogControl>, work: Signal) -> Self {
        let (live, _) = watch::channel(Arc::new(LiveSettings::from_config(&config)));
        Reloader {
            path,
            running: config,
            live,
            log,
            work,
        }
    }

    /// Returns a receiver of the live settings for a stage.
    pub fn subscribe(&self) -> LiveReceiver {
        self.live.subscribe()
    }

    /// Reloads from the file and this process's environment, and logs the result.
    pub fn reload(&mut self) -> Result<ReloadOutcome, ConfigError> {
        match Config::load_with(&self.path, &Environment::from_process()) {
            Ok(new) => Ok(self.apply(new)),
            Err(error) => {
                tracing::error!(
                    path = %self.path.display(),
                    error = %error.one_line(),
                    "config reload rejected; keeping the running config"
                );
                Err(error)
            }
        }
    }

    /// Applies the live part of a valid `new` config and reports the rest.
    pub fn apply(&mut self, new: Config) -> ReloadOutcome {
        let mut outcome = ReloadOutcome::default();
        let old_values = render::flatten(&self.running);
        let new_values = render::flatten(&new);
        for ((key, old), (_, value)) in old_values.iter().zip(&new_values) {
            if old == value {
                continue;
            }
            if LiveSettings::KEYS.contains(&key.as_str()) {
                tracing::info!(key = %key, old = %old, new = %value, "config reloaded");
                outcome.applied.push(key.clone());
            } else {
                tracing::warn!(key = %key, running = %old, new = %value, "config change needs a restart; keeping the running value");
                outcome.needs_restart.push(key.clone());
            }
        }
        if new.provider.api_key.expose() != self.running.provider.api_key.expose() {
            tracing::warn!(
                key = "provider.api_key",
                "config change needs a restart; keeping the running value"
            );
            outcome.needs_restart.push("provider.api_key".into());
        }

        let live = LiveSettings::from_config(&new);
        if live.log_level != self.running.daemon.log_level
            && let Some(log) = &self.log
        {
            match log.set_level(&live.log_level) {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    key = "daemon.log_level",
                    "BATCHD_LOG is set and overrides `daemon.log_level`; the log filter stays as it is"
                ),
                Err(error) => {
                    tracing::error!(%error, level = %live.log_level, "failed to change the log filter")
                }
            }
        }
        live.apply_to(&mut self.running);
        self.live.send_replace(Arc::new(live));
        if outcome.applied.is_empty() && outcome.needs_restart.is_empty() {
            tracing::info!(path = %self.path.display(), "config reloaded; nothing changed");
        } else {
            self.work.raise();
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKey;

    fn config(extra: &str) -> Config {
        let text =
            format!("[paths]\ninbox = \"/srv/inbox\"\ndatabase = \"/srv/batchd.db\"\n{extra}");
        Config::from_toml(&text, ApiKey::default()).unwrap()
    }

    #[test]
    fn live_keys_apply_and_others_wait_for_restart() {
        let mut reloader = Reloader::new(PathBuf::from("/unused"), config(""), None, Signal::new());
        let live = reloader.subscribe();
        let outcome = reloader.apply(config("[batch]\nmax_requests = 5\nmax_linger_secs = 9\n"));
        assert_eq!(outcome.applied, ["batch.max_requests"]);
        assert_eq!(outcome.needs_restart, ["batch.max_linger_secs"]);
        assert_eq!(live.borrow().max_requests, 5);
        assert_eq!(reloader.running.batch.max_requests, 5);
        assert_eq!(
            reloader.running.batch.max_linger,
            std::time::Duration::from_secs(300)
        );
    }

    #[test]
    fn restart_only_change_reported_again_until_restart() {
        let mut reloader = Reloader::new(PathBuf::from("/unused"), config(""), None, Signal::new());
        let changed = "[provider]\nbase_url = \"http://127.0.0.1:9\"\n";
        for _ in 0..2 {
            let outcome = reloader.apply(config(changed));
            assert_eq!(outcome.needs_restart, ["provider.base_url"]);
        }
    }
}
