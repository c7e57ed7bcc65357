//! The log of API requests that `GET /_sim/requests` returns, in arrival order, so that a test
//! can see when a client's retries arrived. The same middleware also carries out two faults that
//! concern every response: it severs the connection of a response marked [`DropConnection`], and
//! adds `x-should-retry` to error responses when [`super::Faults::should_retry`] is set.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Shared;
use super::connection::Connection;
use super::files::MAX_REQUEST_BYTES;

/// One API request as `GET /_sim/requests` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Milliseconds from the simulator's start to the request's arrival.
    pub at_ms: u64,
    pub method: String,
    pub path: String,
    /// HTTP status of the response; 0 while the request is in flight and for a connection the
    /// simulator closed without a response.
    pub status: u16,
    /// The `model` of a JSON request body, if it has one.
    pub model: Option<String>,
}

/// Marks a response that is never sent: the middleware closes its connection instead.
#[derive(Debug, Clone, Copy)]
pub(super) struct DropConnection;

/// The records, in arrival order.
#[derive(Debug, Default)]
pub(super) struct RequestLog {
    records: Mutex<Vec<RequestRecord>>,
}

impl RequestLog {
    /// Appends a record and returns its index.
    fn push(&self, record: RequestRecord) -> usize {
        let mut records = self.records.lock().expect("request log lock poisoned");
        records.push(record);
        records.len() - 1
    }

    fn set_status(&self, index: usize, status: u16) {
        let mut records = self.records.lock().expect("request log lock poisoned");
        records[index].status = status;
    }

    pub fn snapshot(&self) -> Vec<RequestRecord> {
        self.records
            .lock()
            .expect("request log lock poisoned")
            .clone()
    }
}

/// Returns whether `path` belongs to the emulated API rather than to the `/_sim` routes.
fn is_api_path(path: &str) -> bool {
    path.starts_with("/v1/") || path.starts_with("/v2/")
}

/// Reads the body of a JSON request to take its `model`, and rebuilds the request.
async fn take_model(request: Request) -> (Request, Option<String>) {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !is_json {
        return (request, None);
    }
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(bytes) => {
            let model = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|value| value.get("model")?.as_str().map(str::to_owned));
            (Request::from_parts(parts, Body::from(bytes)), model)
        }
        // The handler gets an empty body and rejects it, as it would have rejected the original.
        Err(_) => (Request::from_parts(parts, Body::empty()), None),
    }
}

/// Logs every request, records API requests, and applies the response-wide faults.
pub(super) async fn track_request(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let connection = request
        .extensions()
        .get::<ConnectInfo<Connection>>()
        .map(|info| info.0.clone());

    let (request, index) = if is_api_path(&path) {
        let (request, model) = take_model(request).await;
        let index = shared.request_log.push(RequestRecord {
            at_ms: shared.started.elapsed().as_millis() as u64,
            method: method.to_string(),
            path: path.clone(),
            status: 0,
            model,
        });
        (request, Some(index))
    } else {
        (request, None)
    };

    let mut response = next.run(request).await;

    let dropped = response.extensions().get::<DropConnection>().is_some();
    if dropped {
        match &connection {
            Some(connection) => connection.sever(),
            None => tracing::warn!(path, "cannot drop a connection without connect info"),
        }
    }
    let status = response.status();
    if let Some(index) = index {
        shared
            .request_log
            .set_status(index, if dropped { 0 } else { status.as_u16() });
    }
    if let Some(should_retry) = shared.config.faults.should_retry
        && (status.is_client_error() || status.is_server_error())
    {
        response.headers_mut().insert(
            HeaderName::from_static("x-should-retry"),
            HeaderValue::from_static(if should_retry { "true" } else { "false" }),
        );
    }
    tracing::debug!(%method, path, status = status.as_u16(), dropped, "simulator request");
    response
}

/// `GET /_sim/requests`.
pub(super) async fn get_requests(State(shared): State<Arc<Shared>>) -> Json<Vec<RequestRecord>> {
    Json(shared.request_log.snapshot())
}
