//! The real-time endpoints: chat completions, text completions, embeddings and image generation.
//!
//! Each request first passes its endpoint's rate limiter and is counted in the stats. A rejected
//! request gets a 429 that announces the wait in the style of
//! [`super::Faults::retry_after`]. Every response carries `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset`
//! (seconds), plus `x-tokenlimit-limit` and `x-tokenlimit-remaining` when a token limit is set.
//! An accepted request may then get an injected fault ([`super::realtime_faults`]). It waits the
//! configured real-time delay, a latency drawn from the configured distribution, and any injected
//! latency before its response is built.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::Shared;
use super::answers::{self, RequestError};
use super::error::ApiError;
use super::limits::{Admission, Endpoint, Rejection};
use super::realtime_faults::{self, RealtimeFault, RealtimePlan, add_retry_after};

/// `POST /v1/chat/completions`.
pub(super) async fn chat_completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    serve(&shared, Endpoint::Chat, &body, |request| {
        reject_streaming(request)?;
        answers::chat_completion(request).map_err(request_error)
    })
    .await
}

/// `POST /v1/completions`.
pub(super) async fn completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    serve(&shared, Endpoint::Completions, &body, |request| {
        reject_streaming(request)?;
        answers::text_completion(request).map_err(request_error)
    })
    .await
}

/// `POST /v1/embeddings`.
pub(super) async fn embeddings(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    serve(&shared, Endpoint::Embeddings, &body, |request| {
        let (response, inputs) = answers::embeddings(request).map_err(request_error)?;
        shared.stats.update(|stats| {
            stats.embedding_max_inputs = stats.embedding_max_inputs.max(inputs as u64);
        });
        Ok(response)
    })
    .await
}

/// `POST /v1/images/generations`.
pub(super) async fn image_generations(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    serve(&shared, Endpoint::Images, &body, |request| {
        answers::image_generation(request).map_err(request_error)
    })
    .await
}

/// Applies the rate limits, the faults, the stats and the delay, then responds with the body
/// that `build_body` returns.
async fn serve(
    shared: &Shared,
    endpoint: Endpoint,
    body: &[u8],
    build_body: impl FnOnce(&Value) -> Result<Value, ApiError>,
) -> Response {
    let request = parse_body(body);
    let model = request
        .as_ref()
        .ok()
        .and_then(|request| request.get("model")?.as_str().map(str::to_owned));
    let tokens = request.as_ref().map_or(0, estimate_tokens);

    let admission = shared.limiters.admit(endpoint, tokens);
    let plan = if admission.accepted {
        realtime_faults::plan(shared, endpoint.path(), body, model.as_deref())
    } else {
        RealtimePlan::default()
    };
    let injected_429 = plan.fault == Some(RealtimeFault::RateLimited);
    shared.stats.update(|stats| {
        let path = endpoint.path().to_owned();
        *stats.realtime_requests.entry(path.clone()).or_default() += 1;
        if admission.accepted {
            let max = stats.realtime_max_per_minute.entry(path).or_default();
            *max = (*max).max(admission.in_window as u64);
        }
        if !admission.accepted || injected_429 {
            stats.rate_limited += 1;
        }
    });

    let mut delay = plan.latency;
    if admission.accepted {
        delay += shared.config.realtime_delay;
        if let Some(latency) = &shared.latency {
            delay += latency.next();
        }
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let mut response = match (admission.accepted, plan.fault) {
        (false, _) => rate_limited(shared, endpoint, &admission),
        (true, Some(fault)) => realtime_faults::fault_response(shared, fault, model.as_deref()),
        (true, None) => match request.and_then(|request| build_body(&request)) {
            Ok(value) => Json(value).into_response(),
            Err(error) => error.into_response(),
        },
    };
    add_rate_limit_headers(response.headers_mut(), &admission);
    response
}

/// Estimates the tokens of a request as the number of whitespace-separated words in its string
/// values, leaving out `model`.
fn estimate_tokens(request: &Value) -> u64 {
    fn words(value: &Value) -> u64 {
        match value {
            Value::String(text) => text.split_whitespace().count() as u64,
            Value::Array(items) => items.iter().map(words).sum(),
            Value::Object(fields) => fields
                .iter()
                .filter(|(name, _)| name.as_str() != "model")
                .map(|(_, value)| words(value))
                .sum(),
            _ => 0,
        }
    }
    words(request)
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(error) => Err(ApiError::bad_request(format!("invalid JSON body: {error}"))),
    }
}

fn reject_streaming(request: &Value) -> Result<(), ApiError> {
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::bad_request(
            "the simulator does not support `stream: true`; omit `stream` or set it to false",
        ));
    }
    Ok(())
}

fn request_error(error: RequestError) -> ApiError {
    let api_error = ApiError::bad_request(error.message());
    match error {
        RequestError::UnknownModel(_) => ApiError {
            status: StatusCode::NOT_FOUND,
            ..api_error
        }
        .with_code("model_not_available"),
        RequestError::WrongModelKind { .. } => api_error.with_code("invalid_model"),
        RequestError::Invalid(_) => api_error,
    }
}

fn rate_limited(shared: &Shared, endpoint: Endpoint, admission: &Admission) -> Response {
    let retry_after = admission.retry_after_secs();
    let error = match (admission.rejection, admission.tokens) {
        (Some(Rejection::Tokens), Some(tokens)) => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "token rate limit exceeded: {} accepts about {} tokens per minute; retry after \
                 {retry_after} s",
                endpoint.path(),
                tokens.limit
            ),
            error_type: "dynamic_token_limited",
            code: None,
        },
        _ => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "rate limit exceeded: {} accepts {} requests per minute; retry after {retry_after} s",
                endpoint.path(),
                admission.limit
            ),
            error_type: "rate_limit_exceeded",
            code: Some("rate_limit_exceeded"),
        },
    };
    let mut response = error.into_response();
    add_retry_after(
        response.headers_mut(),
        shared.config.faults.retry_after,
        retry_after as f64,
    );
    response
}

fn add_rate_limit_headers(headers: &mut HeaderMap, admission: &Admission) {
    let mut values = vec![
        ("x-ratelimit-limit", u64::from(admission.limit)),
        ("x-ratelimit-remaining", u64::from(admission.remaining)),
        ("x-ratelimit-reset", admission.reset_secs),
    ];
    if let Some(tokens) = admission.tokens {
        values.push(("x-tokenlimit-limit", tokens.limit));
        values.push(("x-tokenlimit-remaining", tokens.remaining));
    }
    for (name, value) in values {
        headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
    }
}
