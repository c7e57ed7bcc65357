//! The Batch API: create, retrieve, list and cancel batch jobs. Errors use the batch error shape
//! `{"error": "<text>"}`.
//!
//! A job's life is a function of the time since its creation. It is `VALIDATING` for the first
//! tenth of the turnaround, then `FAILED` if its input broke a file-level rule, else
//! `IN_PROGRESS` with `progress` growing linearly until `COMPLETED` at the full turnaround. A
//! turnaround longer than the 24-hour job window ends in `EXPIRED` at the deadline instead.
//! Cancelling, and any end before `COMPLETED`, keeps the share of lines that was finished.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Shared;
use super::batch_input::{self, LineResult};
use super::error::BatchError;
use super::files::{BATCH_INPUT_PURPOSE, FileStore, count_lines};
use super::ids::uuid_v4;

/// Share of the turnaround that a job spends `VALIDATING`.
const VALIDATING_SHARE: f64 = 0.1;

/// Time from creation to `job_deadline`; Together's completion window is fixed at 24 hours.
const JOB_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// The simulator has a single user.
const USER_ID: &str = "user-simulator";

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

/// How a terminal job ended.
struct Outcome {
    status: Status,
    /// Time from creation to the end.
    after: Duration,
    progress: f64,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    error: Option<String>,
}

struct Batch {
    id: String,
    input_file_id: String,
    file_size_bytes: u64,
    endpoint: String,
    model_id: Option<String>,
    created_at: DateTime<Utc>,
    created: Instant,
    /// The answered lines in the order the job finishes them, or why the whole job fails.
    results: Result<Vec<LineResult>, String>,
    /// `None` until the job is terminal.
    outcome: Option<Outcome>,
}

/// The BatchJob object. Absent values are left out rather than sent as `null`.
#[derive(Serialize)]
struct BatchJob<'a> {
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
        let results = self.results.as_deref().unwrap_or_default();
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

    fn job(&self, now: Instant, turnaround: Duration) -> BatchJob<'_> {
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

    fn get_mut(&mut self, id: &str) -> Result<&mut Batch, BatchError> {
        self.batches
            .iter_mut()
            .find(|batch| batch.id == id)
            .ok_or_else(|| {
                BatchError::not_found(format!(
                    "batch {id} not found; GET /v1/batches lists the existing batches"
                ))
            })
    }

    fn in_flight(&self) -> usize {
        self.batches
            .iter()
            .filter(|batch| batch.outcome.is_none())
            .count()
    }
}

/// The fields of a `POST /v1/batches` body.
struct CreateRequest {
    endpoint: String,
    input_file_id: String,
    model_id: Option<String>,
}

impl CreateRequest {
    fn parse(body: &[u8]) -> Result<Self, BatchError> {
        let body: Value = serde_json::from_slice(body)
            .map_err(|error| BatchError::bad_request(format!("invalid JSON body: {error}")))?;
        let text = |name: &str, required: bool| -> Result<Option<String>, BatchError> {
            match body.get(name) {
                Some(Value::String(value)) if !value.is_empty() => Ok(Some(value.clone())),
                None | Some(Value::Null) if !required => Ok(None),
                _ => Err(BatchError::bad_request(format!(
                    "`{name}` must be a non-empty string"
                ))),
            }
        };
        let endpoint = text("endpoint", true)?.unwrap_or_default();
        let input_file_id = text("input_file_id", true)?.unwrap_or_default();
        let model_id = text("model_id", false)?;
        // Together fixes the completion window at 24 hours, so its value is only type-checked.
        text("completion_window", false)?;
        if body
            .get("priority")
            .is_some_and(|priority| !priority.is_null() && !priority.is_i64())
        {
            return Err(BatchError::bad_request("`priority` must be an integer"));
        }
        Ok(Self {
            endpoint,
            input_file_id,
            model_id,
        })
    }
}

/// `POST /v1/batches`: answers 201 with `{"job": BatchJob}`.
pub(super) async fn create_batch(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), BatchError> {
    let request = CreateRequest::parse(&body)?;
    let input_file_id = &request.input_file_id;

    let (content, sequence) = {
        let mut store = shared.current_store();
        let file = store.files.get(input_file_id).ok_or_else(|| {
            BatchError::bad_request(format!(
                "input file {input_file_id} not found; upload it with POST /v1/files first"
            ))
        })?;
        if file.purpose != BATCH_INPUT_PURPOSE {
            return Err(BatchError::bad_request(format!(
                "input file {input_file_id} has purpose `{}`; batch input needs purpose \
                 `{BATCH_INPUT_PURPOSE}`",
                file.purpose
            )));
        }
        let content = file.content.clone().ok_or_else(|| {
            BatchError::bad_request(format!(
                "input file {input_file_id} has no content yet; finish its upload first"
            ))
        })?;
        store.batches.creations += 1;
        (content, store.batches.creations)
    };

    // Answering up to 50,000 lines takes a while, so it runs off the async workers and without
    // the store lock. The n-th batch's shuffle depends only on the configured seed and n.
    let id = uuid_v4();
    let seed = shared.config.seed ^ sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let endpoint = request.endpoint.clone();
    let input = content.clone();
    let results =
        tokio::task::spawn_blocking(move || batch_input::prepare(&input, &endpoint, seed))
            .await
            .map_err(|error| BatchError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("failed to prepare batch {id}: {error}"),
            })?;

    let line_count = count_lines(&content);
    let batch = Batch {
        id: id.clone(),
        input_file_id: request.input_file_id,
        file_size_bytes: content.len() as u64,
        endpoint: request.endpoint,
        model_id: request
            .model_id
            .or_else(|| batch_input::first_model(&content)),
        created_at: Utc::now(),
        created: Instant::now(),
        results,
        outcome: None,
    };

    let mut store = shared.current_store();
    let super::Store { files, batches } = &mut *store;
    batches.batches.push(batch);
    let batch = batches.batches.last_mut().expect("just pushed");
    // A zero turnaround ends the job at once.
    batch.refresh(Instant::now(), shared.config.turnaround, files);
    let in_flight = batches.in_flight() as u64;
    shared.stats.update(|stats| {
        stats.batches_created += 1;
        stats.batch_lines_total += line_count;
        stats.max_batch_lines = stats.max_batch_lines.max(line_count);
        stats.max_batches_in_flight = stats.max_batches_in_flight.max(in_flight);
    });

    let batch = batches.batches.last().expect("just pushed");
    tracing::debug!(batch_id = batch.id, line_count, in_flight, "batch created");
    let job = batch.job(Instant::now(), shared.config.turnaround);
    Ok((StatusCode::CREATED, Json(json!({ "job": job }))))
}

/// `GET /v1/batches/{batch_id}`.
pub(super) async fn get_batch(
    State(shared): State<Arc<Shared>>,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, BatchError> {
    let mut store = shared.current_store();
    let batch = store.batches.get_mut(&batch_id)?;
    Ok(Json(json!(
        batch.job(Instant::now(), shared.config.turnaround)
    )))
}

/// `GET /v1/batches`: a bare JSON array, oldest first.
pub(super) async fn list_batches(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let store = shared.current_store();
    let now = Instant::now();
    let jobs: Vec<BatchJob<'_>> = store
        .batches
        .batches
        .iter()
        .map(|batch| batch.job(now, shared.config.turnaround))
        .collect();
    Json(json!(jobs))
}

/// `POST /v1/batches/{batch_id}/cancel`: ends a `VALIDATING` or `IN_PROGRESS` job as `CANCELLED`.
pub(super) async fn cancel_batch(
    State(shared): State<Arc<Shared>>,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, BatchError> {
    let turnaround = shared.config.turnaround;
    let mut store = shared.current_store();
    let super::Store { files, batches } = &mut *store;
    let batch = batches.get_mut(&batch_id)?;
    let now = Instant::now();
    if let Some(outcome) = &batch.outcome {
        return Err(BatchError::bad_request(format!(
            "batch {batch_id} is already {}; only VALIDATING or IN_PROGRESS batches can be \
             cancelled",
            outcome.status.as_str()
        )));
    }
    let elapsed = now.saturating_duration_since(batch.created);
    let share = Batch::finished_share(elapsed, turnaround);
    batch.finish(Status::Cancelled, elapsed, share, files);
    Ok(Json(json!(batch.job(now, turnaround))))
}
