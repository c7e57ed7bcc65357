//! Wire types of Together's files and batch APIs.
//!
//! Every field the client does not strictly need is optional, because the official SDK types
//! mark them optional and the service omits absent ones.

use serde::Deserialize;

/// A file object. Together spells some keys in capitals (`FileType`, `LineCount`).
#[derive(Debug, Clone, Deserialize)]
pub struct FileObject {
    pub id: String,
    #[serde(default)]
    pub filename: Option<String>,
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default, rename = "LineCount")]
    pub line_count: Option<u64>,
}

/// The list of files; older SDKs also expect `"object": "list"`.
#[derive(Debug, Clone, Deserialize)]
pub struct FileList {
    pub data: Vec<FileObject>,
}

/// Status of a batch job. Together sends UPPER_SNAKE names; they are matched case-insensitively
/// and anything unknown is kept verbatim and treated as still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchStatus {
    Validating,
    InProgress,
    Completed,
    Failed,
    Expired,
    Cancelled,
    Unknown(String),
}

impl BatchStatus {
    pub fn parse(text: &str) -> BatchStatus {
        match text.to_ascii_uppercase().as_str() {
            "VALIDATING" => BatchStatus::Validating,
            "IN_PROGRESS" => BatchStatus::InProgress,
            "COMPLETED" => BatchStatus::Completed,
            "FAILED" => BatchStatus::Failed,
            "EXPIRED" => BatchStatus::Expired,
            "CANCELLED" => BatchStatus::Cancelled,
            _ => BatchStatus::Unknown(text.to_string()),
        }
    }

    /// True for the statuses after which the job's files no longer change.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            BatchStatus::Completed
                | BatchStatus::Failed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }

    pub fn as_str(&self) -> &str {
        match self {
            BatchStatus::Validating => "VALIDATING",
            BatchStatus::InProgress => "IN_PROGRESS",
            BatchStatus::Completed => "COMPLETED",
            BatchStatus::Failed => "FAILED",
            BatchStatus::Expired => "EXPIRED",
            BatchStatus::Cancelled => "CANCELLED",
            BatchStatus::Unknown(text) => text,
        }
    }
}

impl<'de> Deserialize<'de> for BatchStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(BatchStatus::parse(&text))
    }
}

/// A batch job as `GET /v1/batches/{id}` returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchJob {
    pub id: String,
    pub status: BatchStatus,
    #[serde(default)]
    pub input_file_id: Option<String>,
    #[serde(default)]
    pub progress: Option<f64>,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub model_id: Option<String>,
}

/// `POST /v1/batches` wraps the job: `{"job": {...}, "warning": "..."}`.
#[derive(Debug, Clone, Deserialize)]
pub struct CreatedBatch {
    pub job: Option<BatchJob>,
    #[serde(default)]
    pub warning: Option<String>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// One line of a batch output or error file.
#[derive(Debug, Clone, Deserialize)]
pub struct ResultLine {
    pub custom_id: String,
    #[serde(default)]
    pub response: Option<LineResponse>,
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LineResponse {
    pub status_code: u16,
    /// The body exactly as the provider wrote it. It is stored as text, so it is not parsed.
    #[serde(default)]
    pub body: Option<Box<serde_json::value::RawValue>>,
}

impl LineResponse {
    /// Returns the body's JSON text, `null` when the line has none.
    pub fn body_text(&self) -> &str {
        self.body.as_deref().map_or("null", |body| body.get())
    }
}

impl ResultLine {
    /// Returns the provider's error text of an error line, with its code when present.
    pub fn error_message(&self) -> Option<String> {
        let error = self.error.as_ref().filter(|e| !e.is_null())?;
        let message = error
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .or_else(|| error.as_str().map(str::to_string))
            .unwrap_or_else(|| error.to_string());
        Some(match error.get("code").and_then(|c| c.as_str()) {
            Some(code) => format!("{code}: {message}"),
            None => message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_matches_any_case() {
        assert_eq!(BatchStatus::parse("completed"), BatchStatus::Completed);
        assert_eq!(BatchStatus::parse("In_Progress"), BatchStatus::InProgress);
        assert_eq!(
            BatchStatus::parse("QUEUED"),
            BatchStatus::Unknown("QUEUED".into())
        );
        assert!(!BatchStatus::parse("QUEUED").is_terminal());
    }

    #[test]
    fn error_line_message_includes_code() {
        let line: ResultLine = serde_json::from_str(
            r#"{"custom_id":"bd-1","error":{"message":"Invalid model specified","code":"invalid_model"}}"#,
        )
        .unwrap();
        assert_eq!(
            line.error_message().unwrap(),
            "invalid_model: Invalid model specified"
        );
    }
}
