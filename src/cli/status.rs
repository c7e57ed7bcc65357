//! `batchd status`: items by state, batch jobs by status, the jobs in flight, real-time rates
//! per endpoint, and progress with an estimate of the time left per input file, read from the
//! database (safe while the daemon runs).

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::store::{BatchRow, EndpointRate, FileProgress, ItemState, Store, StoreError};

/// Window over which finished items are counted to estimate a file's rate.
pub const RATE_WINDOW_SECS: i64 = 600;

/// Window of the real-time rates.
pub const REALTIME_WINDOW_SECS: i64 = 60;

/// Everything `batchd status` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Count per item state, plus `total`.
    pub items: BTreeMap<String, u64>,
    /// Count per batch job status (the provider's, or batchd's own before submission).
    pub batches: BTreeMap<String, u64>,
    /// Batch jobs not yet harvested, oldest first.
    pub jobs_in_flight: Vec<BatchRow>,
    /// Items the real-time path finished in the last minute, per endpoint.
    pub realtime: Vec<EndpointRate>,
    pub files: Vec<FileStatus>,
}

/// One input file's counts with its progress and an estimate of the time left.
#[derive(Debug, Clone, Serialize)]
pub struct FileStatus {
    #[serde(flatten)]
    pub file: FileProgress,
    /// Items not yet succeeded or failed.
    pub pending: u64,
    /// Share of items finished, from 0 to 1.
    pub progress: f64,
    /// Items finished per minute over the last 10 minutes (or since ingest, if later).
    pub rate_per_minute: f64,
    /// Estimated seconds until every item is finished, at that rate. `None` when no item
    /// finished in the window, because then there is no rate to go by.
    pub eta_secs: Option<u64>,
}

impl FileStatus {
    /// Adds the rate and the estimate to a file's counts, as seen at `now`.
    pub fn new(file: FileProgress, now: DateTime<Utc>) -> FileStatus {
        // A file ingested within the window has had less time to make progress; dividing by
        // the whole window would understate its rate.
        let age = crate::store::parse_timestamp(&file.ingested_at)
            .map(|at| (now - at).num_milliseconds())
            .unwrap_or(RATE_WINDOW_SECS * 1000);
        let window_secs = (age.clamp(1000, RATE_WINDOW_SECS * 1000)) as f64 / 1000.0;
        let per_sec = file.finished_recently as f64 / window_secs;
        let pending = file.pending();
        let eta_secs = if pending == 0 {
            Some(0)
        } else if per_sec > 0.0 {
            Some((pending as f64 / per_sec).ceil() as u64)
        } else {
            None
        };
        FileStatus {
            pending,
            progress: file.progress(),
            rate_per_minute: per_sec * 60.0,
            eta_secs,
            file,
        }
    }
}

/// Formats seconds as `1h 02m`, `3m 20s` or `45s`.
pub fn format_duration(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

impl Status {
    pub async fn read(store: &Store) -> Result<Status, StoreError> {
        let now = Utc::now();
        let counts = store.item_counts().await?;
        let mut items: BTreeMap<String, u64> = counts
            .iter()
            .map(|(state, n)| (state.as_str().to_string(), *n))
            .collect();
        items.insert("total".into(), counts.values().sum());
        let batches = store.batch_status_counts().await?.into_iter().collect();
        let jobs_in_flight = store.unfinished_batches().await?;
        let realtime = store
            .realtime_rates(now - chrono::Duration::seconds(REALTIME_WINDOW_SECS))
            .await?;
        let files = store
            .file_progress(now - chrono::Duration::seconds(RATE_WINDOW_SECS))
            .await?
            .into_iter()
            .map(|file| FileStatus::new(file, now))
            .collect();
        Ok(Status {
            items,
            batches,
            jobs_in_flight,
            realtime,
            files,
        })
    }

    /// Counts items not yet succeeded or failed.
    pub fn unfinished(&self) -> u64 {
        ItemState::ALL
            .iter()
            .filter(|s| !s.is_terminal())
            .map(|s| self.items.get(s.as_str()).copied().unwrap_or(0))
            .sum()
    }

    /// Renders the human-readable form.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let item = |state: ItemState| self.items.get(state.as_str()).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "items: {} total",
            self.items.get("total").copied().unwrap_or(0)
        );
        for state in ItemState::ALL {
            let _ = writeln!(out, "  {:<10} {:>8}", state.as_str(), item(state));
        }
        out.push_str("batch jobs:\n");
        if self.batches.is_empty() {
            out.push_str("  none\n");
        }
        for (status, n) in &self.batches {
            let _ = writeln!(out, "  {status:<10} {n:>8}");
        }
        self.render_jobs(&mut out);
        self.render_realtime(&mut out);
        self.render_files(&mut out);
        out
    }

    fn render_jobs(&self, out: &mut String) {
        out.push_str("batch jobs in flight:\n");
        if self.jobs_in_flight.is_empty() {
            out.push_str("  none\n");
        }
        for job in &self.jobs_in_flight {
            let id = job
                .provider_batch_id
                .clone()
                .unwrap_or_else(|| format!("(batch {}, not created yet)", job.id));
            let status = job
                .provider_status
                .clone()
                .unwrap_or_else(|| job.state.as_str().to_string());
            let progress = job
                .progress
                .map(|p| format!("{p:.0}%"))
                .unwrap_or_else(|| "-".to_string());
            let _ = writeln!(
                out,
                "  {id}: {status}, {progress}, {} items of {}",
                job.item_count, job.model
            );
        }
    }

    fn render_realtime(&self, out: &mut String) {
        out.push_str("real-time items finished in the last minute:\n");
        if self.realtime.is_empty() {
            out.push_str("  none\n");
        }
        for rate in &self.realtime {
            let _ = writeln!(
                out,
                "  {}: {} succeeded, {} failed",
                rate.endpoint, rate.succeeded, rate.failed
            );
        }
    }

    fn render_files(&self, out: &mut String) {
        out.push_str("input files:\n");
        if self.files.is_empty() {
            out.push_str("  none\n");
        }
        for status in &self.files {
            let f = &status.file;
            if let Some(purged_at) = &f.purged_at {
                let _ = writeln!(
                    out,
                    "  {}: {} items, finished and exported to {}; retention deleted the items at {purged_at}",
                    f.name,
                    f.items,
                    f.export_path.as_deref().unwrap_or("-"),
                );
                continue;
            }
            let done = f.succeeded + f.failed;
            let left = match status.eta_secs {
                Some(0) => "finished".to_string(),
                Some(secs) => format!(
                    "about {} left at {:.1} items/min",
                    format_duration(secs),
                    status.rate_per_minute
                ),
                None => "time left unknown (nothing finished in the last 10 minutes)".to_string(),
            };
            let _ = writeln!(
                out,
                "  {}: {done}/{} done ({:.0}%), {} succeeded, {} failed, {} queued, {} in progress, {} bad lines; {left}",
                f.name,
                f.items,
                100.0 * status.progress,
                f.succeeded,
                f.failed,
                f.queued,
                f.in_progress,
                f.errors
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(items: u64, succeeded: u64, finished_recently: u64, ingested_at: &str) -> FileProgress {
        FileProgress {
            id: 1,
            name: "a.jsonl".into(),
            stored_name: Some("a.jsonl".into()),
            disposition: "processed".into(),
            items,
            queued: items - succeeded,
            in_progress: 0,
            succeeded,
            failed: 0,
            errors: 0,
            finished_recently,
            ingested_at: ingested_at.into(),
            exported_at: None,
            export_path: None,
            purged_at: None,
        }
    }

    #[test]
    fn estimate_uses_rate_over_window() {
        let now: DateTime<Utc> = "2026-01-01T12:00:00Z".parse().unwrap();
        // 60 finished in 10 minutes is 6 a minute, so 30 left take 5 minutes.
        let status = FileStatus::new(file(100, 70, 60, "2026-01-01T00:00:00Z"), now);
        assert_eq!(status.eta_secs, Some(300));
        assert!((status.rate_per_minute - 6.0).abs() < 1e-9);
    }

    #[test]
    fn estimate_of_young_file_uses_its_age() {
        let now: DateTime<Utc> = "2026-01-01T12:00:00Z".parse().unwrap();
        // Ingested 2 minutes ago with 20 finished: 10 a minute.
        let status = FileStatus::new(file(100, 20, 20, "2026-01-01T11:58:00Z"), now);
        assert_eq!(status.eta_secs, Some(480));
    }

    #[test]
    fn estimate_unknown_without_rate() {
        let now: DateTime<Utc> = "2026-01-01T12:00:00Z".parse().unwrap();
        let status = FileStatus::new(file(100, 0, 0, "2026-01-01T00:00:00Z"), now);
        assert_eq!(status.eta_secs, None);
        let done = FileStatus::new(file(10, 10, 0, "2026-01-01T00:00:00Z"), now);
        assert_eq!(done.eta_secs, Some(0));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(45), "45s");
        assert_eq!(format_duration(200), "3m 20s");
        assert_eq!(format_duration(3720), "1h 02m");
    }
}
