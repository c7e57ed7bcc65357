//! Drives the Together API simulator over HTTP as a client would: uploads, batch jobs, real-time
//! calls, rate limits, authentication and the stats counters. Each test starts its own simulator
//! on 127.0.0.1 with port 0. Batch jobs use a 0.2 s turnaround and are polled in bounded loops.
//! Tests that need a job to stay unfinished use a turnaround of ten minutes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use batchd::simulate::{
    RateLimits, SimConfig, SimStats, SimStatsHandle, SimulateError, Simulator, chat_answer_text,
    embedding_vector,
};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const API_KEY: &str = "test-key";
const CHAT_MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const QUICK_TURNAROUND: Duration = Duration::from_millis(200);
const SLOW_TURNAROUND: Duration = Duration::from_secs(600);
const MAX_POLLS: usize = 500;
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A simulator serving in the background; dropping it stops the server.
struct TestSim {
    base_url: String,
    stats: SimStatsHandle,
    client: reqwest::Client,
    cancel: CancellationToken,
}

impl Drop for TestSim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl TestSim {
    async fn start(config: SimConfig) -> TestSim {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let simulator = Simulator::bind(addr, config).await.unwrap();
        let cancel = CancellationToken::new();
        let sim = TestSim {
            base_url: simulator.base_url(),
            stats: simulator.stats(),
            // The two-step upload needs the 302 itself, so redirects are not followed.
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cancel: cancel.clone(),
        };
        tokio::spawn(simulator.run(cancel));
        sim
    }

    async fn quick() -> TestSim {
        TestSim::start(SimConfig {
            turnaround: QUICK_TURNAROUND,
            ..SimConfig::default()
        })
        .await
    }

    async fn slow() -> TestSim {
        TestSim::start(SimConfig {
            turnaround: SLOW_TURNAROUND,
            ..SimConfig::default()
        })
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn origin(&self) -> &str {
        self.base_url.strip_suffix("/v1").unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap()
    }

    async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(API_KEY)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Uploads `content` with the one-step route and returns the file id.
    async fn upload(&self, name: &str, content: &str) -> String {
        let form = Form::new()
            .text("purpose", "batch-api")
            .text("file_name", name.to_owned())
            .part(
                "file",
                Part::bytes(content.as_bytes().to_vec()).file_name(name.to_owned()),
            );
        let response = self
            .client
            .post(self.url("/files/upload"))
            .bearer_auth(API_KEY)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let file: Value = response.json().await.unwrap();
        file["id"].as_str().unwrap().to_owned()
    }

    async fn create_batch(&self, input_file_id: &str) -> Value {
        let body = json!({
            "endpoint": "/v1/chat/completions",
            "input_file_id": input_file_id,
            "completion_window": "24h",
        });
        let response = self.post_json("/batches", &body).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let created: Value = response.json().await.unwrap();
        created["job"].clone()
    }

    /// Polls the batch until it is terminal and returns the job.
    async fn wait_for_end(&self, batch_id: &str) -> Value {
        for _ in 0..MAX_POLLS {
            let job: Value = self
                .get(&format!("/batches/{batch_id}"))
                .await
                .json()
                .await
                .unwrap();
            let status = job["status"].as_str().unwrap();
            if !matches!(status, "VALIDATING" | "IN_PROGRESS") {
                return job;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        panic!("batch {batch_id} did not end within {MAX_POLLS} polls");
    }

    async fn content(&self, file_id: &str) -> String {
        let response = self.get(&format!("/files/{file_id}/content")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "application/octet-stream"
        );
        response.text().await.unwrap()
    }
}

fn chat_line(custom_id: &str, model: &str, question: &str) -> String {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": question},
            ],
        },
    })
    .to_string()
}

fn jsonl(lines: &[String]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}

fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn sha256_hex(content: &str) -> String {
    Sha256::digest(content.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[tokio::test]
async fn two_step_upload_flow() {
    let sim = TestSim::quick().await;
    let content = jsonl(&[
        chat_line("a", CHAT_MODEL, "one"),
        chat_line("b", CHAT_MODEL, "two"),
    ]);

    let form = Form::new()
        .text("purpose", "batch-api")
        .text("file_name", "input.jsonl")
        .text("file_type", "jsonl")
        .text("checksum", sha256_hex(&content));
    let response = sim
        .client
        .post(sim.url("/files"))
        .bearer_auth(API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let file_id = response.headers()["x-together-file-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(file_id.starts_with("file-"), "{file_id}");
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(location, format!("{}/_sim/uploads/{file_id}", sim.origin()));

    // The presigned URL takes the bytes without an API key.
    let put = sim
        .client
        .put(&location)
        .body(content.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);

    let response = sim
        .client
        .post(sim.url(&format!("/files/{file_id}/preprocess")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let file: Value = response.json().await.unwrap();
    assert_eq!(file["id"], file_id.as_str());
    assert_eq!(file["object"], "file");
    assert_eq!(file["filename"], "input.jsonl");
    assert_eq!(file["bytes"], content.len());
    assert_eq!(file["purpose"], "batch-api");
    assert_eq!(file["Processed"], true);
    assert_eq!(file["FileType"], "jsonl");
    assert_eq!(file["LineCount"], 2);
    assert_eq!(file["processing_status"], "COMPLETED");
    assert!(file["created_at"].is_i64());

    assert_eq!(sim.content(&file_id).await, content);
    assert_eq!(sim.stats.snapshot().files_uploaded, 1);
}

#[tokio::test]
async fn preprocess_rejects_checksum_mismatch() {
    let sim = TestSim::quick().await;
    let form = Form::new()
        .text("purpose", "batch-api")
        .text("file_name", "input.jsonl")
        .text("checksum", sha256_hex("other content"));
    let response = sim
        .client
        .post(sim.url("/files"))
        .bearer_auth(API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let file_id = response.headers()["x-together-file-id"]
        .to_str()
        .unwrap()
        .to_owned();
    sim.client.put(&location).body("{}\n").send().await.unwrap();

    let response = sim
        .client
        .post(sim.url(&format!("/files/{file_id}/preprocess")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("checksum mismatch"), "{message}");
}

#[tokio::test]
async fn one_step_uploads_return_file() {
    let sim = TestSim::quick().await;
    let content = jsonl(&[chat_line("a", CHAT_MODEL, "one")]);
    let file_id = sim.upload("one.jsonl", &content).await;
    assert_eq!(sim.content(&file_id).await, content);

    // Only a two-step upload has a presigned URL, so this file's content cannot be replaced.
    let put = sim
        .client
        .put(format!("{}/_sim/uploads/{file_id}", sim.origin()))
        .body("{}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::BAD_REQUEST);
    assert_eq!(sim.content(&file_id).await, content);

    // A plain multipart POST /v1/files with a `file` part also returns the file object.
    let form = Form::new().text("purpose", "batch-api").part(
        "file",
        Part::bytes(b"{}\n".to_vec()).file_name("direct.jsonl"),
    );
    let response = sim
        .client
        .post(sim.url("/files"))
        .bearer_auth(API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let file: Value = response.json().await.unwrap();
    assert_eq!(file["filename"], "direct.jsonl");
    assert_eq!(file["LineCount"], 1);

    let list: Value = sim.get("/files").await.json().await.unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|file| file["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [file_id.as_str(), file["id"].as_str().unwrap()]);
    assert_eq!(sim.stats.snapshot().files_uploaded, 2);
}

#[tokio::test]
async fn repeated_checksum_returns_409() {
    let sim = TestSim::quick().await;
    let content = jsonl(&[chat_line("a", CHAT_MODEL, "one")]);
    let file_id = sim.upload("one.jsonl", &content).await;

    let form = Form::new()
        .text("purpose", "batch-api")
        .text("file_name", "again.jsonl")
        .text("file_type", "jsonl")
        .text("checksum", sha256_hex(&content));
    let response = sim
        .client
        .post(sim.url("/files"))
        .bearer_auth(API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["file_id"], file_id.as_str());
}

#[tokio::test]
async fn deleted_file_is_gone() {
    let sim = TestSim::quick().await;
    let file_id = sim.upload("one.jsonl", "{}\n").await;

    let response = sim
        .client
        .delete(sim.url(&format!("/files/{file_id}")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"id": file_id, "object": "file", "deleted": true})
    );

    let response = sim.get(&format!("/files/{file_id}")).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn batch_completes_with_shuffled_output() {
    let sim = TestSim::quick().await;
    let questions: Vec<String> = (0..12).map(|i| format!("What is {i} + {i}?")).collect();
    let mut lines: Vec<String> = questions
        .iter()
        .enumerate()
        .map(|(i, question)| chat_line(&format!("req-{i}"), CHAT_MODEL, question))
        .collect();
    lines.push(chat_line("bad-model", "nobody/no-such-model", "unanswered"));
    lines.push(
        json!({"custom_id": "too-long", "body": {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 100_000,
        }})
        .to_string(),
    );
    let input_file_id = sim.upload("batch.jsonl", &jsonl(&lines)).await;

    let job = sim.create_batch(&input_file_id).await;
    let batch_id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["input_file_id"], input_file_id.as_str());
    assert_eq!(job["endpoint"], "/v1/chat/completions");
    assert_eq!(job["model_id"], CHAT_MODEL);
    assert!(job.get("completed_at").is_none(), "{job}");
    assert!(job.get("output_file_id").is_none(), "{job}");

    let job = sim.wait_for_end(&batch_id).await;
    assert_eq!(job["status"], "COMPLETED");
    assert_eq!(job["progress"], 100.0);
    assert!(job["completed_at"].is_string());
    assert!(job["job_deadline"].is_string());
    assert!(job.get("error").is_none(), "{job}");

    let output = parse_lines(&sim.content(job["output_file_id"].as_str().unwrap()).await);
    assert_eq!(output.len(), 12);
    let expected: HashMap<String, &String> = questions
        .iter()
        .enumerate()
        .map(|(i, question)| (format!("req-{i}"), question))
        .collect();
    let mut output_ids = Vec::new();
    for line in &output {
        let custom_id = line["custom_id"].as_str().unwrap();
        assert_eq!(line["response"]["status_code"], 200);
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            content.starts_with(expected[custom_id].as_str()),
            "{custom_id}: {content}"
        );
        output_ids.push(custom_id.to_owned());
    }
    let input_ids: Vec<String> = (0..12).map(|i| format!("req-{i}")).collect();
    assert_ne!(
        output_ids, input_ids,
        "output lines must not keep input order"
    );

    let errors = parse_lines(&sim.content(job["error_file_id"].as_str().unwrap()).await);
    let mut codes: Vec<(&str, &str)> = errors
        .iter()
        .map(|line| {
            (
                line["custom_id"].as_str().unwrap(),
                line["error"]["code"].as_str().unwrap(),
            )
        })
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            ("bad-model", "invalid_model"),
            ("too-long", "invalid_request")
        ]
    );

    let files: Value = sim.get("/files").await.json().await.unwrap();
    let output_file = files["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|file| file["id"] == job["output_file_id"])
        .unwrap();
    assert_eq!(output_file["purpose"], "batch-generated");
    assert_eq!(output_file["LineCount"], 12);
}

#[tokio::test]
async fn example_file_batch_returns_every_line() {
    let sim = TestSim::quick().await;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/gsm8k-test-chat.jsonl"
    );
    let content = std::fs::read_to_string(path).unwrap();
    let mut input_ids: Vec<String> = parse_lines(&content)
        .iter()
        .map(|line| line["custom_id"].as_str().unwrap().to_owned())
        .collect();
    let input_file_id = sim.upload("gsm8k-test-chat.jsonl", &content).await;

    let job = sim.create_batch(&input_file_id).await;
    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "COMPLETED");
    assert!(job.get("error_file_id").is_none(), "{job}");

    let output = parse_lines(&sim.content(job["output_file_id"].as_str().unwrap()).await);
    let mut output_ids: Vec<String> = output
        .iter()
        .map(|line| line["custom_id"].as_str().unwrap().to_owned())
        .collect();
    output_ids.sort();
    input_ids.sort();
    assert_eq!(output_ids.len(), 1319);
    assert_eq!(output_ids, input_ids);
    assert_eq!(sim.stats.snapshot().max_batch_lines, 1319);
}

#[tokio::test]
async fn repeated_custom_id_fails_batch() {
    let sim = TestSim::quick().await;
    let lines = [
        chat_line("same", CHAT_MODEL, "one"),
        chat_line("same", CHAT_MODEL, "two"),
    ];
    let input_file_id = sim.upload("dup.jsonl", &jsonl(&lines)).await;
    let job = sim.create_batch(&input_file_id).await;

    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "FAILED");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.starts_with("line 2 (custom_id \"same\"): custom_id repeats line 1"),
        "{error}"
    );
    assert!(job["completed_at"].is_string());
    assert!(job.get("output_file_id").is_none(), "{job}");
    assert!(job.get("error_file_id").is_none(), "{job}");
}

#[tokio::test]
async fn batch_with_unknown_input_file_is_rejected() {
    let sim = TestSim::quick().await;
    let body = json!({"endpoint": "/v1/chat/completions", "input_file_id": "file-missing"});
    let response = sim.post_json("/batches", &body).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("file-missing"), "{message}");
}

#[tokio::test]
async fn cancel_ends_running_batch() {
    let sim = TestSim::slow().await;
    let input_file_id = sim
        .upload("batch.jsonl", &jsonl(&[chat_line("a", CHAT_MODEL, "one")]))
        .await;
    let job = sim.create_batch(&input_file_id).await;
    let batch_id = job["id"].as_str().unwrap();
    assert_eq!(job["status"], "VALIDATING");

    let response = sim
        .client
        .post(sim.url(&format!("/batches/{batch_id}/cancel")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["status"], "CANCELLED");
    assert!(job["completed_at"].is_string());
    // Still validating, so no line was finished and no file was written.
    assert!(job.get("output_file_id").is_none(), "{job}");

    let again = sim
        .client
        .post(sim.url(&format!("/batches/{batch_id}/cancel")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    let body: Value = again.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("already CANCELLED"), "{message}");
}

#[tokio::test]
async fn batches_list_as_bare_array() {
    let sim = TestSim::slow().await;
    let input_file_id = sim
        .upload("batch.jsonl", &jsonl(&[chat_line("a", CHAT_MODEL, "one")]))
        .await;
    let first = sim.create_batch(&input_file_id).await;
    let second = sim.create_batch(&input_file_id).await;

    let list: Value = sim.get("/batches").await.json().await.unwrap();
    let ids: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|job| &job["id"])
        .collect();
    assert_eq!(ids, [&first["id"], &second["id"]]);

    let response = sim.get("/batches/no-such-batch").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test]
async fn chat_completion_echoes_question() {
    let sim = TestSim::quick().await;
    let body = json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "How many legs has a spider?"}],
    });
    let response = sim.post_json("/chat/completions", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-ratelimit-limit"], "600");
    assert_eq!(response.headers()["x-ratelimit-remaining"], "599");
    assert!(response.headers().contains_key("x-ratelimit-reset"));
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], CHAT_MODEL);
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        chat_answer_text("How many legs has a spider?")
    );
    let usage = &answer["usage"];
    assert_eq!(usage["prompt_tokens"], 6);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn chat_rejects_bad_requests() {
    let sim = TestSim::quick().await;

    let unknown =
        json!({"model": "nobody/nothing", "messages": [{"role": "user", "content": "hi"}]});
    let response = sim.post_json("/chat/completions", &unknown).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_available");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nobody/nothing")
    );

    let no_messages = json!({"model": CHAT_MODEL});
    let response = sim.post_json("/chat/completions", &no_messages).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let streaming = json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": true,
    });
    let response = sim.post_json("/chat/completions", &streaming).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn completion_echoes_prompt() {
    let sim = TestSim::quick().await;
    let body = json!({"model": CHAT_MODEL, "prompt": "Once upon a time"});
    let answer: Value = sim
        .post_json("/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["object"], "text.completion");
    assert_eq!(
        answer["choices"][0]["text"],
        chat_answer_text("Once upon a time")
    );
}

#[tokio::test]
async fn embeddings_match_embedding_vector() {
    let sim = TestSim::quick().await;
    let body = json!({"model": "BAAI/bge-large-en-v1.5", "input": ["first", "second", "third"]});
    let response = sim.post_json("/embeddings", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "list");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (index, text) in ["first", "second", "third"].iter().enumerate() {
        assert_eq!(data[index]["index"], index);
        assert_eq!(data[index]["object"], "embedding");
        let vector: Vec<f32> = serde_json::from_value(data[index]["embedding"].clone()).unwrap();
        assert_eq!(vector, embedding_vector(text));
    }

    let single = json!({"model": "BAAI/bge-base-en-v1.5", "input": "alone"});
    let answer: Value = sim
        .post_json("/embeddings", &single)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["data"].as_array().unwrap().len(), 1);
    assert_eq!(sim.stats.snapshot().embedding_max_inputs, 3);
}

#[tokio::test]
async fn image_generation_returns_base64() {
    let sim = TestSim::quick().await;
    let body = json!({"model": "black-forest-labs/FLUX.1-schnell", "prompt": "a lighthouse"});
    let answer: Value = sim
        .post_json("/images/generations", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["data"][0]["type"], "b64_json");
    assert!(!answer["data"][0]["b64_json"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn models_list_the_catalogue() {
    let sim = TestSim::quick().await;
    let models: Value = sim.get("/models").await.json().await.unwrap();
    let models = models.as_array().unwrap();
    let kinds: HashMap<&str, &str> = models
        .iter()
        .map(|model| {
            (
                model["id"].as_str().unwrap(),
                model["type"].as_str().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("meta-llama/Llama-3.3-70B-Instruct-Turbo", "chat"),
        ("Qwen/Qwen2.5-7B-Instruct-Turbo", "chat"),
        ("deepseek-ai/DeepSeek-V3.1", "chat"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo", "chat"),
        ("BAAI/bge-large-en-v1.5", "embedding"),
        ("BAAI/bge-base-en-v1.5", "embedding"),
        ("black-forest-labs/FLUX.1-schnell", "image"),
    ];
    for (id, kind) in expected {
        assert_eq!(kinds.get(id), Some(&kind), "{id}");
    }
    for model in models {
        assert_eq!(model["object"], "model");
        for key in [
            "created",
            "display_name",
            "organization",
            "link",
            "license",
            "context_length",
        ] {
            assert!(model.get(key).is_some(), "{} lacks {key}", model["id"]);
        }
        for key in ["hourly", "input", "output", "base", "finetune"] {
            assert!(
                model["pricing"][key].is_number(),
                "{} lacks pricing.{key}",
                model["id"]
            );
        }
    }
}

#[tokio::test]
async fn rate_limit_returns_429() {
    let sim = TestSim::start(SimConfig {
        limits: RateLimits {
            chat_per_minute: 3,
            ..RateLimits::default()
        },
        ..SimConfig::default()
    })
    .await;
    let body = json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]});

    for remaining in ["2", "1", "0"] {
        let response = sim.post_json("/chat/completions", &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-ratelimit-remaining"], remaining);
    }

    let response = sim.post_json("/chat/completions", &body).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let headers = response.headers();
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(headers["x-ratelimit-limit"], "3");
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_exceeded");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 requests per minute")
    );

    // Other endpoints have their own windows.
    let embedding = json!({"model": "BAAI/bge-large-en-v1.5", "input": "x"});
    assert_eq!(
        sim.post_json("/embeddings", &embedding).await.status(),
        StatusCode::OK
    );

    let stats = sim.stats.snapshot();
    assert_eq!(stats.realtime_requests["/v1/chat/completions"], 4);
    assert_eq!(stats.realtime_max_per_minute["/v1/chat/completions"], 3);
    assert_eq!(stats.realtime_requests["/v1/embeddings"], 1);
    assert_eq!(stats.rate_limited, 1);
}

#[tokio::test]
async fn requests_without_key_get_401() {
    let sim = TestSim::quick().await;

    let response = sim.client.get(sim.url("/models")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["param"].is_null());

    let empty_key = sim
        .client
        .get(sim.url("/batches"))
        .header("authorization", "Bearer ")
        .send()
        .await
        .unwrap();
    assert_eq!(empty_key.status(), StatusCode::UNAUTHORIZED);

    // The stats route is outside the API and needs no key.
    let stats = sim
        .client
        .get(format!("{}/_sim/stats", sim.origin()))
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), StatusCode::OK);
}

#[tokio::test]
async fn bind_rejects_non_loopback_addresses() {
    for addr in ["0.0.0.0:0", "10.1.2.3:0", "[::]:0", "[::ffff:127.0.0.1]:0"] {
        let addr: SocketAddr = addr.parse().unwrap();
        let error = match Simulator::bind(addr, SimConfig::default()).await {
            Ok(_) => panic!("{addr} was accepted"),
            Err(error) => error,
        };
        assert!(
            matches!(error, SimulateError::NotLoopback { .. }),
            "{error}"
        );
        let message = error.to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(message.contains("loopback"), "{message}");
    }
}

#[tokio::test]
async fn stats_count_batches_and_uploads() {
    let sim = TestSim::slow().await;
    let small = sim
        .upload("small.jsonl", &jsonl(&[chat_line("a", CHAT_MODEL, "one")]))
        .await;
    let large_lines: Vec<String> = (0..5)
        .map(|i| chat_line(&format!("l-{i}"), CHAT_MODEL, "q"))
        .collect();
    let large = sim.upload("large.jsonl", &jsonl(&large_lines)).await;
    sim.create_batch(&small).await;
    sim.create_batch(&large).await;
    let embedding = json!({"model": "BAAI/bge-large-en-v1.5", "input": ["a", "b"]});
    sim.post_json("/embeddings", &embedding).await;

    let stats = sim.stats.snapshot();
    assert_eq!(stats.batches_created, 2);
    assert_eq!(stats.max_batch_lines, 5);
    assert_eq!(stats.batch_lines_total, 6);
    assert_eq!(stats.max_batches_in_flight, 2);
    assert_eq!(stats.files_uploaded, 2);
    assert_eq!(stats.embedding_max_inputs, 2);
    assert_eq!(stats.rate_limited, 0);

    let served: SimStats = sim
        .client
        .get(format!("{}/_sim/stats", sim.origin()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, stats);
}

#[tokio::test]
async fn cli_prints_base_url_and_stops_on_sigterm() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["simulate", "--listen", "127.0.0.1:0", "--turnaround", "0.2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let base_url = lines.next_line().await.unwrap().unwrap();
    assert!(base_url.starts_with("http://127.0.0.1:"), "{base_url}");
    assert!(base_url.ends_with("/v1"), "{base_url}");

    let models = reqwest::Client::new()
        .get(format!("{base_url}/models"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), StatusCode::OK);

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the simulator did not stop after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn cli_rejects_non_loopback_listen() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["simulate", "--listen", "0.0.0.0:8080"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("only loopback addresses"), "{stderr}");
    assert!(stderr.contains("0.0.0.0:8080"), "{stderr}");
}
