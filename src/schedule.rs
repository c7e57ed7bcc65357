//! Cron schedules for housekeeping: flushing partial batches, deleting old results (retention)
//! and refreshing the model catalogue. Times are in UTC. One task sleeps until the next due
//! job, runs it, and computes the next.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cron::Schedule;
use tokio_util::sync::CancellationToken;

use crate::config::{LiveReceiver, SchedulesConfig};
use crate::models::Catalogue;
use crate::provider::Provider;
use crate::store::Store;
use crate::wake::Signal;

/// Parses a cron expression: five fields (minute, hour, day of month, month, day of week) as in
/// crontab, or six with seconds first.
pub fn parse_cron(expression: &str) -> Result<Schedule, String> {
    let fields = expression.split_whitespace().count();
    let full = match fields {
        5 => format!("0 {expression}"),
        6 => expression.to_string(),
        _ => {
            return Err(format!(
                "{expression:?} has {fields} fields; write five (minute hour day month weekday), for example \"0 3 * * *\", or six with seconds first"
            ));
        }
    };
    Schedule::from_str(&full).map_err(|error| {
        format!(
            "{expression:?} is not a valid cron expression ({error}); for example \"0 3 * * *\" is daily at 03:00 UTC"
        )
    })
}

/// One housekeeping job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Send partial batches now instead of waiting for `batch.max_linger_secs`.
    Flush,
    /// Delete the items of exported files older than the retention period, then return free
    /// pages to the file system.
    Retention,
    /// Fetch the provider's model list again.
    RefreshModels,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Flush => "flush",
            Job::Retention => "retention",
            Job::RefreshModels => "refresh_models",
        }
    }
}

/// The state the jobs act on.
pub struct Housekeeping {
    pub store: Store,
    pub flush: Signal,
    /// The catalogue and the provider to refresh it from, when models are checked.
    pub models: Option<(Catalogue, Provider)>,
}

impl Housekeeping {
    async fn run_job(&self, job: Job, retention: Duration) {
        match job {
            Job::Flush => {
                tracing::debug!("scheduled flush of partial batches");
                self.flush.raise();
            }
            Job::Retention => self.purge(retention).await,
            Job::RefreshModels => {
                if let Some((catalogue, provider)) = &self.models {
                    catalogue.refresh(provider).await;
                }
            }
        }
    }

    async fn purge(&self, retention: Duration) {
        let cutoff = Utc::now() - chrono::Duration::from_std(retention).unwrap_or_default();
        match self.store.purge_exported(cutoff).await {
            Ok(purged) if purged.items > 0 => tracing::info!(
                files = purged.files,
                items = purged.items,
                freed_pages = purged.freed_pages,
                "deleted the results of exported files past retention"
            ),
            Ok(_) => tracing::debug!("retention found nothing to delete"),
            Err(error) => {
                tracing::warn!(%error, "failed to delete old results; retrying at the next scheduled run")
            }
        }
    }
}

/// Returns the job due first after `now`, and when.
fn next_due(schedules: &[(Job, Schedule)], now: DateTime<Utc>) -> Option<(Job, DateTime<Utc>)> {
    schedules
        .iter()
        .filter_map(|(job, schedule)| schedule.after(&now).next().map(|at| (*job, at)))
        .min_by_key(|(_, at)| *at)
}

/// Returns the scheduled jobs of `config`.
fn jobs(config: &SchedulesConfig) -> Vec<(Job, Schedule)> {
    [
        (Job::Flush, &config.flush),
        (Job::Retention, &config.retention_run),
        (Job::RefreshModels, &config.refresh_models),
    ]
    .into_iter()
    .filter_map(|(job, cron)| cron.as_ref().map(|c| (job, c.schedule.clone())))
    .collect()
}

/// Runs each job on its schedule until cancelled, following schedule changes made by a reload.
pub async fn run(housekeeping: Housekeeping, mut live: LiveReceiver, cancel: CancellationToken) {
    // A daemon that never reloads drops its sender; its schedules then stay as they are.
    let mut follow = true;
    loop {
        let settings = live.borrow_and_update().schedules.clone();
        let wait = next_due(&jobs(&settings), Utc::now())
            .map(|(job, at)| (job, (at - Utc::now()).to_std().unwrap_or_default()));
        let due = async {
            match wait {
                Some((job, wait)) => {
                    tokio::time::sleep(wait).await;
                    job
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = live.changed(), if follow => follow = changed.is_ok(),
            job = due => {
                let _busy = crate::watchdog::busy();
                tracing::debug!(job = job.name(), "running scheduled job");
                housekeeping.run_job(job, settings.retention).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn five_fields_read_as_crontab() {
        let schedule = parse_cron("30 3 * * *").unwrap();
        let next = schedule.after(&at("2026-01-01T00:00:00Z")).next().unwrap();
        assert_eq!(next, at("2026-01-01T03:30:00Z"));
    }

    #[test]
    fn six_fields_include_seconds() {
        let schedule = parse_cron("*/10 * * * * *").unwrap();
        let next = schedule.after(&at("2026-01-01T00:00:01Z")).next().unwrap();
        assert_eq!(next, at("2026-01-01T00:00:10Z"));
    }

    #[test]
    fn wrong_field_count_names_the_form() {
        let error = parse_cron("daily").unwrap_err();
        assert!(error.contains("has 1 fields; write five"), "{error}");
    }

    #[test]
    fn bad_field_is_an_error() {
        let error = parse_cron("0 25 * * *").unwrap_err();
        assert!(error.contains("is not a valid cron expression"), "{error}");
    }

    #[test]
    fn earliest_job_runs_first() {
        let schedules = vec![
            (Job::Retention, parse_cron("0 3 * * *").unwrap()),
            (Job::Flush, parse_cron("*/5 * * * *").unwrap()),
        ];
        let (job, when) = next_due(&schedules, at("2026-01-01T02:50:00Z")).unwrap();
        assert_eq!(job, Job::Flush);
        assert_eq!(when, at("2026-01-01T02:55:00Z"));
    }
}
