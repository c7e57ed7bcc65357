//! Errors: [`SimulateError`] for starting and running the simulator, and the two JSON error
//! bodies that Together's API sends, which the HTTP handlers return. Inference, model and file
//! routes send `{"error": {"message", "type", "param", "code"}}`; batch routes send the flat
//! `{"error": "<text>"}`.

use std::net::SocketAddr;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Failures of [`super::Simulator::bind`] and [`super::Simulator::run`].
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(
        "invalid simulator address {addr}: only loopback addresses (127.0.0.0/8 or ::1) are \
         allowed; listen on 127.0.0.1 instead"
    )]
    NotLoopback { addr: SocketAddr },

    #[error("failed to bind the simulator to {addr}: {source}; choose another port or use port 0")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },

    #[error("failed to read the simulator's bound address: {0}")]
    LocalAddr(std::io::Error),

    #[error("the simulator's HTTP server failed: {0}")]
    Serve(std::io::Error),

    #[error(transparent)]
    InvalidFaults(#[from] super::faults::FaultsError),

    #[error(transparent)]
    InvalidLatency(#[from] super::latency::LatencyError),
}

/// An error in the inference shape, used by every `/v1` route except the batch routes.
#[derive(Debug)]
pub(super) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub error_type: &'static str,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            error_type: "invalid_request_error",
            code: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            error_type: "invalid_request_error",
            code: Some("not_found"),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or empty API key: send the header `Authorization: Bearer <key>`"
                .to_owned(),
            error_type: "invalid_request_error",
            code: Some("invalid_api_key"),
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::debug!(
            status = self.status.as_u16(),
            error = self.message,
            "request failed"
        );
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": null,
                "code": self.code,
            }
        });
        (self.status, Json(body)).into_response()
    }
}

/// An error in the batch shape `{"error": "<text>"}`.
#[derive(Debug)]
pub(super) struct BatchError {
    pub status: StatusCode,
    pub message: String,
}

impl BatchError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
}

impl IntoResponse for BatchError {
    fn into_response(self) -> Response {
        tracing::debug!(
            status = self.status.as_u16(),
            error = self.message,
            "request failed"
        );
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}
