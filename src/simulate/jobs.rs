//! The life of a batch job, as a function of the time since its creation.
//!
//! A job is `VALIDATING` for the first tenth of the turnaround, then `FAILED` if its input broke
//! a file-level rule, else `IN_PROGRESS` with `progress` growing linearly until `COMPLETED` at the
//! full turnaround. A turnaround longer than the 24-hour job window ends in `EXPIRED` at the
//! deadline instead. Cancelling, and any end before `COMPLETED`, keeps the share of lines that
//! was finished. The output and error files are written when the job becomes terminal.

use std::time::Duration;

use axum::body::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use tokio::time::Instant;

use super::batch_input::LineResult;
use super::error::BatchError;
use super::files::FileStore;

/// Share of the turnaround that a job spends `VALIDATING`.
const VALIDATING_SHARE: f64 = 0.1;

/// Time from creation to `job_deadline`; Together's completion window is fixed at 24 hours.
const JOB_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// The simulator has a single user.
const USER_ID: &str = "user-simulator";

/// Status of a batch job, sent in UPPER_SNAKE case as Together spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Validating,
    InProgress,
    Completed,
    Failed,
    Expired,
    Cancelled,
}

impl Status {
    fn as_str(self) -> &'static str {
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

impl Serialize for Status {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
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
    input_file_id: String,
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
    status: Status,
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

impl Batch {
    /// Starts a job now. `results` are the job's result lines in the order it finishes them, or
    /// the reason the whole job fails.
    pub fn new(
        id: String,
        input_file_id: String,
        file_size_bytes: u64,
        endpoint: String,
        model_id: Option<String>,
        results: Result<Vec<LineResult>, String>,
    ) -> Self {
        Self {
            id,
            input_file_id,
            file_size_bytes,
            endpoint,
            model_id,
            created_at: Utc::now(),
            created: Instant::now(),
            results,
            outcome: None,
        }
    }

    /// Share of the lines finished after `elapsed`, from 0 to 1.
    fn finished_share(elapsed: Duration, turnaround: Duration) -> f64 {
        let validation = turnaround.mul_f64(VALIDATING_SHARE);
        if elapsed <= validation {
            0.0
        } else if elapsed >= turnaround {
            1.0
        } else {
            (elapsed - validation).as_secs_f64() / (turnaround - validation).as_secs_f64()
        }
    }

    /// Ends the job if its time has come.
    fn refresh(&mut self, now: Instant, turnaround: Duration, files: &mut FileStore) {
        if self.outcome.is_some() {
            return;
        }
        let elapsed = now.saturating_duration_since(self.created);
        let validation = turnaround.mul_f64(VALIDATING_SHARE);
        if elapsed < validation {
            return;
        }
        if let Err(reason) = &self.results {
            tracing::debug!(
                batch_id = self.id,
                error = reason,
                "batch failed validation"
            );
            self.outcome = Some(Outcome {
                status: Status::Failed,
                after: validation,
                progress: 0.0,
                output_file_id: None,
                error_file_id: None,
                error: Some(reason.clone()),
            });
        } else if turnaround > JOB_WINDOW && elapsed >= JOB_WINDOW {
            let share = Self::finished_share(JOB_WINDOW, turnaround);
            self.finish(Status::Expired, JOB_WINDOW, share, files);
        } else if elapsed >= turnaround {
            self.finish(Status::Completed, turnaround, 1.0, files);
        }
    }

    /// Makes the job terminal, writing the output and error files of the finished lines.
    fn finish(&mut self, status: Status, after: Duration, share: f64, files: &mut FileStore) {
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
        for result in &results[..finished] {
            let (file, line) = match result {
                LineResult::Output(line) => (&mut output, line),
                LineResult::Error(line) => (&mut errors, line),
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
    }

    /// Ends a `VALIDATING` or `IN_PROGRESS` job as `CANCELLED`, keeping its finished lines.
    pub fn cancel(
        &mut self,
        now: Instant,
        turnaround: Duration,
        files: &mut FileStore,
    ) -> Result<(), BatchError> {
        self.refresh(now, turnaround, files);
        if let Some(outcome) = &self.outcome {
            return Err(BatchError::bad_request(format!(
                "batch {} is already {}; only VALIDATING or IN_PROGRESS batches can be cancelled",
                self.id,
                outcome.status.as_str()
            )));
        }
        let elapsed = now.saturating_duration_since(self.created);
        let share = Self::finished_share(elapsed, turnaround);
        self.finish(Status::Cancelled, elapsed, share, files);
        Ok(())
    }

    /// Returns the job object at `now`. Callers first bring the job up to date at the same `now`,
    /// so that a job past its end is reported terminal.
    pub fn job(&self, now: Instant, turnaround: Duration) -> BatchJob<'_> {
        let elapsed = now.saturating_duration_since(self.created);
        let (status, progress) = match &self.outcome {
            Some(outcome) => (outcome.status, outcome.progress),
            None if elapsed < turnaround.mul_f64(VALIDATING_SHARE) => (Status::Validating, 0.0),
            None => (
                Status::InProgress,
                Self::finished_share(elapsed, turnaround) * 100.0,
            ),
        };
        let outcome = self.outcome.as_ref();
        BatchJob {
            id: &self.id,
            user_id: USER_ID,
            input_file_id: &self.input_file_id,
            file_size_bytes: self.file_size_bytes,
            status,
            job_deadline: rfc3339(self.created_at + JOB_WINDOW),
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

/// All batch jobs, oldest first.
#[derive(Default)]
pub(super) struct BatchStore {
    batches: Vec<Batch>,
    /// Number of batch creations started, which numbers each batch's shuffle.
    creations: u64,
}

impl BatchStore {
    /// Ends every job whose time has come.
    pub fn refresh_all(&mut self, now: Instant, turnaround: Duration, files: &mut FileStore) {
        for batch in &mut self.batches {
            batch.refresh(now, turnaround, files);
        }
    }

    /// Counts a batch creation and returns its number, starting at 1.
    pub fn next_sequence(&mut self) -> u64 {
        self.creations += 1;
        self.creations
    }

    /// Adds a job and returns it with the number of jobs in flight, the new one included unless
    /// a zero turnaround already ended it.
    pub fn insert(
        &mut self,
        mut batch: Batch,
        turnaround: Duration,
        files: &mut FileStore,
    ) -> (&Batch, usize) {
        batch.refresh(Instant::now(), turnaround, files);
        self.batches.push(batch);
        let in_flight = self
            .batches
            .iter()
            .filter(|batch| batch.outcome.is_none())
            .count();
        (self.batches.last().expect("just pushed"), in_flight)
    }

    pub fn get_mut(&mut self, id: &str) -> Result<&mut Batch, BatchError> {
        self.batches
            .iter_mut()
            .find(|batch| batch.id == id)
            .ok_or_else(|| {
                BatchError::not_found(format!(
                    "batch {id} not found; GET /v1/batches lists the existing batches"
                ))
            })
    }

    /// Returns every job object, oldest first.
    pub fn jobs(&self, now: Instant, turnaround: Duration) -> Vec<BatchJob<'_>> {
        self.batches
            .iter()
            .map(|batch| batch.job(now, turnaround))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TURNAROUND: Duration = Duration::from_secs(10);

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
        let mut files = FileStore::default();
        let mut batch = batch(created, 2, 0);

        let job = batch.job(created + Duration::from_millis(500), TURNAROUND);
        assert_eq!(job.status, Status::Validating);
        assert_eq!(job.progress, 0.0);

        let halfway = created + Duration::from_millis(5_500);
        batch.refresh(halfway, TURNAROUND, &mut files);
        let job = batch.job(halfway, TURNAROUND);
        assert_eq!(job.status, Status::InProgress);
        assert!((job.progress - 50.0).abs() < 1e-9, "{}", job.progress);

        let end = created + TURNAROUND;
        batch.refresh(end, TURNAROUND, &mut files);
        let job = batch.job(end, TURNAROUND);
        assert_eq!(job.status, Status::Completed);
        assert_eq!(job.progress, 100.0);
        assert_eq!(file_text(&files, job.output_file_id), "out-0\nout-1\n");
        assert_eq!(job.error_file_id, None);
    }

    #[test]
    fn invalid_input_fails_after_validating() {
        let created = Instant::now();
        let mut files = FileStore::default();
        let mut batch = batch(created, 0, 0);
        batch.results = Err("line 1: missing body".to_owned());

        batch.refresh(created + Duration::from_millis(900), TURNAROUND, &mut files);
        assert!(batch.outcome.is_none());

        let validated = created + Duration::from_secs(1);
        batch.refresh(validated, TURNAROUND, &mut files);
        let job = batch.job(validated, TURNAROUND);
        assert_eq!(job.status, Status::Failed);
        assert_eq!(job.error, Some("line 1: missing body"));
        assert_eq!(job.output_file_id, None);
    }

    #[test]
    fn cancel_keeps_finished_lines() {
        let mut files = FileStore::default();
        let mut batch = batch(Instant::now(), 3, 1);
        batch.finish(Status::Cancelled, Duration::from_secs(5), 0.5, &mut files);

        let job = batch.job(Instant::now(), TURNAROUND);
        assert_eq!(job.status, Status::Cancelled);
        assert_eq!(job.progress, 50.0);
        assert_eq!(file_text(&files, job.output_file_id), "out-0\nout-1\n");
        assert_eq!(job.error_file_id, None);
    }

    #[test]
    fn long_turnaround_expires_at_deadline() {
        let created = Instant::now();
        let turnaround = 2 * JOB_WINDOW;
        let mut files = FileStore::default();
        let mut batch = batch(created, 10, 0);

        batch.refresh(created + JOB_WINDOW, turnaround, &mut files);
        let job = batch.job(created + JOB_WINDOW, turnaround);
        assert_eq!(job.status, Status::Expired);
        // Validation takes 4.8 of the 48 hours, so 19.2 of the remaining 43.2 hours are done.
        let expected = 19.2 / 43.2 * 100.0;
        assert!((job.progress - expected).abs() < 1e-9, "{}", job.progress);
        assert_eq!(file_text(&files, job.output_file_id).lines().count(), 4);
    }
}
