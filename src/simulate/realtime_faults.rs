//! The faults of real-time requests: which one a request gets, how long it waits, and the
//! responses that stand for each fault. A request gets at most one fault, checked in this order:
//! a dropped connection, an overload (time window or model), an injected 429, a server error.
//! Only requests that passed the per-minute windows get here, so a window rejection, which
//! depends on timing, also changes which occurrence of a request key the next request is.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Shared;
use super::error::ApiError;
use super::faults::{FaultKind, RateLimitKind, RetryAfterStyle};
use super::request_log::DropConnection;

/// Message of the 503 that Together sends when it is overloaded.
const OVERLOADED_MESSAGE: &str = "The server is overloaded or not ready yet.";

/// The fault that one real-time request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RealtimeFault {
    Drop,
    Overloaded,
    RateLimited,
    ServerError(StatusCode),
}

/// The fault and the latency of one real-time request, decided before its response is built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RealtimePlan {
    pub fault: Option<RealtimeFault>,
    /// Injected latency, on top of the configured real-time delay.
    pub latency: Duration,
}

/// Decides the faults of a request to `path` with this raw `body` and `model`, and counts them
/// in the stats.
pub(super) fn plan(shared: &Shared, path: &str, body: &[u8], model: Option<&str>) -> RealtimePlan {
    let faults = &shared.config.faults;
    if !faults.applies_to(path) {
        return RealtimePlan::default();
    }

    let mut plan = RealtimePlan::default();
    let mut injected = Vec::new();
    let roll = faults.has_realtime_draws().then(|| {
        let mut key = Vec::with_capacity(path.len() + 1 + body.len());
        key.extend_from_slice(path.as_bytes());
        key.push(0);
        key.extend_from_slice(body);
        shared.dice.roll(&key)
    });

    if let Some(roll) = &roll {
        let millis = roll.between("latency", faults.latency_min_ms, faults.latency_max_ms);
        plan.latency = Duration::from_millis(millis);
        if millis > 0 {
            injected.push(FaultKind::Latency);
        }
    }

    let since_start = shared.started.elapsed().as_secs_f64();
    let in_window = faults
        .overload_windows
        .iter()
        .any(|window| window.contains(since_start));
    let overloaded_model =
        model.is_some_and(|model| faults.overloaded_models.iter().any(|m| m == model));

    let chance =
        |decision: &str, rate: f64| roll.as_ref().is_some_and(|r| r.chance(decision, rate));
    plan.fault = if chance("drop", faults.drop_rate) {
        injected.push(FaultKind::DroppedConnection);
        Some(RealtimeFault::Drop)
    } else if in_window {
        injected.push(FaultKind::OverloadWindow);
        Some(RealtimeFault::Overloaded)
    } else if overloaded_model {
        injected.push(FaultKind::OverloadedModel);
        Some(RealtimeFault::Overloaded)
    } else if roll
        .as_ref()
        .is_some_and(|r| r.occurrence() < u64::from(faults.rate_limit_first))
        || chance("rate_limit", faults.rate_limit_rate)
    {
        injected.push(FaultKind::RateLimit);
        Some(RealtimeFault::RateLimited)
    } else if chance("server_error", faults.server_error_rate) {
        injected.push(FaultKind::ServerError);
        let bad_gateway = roll
            .as_ref()
            .is_some_and(|r| r.bits("server_error_status", b"") % 2 == 1);
        Some(RealtimeFault::ServerError(if bad_gateway {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }))
    } else {
        None
    };

    for kind in injected {
        shared.stats.record_fault(kind);
    }
    plan
}

/// Builds the response that stands for `fault`.
pub(super) fn fault_response(
    shared: &Shared,
    fault: RealtimeFault,
    model: Option<&str>,
) -> Response {
    match fault {
        RealtimeFault::Drop => {
            let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
            response.extensions_mut().insert(DropConnection);
            response
        }
        RealtimeFault::Overloaded => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: OVERLOADED_MESSAGE.to_owned(),
            error_type: "service_unavailable",
            code: None,
        }
        .into_response(),
        RealtimeFault::RateLimited => {
            let faults = &shared.config.faults;
            let mut response = injected_rate_limit(faults.rate_limit_kind, model).into_response();
            add_retry_after(
                response.headers_mut(),
                faults.retry_after,
                faults.retry_after_secs,
            );
            response
        }
        RealtimeFault::ServerError(status) => {
            let message = if status == StatusCode::BAD_GATEWAY {
                "bad gateway: the upstream inference server did not answer; retry the request"
            } else {
                "internal server error while serving the request; retry the request"
            };
            ApiError {
                status,
                message: message.to_owned(),
                error_type: "server_error",
                code: None,
            }
            .into_response()
        }
    }
}

fn injected_rate_limit(kind: RateLimitKind, model: Option<&str>) -> ApiError {
    let model = model.unwrap_or("this model");
    let (message, error_type, code) = match kind {
        RateLimitKind::RequestLimited => (
            format!(
                "request rate limit exceeded for {model}: your dynamic request rate is lower \
                 than your current traffic; retry after the announced wait"
            ),
            "dynamic_request_limited",
            None,
        ),
        RateLimitKind::TokenLimited => (
            format!(
                "token rate limit exceeded for {model}: your dynamic token rate is lower than \
                 your current traffic; retry after the announced wait"
            ),
            "dynamic_token_limited",
            None,
        ),
        RateLimitKind::InsufficientQuota => (
            "insufficient quota: the account is out of credit; add credit to the account \
             before sending more requests"
                .to_owned(),
            "insufficient_quota",
            Some("insufficient_quota"),
        ),
    };
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message,
        error_type,
        code,
    }
}

/// Adds the headers that announce a wait of `secs` seconds in the given style.
pub(super) fn add_retry_after(headers: &mut HeaderMap, style: RetryAfterStyle, secs: f64) {
    let whole_secs = secs.ceil() as u64;
    match style {
        RetryAfterStyle::Seconds => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(whole_secs));
        }
        RetryAfterStyle::Absent => {}
        RetryAfterStyle::Millis => {
            let millis = (secs * 1000.0).round() as u64;
            headers.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(millis),
            );
        }
        RetryAfterStyle::HttpDate => {
            // An HTTP date has whole seconds, so the time is rounded up to keep the full wait.
            let target = SystemTime::now() + Duration::from_secs_f64(secs);
            let unix_secs = target
                .duration_since(UNIX_EPOCH)
                .expect("the clock is after 1970")
                .as_secs_f64()
                .ceil();
            let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(unix_secs as u64));
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&date).expect("an HTTP date is a valid header value"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_styles_set_their_headers() {
        let mut headers = HeaderMap::new();
        add_retry_after(&mut headers, RetryAfterStyle::Seconds, 1.2);
        assert_eq!(headers[header::RETRY_AFTER], "2");

        let mut headers = HeaderMap::new();
        add_retry_after(&mut headers, RetryAfterStyle::Millis, 1.2);
        assert_eq!(headers["retry-after-ms"], "1200");
        assert!(!headers.contains_key(header::RETRY_AFTER));

        let mut headers = HeaderMap::new();
        add_retry_after(&mut headers, RetryAfterStyle::Absent, 1.2);
        assert!(headers.is_empty());

        let mut headers = HeaderMap::new();
        add_retry_after(&mut headers, RetryAfterStyle::HttpDate, 1.0);
        let date = headers[header::RETRY_AFTER].to_str().unwrap();
        let at = httpdate::parse_http_date(date).unwrap();
        assert!(at > SystemTime::now(), "{date}");
    }
}
