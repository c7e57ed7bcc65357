//! The life of a batch job, as a function of the time since its creation.
//!
//! A job is `VALIDATING` for the first tenth of the turnaround, then `FAILED` if its input broke
//! a file-level rule or a fault failed it, else `IN_PROGRESS` with `progress` growing linearly
//! until `COMPLETED` at the full turnaround. A job still running at its deadline ends `EXPIRED`
//! then: one whose turnaround is longer than the deadline, one that a fault set to expire (it
//! finishes a fixed share of its lines by the deadline), and a stalled one (it finishes none).
//! Cancelling, and any end before `COMPLETED`, keeps the share of lines that was finished. The
//! output and error files are written when the job becomes terminal.

use std::time::Duration;

use axum::body::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use tokio::time::Instant;

use super::SimConfig;
use super::batch_input::LineResult;
use super::error::BatchError;
use super::faults::StatusCase;
use super::files::FileStore;

/// Share of the turnaround that a job spends `VALIDATING`.
const VALIDATING_SHARE: f64 = 0.1;

/// The simulator has a single user.
const USER_ID: &str = "user-simulator";

/// Status of a batch job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Validating,
    InProgress,
    Completed,
    Failed,
    Expired,
    Cancelled,
}

impl Status {
    /// Returns the status in UPPER_SNAKE case, as Together spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "VALIDATING",
            Status::InProgress => "IN_PROGRESS",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
            Status::Expired => "EXPIRED",
            Status::Cancelled => "CANCELLED",
        }
    }
}

/// The timeline of every job and the spelling of its status, taken from the config.
#[derive(Debug, Clone)]
pub(super) struct JobSettings {
    turnaround: Duration,
    validation: Duration,
    deadline: Duration,
    status_case: StatusCase,
    in_progress_status: Option<String>,
}

impl JobSettings {
    pub fn new(config: &SimConfig) -> Self {
        let faults = &config.faults;
        Self {
            turnaround: config.turnaround,
            validation: config.turnaround.mul_f64(VALIDATING_SHARE),
            deadline: Duration::try_from_secs_f64(faults.job_deadline_secs)
                .unwrap_or(Duration::MAX),
            status_case: faults.status_case,
            in_progress_status: faults.in_progress_status.clone(),
        }
    }

    /// Returns the status as clients see it.
    fn spell(&self, status: Status) -> String {
        let text = match (&self.in_progress_status, status) {
            (Some(replacement), Status::InProgress) => replacement.as_str(),
            _ => status.as_str(),
        };
        match self.status_case {
            StatusCase::Upper => text.to_owned(),
            StatusCase::Lower => text.to_lowercase(),
        }
    }
}

/// The end of a job that passed validation, unless it is cancelled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Fate {
    /// `COMPLETED` at the turnaround, or `EXPIRED` at the deadline if that comes first.
    Complete,
    /// `EXPIRED` at the deadline with this share of its lines finished.
    Expire { completed_fraction: f64 },
    /// In progress with no line finished until the deadline, then `EXPIRED`.
    Stall,
}

/// The end state of a terminal job.
struct Outcome {
    status: Status,
    /// Time from creation to the end.
    after: Duration,
    progress: f64,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    error: Option<String>,
}

/// One batch job.
pub(super) struct Batch {
    pub id: String,
    pub input_file_id: String,
    file_size_bytes: u64,
    endpoint: String,
    model_id: Option<String>,
    /// Wall-clock creation time, for the RFC 3339 fields.
    created_at: DateTime<Utc>,
    /// Monotonic creation time, from which the job's state is computed.
    created: Instant,
    /// The result lines in the order the job finishes them, or the reason the whole job fails.
    /// The lines move into the output and error files when the job ends.
    results: Result<Vec<LineResult>, String>,
    fate: Fate,
    /// `None` until the job is terminal.
    outcome: Option<Outcome>,
}

/// The BatchJob object. Absent values are left out rather than sent as `null`.
#[derive(Serialize)]
pub(super) struct BatchJob<'a> {
    id: &'a str,
    user_id: &'static str,
    input_file_id: &'a str,
    file_size_bytes: u64,
    status: String,
    job_deadline: String,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    completed_at: Option<String>,
    endpoint: &'a str,
    progress: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_file_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_file_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The fields of a new job.
pub(super) struct NewBatch {
    pub id: String,
    pub input_file_id: String,
    pub file_size_bytes: u64,
    pub endpoint: String,
    pub model_id: Option<String>,
    /// The job's result lines in the order it finishes them, or the reason the whole job fails.
    pub results: Result<Vec<LineResult>, String>,
    pub fate: Fate,
}

impl Batch {
    /// Starts a job now.
    pub fn new(new: NewBatch) -> Self {
        Self {
            id: new.id,
            input_file_id: new.input_file_id,
            file_size_bytes: new.file_size_bytes,
            endpoint: new.endpoint,
            model_id: new.model_id,
            created_at: Utc::now(),
            created: Instant::now(),
            results: new.results,
            fate: new.fate,
            outcome: None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.outcome.is_some()
    }

    /// Share of the lines finished after `elapsed`, from 0 to 1, while the job runs.
    fn finished_share(&self, elapsed: Duration, settings: &JobSettings) -> f64 {
        let (end, share_at_end) = match self.fate {
            Fate::Complete => (settings.turnaround, 1.0),
            Fate::Expire { completed_fraction } => (settings.deadline, completed_fraction),
            Fate::Stall => return 0.0,
        };
        let validation = settings.validation;
        if elapsed <= validation {
            0.0
        } else if elapsed >= end {
            share_at_end
        } else {
            share_at_end * (elapsed - validation).as_secs_f64() / (end - validation).as_secs_f64()
        }
    }

    /// Ends the job if its time has come, and returns the number of lines that a fault moved to
    /// the error file.
    pub fn refresh(&mut self, now: Instant, settings: &JobSettings, files: &mut FileStore) -> u64 {
        if self.outcome.is_some() {
            return 0;
        }
        let elapsed = now.saturating_duration_since(self.created);
        if elapsed < settings.validation {
            return 0;
        }
        if let Err(reason) = &self.results {
            tracing::debug!(
                batch_id = self.id,
                error = reason,
                "batch failed validation"
            );
            self.outcome = Some(Outcome {
                status: Status::Failed,
                after: settings.validation,
                progress: 0.0,
                output_file_id: None,
                error_file_id: None,
                error: Some(reason.clone()),
            });
            return 0;
        }

        let completes = self.fate == Fate::Complete && settings.turnaround <= settings.deadline;
        if completes && elapsed >= settings.turnaround {
            self.finish(Status::Completed, settings.turnaround, 1.0, files)
        } else if !completes && elapsed >= settings.deadline {
            let share = self.finished_share(settings.deadline, settings);
            self.finish(Status::Expired, settings.deadline, share, files)
        } else {
            0
        }
    }

    /// Makes the job terminal, writing the output and error files of the finished lines, and
    /// returns the number of lines that a fault moved to the error file.
    fn finish(
        &mut self,
        status: Status,
        after: Duration,
        share: f64,
        files: &mut FileStore,
    ) -> u64 {
        // Taking the lines out keeps one copy of them, the one in the files.
        let results = std::mem::replace(&mut self.results, Ok(Vec::new()));
        let results = results.as_deref().unwrap_or_default();
        let finished = if share >= 1.0 {
            results.len()
        } else {
            (results.len() as f64 * share).floor() as usize
        };

        let mut output = String::new();
        let mut errors = String::new();
        let mut injected_errors = 0;
        for result in &results[..finished] {
            let (file, line) = match result {
                LineResult::Output(line) => (&mut output, line),
                LineResult::Error(line) => (&mut errors, line),
                // Only a completed job reports the injected error. A job that ends any other way
                // writes the line's result to the output file.
                LineResult::FaultedOutput { output: line, .. } if status != Status::Completed => {
                    (&mut output, line)
                }
                LineResult::FaultedOutput { error, .. } => {
                    injected_errors += 1;
                    (&mut errors, error)
                }
            };
            file.push_str(line);
            file.push('\n');
        }
        let mut write = |kind: &str, content: String| {
            (!content.is_empty()).then(|| {
                let name = format!("batch-{}-{kind}.jsonl", self.id);
                files.add_generated(name, Bytes::from(content))
            })
        };
        let output_file_id = write("output", output);
        let error_file_id = write("error", errors);

        tracing::debug!(batch_id = self.id, ?status, finished, "batch ended");
        self.outcome = Some(Outcome {
            status,
            after,
            progress: share * 100.0,
            output_file_id,
            error_file_id,
            error: None,
        });
        injected_errors
    }

    /// Ends a `VALIDATING` or `IN_PROGRESS` job as `CANCELLED`, keeping its finished lines.
    pub fn cancel(
        &mut self,
        now: Instant,
        settings: &JobSettings,
        files: &mut FileStore,
    ) -> Result<(), BatchError> {
        self.refresh(now, settings, files);
        if let Some(outcome) = &self.outcome {
            return Err(BatchError::bad_request(format!(
                "batch {} is already {}; only VALIDATING or IN_PROGRESS batches can be cancelled",
                self.id,
                outcome.status.as_str()
            )));
        }
        let elapsed = now.saturating_duration_since(self.created);
        let share = self.finished_share(elapsed, settings);
        self.finish(Status::Cancelled, elapsed, share, files);
        Ok(())
    }

    /// Returns the status and progress at `now`.
    fn state(&self, now: Instant, settings: &JobSettings) -> (Status, f64) {
        let elapsed = now.saturating_duration_since(self.created);
        match &self.outcome {
            Some(outcome) => (outcome.status, outcome.progress),
            None if elapsed < settings.validation => (Status::Validating, 0.0),
            None => (
                Status::InProgress,
                self.finished_share(elapsed, settings) * 100.0,
            ),
        }
    }

    /// Returns the job object at `now`. Callers first bring the job up to date at the same `now`,
    /// so that a job past its end is reported terminal.
    pub fn job(&self, now: Instant, settings: &JobSettings) -> BatchJob<'_> {
        let (status, progress) = self.state(now, settings);
        let outcome = self.outcome.as_ref();
        BatchJob {
            id: &self.id,
            user_id: USER_ID,
            input_file_id: &self.input_file_id,
            file_size_bytes: self.file_size_bytes,
            status: settings.spell(status),
            job_deadline: rfc3339(self.created_at + settings.deadline),
            created_at: rfc3339(self.created_at),
            completed_at: outcome.map(|outcome| rfc3339(self.created_at + outcome.after)),
            endpoint: &self.endpoint,
            progress,
            model_id: self.model_id.as_deref(),
            output_file_id: outcome.and_then(|outcome| outcome.output_file_id.as_deref()),
            error_file_id: outcome.and_then(|outcome| outcome.error_file_id.as_deref()),
            error: outcome.and_then(|outcome| outcome.error.as_deref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::Faults;

    const TURNAROUND: Duration = Duration::from_secs(10);

    fn settings(turnaround: Duration, faults: Faults) -> JobSettings {
        JobSettings::new(&SimConfig {
            turnaround,
            faults,
            ..SimConfig::default()
        })
    }

    fn plain() -> JobSettings {
        settings(TURNAROUND, Faults::default())
    }

    /// Builds a batch created at `created` whose results are `outputs` output lines, then
    /// `errors` error lines, in that order.
    fn batch(created: Instant, outputs: usize, errors: usize) -> Batch {
        let results = (0..outputs)
            .map(|i| LineResult::Output(format!("out-{i}")))
            .chain((0..errors).map(|i| LineResult::Error(format!("err-{i}"))))
            .collect();
        Batch {
            id: "b".to_owned(),
            input_file_id: "file-in".to_owned(),
            file_size_bytes: 0,
            endpoint: "/v1/chat/completions".to_owned(),
            model_id: None,
            created_at: Utc::now(),
            created,
            results: Ok(results),
            fate: Fate::Complete,
            outcome: None,
        }
    }

    fn file_text(files: &FileStore, id: Option<&str>) -> String {
        let content = files.get(id.expect("file id")).unwrap().content.clone();
        String::from_utf8(content.unwrap().to_vec()).unwrap()
    }

    #[test]
    fn status_follows_elapsed_time() {
        let created = Instant::now();
        let settings = plain();
        let mut files = FileStore::default();
        let mut batch = batch(created, 2, 0);

        let job = batch.job(created + Duration::from_millis(500), &settings);
        assert_eq!(job.status, "VALIDATING");
        assert_eq!(job.progress, 0.0);

        let halfway = created + Duration::from_millis(5_500);
        batch.refresh(halfway, &settings, &mut files);
        let job = batch.job(halfway, &settings);
        assert_eq!(job.status, "IN_PROGRESS");
        assert!((job.progress - 50.0).abs() < 1e-9, "{}", job.progress);

        let end = created + TURNAROUND;
        batch.refresh(end, &settings, &mut files);
        let job = batch.job(end, &settings);
        assert_eq!(job.status, "COMPLETED");
        assert_eq!(job.progress, 100.0);
        assert_eq!(file_text(&files, job.output_file_id), "out-0\nout-1\n");
        assert_eq!(job.error_file_id, None);
    }

    #[test]
    fn invalid_input_fails_after_validating() {
        let created = Instant::now();
        let settings = plain();
        let mut files = FileStore::default();
        let mut batch = batch(created, 0, 0);
        batch.results = Err("line 1: missing body".to_owned());

        batch.refresh(created + Duration::from_millis(900), &settings, &mut files);
        assert!(batch.outcome.is_none());

        let validated = created + Duration::from_secs(1);
        batch.refresh(validated, &settings, &mut files);
        let job = batch.job(validated, &settings);
        assert_eq!(job.status, "FAILED");
        assert_eq!(job.error, Some("line 1: missing body"));
        assert_eq!(job.output_file_id, None);
    }

    #[test]
    fn cancel_keeps_finished_lines() {
        let mut files = FileStore::default();
        let mut batch = batch(Instant::now(), 3, 1);
        batch.finish(Status::Cancelled, Duration::from_secs(5), 0.5, &mut files);

        let job = batch.job(Instant::now(), &plain());
        assert_eq!(job.status, "CANCELLED");
        assert_eq!(job.progress, 50.0);
        assert_eq!(file_text(&files, job.output_file_id), "out-0\nout-1\n");
        assert_eq!(job.error_file_id, None);
    }

    #[test]
    fn long_turnaround_expires_at_deadline() {
        let created = Instant::now();
        let deadline = Duration::from_secs(24 * 60 * 60);
        let settings = settings(2 * deadline, Faults::default());
        let mut files = FileStore::default();
        let mut batch = batch(created, 10, 0);

        batch.refresh(created + deadline, &settings, &mut files);
        let job = batch.job(created + deadline, &settings);
        assert_eq!(job.status, "EXPIRED");
        // Validation takes 4.8 of the 48 hours, so 19.2 of the remaining 43.2 hours are done.
        let expected = 19.2 / 43.2 * 100.0;
        assert!((job.progress - expected).abs() < 1e-9, "{}", job.progress);
        assert_eq!(file_text(&files, job.output_file_id).lines().count(), 4);
    }

    #[test]
    fn expiring_fate_finishes_its_fraction() {
        let created = Instant::now();
        let settings = settings(
            TURNAROUND,
            Faults {
                job_deadline_secs: 20.0,
                ..Faults::default()
            },
        );
        let mut files = FileStore::default();
        let mut batch = batch(created, 10, 0);
        batch.fate = Fate::Expire {
            completed_fraction: 0.6,
        };

        // Past the turnaround the job still runs, because it is set to expire.
        batch.refresh(created + TURNAROUND, &settings, &mut files);
        assert_eq!(
            batch.job(created + TURNAROUND, &settings).status,
            "IN_PROGRESS"
        );

        let deadline = created + Duration::from_secs(20);
        batch.refresh(deadline, &settings, &mut files);
        let job = batch.job(deadline, &settings);
        assert_eq!(job.status, "EXPIRED");
        assert!((job.progress - 60.0).abs() < 1e-9, "{}", job.progress);
        assert_eq!(file_text(&files, job.output_file_id).lines().count(), 6);
    }

    #[test]
    fn stalled_job_finishes_nothing() {
        let created = Instant::now();
        let settings = settings(
            TURNAROUND,
            Faults {
                job_deadline_secs: 30.0,
                in_progress_status: Some("QUEUED".to_owned()),
                status_case: StatusCase::Lower,
                ..Faults::default()
            },
        );
        let mut files = FileStore::default();
        let mut batch = batch(created, 4, 0);
        batch.fate = Fate::Stall;

        let later = created + 2 * TURNAROUND;
        batch.refresh(later, &settings, &mut files);
        let job = batch.job(later, &settings);
        assert_eq!(job.status, "queued");
        assert_eq!(job.progress, 0.0);

        let deadline = created + Duration::from_secs(30);
        batch.refresh(deadline, &settings, &mut files);
        let job = batch.job(deadline, &settings);
        assert_eq!(job.status, "expired");
        assert_eq!(job.output_file_id, None);
    }

    #[test]
    fn injected_line_errors_only_show_in_completed_jobs() {
        let faulted = || LineResult::FaultedOutput {
            output: "out".to_owned(),
            error: "err".to_owned(),
        };
        let mut files = FileStore::default();

        let mut completed = batch(Instant::now(), 0, 0);
        completed.results = Ok(vec![faulted(), LineResult::Output("ok".to_owned())]);
        let moved = completed.finish(Status::Completed, TURNAROUND, 1.0, &mut files);
        assert_eq!(moved, 1);
        let job = completed.job(Instant::now(), &plain());
        assert_eq!(file_text(&files, job.error_file_id), "err\n");
        assert_eq!(file_text(&files, job.output_file_id), "ok\n");

        let mut cancelled = batch(Instant::now(), 0, 0);
        cancelled.results = Ok(vec![faulted()]);
        let moved = cancelled.finish(Status::Cancelled, TURNAROUND, 1.0, &mut files);
        assert_eq!(moved, 0);
        let job = cancelled.job(Instant::now(), &plain());
        assert_eq!(file_text(&files, job.output_file_id), "out\n");
    }
}
