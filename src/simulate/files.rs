//! Stored files and the Files API routes that read them: list, retrieve, download and delete.
//! Errors use the inference error shape. Uploads are in [`super::uploads`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::Shared;
use super::error::ApiError;
use super::ids::uuid_v4;

/// Maximum size of a request body that the simulator reads. It is above the 100 MB batch input
/// limit, so that an oversized input file uploads and then fails batch validation, as on Together.
pub(super) const MAX_REQUEST_BYTES: usize = 256 * 1024 * 1024;

/// Purpose of the output and error files that batches write.
pub(super) const GENERATED_PURPOSE: &str = "batch-generated";

/// Purpose that batch input files must have.
pub(super) const BATCH_INPUT_PURPOSE: &str = "batch-api";

/// Counts the lines that are not blank, which is how batch input is counted too.
pub(super) fn count_lines(content: &[u8]) -> u64 {
    content
        .split(|&byte| byte == b'\n')
        .filter(|line| !line.trim_ascii().is_empty())
        .count() as u64
}

fn sha256_hex(content: &[u8]) -> String {
    hex::encode(Sha256::digest(content))
}

/// A client's upload, a two-step upload that waits for its bytes, or a file that a batch wrote.
pub(super) struct StoredFile {
    pub id: String,
    /// Creation order, for listing.
    seq: u64,
    filename: String,
    pub purpose: String,
    file_type: String,
    created_at: i64,
    /// `None` while a two-step upload waits for its `PUT`.
    pub content: Option<Bytes>,
    pub content_sha256: Option<String>,
    /// Non-blank lines of `content`, counted once because listings report it every time.
    line_count: u64,
    /// The `checksum` the client declared when it started a two-step upload.
    pub declared_checksum: Option<String>,
    /// Whether the file came from the first step of a two-step upload, which gives it a
    /// presigned URL that takes its bytes.
    pub has_upload_url: bool,
}

/// The file object, with both the capitalised keys of Together's spec (`Processed`, `FileType`,
/// `LineCount`) and the `processing_status` of the current Python SDK.
#[derive(Serialize)]
pub(super) struct FileResponse<'a> {
    id: &'a str,
    object: &'static str,
    created_at: i64,
    filename: &'a str,
    bytes: u64,
    purpose: &'a str,
    #[serde(rename = "Processed")]
    processed: bool,
    #[serde(rename = "FileType")]
    file_type: &'a str,
    #[serde(rename = "LineCount")]
    line_count: u64,
    processing_status: &'static str,
}

impl StoredFile {
    pub fn response(&self) -> FileResponse<'_> {
        let content = self.content.as_deref();
        FileResponse {
            id: &self.id,
            object: "file",
            created_at: self.created_at,
            filename: &self.filename,
            bytes: content.map_or(0, |bytes| bytes.len() as u64),
            purpose: &self.purpose,
            processed: content.is_some(),
            file_type: &self.file_type,
            line_count: self.line_count,
            processing_status: if content.is_some() {
                "COMPLETED"
            } else {
                "PENDING"
            },
        }
    }

    pub fn set_content(&mut self, content: Bytes) {
        self.content_sha256 = Some(sha256_hex(&content));
        self.line_count = count_lines(&content);
        self.content = Some(content);
    }
}

#[derive(Default)]
pub(super) struct FileStore {
    pub files: HashMap<String, StoredFile>,
    next_seq: u64,
}

impl FileStore {
    pub fn insert(
        &mut self,
        filename: String,
        purpose: String,
        file_type: String,
        content: Option<Bytes>,
        declared_checksum: Option<String>,
    ) -> &StoredFile {
        let id = format!("file-{}", uuid_v4());
        let mut file = StoredFile {
            id: id.clone(),
            seq: self.next_seq,
            filename,
            purpose,
            file_type,
            created_at: Utc::now().timestamp(),
            content: None,
            content_sha256: None,
            line_count: 0,
            has_upload_url: content.is_none(),
            declared_checksum,
        };
        if let Some(content) = content {
            file.set_content(content);
        }
        self.next_seq += 1;
        self.files.entry(id).or_insert(file)
    }

    /// Stores a file that a batch wrote and returns its id.
    pub fn add_generated(&mut self, filename: String, content: Bytes) -> String {
        let file = self.insert(
            filename,
            GENERATED_PURPOSE.to_owned(),
            "jsonl".to_owned(),
            Some(content),
            None,
        );
        file.id.clone()
    }

    pub fn get(&self, id: &str) -> Option<&StoredFile> {
        self.files.get(id)
    }

    /// Finds a client-uploaded file whose content has this SHA-256. Batch output is left out
    /// because no client uploaded it.
    pub fn find_uploaded(&self, checksum: &str) -> Option<&StoredFile> {
        self.files.values().find(|file| {
            file.purpose != GENERATED_PURPOSE && file.content_sha256.as_deref() == Some(checksum)
        })
    }
}

pub(super) fn not_found(file_id: &str) -> ApiError {
    ApiError::not_found(format!(
        "file {file_id} not found; GET /v1/files lists the existing files"
    ))
}

/// `GET /v1/files`, oldest first.
pub(super) async fn list_files(State(shared): State<Arc<Shared>>) -> Response {
    let store = shared.current_store();
    let mut files: Vec<&StoredFile> = store.files.files.values().collect();
    files.sort_by_key(|file| file.seq);
    let data: Vec<FileResponse<'_>> = files.iter().map(|file| file.response()).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/files/{file_id}`.
pub(super) async fn get_file(
    State(shared): State<Arc<Shared>>,
    Path(file_id): Path<String>,
) -> Result<Response, ApiError> {
    let store = shared.current_store();
    let file = store
        .files
        .get(&file_id)
        .ok_or_else(|| not_found(&file_id))?;
    Ok(Json(file.response()).into_response())
}

/// `GET /v1/files/{file_id}/content`: the raw bytes.
pub(super) async fn get_content(
    State(shared): State<Arc<Shared>>,
    Path(file_id): Path<String>,
) -> Result<Response, ApiError> {
    let store = shared.current_store();
    let file = store
        .files
        .get(&file_id)
        .ok_or_else(|| not_found(&file_id))?;
    let Some(content) = file.content.clone() else {
        return Err(ApiError::bad_request(format!(
            "file {file_id} has no content yet; PUT its bytes to the upload URL first"
        )));
    };
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    )];
    Ok((content_type, content).into_response())
}

/// `DELETE /v1/files/{file_id}`.
pub(super) async fn delete_file(
    State(shared): State<Arc<Shared>>,
    Path(file_id): Path<String>,
) -> Result<Response, ApiError> {
    let mut store = shared.current_store();
    store
        .files
        .files
        .remove(&file_id)
        .ok_or_else(|| not_found(&file_id))?;
    shared.stats.update(|stats| stats.files_deleted += 1);
    Ok(Json(json!({"id": file_id, "object": "file", "deleted": true})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_lines_skips_blank_lines() {
        assert_eq!(count_lines(b""), 0);
        assert_eq!(count_lines(b"{}\n{}\n"), 2);
        assert_eq!(count_lines(b"{}\r\n\r\n  \n{}"), 2);
    }
}
