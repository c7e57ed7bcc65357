//! Parsing and checking one input line.
//!
//! A line is a batch request in the format Together's and OpenAI's batch APIs accept:
//! `{"custom_id": "...", "body": {...}}`, optionally with `"method": "POST"` and `"url"`, plus
//! batchd's extensions `"urgent": true` and `"deadline": "<RFC 3339>"`. Only `body` reaches the
//! provider, so the extensions never leave batchd.

use chrono::{DateTime, Utc};
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use serde_json::error::Category;
use serde_json::value::RawValue;

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
    if !text.trim_start().starts_with('{') {
        // Rare, so parsed in full only to name the kind of value the line has.
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        return Err(format!(
            "expected a JSON object like {{\"custom_id\": ..., \"body\": {{...}}}}, found {}",
            kind(&value)
        ));
    }
    // The fields are borrowed from the line as raw JSON and the rest is skipped, so a line
    // costs no tree of maps and strings.
    let line: RawLine = serde_json::from_str(text).map_err(invalid)?;
    if let Some(reason) = foreign_format(&line) {
        return Err(reason);
    }

    let custom_id = match line.custom_id {
        None => return Err("missing \"custom_id\": every line needs a unique string id".into()),
        Some(raw) => match string(raw) {
            Some(id) if id.trim().is_empty() => {
                return Err("\"custom_id\" is empty: every line needs a unique string id".into());
            }
            Some(id) => id,
            None => {
                return Err(format!(
                    "\"custom_id\" must be a string, found {}",
                    raw_kind(raw)
                ));
            }
        },
    };
    let body_raw = match line.body {
        None => {
            return Err(
                "missing \"body\": put the request (model, messages, ...) under \"body\"".into(),
            );
        }
        Some(raw) if raw_kind(raw) == "an object" => raw,
        Some(other) => {
            return Err(format!(
                "\"body\" must be a JSON object, found {}",
                raw_kind(other)
            ));
        }
    };
    let body: RawBody = serde_json::from_str(body_raw.get()).map_err(invalid)?;
    if let Some(method) = line.method
        && !string(method).is_some_and(|m| m.eq_ignore_ascii_case("POST"))
    {
        return Err(format!("\"method\" must be \"POST\", found {method}"));
    }
    let endpoint = endpoint(line.url, &body)?;
    let model = match body.model.map(|raw| (raw, string(raw))) {
        Some((_, Some(m))) if !m.trim().is_empty() => m,
        Some((_, Some(_))) => {
            return Err("\"body.model\" is empty: name the model to run".into());
        }
        Some((raw, None)) => {
            return Err(format!(
                "\"body.model\" must be a string, found {}",
                raw_kind(raw)
            ));
        }
        None => return Err("missing \"body.model\": name the model to run".into()),
    };
    check_body(&endpoint, &body)?;
    let urgent = match line.urgent.map(RawValue::get) {
        None | Some("null") | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(format!("\"urgent\" must be true or false, found {other}")),
    };
    let deadline = match line.deadline.map(|raw| (raw, string(raw))) {
        None => None,
        Some((raw, _)) if raw.get() == "null" => None,
        Some((_, Some(s))) => Some(
            DateTime::parse_from_rfc3339(&s)
                .map_err(|_| format!("\"deadline\" {s:?} is not an RFC 3339 time such as \"2026-01-31T18:00:00Z\""))?
                .with_timezone(&Utc),
        ),
        Some((raw, None)) => return Err(format!("\"deadline\" must be an RFC 3339 time string, found {raw}")),
    };
    Ok(ParsedLine {
        custom_id,
        endpoint,
        model,
        body: compact(body_raw)?,
        urgent,
        deadline,
    })
}

/// The top-level fields of a line, borrowed as raw JSON. Unknown fields are skipped.
#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    custom_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    body: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    method: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    url: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    urgent: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    deadline: Option<&'a RawValue>,
    // Only whether these are present matters: they mark another provider's format.
    key: Option<IgnoredAny>,
    request: Option<IgnoredAny>,
    params: Option<IgnoredAny>,
    messages: Option<IgnoredAny>,
    model: Option<IgnoredAny>,
}

/// The fields of a request body that batchd checks, borrowed as raw JSON.
#[derive(Deserialize)]
struct RawBody<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    model: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    messages: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    input: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    prompt: Option<&'a RawValue>,
}

/// Words a failed parse of a line or body. Every field takes any JSON value, so a failure that
/// is not a syntax error is a field given twice.
fn invalid(e: serde_json::Error) -> String {
    match e.classify() {
        Category::Data => format!("{e}: give each field once"),
        _ => format!("not valid JSON: {e}"),
    }
}

/// Keeps a field that is present, `null` included, so that `null` is reported by its kind
/// rather than as a missing field.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Returns the string a raw value holds, or `None` if it is not a string.
fn string(raw: &RawValue) -> Option<String> {
    if !raw.get().starts_with('"') {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// Names a raw value's type for messages from its first byte, which decides it in valid JSON.
fn raw_kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// True for a raw array with no elements.
fn is_empty_array(raw: &RawValue) -> bool {
    raw.get()
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|inside| inside.trim().is_empty())
}

/// The body as stored and sent: the user's text as is, unless it has a carriage return
/// between tokens, which some JSONL readers take for a line break. Such a body is written
/// again without whitespace.
fn compact(body: &RawValue) -> Result<String, String> {
    if !body.get().contains('\r') {
        return Ok(body.get().to_string());
    }
    let value: Value =
        serde_json::from_str(body.get()).map_err(|e| format!("not valid JSON: {e}"))?;
    serde_json::to_string(&value).map_err(|e| format!("failed to write \"body\" as JSON: {e}"))
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
fn foreign_format(line: &RawLine) -> Option<String> {
    const EXPECTED: &str =
        "batchd expects {\"custom_id\": \"...\", \"body\": {...}} (Together/OpenAI batch format)";
    if line.custom_id.is_some() && line.body.is_some() {
        return None;
    }
    if line.key.is_some() && line.request.is_some() {
        return Some(format!(
            "this is a Gemini batch line ({{\"key\", \"request\"}}): {EXPECTED}"
        ));
    }
    if line.custom_id.is_some() && line.params.is_some() {
        return Some(format!(
            "this is an Anthropic batch line ({{\"custom_id\", \"params\"}}): {EXPECTED}"
        ));
    }
    if line.messages.is_some() || line.model.is_some() {
        return Some(format!(
            "this is a bare request body without an id: {EXPECTED}"
        ));
    }
    None
}

/// Takes the endpoint from `url`, or infers it from the body when `url` is absent.
fn endpoint(url: Option<&RawValue>, body: &RawBody) -> Result<String, String> {
    match url.map(|raw| (raw, string(raw))) {
        Some((_, Some(url))) => {
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
        Some((raw, None)) => Err(format!("\"url\" must be a string, found {}", raw_kind(raw))),
        None if body.messages.is_some() => Ok("/v1/chat/completions".to_string()),
        None if body.input.is_some() => Ok("/v1/embeddings".to_string()),
        None if body.prompt.is_some() => Ok("/v1/completions".to_string()),
        None => Err(format!(
            "cannot tell the endpoint: add \"url\" (one of {}) or a body with \"messages\", \"input\" or \"prompt\"",
            SUPPORTED_ENDPOINTS.join(", ")
        )),
    }
}

/// Checks the fields each endpoint cannot do without.
fn check_body(endpoint: &str, body: &RawBody) -> Result<(), String> {
    match endpoint {
        "/v1/chat/completions" => match body.messages.map(|raw| (raw, raw_kind(raw))) {
            Some((raw, "an array")) if !is_empty_array(raw) => Ok(()),
            Some((_, "an array")) => {
                Err("\"body.messages\" is empty: a chat request needs at least one message".into())
            }
            Some((_, kind)) => Err(format!("\"body.messages\" must be an array, found {kind}")),
            None => {
                Err("missing \"body.messages\": a chat request needs a list of messages".into())
            }
        },
        "/v1/embeddings" => match body.input.map(|raw| (raw, raw_kind(raw))) {
            Some((_, "a string")) => Ok(()),
            Some((raw, "an array")) if !is_empty_array(raw) => Ok(()),
            Some((_, "an array")) => {
                Err("\"body.input\" is empty: give a string or an array of strings".into())
            }
            Some((_, kind)) => Err(format!(
                "\"body.input\" must be a string or an array, found {kind}"
            )),
            None => {
                Err("missing \"body.input\": an embeddings request needs the text to embed".into())
            }
        },
        "/v1/completions" | "/v1/images/generations" => match body.prompt.map(raw_kind) {
            Some("a string") => Ok(()),
            Some(kind) => Err(format!("\"body.prompt\" must be a string, found {kind}")),
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
    fn body_is_stored_as_written() {
        let line = br#"{"custom_id": "a", "body": {"model": "m", "temperature": 0.10, "messages": [{"role": "user", "content": "x\u00e9"}]}}"#;
        let parsed = parse_line(line).unwrap();
        assert_eq!(
            parsed.body,
            r#"{"model": "m", "temperature": 0.10, "messages": [{"role": "user", "content": "x\u00e9"}]}"#
        );
    }

    #[test]
    fn carriage_return_between_tokens_is_removed_from_body() {
        let parsed =
            parse_line(b"{\"custom_id\": \"a\", \"body\": {\"model\":\r\"m\", \"input\": \"x\"}}")
                .unwrap();
        assert_eq!(parsed.body, r#"{"input":"x","model":"m"}"#);
    }

    #[test]
    fn field_given_twice_is_reported() {
        let r =
            reason(r#"{"custom_id": "a", "custom_id": "b", "body": {"model": "m", "input": "x"}}"#);
        assert!(r.contains("duplicate field `custom_id`"), "{r}");
        let r = reason(r#"{"custom_id": "a", "body": {"model": "m", "model": "n", "input": "x"}}"#);
        assert!(r.contains("duplicate field `model`"), "{r}");
    }

    #[test]
    fn null_fields_are_reported_by_kind() {
        let r = reason(r#"{"custom_id": null, "body": {"model": "m", "input": "x"}}"#);
        assert!(
            r.contains("\"custom_id\" must be a string, found null"),
            "{r}"
        );
        let r = reason(r#"{"custom_id": "a", "body": {"model": "m", "messages": null}}"#);
        assert!(
            r.contains("\"body.messages\" must be an array, found null"),
            "{r}"
        );
        let parsed =
            parse_line(br#"{"custom_id": "a", "urgent": null, "deadline": null, "body": {"model": "m", "input": "x"}}"#)
                .unwrap();
        assert!(!parsed.urgent);
        assert_eq!(parsed.deadline, None);
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
