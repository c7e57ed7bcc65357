//! Deterministic response bodies for inference requests. The real-time routes and the batch
//! runner both build their bodies here, so a batch line gets the same response as the same request
//! sent in real time (apart from ids and timestamps).
//!
//! Token counts are estimates: one token per whitespace-separated word.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::Utc;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::ids::random_hex;
use super::models::{self, Model, ModelKind};

/// Number of components in every vector that [`embedding_vector`] returns.
pub const EMBEDDING_DIMENSION: usize = 16;

/// Maximum `n` of an image request.
const MAX_IMAGES_PER_REQUEST: u64 = 4;

/// Returns the simulated completion text: the message itself, then a tag derived from its
/// SHA-256, so that a client can match every completion to its request.
pub fn chat_answer_text(last_user_message: &str) -> String {
    let digest = Sha256::digest(last_user_message.as_bytes());
    format!(
        "{last_user_message}\n\n[simulated answer {}]",
        hex::encode(&digest[..4])
    )
}

/// Returns a vector of [`EMBEDDING_DIMENSION`] values in [-1, 1], taken two bytes at a time from
/// the SHA-256 of `input`. Equal inputs give equal vectors.
pub fn embedding_vector(input: &str) -> Vec<f32> {
    let digest = Sha256::digest(input.as_bytes());
    digest
        .chunks_exact(2)
        .map(|pair| {
            let value = u16::from_be_bytes([pair[0], pair[1]]);
            f32::from(value) / f32::from(u16::MAX) * 2.0 - 1.0
        })
        .collect()
}

/// Reason why a request body gets no response.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RequestError {
    /// The body is missing a field or a field has the wrong type.
    Invalid(String),
    /// `model` names no model in the catalogue.
    UnknownModel(String),
    /// `model` exists but serves another kind of request.
    WrongModelKind {
        model: String,
        kind: ModelKind,
        expected: ModelKind,
    },
}

impl RequestError {
    pub fn message(&self) -> String {
        match self {
            RequestError::Invalid(message) => message.clone(),
            RequestError::UnknownModel(model) => format!(
                "model `{model}` is not available; GET /v1/models lists the available models"
            ),
            RequestError::WrongModelKind {
                model,
                kind,
                expected,
            } => format!(
                "model `{model}` is a {} model, but this endpoint needs a {} model",
                kind.as_str(),
                expected.as_str()
            ),
        }
    }

    /// Returns whether the error concerns the `model` field rather than the rest of the body.
    pub fn is_model_error(&self) -> bool {
        !matches!(self, RequestError::Invalid(_))
    }
}

fn require_model(body: &Value, expected: ModelKind) -> Result<&'static Model, RequestError> {
    let Some(id) = body.get("model").and_then(Value::as_str) else {
        return Err(RequestError::Invalid(
            "missing required field `model` (a string naming a model from GET /v1/models)"
                .to_owned(),
        ));
    };
    let model = models::find(id).ok_or_else(|| RequestError::UnknownModel(id.to_owned()))?;
    if model.kind != expected {
        return Err(RequestError::WrongModelKind {
            model: id.to_owned(),
            kind: model.kind,
            expected,
        });
    }
    Ok(model)
}

/// Checks an optional `max_tokens`: a positive integer no larger than the model's output limit.
/// A `null` counts as absent.
pub(super) fn check_max_tokens(body: &Value, model: &Model) -> Result<(), RequestError> {
    let value = match body.get("max_tokens") {
        None | Some(Value::Null) => return Ok(()),
        Some(value) => value,
    };
    let Some(max_tokens) = value.as_u64().filter(|&n| n > 0) else {
        return Err(RequestError::Invalid(format!(
            "max_tokens must be a positive integer, found {value}"
        )));
    };
    if let Some(limit) = model.max_output_tokens
        && max_tokens > limit
    {
        return Err(RequestError::Invalid(format!(
            "max_tokens {max_tokens} is larger than the maximum of {limit} for model {}",
            model.id
        )));
    }
    Ok(())
}

fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Returns the text of a message's `content`, which is either a string or an array of parts of
/// which only `{"type": "text", "text": ...}` parts carry text.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Builds a `chat.completion` object for a `/v1/chat/completions` request body.
pub(super) fn chat_completion(body: &Value) -> Result<Value, RequestError> {
    let model = require_model(body, ModelKind::Chat)?;
    check_max_tokens(body, model)?;
    let messages = match body.get("messages").and_then(Value::as_array) {
        Some(messages) if !messages.is_empty() => messages,
        _ => {
            return Err(RequestError::Invalid(
                "missing or empty `messages`: send a non-empty array of {\"role\", \"content\"} \
                 objects"
                    .to_owned(),
            ));
        }
    };

    // The completion echoes the last user message, or the last message if no user spoke.
    let last_user = messages
        .iter()
        .rev()
        .find(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .unwrap_or(&messages[messages.len() - 1]);
    let answer = chat_answer_text(&message_text(last_user));

    let prompt_tokens: u64 = messages
        .iter()
        .map(|message| count_tokens(&message_text(message)))
        .sum();
    let completion_tokens = count_tokens(&answer);
    Ok(json!({
        "id": random_hex(8),
        "object": "chat.completion",
        "created": Utc::now().timestamp(),
        "model": model.id,
        // The official Python SDK 3.1.1 requires `prompt`, which contains the prompt only when
        // the request sets `echo`.
        "prompt": [],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
}

/// Builds a `text.completion` object, as the official Python SDK 3.1.1 spells it, for a
/// `/v1/completions` request body.
pub(super) fn text_completion(body: &Value) -> Result<Value, RequestError> {
    let model = require_model(body, ModelKind::Chat)?;
    check_max_tokens(body, model)?;
    let Some(prompt) = body.get("prompt").and_then(Value::as_str) else {
        return Err(RequestError::Invalid(
            "missing required field `prompt` (a string)".to_owned(),
        ));
    };
    let text = chat_answer_text(prompt);
    let prompt_tokens = count_tokens(prompt);
    let completion_tokens = count_tokens(&text);
    Ok(json!({
        "id": random_hex(8),
        "object": "text.completion",
        "created": Utc::now().timestamp(),
        "model": model.id,
        "prompt": [],
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
}

/// Builds the response to a `/v1/embeddings` request body. Also returns the number of inputs,
/// where a single string counts as one.
pub(super) fn embeddings(body: &Value) -> Result<(Value, usize), RequestError> {
    let model = require_model(body, ModelKind::Embedding)?;
    let invalid_input = || {
        RequestError::Invalid("`input` must be a string or a non-empty array of strings".to_owned())
    };
    let inputs: Vec<&str> = match body.get("input") {
        Some(Value::String(text)) => vec![text.as_str()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| item.as_str().ok_or_else(invalid_input))
            .collect::<Result<_, _>>()?,
        _ => return Err(invalid_input()),
    };

    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            json!({"object": "embedding", "embedding": embedding_vector(text), "index": index})
        })
        .collect();
    let prompt_tokens: u64 = inputs.iter().map(|text| count_tokens(text)).sum();
    let response = json!({
        "object": "list",
        "model": model.id,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    });
    Ok((response, inputs.len()))
}

/// Builds the response to a `/v1/images/generations` request body.
///
/// NOTE: each `b64_json` is the base64 of a SHA-256 digest of the prompt and the image index, not
/// a decodable image. It is deterministic and small, which is all the daemon stores.
pub(super) fn image_generation(body: &Value) -> Result<Value, RequestError> {
    let model = require_model(body, ModelKind::Image)?;
    let Some(prompt) = body.get("prompt").and_then(Value::as_str) else {
        return Err(RequestError::Invalid(
            "missing required field `prompt` (a string)".to_owned(),
        ));
    };
    let count = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(n) => match n.as_u64() {
            Some(n) if (1..=MAX_IMAGES_PER_REQUEST).contains(&n) => n,
            _ => {
                return Err(RequestError::Invalid(format!(
                    "invalid `n` {n}: expected an integer from 1 to {MAX_IMAGES_PER_REQUEST}"
                )));
            }
        },
    };

    let data: Vec<Value> = (0..count)
        .map(|index| {
            let digest = Sha256::digest(format!("{index}:{prompt}").as_bytes());
            json!({"index": index, "b64_json": BASE64.encode(digest), "type": "b64_json"})
        })
        .collect();
    Ok(json!({"id": random_hex(8), "model": model.id, "object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_answer_begins_with_message() {
        let answer = chat_answer_text("What is 2 + 2?");
        assert!(answer.starts_with("What is 2 + 2?"), "{answer}");
        assert_eq!(answer, chat_answer_text("What is 2 + 2?"));
        assert_ne!(answer, chat_answer_text("What is 2 + 3?"));
    }

    #[test]
    fn embedding_vector_is_deterministic_and_bounded() {
        let vector = embedding_vector("hello");
        assert_eq!(vector.len(), EMBEDDING_DIMENSION);
        assert!(vector.iter().all(|value| (-1.0..=1.0).contains(value)));
        assert_eq!(vector, embedding_vector("hello"));
        assert_ne!(vector, embedding_vector("hello!"));
    }

    #[test]
    fn chat_completion_echoes_last_user_message() {
        let body = json!({
            "model": "Qwen/Qwen2.5-7B-Instruct-Turbo",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": [{"type": "text", "text": "second question"}]},
            ],
        });
        let response = chat_completion(&body).unwrap();
        let content = response["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        assert!(content.starts_with("second question"), "{content}");
        assert_eq!(response["usage"]["prompt_tokens"], 8);
    }

    #[test]
    fn chat_completion_rejects_bad_bodies() {
        let no_model = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(matches!(
            chat_completion(&no_model),
            Err(RequestError::Invalid(_))
        ));

        let unknown =
            json!({"model": "nobody/none", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(
            chat_completion(&unknown),
            Err(RequestError::UnknownModel("nobody/none".to_owned()))
        );

        let embedding_model = json!({"model": "BAAI/bge-base-en-v1.5", "messages": [{"role": "user", "content": "hi"}]});
        assert!(matches!(
            chat_completion(&embedding_model),
            Err(RequestError::WrongModelKind { .. })
        ));

        let empty = json!({"model": "deepseek-ai/DeepSeek-V3.1", "messages": []});
        assert!(matches!(
            chat_completion(&empty),
            Err(RequestError::Invalid(_))
        ));
    }

    #[test]
    fn max_tokens_must_fit_the_model() {
        let body = |max_tokens: Value| {
            json!({
                "model": "Qwen/Qwen2.5-7B-Instruct-Turbo",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": max_tokens,
            })
        };
        assert!(chat_completion(&body(json!(100))).is_ok());
        assert!(chat_completion(&body(Value::Null)).is_ok());
        assert_eq!(
            chat_completion(&body(json!(-5))),
            Err(RequestError::Invalid(
                "max_tokens must be a positive integer, found -5".to_owned()
            ))
        );
        assert_eq!(
            chat_completion(&body(json!(100_000))),
            Err(RequestError::Invalid(
                "max_tokens 100000 is larger than the maximum of 8192 for model \
                 Qwen/Qwen2.5-7B-Instruct-Turbo"
                    .to_owned()
            ))
        );
    }

    #[test]
    fn embeddings_count_array_inputs() {
        let body = json!({"model": "BAAI/bge-large-en-v1.5", "input": ["a", "b", "c"]});
        let (response, count) = embeddings(&body).unwrap();
        assert_eq!(count, 3);
        assert_eq!(response["data"][2]["index"], 2);

        let mixed = json!({"model": "BAAI/bge-large-en-v1.5", "input": ["a", 1]});
        assert!(matches!(embeddings(&mixed), Err(RequestError::Invalid(_))));
    }

    #[test]
    fn image_generation_honours_n() {
        let body = json!({"model": "black-forest-labs/FLUX.1-schnell", "prompt": "a cat", "n": 2});
        let response = image_generation(&body).unwrap();
        assert_eq!(response["data"].as_array().unwrap().len(), 2);

        let too_many =
            json!({"model": "black-forest-labs/FLUX.1-schnell", "prompt": "a cat", "n": 9});
        assert!(matches!(
            image_generation(&too_many),
            Err(RequestError::Invalid(_))
        ));
    }
}
