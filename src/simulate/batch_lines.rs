//! Validation of one line of batch input: the rules whose breach fails the whole batch, and the
//! error text that names the line.

use serde_json::Value;

use super::batch_input::MAX_CUSTOM_ID_CHARS;
use super::models;

/// The reason that one line fails the batch, with the line's `custom_id` if it has one.
pub(super) struct LineProblem {
    pub custom_id: Option<String>,
    pub reason: String,
}

impl LineProblem {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            custom_id: None,
            reason: reason.into(),
        }
    }

    /// Returns the batch's error text for line `number`.
    pub fn at(self, number: usize) -> String {
        match self.custom_id {
            Some(custom_id) => format!("line {number} (custom_id {custom_id:?}): {}", self.reason),
            None => format!("line {number}: {}", self.reason),
        }
    }
}

/// Names the JSON type of `value`, for messages.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(super) fn parse_line(line: &str, endpoint: &str) -> Result<(String, Value), LineProblem> {
    let value: Value = serde_json::from_str(line)
        .map_err(|error| LineProblem::new(format!("invalid JSON: {error}")))?;
    let Value::Object(mut object) = value else {
        return Err(LineProblem::new("expected a JSON object"));
    };

    let custom_id = match object.remove("custom_id") {
        Some(Value::String(custom_id)) if !custom_id.is_empty() => custom_id,
        Some(Value::String(_)) => return Err(LineProblem::new("custom_id is empty")),
        Some(_) => return Err(LineProblem::new("custom_id must be a string")),
        None => return Err(LineProblem::new("missing custom_id")),
    };
    let problem = |reason: String| LineProblem {
        custom_id: Some(custom_id.clone()),
        reason,
    };
    let length = custom_id.chars().count();
    if length > MAX_CUSTOM_ID_CHARS {
        return Err(problem(format!(
            "custom_id has {length} characters, more than the limit of {MAX_CUSTOM_ID_CHARS}"
        )));
    }

    let body = match object.remove("body") {
        Some(body @ Value::Object(_)) => body,
        Some(other) => {
            return Err(problem(format!(
                "body must be a JSON object, found {}",
                json_type(&other)
            )));
        }
        None => return Err(problem("missing body".to_owned())),
    };
    check_body(&body, endpoint).map_err(problem)?;
    Ok((custom_id, body))
}

/// Checks the body rules that fail the whole batch.
fn check_body(body: &Value, endpoint: &str) -> Result<(), String> {
    if endpoint == "/v1/chat/completions" {
        match body.get("messages") {
            Some(Value::Array(messages)) if !messages.is_empty() => {}
            Some(Value::Array(_)) => {
                return Err("body.messages is empty; send at least one message".to_owned());
            }
            Some(other) => {
                return Err(format!(
                    "body.messages must be a non-empty array, found {}",
                    json_type(other)
                ));
            }
            None => {
                return Err("missing body.messages; send a non-empty array of messages".to_owned());
            }
        }
    }
    match body.get("max_tokens") {
        None | Some(Value::Null) => {}
        Some(value) if value.as_u64().is_some_and(|n| n > 0) => {}
        Some(value) => {
            return Err(format!(
                "max_tokens must be a positive integer, found {value}"
            ));
        }
    }
    if let Some(id) = body.get("model").and_then(Value::as_str)
        && let Some(model) = models::find(id)
        && !model.batchable
    {
        return Err(not_batchable(id));
    }
    Ok(())
}

/// Returns the error of a batch whose model does not support batches.
pub(super) fn not_batchable(model: &str) -> String {
    format!(
        "model {model} does not support batch inference; send its requests to the real-time \
         endpoint or pick a model that GET /v1/models lists with `batchable: true`"
    )
}
