//! Validation of a batch's input file and the result lines of its requests.
//!
//! These file-level problems fail the whole batch with one message:
//! - an endpoint that does not accept batches,
//! - a file over 100 MB or over 50,000 requests,
//! - a line that is not a JSON object with a string `custom_id` and an object `body`,
//! - a `custom_id` over 64 characters, or one used twice,
//! - a chat line without a non-empty `body.messages` array,
//! - a `max_tokens` that is not a positive integer,
//! - a model that does not support batches.
//!
//! A problem on one line names it as `line N: reason`, or `line N (custom_id "id"): reason` when
//! the line has a `custom_id`, where N counts every line of the file from 1.
//!
//! A line whose request has no valid response (unknown model, `max_tokens` above the model's
//! limit, missing `prompt`) goes to the error file instead, and the other lines still get their
//! results.

use std::collections::HashMap;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

use super::answers::{self, RequestError};
use super::batch_lines::{LineProblem, parse_line};
use super::dice::Roll;
use super::ids::random_hex;

/// Endpoints that accept batches.
pub(super) const BATCHABLE_ENDPOINTS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// Maximum number of requests in one batch, from Together's batch overview page
/// (docs.together.ai/docs/inference/batch/overview).
pub(super) const MAX_LINES: usize = 50_000;

/// Maximum size of an input file in bytes, from the same page.
// NOTE: Together writes "100 MB" without saying whether it means 10^8 or 100 * 2^20 bytes. The
// smaller value is used, so a file accepted here is also accepted there.
pub(super) const MAX_INPUT_BYTES: usize = 100_000_000;

/// Maximum length of a `custom_id`, in characters.
pub(super) const MAX_CUSTOM_ID_CHARS: usize = 64;

/// One line of the output file or of the error file, without its newline.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum LineResult {
    Output(String),
    Error(String),
    /// A successful line that the `line_error_rate` fault moves to the error file if the job
    /// completes.
    FaultedOutput {
        output: String,
        error: String,
    },
}

/// The deterministic choices of one batch: the output order and the lines that get an injected
/// error.
pub(super) struct Draws {
    pub roll: Roll,
    pub line_error_rate: f64,
}

/// Validates `content` as batch input for `endpoint` and builds every request's result line. The
/// results come in the order in which the batch finishes them: shuffled by `draws`, and never in
/// input order when there are three lines or more. An `Err` carries the reason the whole batch
/// fails.
pub(super) fn prepare(
    content: &[u8],
    endpoint: &str,
    draws: &Draws,
) -> Result<Vec<LineResult>, String> {
    let requests = parse_requests(content, endpoint)?;
    let mut results: Vec<(usize, LineResult)> = requests
        .into_iter()
        .enumerate()
        .map(|(index, (custom_id, body))| {
            let mut result = answer_line(endpoint, &custom_id, &body);
            if let LineResult::Output(output) = &result
                && draws.line_error_rate > 0.0
                && draws.roll.uniform("line_error", custom_id.as_bytes()) < draws.line_error_rate
            {
                result = LineResult::FaultedOutput {
                    output: output.clone(),
                    error: injected_error_line(&custom_id),
                };
            }
            (index, result)
        })
        .collect();

    let seed = draws.roll.bits("shuffle", b"");
    results.shuffle(&mut StdRng::seed_from_u64(seed));
    if results.len() >= 3 && results.is_sorted_by_key(|(index, _)| *index) {
        // A shuffle may return the input order; a client must never be able to rely on it.
        results.rotate_left(1);
    }
    Ok(results.into_iter().map(|(_, result)| result).collect())
}

/// Returns the `body.model` of the first line that has one, for the batch's `model_id`.
pub(super) fn first_model(content: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(content).ok()?;
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find_map(|line| line["body"]["model"].as_str().map(str::to_owned))
}

/// Checks the file-level rules and returns each line's `custom_id` and `body`.
fn parse_requests(content: &[u8], endpoint: &str) -> Result<Vec<(String, Value)>, String> {
    if !BATCHABLE_ENDPOINTS.contains(&endpoint) {
        return Err(format!(
            "endpoint {endpoint} does not support batches; use {}",
            BATCHABLE_ENDPOINTS.join(" or ")
        ));
    }
    if content.len() > MAX_INPUT_BYTES {
        return Err(format!(
            "input file has {} bytes, more than the limit of {MAX_INPUT_BYTES} bytes (100 MB); \
             split it into smaller batches",
            content.len()
        ));
    }
    let text = std::str::from_utf8(content)
        .map_err(|error| format!("input file is not valid UTF-8: {error}"))?;

    // Line numbers count every line of the file, blank ones included, as an editor shows them.
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| (index + 1, line))
        .collect();
    if lines.is_empty() {
        return Err("input file has no requests".to_owned());
    }
    if lines.len() > MAX_LINES {
        return Err(format!(
            "input file has {} requests, more than the limit of {MAX_LINES}; split it into \
             smaller batches",
            lines.len()
        ));
    }

    let mut first_use: HashMap<String, usize> = HashMap::new();
    let mut requests = Vec::with_capacity(lines.len());
    for (number, line) in lines {
        let (custom_id, body) = parse_line(line, endpoint).map_err(|problem| problem.at(number))?;
        if let Some(first) = first_use.insert(custom_id.clone(), number) {
            let problem = LineProblem {
                custom_id: Some(custom_id),
                reason: format!("custom_id repeats line {first}; every custom_id must be unique"),
            };
            return Err(problem.at(number));
        }
        requests.push((custom_id, body));
    }
    Ok(requests)
}

/// Builds the error line that the `line_error_rate` fault writes instead of a result.
fn injected_error_line(custom_id: &str) -> String {
    json!({
        "custom_id": custom_id,
        "error": {
            "message": "internal server error while processing this request; retry it in a new batch",
            "code": "server_error",
        },
    })
    .to_string()
}

fn answer_line(endpoint: &str, custom_id: &str, body: &Value) -> LineResult {
    let answer = if endpoint == "/v1/completions" {
        answers::text_completion(body)
    } else {
        answers::chat_completion(body)
    };
    match answer {
        Ok(response_body) => {
            let line = json!({
                "id": format!("batch_req_{}", random_hex(12)),
                "custom_id": custom_id,
                "response": {
                    "status_code": 200,
                    "request_id": random_hex(12),
                    "body": response_body,
                },
            });
            LineResult::Output(line.to_string())
        }
        Err(error) => {
            let line = json!({
                "custom_id": custom_id,
                "error": {"message": error.message(), "code": error_code(&error)},
            });
            LineResult::Error(line.to_string())
        }
    }
}

fn error_code(error: &RequestError) -> &'static str {
    if error.is_model_error() {
        "invalid_model"
    } else {
        "invalid_request"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::dice::Dice;

    const CHAT: &str = "/v1/chat/completions";

    fn chat_line(custom_id: &str, question: &str) -> String {
        json!({
            "custom_id": custom_id,
            "method": "POST",
            "url": CHAT,
            "body": {
                "model": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
                "messages": [{"role": "user", "content": question}],
            },
        })
        .to_string()
    }

    fn draws(seed: u64) -> Draws {
        Draws {
            roll: Dice::new(seed).roll(b"input"),
            line_error_rate: 0.0,
        }
    }

    fn failure(content: &str) -> String {
        prepare(content.as_bytes(), CHAT, &draws(0)).unwrap_err()
    }

    fn custom_ids(results: &[LineResult]) -> Vec<String> {
        results
            .iter()
            .map(|result| {
                let LineResult::Output(line) = result else {
                    panic!("unexpected error line {result:?}");
                };
                let line: Value = serde_json::from_str(line).unwrap();
                line["custom_id"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    #[test]
    fn prepare_shuffles_and_answers_every_line() {
        let content: String = (0..10)
            .map(|i| chat_line(&format!("id-{i}"), &format!("question {i}")) + "\n")
            .collect();
        let results = prepare(content.as_bytes(), CHAT, &draws(7)).unwrap();
        assert_eq!(results.len(), 10);

        let input_order: Vec<String> = (0..10).map(|i| format!("id-{i}")).collect();
        assert_ne!(custom_ids(&results), input_order);
    }

    #[test]
    fn prepare_never_keeps_input_order() {
        let content = [
            chat_line("a", "1"),
            chat_line("b", "2"),
            chat_line("c", "3"),
        ]
        .join("\n");
        for seed in 0..50 {
            let results = prepare(content.as_bytes(), CHAT, &draws(seed)).unwrap();
            assert_ne!(custom_ids(&results), ["a", "b", "c"], "seed {seed}");
        }
    }

    #[test]
    fn bad_requests_go_to_error_lines() {
        let unknown_model = json!({"custom_id": "x", "body": {"model": "no/such", "messages": [{"role": "user", "content": "hi"}]}});
        let too_long = json!({"custom_id": "y", "body": {
            "model": "Qwen/Qwen2.5-7B-Instruct-Turbo",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 9_000,
        }});
        let content = format!("{unknown_model}\n{too_long}\n");
        let results = prepare(content.as_bytes(), CHAT, &draws(0)).unwrap();

        let mut errors: Vec<(String, String, String)> = results
            .iter()
            .map(|result| {
                let LineResult::Error(line) = result else {
                    panic!("expected an error line, got {result:?}");
                };
                let line: Value = serde_json::from_str(line).unwrap();
                (
                    line["custom_id"].as_str().unwrap().to_owned(),
                    line["error"]["code"].as_str().unwrap().to_owned(),
                    line["error"]["message"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        errors.sort();
        assert_eq!(errors[0].0, "x");
        assert_eq!(errors[0].1, "invalid_model");
        assert_eq!(errors[1].0, "y");
        assert_eq!(errors[1].1, "invalid_request");
        assert_eq!(
            errors[1].2,
            "max_tokens 9000 is larger than the maximum of 8192 for model \
             Qwen/Qwen2.5-7B-Instruct-Turbo"
        );
    }

    #[test]
    fn injected_line_errors_follow_the_rate() {
        let content: String = (0..200)
            .map(|i| chat_line(&format!("id-{i}"), "q") + "\n")
            .collect();
        let draws = Draws {
            roll: Dice::new(4).roll(b"input"),
            line_error_rate: 0.5,
        };
        let results = prepare(content.as_bytes(), CHAT, &draws).unwrap();
        let faulted = results
            .iter()
            .filter(|result| matches!(result, LineResult::FaultedOutput { .. }))
            .count();
        assert!((60..140).contains(&faulted), "{faulted} of 200 lines");
    }

    #[test]
    fn file_level_problems_fail_the_batch() {
        let with_body = |custom_id: &str, body: Value| {
            json!({"custom_id": custom_id, "body": body}).to_string()
        };
        let model = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
        let message = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (
                format!("{}\n[1, 2]", chat_line("a", "q")),
                "line 2: expected a JSON object",
            ),
            ("{not json".to_owned(), "line 1: invalid JSON"),
            (r#"{"body": {}}"#.to_owned(), "line 1: missing custom_id"),
            (
                r#"{"custom_id": 5, "body": {}}"#.to_owned(),
                "line 1: custom_id must be a string",
            ),
            (
                r#"{"custom_id": "a"}"#.to_owned(),
                "line 1 (custom_id \"a\"): missing body",
            ),
            (
                r#"{"custom_id": "a", "body": "x"}"#.to_owned(),
                "line 1 (custom_id \"a\"): body must be a JSON object, found a string",
            ),
            (chat_line(&"x".repeat(65), "q"), "has 65 characters"),
            (
                [chat_line("a", "1"), String::new(), chat_line("a", "2")].join("\n"),
                "line 3 (custom_id \"a\"): custom_id repeats line 1",
            ),
            (
                with_body("m", json!({"model": model})),
                "line 1 (custom_id \"m\"): missing body.messages",
            ),
            (
                with_body("m", json!({"model": model, "messages": []})),
                "line 1 (custom_id \"m\"): body.messages is empty",
            ),
            (
                with_body("m", json!({"model": model, "messages": "hi"})),
                "body.messages must be a non-empty array, found a string",
            ),
            (
                [
                    chat_line("a", "1"),
                    with_body(
                        "bd-42",
                        json!({"model": model, "messages": message, "max_tokens": -5}),
                    ),
                ]
                .join("\n"),
                "line 2 (custom_id \"bd-42\"): max_tokens must be a positive integer, found -5",
            ),
            (
                with_body(
                    "t",
                    json!({"model": model, "messages": message, "max_tokens": "ten"}),
                ),
                "max_tokens must be a positive integer, found \"ten\"",
            ),
            (
                with_body(
                    "r1",
                    json!({"model": "deepseek-ai/DeepSeek-R1", "messages": message}),
                ),
                "line 1 (custom_id \"r1\"): model deepseek-ai/DeepSeek-R1 does not support batch",
            ),
            (String::new(), "no requests"),
        ];
        for (content, expected) in cases {
            let message = failure(&content);
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn line_errors_start_with_the_line_number() {
        let message = failure(&format!("\n\n{}", r#"{"custom_id": "a"}"#));
        assert!(message.starts_with("line 3 "), "{message}");
    }

    #[test]
    fn custom_id_of_64_characters_is_accepted() {
        let content = chat_line(&"é".repeat(64), "q");
        assert!(prepare(content.as_bytes(), CHAT, &draws(0)).is_ok());
    }

    #[test]
    fn only_chat_and_completions_are_batchable() {
        let message =
            prepare(chat_line("a", "q").as_bytes(), "/v1/embeddings", &draws(0)).unwrap_err();
        assert!(message.contains("/v1/embeddings"), "{message}");
    }

    #[test]
    fn too_many_lines_fail_the_batch() {
        let content = "{}\n".repeat(MAX_LINES + 1);
        assert!(failure(&content).contains("50001 requests"));
    }

    #[test]
    fn first_model_reads_the_first_body() {
        let content = format!("{}\n", chat_line("a", "q"));
        assert_eq!(
            first_model(content.as_bytes()).as_deref(),
            Some("meta-llama/Llama-3.3-70B-Instruct-Turbo")
        );
    }
}
