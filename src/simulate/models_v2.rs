//! The two model routes that the official Python SDK 3.1.1 calls instead of `GET /v1/models`:
//! `models.list_supported()` reads `GET /v2/supported-models`, and `models.list()` reads
//! `GET /v2/projects/{project_id}/models`. Both return a cursor page `{"data", "next_cursor"}`
//! with camelCase keys, as the SDK's `SupportedModel` and `Model` types declare them.
//!
//! The simulator has no custom models, so every project's model list is empty.

use axum::Json;
use axum::extract::{Path, Query};
use chrono::{DateTime, SecondsFormat};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::models::{self, Model, ModelKind};

/// Query parameters of `GET /v2/supported-models` that the simulator honours.
#[derive(Debug, Deserialize)]
pub(super) struct SupportedQuery {
    /// Case-insensitive text to find in the id or display name.
    search: Option<String>,
    /// `PRODUCT_SERVERLESS` keeps every model; the other products have none here.
    product: Option<String>,
    /// Page size.
    limit: Option<usize>,
    /// Id of the last model of the previous page.
    after: Option<String>,
}

fn rfc3339(unix_secs: i64) -> String {
    DateTime::from_timestamp(unix_secs, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn supported_model_json(model: &Model) -> Value {
    let (capability, output) = match model.kind {
        ModelKind::Chat => ("CAPABILITY_CHAT", "MODALITY_TEXT"),
        ModelKind::Embedding => ("CAPABILITY_EMBEDDING", "MODALITY_TEXT"),
        ModelKind::Image => ("CAPABILITY_IMAGE_GENERATION", "MODALITY_IMAGE"),
    };
    let created = rfc3339(model.created);
    json!({
        "id": model.id,
        "name": model.id,
        "baseModel": "",
        "baseModelId": "",
        "capabilities": [capability],
        "createdAt": created,
        "updatedAt": created,
        "deploymentProfiles": [],
        "displayName": model.display_name,
        "displayType": model.kind.as_str(),
        "inputModalities": ["MODALITY_TEXT"],
        "outputModalities": [output],
        "products": ["PRODUCT_SERVERLESS"],
        "publisher": model.organization,
        "status": "SUPPORTED_MODEL_STATUS_SUPPORTED",
        "contextLength": model.context_length.to_string(),
        "pricing": {"input": model.input_price, "output": model.output_price},
        "serverlessEndpoint": model.id,
    })
}

/// `GET /v2/supported-models`: the catalogue as one cursor page at a time.
pub(super) async fn list_supported_models(
    Query(query): Query<SupportedQuery>,
) -> Result<Json<Value>, ApiError> {
    if query.limit == Some(0) {
        return Err(ApiError::bad_request(
            "invalid `limit` 0: ask for at least one model per page",
        ));
    }
    let search = query.search.as_deref().map(str::to_lowercase);
    let serverless = query
        .product
        .as_deref()
        .is_none_or(|product| product == "PRODUCT_SERVERLESS");
    let matching: Vec<&Model> = models::all()
        .iter()
        .filter(|_| serverless)
        .filter(|model| {
            search.as_deref().is_none_or(|text| {
                model.id.to_lowercase().contains(text)
                    || model.display_name.to_lowercase().contains(text)
            })
        })
        .collect();

    let start = match &query.after {
        None => 0,
        Some(after) => {
            let position = matching.iter().position(|model| model.id == after);
            let Some(position) = position else {
                return Err(ApiError::bad_request(format!(
                    "invalid cursor `after` {after:?}: pass the `next_cursor` of the previous page"
                )));
            };
            position + 1
        }
    };
    let limit = query.limit.unwrap_or(matching.len().max(1));
    let page: Vec<&Model> = matching.iter().skip(start).take(limit).copied().collect();
    let next_cursor = (start + page.len() < matching.len())
        .then(|| page.last().map(|model| model.id))
        .flatten();
    let data: Vec<Value> = page.into_iter().map(supported_model_json).collect();
    Ok(Json(json!({"data": data, "next_cursor": next_cursor})))
}

/// `GET /v2/projects/{project_id}/models`: an empty page, because the simulator has no custom
/// models.
pub(super) async fn list_project_models(Path(_project_id): Path<String>) -> Json<Value> {
    Json(json!({"data": [], "next_cursor": null}))
}
