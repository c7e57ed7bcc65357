//! The Batch API routes: create, retrieve, list and cancel batch jobs. Errors use the batch error
//! shape `{"error": "<text>"}`. The jobs themselves live in [`super::jobs`].

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::batch_input;
use super::error::BatchError;
use super::files::{BATCH_INPUT_PURPOSE, count_lines};
use super::ids::uuid_v4;
use super::jobs::Batch;
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
        (content, store.batches.next_sequence())
    };

    // Building up to 50,000 result lines takes a while, so it runs on a blocking thread and
    // without the store lock. The n-th batch's shuffle depends only on the configured seed and n.
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

    let model_id = request
        .model_id
        .or_else(|| batch_input::first_model(&content));
    let batch = Batch::new(
        id,
        request.input_file_id,
        content.len() as u64,
        request.endpoint,
        model_id,
        results,
    );

    let turnaround = shared.config.turnaround;
    let mut store = shared.current_store();
    let Store { files, batches } = &mut *store;
    let (batch, in_flight) = batches.insert(batch, turnaround, files);
    let line_count = count_lines(&content);
    shared.stats.update(|stats| {
        stats.batches_created += 1;
        stats.batch_lines_total += line_count;
        stats.max_batch_lines = stats.max_batch_lines.max(line_count);
        stats.max_batches_in_flight = stats.max_batches_in_flight.max(in_flight as u64);
    });
    tracing::debug!(batch_id = batch.id, line_count, in_flight, "batch created");

    let job = batch.job(Instant::now(), turnaround);
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
    Json(json!(
        store.batches.jobs(Instant::now(), shared.config.turnaround)
    ))
}

/// `POST /v1/batches/{batch_id}/cancel`: ends a `VALIDATING` or `IN_PROGRESS` job as `CANCELLED`.
pub(super) async fn cancel_batch(
    State(shared): State<Arc<Shared>>,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, BatchError> {
    let turnaround = shared.config.turnaround;
    let mut store = shared.current_store();
    let Store { files, batches } = &mut *store;
    let batch = batches.get_mut(&batch_id)?;
    let now = Instant::now();
    batch.cancel(now, turnaround, files)?;
    Ok(Json(json!(batch.job(now, turnaround))))
}
