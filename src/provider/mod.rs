//! The Together HTTP client: files, batches and real-time calls, with every failure classified
//! once as rate-limited, retryable or fatal. That classification alone decides retries.

pub mod types;
pub mod wait;

use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, HeaderMap, LOCATION};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::ProviderConfig;
pub use types::{BatchJob, BatchStatus, FileObject, ResultLine};

/// The retry class of a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 429: wait as long as the server requests, and slow the whole endpoint.
    RateLimited,
    /// 429 `insufficient_quota`: the account is out of credit. Retrying cannot help until an
    /// operator acts, so the endpoint pauses for a long time.
    OutOfCredit,
    /// 5xx, 408, timeouts, dropped connections: back off and retry.
    Retryable,
    /// Any other 4xx: retrying cannot help.
    Fatal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{action} failed with HTTP {status}: {message}")]
    Status {
        action: &'static str,
        status: u16,
        message: String,
        class: Failure,
        /// The wait the response asked for, if any.
        wait: Option<Duration>,
    },
    #[error("{action} failed: {source}")]
    Transport {
        action: &'static str,
        source: reqwest::Error,
    },
    #[error("{action} returned an unexpected response: {detail}")]
    Protocol {
        action: &'static str,
        detail: String,
    },
}

impl ProviderError {
    pub fn class(&self) -> Failure {
        match self {
            ProviderError::Status { class, .. } => *class,
            ProviderError::Transport { .. } | ProviderError::Protocol { .. } => Failure::Retryable,
        }
    }

    pub fn server_wait(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { wait, .. } => *wait,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ProviderError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A successful real-time response.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// The client. Cheap to clone.
#[derive(Clone)]
pub struct Provider {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    max_wait: Duration,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// Classifies an HTTP error status, honouring `x-should-retry` when the server sends it.
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Failure {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Failure::RateLimited;
    }
    match headers.get("x-should-retry").and_then(|v| v.to_str().ok()) {
        Some("true") => return Failure::Retryable,
        Some("false") => return Failure::Fatal,
        _ => {}
    }
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        Failure::Retryable
    } else {
        Failure::Fatal
    }
}

/// Returns true when an error body reports that the account is out of credit.
fn is_out_of_credit(body: &str) -> bool {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return false;
    };
    let error = &value["error"];
    [&error["type"], &error["code"], &value["error_type"]]
        .iter()
        .any(|v| v.as_str() == Some("insufficient_quota"))
}

/// Extracts the message of either Together error shape, or the start of a non-JSON body.
fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        let error = v.get("error")?;
        error
            .get("message")
            .and_then(Value::as_str)
            .or_else(|| error.as_str())
            .map(str::to_string)
    });
    match message {
        Some(m) => m,
        None if body.trim().is_empty() => "empty response body".to_string(),
        None => body.chars().take(500).collect(),
    }
}

impl Provider {
    pub fn new(config: &ProviderConfig, max_wait: Duration) -> Result<Provider, ProviderError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.request_timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("batchd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ProviderError::Transport {
                action: "building the HTTP client",
                source,
            })?;
        Ok(Provider {
            http,
            base_url: config.base_url.clone(),
            api_key: config.api_key.expose().map(str::to_string),
            max_wait,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self
            .http
            .request(method, format!("{}{}", self.base_url, path));
        match &self.api_key {
            Some(key) => builder.header(AUTHORIZATION, format!("Bearer {key}")),
            None => builder,
        }
    }

    async fn send(
        &self,
        action: &'static str,
        builder: RequestBuilder,
    ) -> Result<Response, ProviderError> {
        let sent = builder.send().await;
        // Each completed call is progress for the watchdog, so a stage that makes many calls in
        // one pass counts as stuck only when a single call hangs past the request timeout.
        crate::watchdog::progress();
        sent.map_err(|source| ProviderError::Transport { action, source })
    }

    /// Turns a non-success response into a classified error.
    async fn failure(&self, action: &'static str, response: Response) -> ProviderError {
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        let class = match classify(status, &headers) {
            Failure::RateLimited if is_out_of_credit(&body) => Failure::OutOfCredit,
            class => class,
        };
        ProviderError::Status {
            action,
            status: status.as_u16(),
            message: error_message(&body),
            class,
            wait: wait::server_wait(&headers, SystemTime::now(), self.max_wait),
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        action: &'static str,
        response: Response,
    ) -> Result<T, ProviderError> {
        if !response.status().is_success() {
            return Err(self.failure(action, response).await);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ProviderError::Transport { action, source })?;
        serde_json::from_slice(&bytes).map_err(|e| ProviderError::Protocol {
            action,
            detail: format!(
                "{e}; body starts with {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
        })
    }

    /// Uploads a batch input file the way the official SDK does: a multipart form without the
    /// bytes, which returns a 302 to a presigned URL, a PUT of the bytes there, then preprocess.
    /// A 409 means the same content is stored already; its file id is reused.
    pub async fn upload_batch_file(
        &self,
        name: &str,
        content: Vec<u8>,
    ) -> Result<FileObject, ProviderError> {
        const ACTION: &str = "uploading a batch input file";
        let checksum = hex::encode(Sha256::digest(&content));
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch-api")
            .text("file_name", name.to_string())
            .text("file_type", "jsonl")
            .text("checksum", checksum);
        let response = self
            .send(ACTION, self.request(Method::POST, "/files").multipart(form))
            .await?;
        let status = response.status();
        if status == StatusCode::CONFLICT {
            let body: Value = self.json_any(ACTION, response).await?;
            let id = body["file_id"]
                .as_str()
                .ok_or_else(|| ProviderError::Protocol {
                    action: ACTION,
                    detail: format!("409 without a file_id: {body}"),
                })?;
            return self.file(id).await;
        }
        if status != StatusCode::FOUND {
            if status.is_success() {
                return self.json(ACTION, response).await;
            }
            return Err(self.failure(ACTION, response).await);
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (Some(location), Some(file_id)) =
            (header(LOCATION.as_str()), header("x-together-file-id"))
        else {
            return Err(ProviderError::Protocol {
                action: ACTION,
                detail: "302 without Location or X-Together-File-Id".to_string(),
            });
        };
        // The presigned URL carries its own signature, so no Authorization header goes with it.
        let put = self.http.put(&location).body(content);
        let uploaded = self.send(ACTION, put).await?;
        if !uploaded.status().is_success() {
            return Err(self.failure(ACTION, uploaded).await);
        }
        let preprocess = self.request(Method::POST, &format!("/files/{file_id}/preprocess"));
        let response = self.send(ACTION, preprocess).await?;
        self.json(ACTION, response).await
    }

    async fn json_any(
        &self,
        action: &'static str,
        response: Response,
    ) -> Result<Value, ProviderError> {
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ProviderError::Transport { action, source })?;
        serde_json::from_slice(&bytes).map_err(|e| ProviderError::Protocol {
            action,
            detail: e.to_string(),
        })
    }

    pub async fn file(&self, file_id: &str) -> Result<FileObject, ProviderError> {
        const ACTION: &str = "reading a file's metadata";
        let response = self
            .send(
                ACTION,
                self.request(Method::GET, &format!("/files/{file_id}")),
            )
            .await?;
        self.json(ACTION, response).await
    }

    pub async fn list_files(&self) -> Result<Vec<FileObject>, ProviderError> {
        const ACTION: &str = "listing files";
        let response = self
            .send(ACTION, self.request(Method::GET, "/files"))
            .await?;
        let list: types::FileList = self.json(ACTION, response).await?;
        Ok(list.data)
    }

    /// Downloads a file's content.
    // NOTE: the whole file is held in memory; batches are capped at `batch.max_bytes` of input,
    // and output files are of a similar size.
    pub async fn file_content(&self, file_id: &str) -> Result<Vec<u8>, ProviderError> {
        const ACTION: &str = "downloading a file";
        let request = self
            .request(Method::GET, &format!("/files/{file_id}/content"))
            .header("accept", "application/binary");
        let response = self.send(ACTION, request).await?;
        if !response.status().is_success() {
            return Err(self.failure(ACTION, response).await);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ProviderError::Transport {
                action: ACTION,
                source,
            })?;
        Ok(bytes.to_vec())
    }

    pub async fn create_batch(
        &self,
        endpoint: &str,
        input_file_id: &str,
        model: &str,
    ) -> Result<BatchJob, ProviderError> {
        const ACTION: &str = "creating a batch job";
        let body = serde_json::json!({
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "model_id": model,
        });
        let response = self
            .send(ACTION, self.request(Method::POST, "/batches").json(&body))
            .await?;
        let created: types::CreatedBatch = self.json(ACTION, response).await?;
        match created.job.filter(|job| !job.id.is_empty()) {
            Some(job) => Ok(job),
            None => Err(ProviderError::Protocol {
                action: ACTION,
                detail: format!(
                    "no job in the response (warning: {})",
                    created.warning.unwrap_or_else(|| "none".to_string())
                ),
            }),
        }
    }

    pub async fn batch(&self, batch_id: &str) -> Result<BatchJob, ProviderError> {
        const ACTION: &str = "reading a batch job";
        let response = self
            .send(
                ACTION,
                self.request(Method::GET, &format!("/batches/{batch_id}")),
            )
            .await?;
        self.json(ACTION, response).await
    }

    /// Asks the provider to cancel a job; finished lines stay in its output file.
    pub async fn cancel_batch(&self, batch_id: &str) -> Result<BatchJob, ProviderError> {
        const ACTION: &str = "cancelling a batch job";
        let request = self.request(Method::POST, &format!("/batches/{batch_id}/cancel"));
        let response = self.send(ACTION, request).await?;
        self.json(ACTION, response).await
    }

    pub async fn delete_file(&self, file_id: &str) -> Result<(), ProviderError> {
        const ACTION: &str = "deleting a file";
        let response = self
            .send(
                ACTION,
                self.request(Method::DELETE, &format!("/files/{file_id}")),
            )
            .await?;
        if !response.status().is_success() {
            return Err(self.failure(ACTION, response).await);
        }
        Ok(())
    }

    /// Lists the provider's model catalogue.
    pub async fn list_models(&self) -> Result<Vec<types::ModelInfo>, ProviderError> {
        const ACTION: &str = "listing models";
        let response = self
            .send(ACTION, self.request(Method::GET, "/models"))
            .await?;
        self.json(ACTION, response).await
    }

    pub async fn list_batches(&self) -> Result<Vec<BatchJob>, ProviderError> {
        const ACTION: &str = "listing batch jobs";
        let response = self
            .send(ACTION, self.request(Method::GET, "/batches"))
            .await?;
        self.json(ACTION, response).await
    }

    /// Sends one real-time request to `endpoint` (e.g. `/v1/chat/completions`).
    pub async fn call(&self, endpoint: &str, body: &Value) -> Result<Answer, ProviderError> {
        const ACTION: &str = "sending a real-time request";
        let path = endpoint.strip_prefix("/v1").unwrap_or(endpoint);
        let response = self
            .send(ACTION, self.request(Method::POST, path).json(body))
            .await?;
        let status = response.status().as_u16();
        let body: Value = self.json(ACTION, response).await?;
        Ok(Answer { status, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn classify_statuses() {
        let none = HeaderMap::new();
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &none),
            Failure::RateLimited
        );
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &none),
            Failure::Retryable
        );
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, &none),
            Failure::Retryable
        );
        assert_eq!(classify(StatusCode::BAD_REQUEST, &none), Failure::Fatal);
        assert_eq!(classify(StatusCode::NOT_FOUND, &none), Failure::Fatal);
    }

    #[test]
    fn should_retry_header_overrides() {
        let mut headers = HeaderMap::new();
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &headers),
            Failure::Fatal
        );
        headers.insert("x-should-retry", HeaderValue::from_static("true"));
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, &headers),
            Failure::Retryable
        );
    }

    #[test]
    fn out_of_credit_type_or_code() {
        assert!(is_out_of_credit(
            r#"{"error":{"message":"no credit","type":"insufficient_quota"}}"#
        ));
        assert!(is_out_of_credit(
            r#"{"error":{"message":"no credit","code":"insufficient_quota"}}"#
        ));
        assert!(!is_out_of_credit(
            r#"{"error":{"message":"slow down","type":"dynamic_request_limited"}}"#
        ));
    }

    #[test]
    fn error_message_reads_both_shapes() {
        assert_eq!(
            error_message(r#"{"error":{"message":"bad model","type":"x"}}"#),
            "bad model"
        );
        assert_eq!(
            error_message(r#"{"error":"file not found"}"#),
            "file not found"
        );
        assert_eq!(error_message("upstream broke"), "upstream broke");
    }
}
