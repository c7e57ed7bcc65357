//! Parsing and checking one input line.
//!
//! A line is a batch request in the format Together's and OpenAI's batch APIs accept:
//! `{"custom_id": "...", "body": {...}}`, optionally with `"method": "POST"` and `"url"`, plus
//! batchd's extensions `"urgent": true` and `"deadline": "<RFC 3339>"`. Only `body` reaches the
//! provider, so the extensions never leave batchd.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::config::SUPPORTED_ENDPOINTS;

/// A checked input line.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedLine {
    pub custom_id: String,
    pub endpoint: String,
    pub model: String,
    /// The request body as compact JSON.
    pub body: String,
    pub urgent: bool,
    pub deadline: Option<DateTime<Utc>>,
}

/// Parses one line (without its line ending). The error is the reason, ready to follow
/// `path:line: `.
pub fn parse_line(bytes: &[u8]) -> Result<ParsedLine, String> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err("line starts with a byte-order mark (U+FEFF): only the first line of a file may have one; remove it".into());
    }
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err(format!(
            "NUL byte at byte {}: the file may be binary or UTF-16; save it as UTF-8 text",
            at + 1
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "invalid UTF-8 at byte {}: save the file as UTF-8",
            e.valid_up_to() + 1
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(line) = value else {
        return Err(format!(
            "expected a JSON object like {{\"custom_id\": ..., \"body\": {{...}}}}, found {}",
            kind(&value)
        ));
    };
    if let Some(reason) = foreign_format(&line) {
        return Err(reason);
    }

    let custom_id = match line.get("custom_id") {
        None => return Err("missing \"custom_id\": every line needs a unique string id".into()),
        Some(Value::String(id)) if id.trim().is_empty() => {
            return Err("\"custom_id\" is empty: every line needs a unique string id".into());
        }
        Some(Value::String(id)) => id.clone(),
        Some(other) => {
            return Err(format!(
                "\"custom_id\" must be a string, found {}",
                kind(other)
            ));
        }
    };
    let body = match line.get("body") {
        None => {
            return Err(
                "missing \"body\": put the request (model, messages, ...) under \"body\"".into(),
            );
        }
        Some(Value::Object(body)) => body,
        Some(other) => {
            return Err(format!(
                "\"body\" must be a JSON object, found {}",
                kind(other)
            ));
        }
    };
    match line.get("method") {
        None => {}
        Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
        Some(other) => return Err(format!("\"method\" must be \"POST\", found {other}")),
    }
    let endpoint = endpoint(line.get("url"), body)?;
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        Some(Value::String(_)) => {
            return Err("\"body.model\" is empty: name the model to run".into());
        }
        Some(other) => {
            return Err(format!(
                "\"body.model\" must be a string, found {}",
                kind(other)
            ));
        }
        None => return Err("missing \"body.model\": name the model to run".into()),
    };
    check_body(&endpoint, body)?;
    let urgent = match line.get("urgent") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(format!("\"urgent\" must be true or false, found {other}")),
    };
    let deadline = match line.get("deadline") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| format!("\"deadline\" {s:?} is not an RFC 3339 time such as \"2026-01-31T18:00:00Z\""))?
                .with_timezone(&Utc),
        ),
        Some(other) => return Err(format!("\"deadline\" must be an RFC 3339 time string, found {other}")),
    };
    Ok(ParsedLine {
        custom_id,
        endpoint,
        model,
        // Written from the parsed map, which saves a copy of the whole body per line.
        body: serde_json::to_string(body)
            .map_err(|e| format!("failed to write \"body\" as JSON: {e}"))?,
        urgent,
        deadline,
    })
}

/// Names a JSON value's type for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Recognises lines written for another provider's batch API.
fn foreign_format(line: &Map<String, Value>) -> Option<String> {
    const EXPECTED: &str =
        "batchd expects {\"custom_id\": \"...\", \"body\": {...}} (Together/OpenAI batch format)";
    if line.contains_key("custom_id") && line.contains_key("body") {
        return None;
    }
    if line.contains_key("key") && line.contains_key("request") {
        return Some(format!(
            "this is a Gemini batch line ({{\"key\", \"request\"}}): {EXPECTED}"
        ));
    }
    if line.contains_key("custom_id") && line.contains_key("params") {
        return Some(format!(
            "this is an Anthropic batch line ({{\"custom_id\", \"params\"}}): {EXPECTED}"
        ));
    }
    if line.contains_key("messages") || line.contains_key("model") {
        return Some(format!(
            "this is a bare request body without an id: {EXPECTED}"
        ));
    }
    None
}

/// Takes the endpoint from `url`, or infers it from the body when `url` is absent.
fn endpoint(url: Option<&Value>, body: &Map<String, Value>) -> Result<String, String> {
    match url {
        Some(Value::String(url)) => {
            let path = url.trim_end_matches('/');
            if SUPPORTED_ENDPOINTS.contains(&path) {
                Ok(path.to_string())
            } else {
                Err(format!(
                    "\"url\" {url:?} is not an endpoint batchd serves: use one of {}",
                    SUPPORTED_ENDPOINTS.join(", ")
                ))
            }
        }
        Some(other) => Err(format!("\"url\" must be a string, found {}", kind(other))),
        None if body.contains_key("messages") => Ok("/v1/chat/completions".to_string()),
        None if body.contains_key("input") => Ok("/v1/embeddings".to_string()),
        None if body.contains_key("prompt") => Ok("/v1/completions".to_string()),
        None => Err(format!(
            "cannot tell the endpoint: add \"url\" (one of {}) or a body with \"messages\", \"input\" or \"prompt\"",
            SUPPORTED_ENDPOINTS.join(", ")
        )),
    }
}

/// Checks the fields each endpoint cannot do without.
fn check_body(endpoint: &str, body: &Map<String, Value>) -> Result<(), String> {
    match endpoint {
        "/v1/chat/completions" => match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => Ok(()),
            Some(Value::Array(_)) => {
                Err("\"body.messages\" is empty: a chat request needs at least one message".into())
            }
            Some(other) => Err(format!(
                "\"body.messages\" must be an array, found {}",
                kind(other)
            )),
            None => {
                Err("missing \"body.messages\": a chat request needs a list of messages".into())
            }
        },
        "/v1/embeddings" => match body.get("input") {
            Some(Value::String(_)) => Ok(()),
            Some(Value::Array(a)) if !a.is_empty() => Ok(()),
            Some(Value::Array(_)) => {
                Err("\"body.input\" is empty: give a string or an array of strings".into())
            }
            Some(other) => Err(format!(
                "\"body.input\" must be a string or an array, found {}",
                kind(other)
            )),
            None => {
                Err("missing \"body.input\": an embeddings request needs the text to embed".into())
            }
        },
        "/v1/completions" | "/v1/images/generations" => match body.get("prompt") {
            Some(Value::String(_)) => Ok(()),
            Some(other) => Err(format!(
                "\"body.prompt\" must be a string, found {}",
                kind(other)
            )),
            None => Err("missing \"body.prompt\"".into()),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(line: &str) -> String {
        parse_line(line.as_bytes()).unwrap_err()
    }

    #[test]
    fn full_batch_line_is_parsed() {
        let line = r#"{"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}"#;
        let parsed = parse_line(line.as_bytes()).unwrap();
        assert_eq!(parsed.custom_id, "q-1");
        assert_eq!(parsed.endpoint, "/v1/chat/completions");
        assert_eq!(parsed.model, "m");
        assert!(!parsed.urgent);
        assert_eq!(parsed.deadline, None);
    }

    #[test]
    fn short_line_infers_endpoint() {
        let chat = parse_line(br#"{"custom_id": "a", "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}"#).unwrap();
        assert_eq!(chat.endpoint, "/v1/chat/completions");
        let embed =
            parse_line(br#"{"custom_id": "b", "body": {"model": "e", "input": "text"}}"#).unwrap();
        assert_eq!(embed.endpoint, "/v1/embeddings");
    }

    #[test]
    fn extensions_are_read_and_kept_out_of_body() {
        let parsed = parse_line(br#"{"custom_id": "u", "urgent": true, "deadline": "2030-01-01T00:00:00Z", "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}"#).unwrap();
        assert!(parsed.urgent);
        assert_eq!(
            parsed.deadline.unwrap().to_rfc3339(),
            "2030-01-01T00:00:00+00:00"
        );
        assert!(!parsed.body.contains("urgent"));
        assert!(!parsed.body.contains("deadline"));
    }

    #[test]
    fn invalid_json_is_reported() {
        assert!(reason("{not json").starts_with("not valid JSON"));
    }

    #[test]
    fn non_object_is_reported() {
        assert!(reason("[1, 2]").contains("found an array"));
    }

    #[test]
    fn missing_custom_id_is_reported() {
        assert!(
            reason(r#"{"body": {"model": "m", "input": "x"}, "url": "/v1/embeddings"}"#)
                .contains("missing \"custom_id\"")
        );
    }

    #[test]
    fn non_string_custom_id_is_reported() {
        assert!(
            reason(r#"{"custom_id": 7, "body": {"model": "m", "input": "x"}}"#)
                .contains("must be a string")
        );
    }

    #[test]
    fn missing_body_is_reported() {
        assert!(reason(r#"{"custom_id": "a"}"#).contains("missing \"body\""));
    }

    #[test]
    fn unknown_url_names_supported_ones() {
        let r = reason(
            r#"{"custom_id": "a", "url": "/v1/responses", "body": {"model": "m", "input": "x"}}"#,
        );
        assert!(r.contains("/v1/responses"), "{r}");
        assert!(r.contains("/v1/chat/completions"), "{r}");
    }

    #[test]
    fn missing_model_is_reported() {
        assert!(
            reason(
                r#"{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "x"}]}}"#
            )
            .contains("body.model")
        );
    }

    #[test]
    fn empty_messages_is_reported() {
        assert!(
            reason(r#"{"custom_id": "a", "body": {"model": "m", "messages": []}}"#)
                .contains("empty")
        );
    }

    #[test]
    fn bad_urgent_and_deadline_are_reported() {
        assert!(
            reason(r#"{"custom_id": "a", "urgent": "yes", "body": {"model": "m", "input": "x"}}"#)
                .contains("\"urgent\"")
        );
        assert!(reason(r#"{"custom_id": "a", "deadline": "tomorrow", "body": {"model": "m", "input": "x"}}"#).contains("RFC 3339"));
    }

    #[test]
    fn gemini_line_names_expected_format() {
        let r = reason(r#"{"key": "k1", "request": {"contents": []}}"#);
        assert!(r.contains("Gemini"), "{r}");
        assert!(r.contains("custom_id"), "{r}");
    }

    #[test]
    fn byte_order_mark_mid_file_is_reported() {
        assert!(
            parse_line(b"\xEF\xBB\xBF{\"custom_id\": \"a\"}")
                .unwrap_err()
                .contains("byte-order mark")
        );
    }

    #[test]
    fn nul_byte_is_reported() {
        assert!(
            parse_line(b"{\"custom_id\": \"a\0\"}")
                .unwrap_err()
                .contains("NUL byte at byte 17")
        );
    }

    #[test]
    fn invalid_utf8_is_reported() {
        assert!(
            parse_line(b"{\"custom_id\": \"\xff\"}")
                .unwrap_err()
                .contains("UTF-8")
        );
    }
}
