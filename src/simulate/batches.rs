//! The Batch API routes: create, retrieve, list and cancel batch jobs. Errors use the batch error
//! shape `{"error": "<text>"}`. The jobs themselves live in [`super::jobs`]. Creating a job also
//! decides its batch faults: a 404 for a file that is not visible yet, a capacity failure, an
//! expiry or a stall.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::batch_input::{self, Draws, LineResult};
use super::batch_lines;
use super::dice::Roll;
use super::error::BatchError;
use super::faults::FaultKind;
use super::files::{BATCH_INPUT_PURPOSE, count_lines};
use super::ids::uuid_v4;
use super::jobs::{Batch, Fate, NewBatch};
use super::models;
use super::{Shared, Store};

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

/// `POST /v1/batches`: responds 201 with `{"job": BatchJob}`.
pub(super) async fn create_batch(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), BatchError> {
    shared
        .stats
        .update(|stats| stats.batch_create_requests += 1);
    let request = CreateRequest::parse(&body)?;
    let input_file_id = &request.input_file_id;

    let (content, checksum) = {
        let mut store = shared.current_store();
        let attempt = store.batches.count_create_attempt(input_file_id);
        if attempt <= shared.config.faults.create_not_found {
            shared.stats.record_fault(FaultKind::CreateNotFound);
            return Err(BatchError::not_found(format!(
                "file not found: {input_file_id}"
            )));
        }
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
        let (Some(content), Some(checksum)) = (file.content.clone(), file.content_sha256.clone())
        else {
            return Err(BatchError::bad_request(format!(
                "input file {input_file_id} has no content yet; finish its upload first"
            )));
        };
        (content, checksum)
    };

    // Every decision about the job comes from the content's checksum and the number of jobs made
    // from the same content before, so that it does not depend on which client came first.
    let mut key = b"batch:".to_vec();
    key.extend_from_slice(checksum.as_bytes());
    let draws = Draws {
        roll: shared.dice.roll(&key),
        line_error_rate: shared.config.faults.line_error_rate,
    };

    // Building up to 50,000 result lines takes a while, so it runs on a blocking thread and
    // without the store lock.
    let id = uuid_v4();
    let endpoint = request.endpoint.clone();
    let input = content.clone();
    let (results, draws) = tokio::task::spawn_blocking(move || {
        let results = batch_input::prepare(&input, &endpoint, &draws);
        (results, draws)
    })
    .await
    .map_err(|error| BatchError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("failed to prepare batch {id}: {error}"),
    })?;

    let model_id = request
        .model_id
        .or_else(|| batch_input::first_model(&content));
    let (results, fate) = decide_fate(&shared, &draws.roll, model_id.as_deref(), results);
    let batch = Batch::new(NewBatch {
        id,
        input_file_id: request.input_file_id,
        file_size_bytes: content.len() as u64,
        endpoint: request.endpoint,
        model_id,
        results,
        fate,
    });

    let settings = &shared.job_settings;
    let mut store = shared.current_store();
    let Store { files, batches } = &mut *store;
    let (batch, in_flight, jobs_for_input) = batches.insert(batch, settings, files);
    let line_count = count_lines(&content);
    shared.stats.update(|stats| {
        stats.batches_created += 1;
        stats.batch_lines_total += line_count;
        stats.max_batch_lines = stats.max_batch_lines.max(line_count);
        stats.max_batches_in_flight = stats.max_batches_in_flight.max(in_flight as u64);
        stats.max_jobs_per_input_file = stats.max_jobs_per_input_file.max(jobs_for_input as u64);
    });
    tracing::debug!(batch_id = batch.id, line_count, in_flight, "batch created");

    let job = batch.job(Instant::now(), settings);
    Ok((StatusCode::CREATED, Json(json!({ "job": job }))))
}

/// Decides how a job ends. A failed validation keeps its reason. Otherwise a model without batch
/// support or at capacity fails the job, and the expiry and stall faults set its fate.
fn decide_fate(
    shared: &Shared,
    roll: &Roll,
    model: Option<&str>,
    results: Result<Vec<LineResult>, String>,
) -> (Result<Vec<LineResult>, String>, Fate) {
    let faults = &shared.config.faults;
    if results.is_err() {
        return (results, Fate::Complete);
    }
    if let Some(model) = model
        && models::find(model).is_some_and(|model| !model.batchable)
    {
        return (Err(batch_lines::not_batchable(model)), Fate::Complete);
    }

    let capacity_model =
        model.is_some_and(|model| faults.capacity_fail_models.iter().any(|m| m == model));
    if capacity_model || roll.chance("batch_fail", faults.batch_fail_rate) {
        shared.stats.record_fault(FaultKind::BatchCapacity);
        let model = model.unwrap_or("of this batch");
        let reason = format!("The model {model} is at capacity, please try again later");
        return (Err(reason), Fate::Complete);
    }
    let created_before = shared.stats.snapshot().batches_created;
    if created_before < u64::from(faults.expire_first_jobs)
        || roll.chance("batch_expire", faults.batch_expire_rate)
    {
        shared.stats.record_fault(FaultKind::BatchExpired);
        let fate = Fate::Expire {
            completed_fraction: faults.expire_completed_fraction,
        };
        return (results, fate);
    }
    if faults.stall_batches {
        shared.stats.record_fault(FaultKind::BatchStalled);
        return (results, Fate::Stall);
    }
    (results, Fate::Complete)
}

/// `GET /v1/batches/{batch_id}`.
pub(super) async fn get_batch(
    State(shared): State<Arc<Shared>>,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, BatchError> {
    let mut store = shared.current_store();
    let batch = store.batches.get_mut(&batch_id)?;
    Ok(Json(json!(batch.job(Instant::now(), &shared.job_settings))))
}

/// `GET /v1/batches`: a bare JSON array, oldest first.
pub(super) async fn list_batches(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let store = shared.current_store();
    Json(json!(
        store.batches.jobs(Instant::now(), &shared.job_settings)
    ))
}

/// `POST /v1/batches/{batch_id}/cancel`: ends a `VALIDATING` or `IN_PROGRESS` job as `CANCELLED`.
pub(super) async fn cancel_batch(
    State(shared): State<Arc<Shared>>,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, BatchError> {
    let settings = &shared.job_settings;
    let mut store = shared.current_store();
    let Store { files, batches } = &mut *store;
    let batch = batches.get_mut(&batch_id)?;
    let now = Instant::now();
    batch.cancel(now, settings, files)?;
    Ok(Json(json!(batch.job(now, settings))))
}
