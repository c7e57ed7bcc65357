//! File uploads: the official SDKs' two-step upload (`POST /v1/files` without the bytes returns
//! 302 with a presigned URL, the client `PUT`s the bytes there, then calls `preprocess`), the
//! one-step `POST /v1/files/upload`, and a plain multipart `POST /v1/files` that carries the
//! bytes. Errors use the inference error shape.
//!
//! A form's optional `checksum` (hex SHA-256) is compared with the files uploaded so far. A match
//! gets a 409 with the existing `file_id`, which the official Python SDK reuses instead of
//! uploading again.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;
use super::files::not_found;
use super::{Shared, Store};

/// Purposes in Together's OpenAPI spec.
const PURPOSES: [&str; 7] = [
    "fine-tune",
    "eval",
    "eval-sample",
    "eval-output",
    "eval-summary",
    "batch-generated",
    "batch-api",
];

const FILE_TYPES: [&str; 3] = ["jsonl", "parquet", "csv"];

/// The parts of a multipart upload form.
struct UploadForm {
    fields: HashMap<String, String>,
    /// The `file` part: its file name, if any, and its bytes.
    file: Option<(Option<String>, Bytes)>,
}

impl UploadForm {
    async fn read(multipart: Result<Multipart, MultipartRejection>) -> Result<Self, ApiError> {
        let invalid = |error: &dyn std::fmt::Display| {
            ApiError::bad_request(format!("invalid multipart form: {error}"))
        };
        let mut multipart = multipart.map_err(|error| invalid(&error))?;
        let mut form = UploadForm {
            fields: HashMap::new(),
            file: None,
        };
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|error| invalid(&error))?
        {
            let name = field.name().unwrap_or_default().to_owned();
            if name == "file" {
                let file_name = field.file_name().map(str::to_owned);
                let bytes = field.bytes().await.map_err(|error| invalid(&error))?;
                form.file = Some((file_name, bytes));
            } else {
                let text = field.text().await.map_err(|error| invalid(&error))?;
                form.fields.insert(name, text);
            }
        }
        Ok(form)
    }

    /// Returns a text field, treating an empty one as absent.
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .get(name)
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
    }

    fn purpose(&self) -> Result<String, ApiError> {
        let purpose = self.field("purpose").ok_or_else(|| {
            ApiError::bad_request("missing form field `purpose`; batch input files use `batch-api`")
        })?;
        if !PURPOSES.contains(&purpose) {
            return Err(ApiError::bad_request(format!(
                "invalid purpose `{purpose}`: expected one of {}",
                PURPOSES.join(", ")
            )));
        }
        Ok(purpose.to_owned())
    }

    fn file_type(&self) -> Result<String, ApiError> {
        let file_type = self.field("file_type").unwrap_or("jsonl");
        if !FILE_TYPES.contains(&file_type) {
            return Err(ApiError::bad_request(format!(
                "invalid file_type `{file_type}`: expected one of {}",
                FILE_TYPES.join(", ")
            )));
        }
        Ok(file_type.to_owned())
    }

    /// Returns the `file_name` field, or else the file name of the `file` part.
    fn file_name(&self) -> Result<String, ApiError> {
        let part_name = self.file.as_ref().and_then(|(name, _)| name.as_deref());
        self.field("file_name")
            .or(part_name)
            .map(str::to_owned)
            .ok_or_else(|| ApiError::bad_request("missing form field `file_name`"))
    }

    /// Returns the `checksum` field in lowercase, after checking that it is a hex SHA-256.
    fn checksum(&self) -> Result<Option<String>, ApiError> {
        let Some(checksum) = self.field("checksum") else {
            return Ok(None);
        };
        if checksum.len() != 64 || !checksum.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(ApiError::bad_request(format!(
                "invalid checksum `{checksum}`: expected the SHA-256 of the file as 64 hex digits"
            )));
        }
        Ok(Some(checksum.to_ascii_lowercase()))
    }
}

/// Builds the 409 response from which the official SDK takes the `file_id` to reuse instead of
/// uploading again.
fn already_uploaded(file_id: &str, checksum: &str) -> Response {
    let body = json!({
        "file_id": file_id,
        "error": {
            "message": format!("a file with checksum {checksum} already exists: {file_id}; reuse it"),
            "type": "invalid_request_error",
            "param": "checksum",
            "code": "file_already_exists",
        },
    });
    (StatusCode::CONFLICT, Json(body)).into_response()
}

/// Stores a form that carries the bytes and returns the file object.
fn store_uploaded(
    shared: &Shared,
    store: &mut Store,
    form: UploadForm,
    purpose: String,
    file_type: String,
) -> Result<Response, ApiError> {
    let filename = form.file_name()?;
    let Some((_, content)) = form.file else {
        return Err(ApiError::bad_request(
            "missing form part `file` with the file's bytes",
        ));
    };
    let file = store
        .files
        .insert(filename, purpose, file_type, Some(content), None);
    tracing::debug!(file_id = file.id, "file uploaded");
    shared.stats.update(|stats| stats.files_uploaded += 1);
    Ok(Json(file.response()).into_response())
}

/// `POST /v1/files`: the SDK's first upload step when the form has no `file` part, or a one-step
/// upload when it has one.
pub(super) async fn create_file(
    State(shared): State<Arc<Shared>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let form = UploadForm::read(multipart).await?;
    let purpose = form.purpose()?;
    let file_type = form.file_type()?;
    let checksum = form.checksum()?;

    let mut store = shared.current_store();
    if let Some(checksum) = &checksum {
        if let Some(existing) = store.files.find_uploaded(checksum) {
            return Ok(already_uploaded(&existing.id, checksum));
        }
    }
    if form.file.is_some() {
        return store_uploaded(&shared, &mut store, form, purpose, file_type);
    }

    let filename = form.file_name()?;
    let file = store
        .files
        .insert(filename, purpose, file_type, None, checksum);
    let location = format!("{}/_sim/uploads/{}", shared.origin, file.id);
    let headers = [
        (header::LOCATION, header_value(&location)),
        (
            header::HeaderName::from_static("x-together-file-id"),
            header_value(&file.id),
        ),
    ];
    Ok((StatusCode::FOUND, headers).into_response())
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("ids and loopback URLs are valid header values")
}

/// `POST /v1/files/upload`: one-step upload with `purpose`, `file_name`, `file` and an optional
/// `file_type`.
pub(super) async fn upload_file(
    State(shared): State<Arc<Shared>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let form = UploadForm::read(multipart).await?;
    let purpose = form.purpose()?;
    let file_type = form.file_type()?;
    let mut store = shared.current_store();
    store_uploaded(&shared, &mut store, form, purpose, file_type)
}

/// `PUT /_sim/uploads/{file_id}`: the presigned URL of a two-step upload. Like a presigned URL it
/// needs no API key. A second `PUT` replaces the content; files uploaded in one step or written by
/// a batch have no such URL.
pub(super) async fn put_upload(
    State(shared): State<Arc<Shared>>,
    Path(file_id): Path<String>,
    content: Bytes,
) -> Result<StatusCode, ApiError> {
    let mut store = shared.current_store();
    let file = store
        .files
        .files
        .get_mut(&file_id)
        .ok_or_else(|| not_found(&file_id))?;
    if !file.has_upload_url {
        return Err(ApiError::bad_request(format!(
            "file {file_id} has no upload URL because it was not created by a two-step upload; \
             start one with POST /v1/files without a `file` part"
        )));
    }
    let first_upload = file.content.is_none();
    file.set_content(content);
    if first_upload {
        shared.stats.update(|stats| stats.files_uploaded += 1);
    }
    tracing::debug!(file_id, "file content received");
    Ok(StatusCode::OK)
}

/// `POST /v1/files/{file_id}/preprocess`: the last upload step, which returns the file object.
pub(super) async fn preprocess(
    State(shared): State<Arc<Shared>>,
    Path(file_id): Path<String>,
) -> Result<Response, ApiError> {
    let store = shared.current_store();
    let file = store
        .files
        .get(&file_id)
        .ok_or_else(|| not_found(&file_id))?;
    let Some(actual) = &file.content_sha256 else {
        return Err(ApiError::bad_request(format!(
            "file {file_id} has no content yet; PUT its bytes to the upload URL first"
        )));
    };
    if let Some(declared) = &file.declared_checksum {
        if declared != actual {
            return Err(ApiError::bad_request(format!(
                "checksum mismatch for file {file_id}: the form declared {declared} but the \
                 uploaded bytes have SHA-256 {actual}; upload the file again"
            )));
        }
    }
    Ok(Json(file.response()).into_response())
}
