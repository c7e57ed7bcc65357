//! Drives the simulator's fault injection over HTTP as a client would: one test per fault, the
//! new batch validation rules, the request log and the stats, and the determinism of fault
//! decisions under a seed. Each test starts its own simulator on 127.0.0.1 with port 0. Batch
//! jobs use turnarounds and deadlines under a second and are polled in bounded loops; no test
//! asserts how long anything took.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use batchd::simulate::{
    Faults, RateLimitKind, RateLimits, RequestRecord, RetryAfterStyle, SimConfig, SimStatsHandle,
    Simulator, StatusCase, Window,
};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const API_KEY: &str = "test-key";
const CHAT_MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const OTHER_CHAT_MODEL: &str = "Qwen/Qwen2.5-7B-Instruct-Turbo";
const EMBEDDING_MODEL: &str = "BAAI/bge-large-en-v1.5";
const QUICK_TURNAROUND: Duration = Duration::from_millis(200);
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
            client: reqwest::Client::new(),
            cancel: cancel.clone(),
        };
        tokio::spawn(simulator.run(cancel));
        sim
    }

    /// Starts a simulator with a quick turnaround and these faults.
    async fn with_faults(faults: Faults) -> TestSim {
        TestSim::start(SimConfig {
            turnaround: QUICK_TURNAROUND,
            faults,
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

    async fn try_post_json(&self, path: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(self.url(path))
            .bearer_auth(API_KEY)
            .json(body)
            .send()
            .await
    }

    async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.try_post_json(path, body).await.unwrap()
    }

    async fn chat(&self, model: &str, question: &str) -> reqwest::Response {
        self.post_json("/chat/completions", &chat_body(model, question))
            .await
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

    async fn create_batch(&self, input_file_id: &str) -> reqwest::Response {
        let body = json!({"endpoint": "/v1/chat/completions", "input_file_id": input_file_id});
        self.post_json("/batches", &body).await
    }

    /// Creates a batch, expecting success, and returns the job.
    async fn create_job(&self, input_file_id: &str) -> Value {
        let response = self.create_batch(input_file_id).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let created: Value = response.json().await.unwrap();
        created["job"].clone()
    }

    async fn job(&self, batch_id: &str) -> Value {
        self.get(&format!("/batches/{batch_id}"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// Polls the batch until its status differs from `status` and returns the job.
    async fn wait_while(&self, batch_id: &str, status: &str) -> Value {
        for _ in 0..MAX_POLLS {
            let job = self.job(batch_id).await;
            if job["status"] != status {
                return job;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        panic!("batch {batch_id} stayed {status} for {MAX_POLLS} polls");
    }

    /// Polls the batch until it is terminal, in any letter case, and returns the job.
    async fn wait_for_end(&self, batch_id: &str) -> Value {
        for _ in 0..MAX_POLLS {
            let job = self.job(batch_id).await;
            let status = job["status"].as_str().unwrap().to_uppercase();
            if matches!(
                status.as_str(),
                "COMPLETED" | "FAILED" | "EXPIRED" | "CANCELLED"
            ) {
                return job;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        panic!("batch {batch_id} did not end within {MAX_POLLS} polls");
    }

    async fn content(&self, file_id: &str) -> String {
        let response = self.get(&format!("/files/{file_id}/content")).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    }

    async fn requests(&self) -> Vec<RequestRecord> {
        self.client
            .get(format!("{}/_sim/requests", self.origin()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    fn faults_injected(&self, name: &str) -> u64 {
        self.stats
            .snapshot()
            .faults_injected
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

fn chat_body(model: &str, question: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": question}]})
}

fn chat_line(custom_id: &str, model: &str, question: &str) -> String {
    json!({
        "custom_id": custom_id,
        "body": {"model": model, "messages": [{"role": "user", "content": question}]},
    })
    .to_string()
}

/// Returns a file of `count` chat lines with ids `prefix-0`, `prefix-1`, ...
fn chat_file(prefix: &str, count: usize) -> String {
    (0..count)
        .map(|i| {
            chat_line(
                &format!("{prefix}-{i}"),
                CHAT_MODEL,
                &format!("question {i}"),
            ) + "\n"
        })
        .collect()
}

fn custom_ids(text: &str) -> Vec<String> {
    let mut ids: Vec<String> = text
        .lines()
        .map(|line| {
            let line: Value = serde_json::from_str(line).unwrap();
            line["custom_id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.sort();
    ids
}

fn always_rate_limited(kind: RateLimitKind, style: RetryAfterStyle) -> Faults {
    Faults {
        rate_limit_rate: 1.0,
        rate_limit_kind: kind,
        retry_after: style,
        retry_after_secs: 2.5,
        ..Faults::default()
    }
}

#[tokio::test]
async fn injected_429_bodies_follow_kind() {
    let cases = [
        (
            RateLimitKind::RequestLimited,
            "dynamic_request_limited",
            None,
        ),
        (RateLimitKind::TokenLimited, "dynamic_token_limited", None),
        (
            RateLimitKind::InsufficientQuota,
            "insufficient_quota",
            Some("insufficient_quota"),
        ),
    ];
    for (kind, error_type, code) in cases {
        let sim = TestSim::with_faults(always_rate_limited(kind, RetryAfterStyle::Seconds)).await;
        let response = sim.chat(CHAT_MODEL, "hi").await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{kind:?}");
        assert!(response.headers().contains_key("x-ratelimit-limit"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], error_type, "{kind:?}");
        assert_eq!(body["error"]["code"].as_str(), code, "{kind:?}");
        let message = body["error"]["message"].as_str().unwrap();
        if kind == RateLimitKind::InsufficientQuota {
            assert!(message.contains("out of credit"), "{message}");
        } else {
            assert!(message.contains(CHAT_MODEL), "{message}");
        }
        assert_eq!(sim.faults_injected("rate_limit"), 1);
        assert_eq!(sim.stats.snapshot().rate_limited, 1);
    }
}

#[tokio::test]
async fn retry_after_styles_on_injected_429() {
    let seconds = TestSim::with_faults(always_rate_limited(
        RateLimitKind::RequestLimited,
        RetryAfterStyle::Seconds,
    ))
    .await;
    let response = seconds.chat(CHAT_MODEL, "hi").await;
    assert_eq!(response.headers()["retry-after"], "3");
    assert!(!response.headers().contains_key("retry-after-ms"));

    let millis = TestSim::with_faults(always_rate_limited(
        RateLimitKind::RequestLimited,
        RetryAfterStyle::Millis,
    ))
    .await;
    let response = millis.chat(CHAT_MODEL, "hi").await;
    assert_eq!(response.headers()["retry-after-ms"], "2500");
    assert!(!response.headers().contains_key("retry-after"));

    let date = TestSim::with_faults(always_rate_limited(
        RateLimitKind::RequestLimited,
        RetryAfterStyle::HttpDate,
    ))
    .await;
    let before = SystemTime::now();
    let response = date.chat(CHAT_MODEL, "hi").await;
    let value = response.headers()["retry-after"].to_str().unwrap();
    let at = httpdate::parse_http_date(value).unwrap();
    assert!(at > before, "Retry-After {value} is not in the future");

    let absent = TestSim::with_faults(always_rate_limited(
        RateLimitKind::RequestLimited,
        RetryAfterStyle::Absent,
    ))
    .await;
    let response = absent.chat(CHAT_MODEL, "hi").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(!response.headers().contains_key("retry-after"));
    assert!(!response.headers().contains_key("retry-after-ms"));
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(response.headers().contains_key(name), "{name} missing");
    }
}

#[tokio::test]
async fn retry_after_style_applies_to_window_429() {
    let sim = TestSim::start(SimConfig {
        limits: RateLimits {
            chat_per_minute: 1,
            ..RateLimits::default()
        },
        faults: Faults {
            retry_after: RetryAfterStyle::Millis,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    assert_eq!(sim.chat(CHAT_MODEL, "one").await.status(), StatusCode::OK);

    let response = sim.chat(CHAT_MODEL, "two").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(!response.headers().contains_key("retry-after"));
    let millis: u64 = response.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1_000..=60_000).contains(&millis),
        "retry-after-ms {millis}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    // A window 429 is the real limit, not an injected fault.
    assert!(sim.stats.snapshot().faults_injected.is_empty());
}

#[tokio::test]
async fn overload_window_returns_503() {
    let sim = TestSim::with_faults(Faults {
        overload_windows: vec![Window {
            start_secs: 0.0,
            end_secs: 3_600.0,
        }],
        ..Faults::default()
    })
    .await;
    let response = sim.chat(CHAT_MODEL, "hi").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "The server is overloaded or not ready yet."
    );
    assert_eq!(body["error"]["type"], "service_unavailable");
    let embedding = json!({"model": EMBEDDING_MODEL, "input": "x"});
    assert_eq!(
        sim.post_json("/embeddings", &embedding).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(sim.faults_injected("overload_window"), 2);

    // A window that opens in an hour leaves requests alone now.
    let later = TestSim::with_faults(Faults {
        overload_windows: vec![Window {
            start_secs: 3_600.0,
            end_secs: 7_200.0,
        }],
        ..Faults::default()
    })
    .await;
    assert_eq!(later.chat(CHAT_MODEL, "hi").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn overloaded_model_returns_503() {
    let sim = TestSim::with_faults(Faults {
        overloaded_models: vec![CHAT_MODEL.to_owned()],
        ..Faults::default()
    })
    .await;
    let response = sim.chat(CHAT_MODEL, "hi").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "service_unavailable");
    assert_eq!(
        sim.chat(OTHER_CHAT_MODEL, "hi").await.status(),
        StatusCode::OK
    );
    assert_eq!(sim.faults_injected("overloaded_model"), 1);
}

#[tokio::test]
async fn server_errors_are_500_or_502() {
    let sim = TestSim::with_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..20 {
        let response = sim.chat(CHAT_MODEL, &format!("question {i}")).await;
        let status = response.status();
        assert!(
            status == StatusCode::INTERNAL_SERVER_ERROR || status == StatusCode::BAD_GATEWAY,
            "{status}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "server_error");
        assert!(body["error"]["message"].is_string());
        statuses.push(status);
    }
    assert!(statuses.contains(&StatusCode::INTERNAL_SERVER_ERROR));
    assert!(statuses.contains(&StatusCode::BAD_GATEWAY));
    assert_eq!(sim.faults_injected("server_error"), 20);
}

#[tokio::test]
async fn dropped_connection_is_transport_error() {
    let sim = TestSim::with_faults(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let error = sim
        .try_post_json("/chat/completions", &chat_body(CHAT_MODEL, "hi"))
        .await
        .expect_err("a dropped connection must not produce a response");
    assert!(error.status().is_none(), "{error:?}");
    assert!(error.is_request() || error.is_body(), "{error:?}");

    let requests = sim.requests().await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert_eq!(requests[0].status, 0);
    assert_eq!(sim.faults_injected("dropped_connection"), 1);

    // Other routes still respond, on new connections.
    assert_eq!(sim.get("/models").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn realtime_paths_limit_the_faults() {
    let sim = TestSim::with_faults(Faults {
        realtime_paths: vec!["/v1/embeddings".to_owned()],
        server_error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    assert_eq!(sim.chat(CHAT_MODEL, "hi").await.status(), StatusCode::OK);
    let embedding = json!({"model": EMBEDDING_MODEL, "input": "x"});
    assert!(
        sim.post_json("/embeddings", &embedding)
            .await
            .status()
            .is_server_error()
    );
}

#[tokio::test]
async fn should_retry_header_on_errors() {
    let sim = TestSim::with_faults(Faults {
        should_retry: Some(false),
        overloaded_models: vec![CHAT_MODEL.to_owned()],
        ..Faults::default()
    })
    .await;
    let overloaded = sim.chat(CHAT_MODEL, "hi").await;
    assert_eq!(overloaded.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(overloaded.headers()["x-should-retry"], "false");

    let missing_batch = sim.get("/batches/no-such-batch").await;
    assert_eq!(missing_batch.status(), StatusCode::NOT_FOUND);
    assert_eq!(missing_batch.headers()["x-should-retry"], "false");

    let ok = sim.chat(OTHER_CHAT_MODEL, "hi").await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(!ok.headers().contains_key("x-should-retry"));

    let retry = TestSim::with_faults(Faults {
        should_retry: Some(true),
        server_error_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let response = retry.chat(CHAT_MODEL, "hi").await;
    assert_eq!(response.headers()["x-should-retry"], "true");
}

#[tokio::test]
async fn token_limit_headers_count_down() {
    let sim = TestSim::with_faults(Faults {
        token_limit_per_minute: Some(10),
        ..Faults::default()
    })
    .await;
    let without = TestSim::with_faults(Faults::default()).await;
    let plain = without.chat(CHAT_MODEL, "one two three").await;
    assert!(!plain.headers().contains_key("x-tokenlimit-limit"));

    // The estimate counts the words of the message and of its role.
    let first = sim.chat(CHAT_MODEL, "one two three four").await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-tokenlimit-limit"], "10");
    assert_eq!(first.headers()["x-tokenlimit-remaining"], "5");
    assert!(first.headers().contains_key("x-ratelimit-remaining"));

    let second = sim.chat(CHAT_MODEL, "one two three four five six").await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.headers()["x-tokenlimit-remaining"], "0");

    let third = sim.chat(CHAT_MODEL, "one").await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.headers()["x-tokenlimit-remaining"], "0");
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["type"], "dynamic_token_limited");
}

#[tokio::test]
async fn capacity_fault_fails_batch() {
    let sim = TestSim::with_faults(Faults {
        capacity_fail_models: vec![CHAT_MODEL.to_owned()],
        ..Faults::default()
    })
    .await;
    let file_id = sim.upload("in.jsonl", &chat_file("c", 3)).await;
    let job = sim.create_job(&file_id).await;
    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "FAILED");
    assert_eq!(
        job["error"],
        format!("The model {CHAT_MODEL} is at capacity, please try again later")
    );
    assert!(job.get("output_file_id").is_none(), "{job}");
    assert!(job.get("error_file_id").is_none(), "{job}");
    assert_eq!(sim.faults_injected("batch_capacity"), 1);

    let by_rate = TestSim::with_faults(Faults {
        batch_fail_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let file_id = by_rate.upload("in.jsonl", &chat_file("r", 2)).await;
    let job = by_rate.create_job(&file_id).await;
    let job = by_rate.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "FAILED");
    assert!(
        job["error"].as_str().unwrap().contains("is at capacity"),
        "{job}"
    );
}

#[tokio::test]
async fn expired_batch_keeps_completed_fraction() {
    let sim = TestSim::with_faults(Faults {
        batch_expire_rate: 1.0,
        job_deadline_secs: 0.4,
        ..Faults::default()
    })
    .await;
    let file_id = sim.upload("in.jsonl", &chat_file("e", 100)).await;
    let job = sim.create_job(&file_id).await;
    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "EXPIRED");
    assert!(
        (job["progress"].as_f64().unwrap() - 60.0).abs() < 1e-9,
        "{job}"
    );
    assert!(job.get("error_file_id").is_none(), "{job}");

    let written = custom_ids(&sim.content(job["output_file_id"].as_str().unwrap()).await);
    assert_eq!(written.len(), 60);
    let all: Vec<String> = custom_ids(&chat_file("e", 100));
    let unwritten = all.iter().filter(|id| !written.contains(id)).count();
    assert_eq!(unwritten, 40);
    assert_eq!(sim.faults_injected("batch_expired"), 1);
}

#[tokio::test]
async fn line_errors_go_to_error_file() {
    let sim = TestSim::with_faults(Faults {
        line_error_rate: 0.5,
        ..Faults::default()
    })
    .await;
    let file_id = sim.upload("in.jsonl", &chat_file("l", 40)).await;
    let job = sim.create_job(&file_id).await;
    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "COMPLETED");

    let errors = sim.content(job["error_file_id"].as_str().unwrap()).await;
    for line in errors.lines() {
        let line: Value = serde_json::from_str(line).unwrap();
        assert_eq!(line["error"]["code"], "server_error");
        assert!(line["error"]["message"].is_string());
    }
    let error_ids = custom_ids(&errors);
    let output_ids = custom_ids(&sim.content(job["output_file_id"].as_str().unwrap()).await);
    assert!(!error_ids.is_empty(), "no line was moved to the error file");
    assert!(
        !output_ids.is_empty(),
        "every line was moved to the error file"
    );
    let mut every_id = [error_ids.clone(), output_ids].concat();
    every_id.sort();
    assert_eq!(every_id, custom_ids(&chat_file("l", 40)));
    assert_eq!(sim.faults_injected("line_error"), error_ids.len() as u64);
}

#[tokio::test]
async fn create_not_found_twice_then_created() {
    let sim = TestSim::with_faults(Faults {
        create_not_found: 2,
        ..Faults::default()
    })
    .await;
    let file_id = sim.upload("in.jsonl", &chat_file("n", 1)).await;
    for _ in 0..2 {
        let response = sim.create_batch(&file_id).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"error": format!("file not found: {file_id}")}));
    }
    sim.create_job(&file_id).await;

    let stats = sim.stats.snapshot();
    assert_eq!(stats.batch_create_requests, 3);
    assert_eq!(stats.batches_created, 1);
    assert_eq!(stats.faults_injected["create_not_found"], 2);
    let statuses: Vec<u16> = sim
        .requests()
        .await
        .iter()
        .filter(|record| record.path == "/v1/batches")
        .map(|record| record.status)
        .collect();
    assert_eq!(statuses, [404, 404, 201]);
}

#[tokio::test]
async fn lower_case_statuses() {
    let sim = TestSim::with_faults(Faults {
        status_case: StatusCase::Lower,
        ..Faults::default()
    })
    .await;
    let file_id = sim.upload("in.jsonl", &chat_file("s", 2)).await;
    let job = sim.create_job(&file_id).await;
    assert_eq!(job["status"], "validating");
    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed");
    let list: Value = sim.get("/batches").await.json().await.unwrap();
    assert_eq!(list[0]["status"], "completed");
}

#[tokio::test]
async fn in_progress_status_is_replaced() {
    // An expiring job with a far deadline stays in progress, whatever the machine's speed.
    let sim = TestSim::with_faults(Faults {
        in_progress_status: Some("QUEUED".to_owned()),
        batch_expire_rate: 1.0,
        job_deadline_secs: 3_600.0,
        ..Faults::default()
    })
    .await;
    let file_id = sim.upload("in.jsonl", &chat_file("q", 2)).await;
    let job = sim.create_job(&file_id).await;
    let job = sim
        .wait_while(job["id"].as_str().unwrap(), "VALIDATING")
        .await;
    assert_eq!(job["status"], "QUEUED");
    let progress = job["progress"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&progress), "{progress}");
}

#[tokio::test]
async fn stalled_batch_expires_with_nothing() {
    let sim = TestSim::start(SimConfig {
        turnaround: Duration::from_millis(50),
        faults: Faults {
            stall_batches: true,
            job_deadline_secs: 0.5,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let file_id = sim.upload("in.jsonl", &chat_file("t", 5)).await;
    let job = sim.create_job(&file_id).await;
    let batch_id = job["id"].as_str().unwrap();
    let job = sim.wait_for_end(batch_id).await;
    assert_eq!(job["status"], "EXPIRED");
    assert_eq!(job["progress"], 0.0);
    assert!(job.get("output_file_id").is_none(), "{job}");
    assert!(job.get("error_file_id").is_none(), "{job}");
    assert_eq!(sim.faults_injected("batch_stalled"), 1);
}

#[tokio::test]
async fn stalled_batch_stays_until_cancelled() {
    let sim = TestSim::with_faults(Faults {
        stall_batches: true,
        ..Faults::default()
    })
    .await;
    let file_id = sim.upload("in.jsonl", &chat_file("t", 5)).await;
    let job = sim.create_job(&file_id).await;
    let batch_id = job["id"].as_str().unwrap();
    let job = sim.wait_while(batch_id, "VALIDATING").await;
    assert_eq!(job["status"], "IN_PROGRESS");
    assert_eq!(job["progress"], 0.0);

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
    assert!(job.get("output_file_id").is_none(), "{job}");
}

#[tokio::test]
async fn non_batchable_model_fails_batch() {
    let sim = TestSim::with_faults(Faults::default()).await;
    let content = chat_line("d", "deepseek-ai/DeepSeek-V3.1", "hi");
    let file_id = sim.upload("in.jsonl", &content).await;
    let job = sim.create_job(&file_id).await;
    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "FAILED");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("deepseek-ai/DeepSeek-V3.1"), "{error}");
    assert!(error.contains("does not support batch"), "{error}");

    // A batch-level `model_id` is checked too.
    let file_id = sim.upload("ok.jsonl", &chat_file("m", 1)).await;
    let body = json!({
        "endpoint": "/v1/chat/completions",
        "input_file_id": file_id,
        "model_id": "deepseek-ai/DeepSeek-R1",
    });
    let created: Value = sim.post_json("/batches", &body).await.json().await.unwrap();
    let job = sim
        .wait_for_end(created["job"]["id"].as_str().unwrap())
        .await;
    assert_eq!(job["status"], "FAILED");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("deepseek-ai/DeepSeek-R1"),
        "{job}"
    );

    let models: Value = sim.get("/models").await.json().await.unwrap();
    for model in models.as_array().unwrap() {
        let id = model["id"].as_str().unwrap();
        let expected = !id.starts_with("deepseek-ai/") && model["type"] == "chat";
        assert_eq!(model["batchable"], expected, "{id}");
        if model["type"] == "chat" {
            assert!(model["max_output_tokens"].as_u64().unwrap() > 0, "{id}");
        }
    }
}

#[tokio::test]
async fn max_tokens_over_limit_goes_to_error_file() {
    let sim = TestSim::with_faults(Faults::default()).await;
    let big = json!({"custom_id": "big", "body": {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1_000_000,
    }});
    let content = format!("{big}\n{}\n", chat_line("fine", CHAT_MODEL, "hi"));
    let file_id = sim.upload("in.jsonl", &content).await;
    let job = sim.create_job(&file_id).await;
    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "COMPLETED");

    let errors = sim.content(job["error_file_id"].as_str().unwrap()).await;
    let line: Value = serde_json::from_str(errors.trim()).unwrap();
    assert_eq!(
        line,
        json!({"custom_id": "big", "error": {
            "message": format!(
                "max_tokens 1000000 is larger than the maximum of 8192 for model {CHAT_MODEL}"
            ),
            "code": "invalid_request",
        }})
    );
    let output = sim.content(job["output_file_id"].as_str().unwrap()).await;
    assert_eq!(custom_ids(&output), ["fine"]);
}

#[tokio::test]
async fn validation_error_names_the_line() {
    let sim = TestSim::with_faults(Faults::default()).await;
    let bad = json!({"custom_id": "bd-42", "body": {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": -5,
    }});
    let content = format!(
        "{}\n{}\n\n{bad}\n",
        chat_file("a", 1).trim(),
        chat_line("b", CHAT_MODEL, "q")
    );
    let file_id = sim.upload("in.jsonl", &content).await;
    let job = sim.create_job(&file_id).await;
    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "FAILED");
    assert_eq!(
        job["error"],
        "line 4 (custom_id \"bd-42\"): max_tokens must be a positive integer, found -5"
    );

    let no_id = sim.upload("no-id.jsonl", "{\"body\": {}}\n").await;
    let job = sim.create_job(&no_id).await;
    let job = sim.wait_for_end(job["id"].as_str().unwrap()).await;
    assert_eq!(job["error"], "line 1: missing custom_id");
}

#[tokio::test]
async fn request_log_and_new_stats() {
    let sim = TestSim::with_faults(Faults::default()).await;
    let file_id = sim.upload("in.jsonl", &chat_file("x", 2)).await;
    sim.create_job(&file_id).await;
    sim.create_job(&file_id).await;
    let other = sim.upload("other.jsonl", &chat_file("y", 1)).await;
    sim.create_job(&other).await;
    let missing = sim.create_batch("file-missing").await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    sim.chat(CHAT_MODEL, "hello").await;
    let deleted = sim
        .client
        .delete(sim.url(&format!("/files/{other}")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);

    let stats = sim.stats.snapshot();
    assert_eq!(stats.batch_create_requests, 4);
    assert_eq!(stats.batches_created, 3);
    assert_eq!(stats.max_jobs_per_input_file, 2);
    assert_eq!(stats.files_deleted, 1);
    assert!(stats.faults_injected.is_empty());

    let requests = sim.requests().await;
    let summary: Vec<(&str, &str, u16, Option<&str>)> = requests
        .iter()
        .map(|record| {
            (
                record.method.as_str(),
                record.path.as_str(),
                record.status,
                record.model.as_deref(),
            )
        })
        .collect();
    let other_path = format!("/v1/files/{other}");
    assert_eq!(
        summary,
        [
            ("POST", "/v1/files/upload", 200, None),
            ("POST", "/v1/batches", 201, None),
            ("POST", "/v1/batches", 201, None),
            ("POST", "/v1/files/upload", 200, None),
            ("POST", "/v1/batches", 201, None),
            ("POST", "/v1/batches", 400, None),
            ("POST", "/v1/chat/completions", 200, Some(CHAT_MODEL)),
            ("DELETE", other_path.as_str(), 200, None),
        ]
    );
    assert!(
        requests
            .windows(2)
            .all(|pair| pair[0].at_ms <= pair[1].at_ms),
        "{requests:?}"
    );
}

/// Sends the same 40 chat requests, each twice, concurrently and in the given order, and
/// returns what each got: its status, or 0 for a dropped connection.
async fn realtime_outcomes(sim: &TestSim, reverse: bool) -> BTreeMap<(String, usize), u16> {
    let mut questions: Vec<(String, usize)> = (0..40)
        .flat_map(|i| [(format!("question {i}"), 0), (format!("question {i}"), 1)])
        .collect();
    if reverse {
        questions.reverse();
    }
    let calls = questions.iter().map(|(question, _)| async move {
        match sim
            .try_post_json("/chat/completions", &chat_body(CHAT_MODEL, question))
            .await
        {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        }
    });
    let statuses = futures::future::join_all(calls).await;

    // Identical requests share a key, so only how many of them got each status is fixed.
    let mut outcomes: BTreeMap<(String, usize), u16> = BTreeMap::new();
    let mut by_question: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for ((question, _), status) in questions.into_iter().zip(statuses) {
        by_question.entry(question).or_default().push(status);
    }
    for (question, mut statuses) in by_question {
        statuses.sort();
        for (copy, status) in statuses.into_iter().enumerate() {
            outcomes.insert((question.clone(), copy), status);
        }
    }
    outcomes
}

fn mixed_faults() -> Faults {
    Faults {
        rate_limit_rate: 0.2,
        server_error_rate: 0.2,
        drop_rate: 0.1,
        latency_max_ms: 5,
        ..Faults::default()
    }
}

async fn seeded(seed: u64, faults: Faults) -> TestSim {
    TestSim::start(SimConfig {
        turnaround: QUICK_TURNAROUND,
        seed,
        faults,
        ..SimConfig::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_realtime_faults() {
    let first = seeded(11, mixed_faults()).await;
    let second = seeded(11, mixed_faults()).await;
    let other_seed = seeded(12, mixed_faults()).await;

    let outcomes = realtime_outcomes(&first, false).await;
    assert_eq!(outcomes, realtime_outcomes(&second, true).await);
    assert_ne!(outcomes, realtime_outcomes(&other_seed, false).await);

    let distinct: std::collections::BTreeSet<u16> = outcomes.values().copied().collect();
    assert!(distinct.contains(&200), "{distinct:?}");
    assert!(
        distinct.len() >= 3,
        "too few kinds of outcome: {distinct:?}"
    );
    assert_eq!(
        first.stats.snapshot().faults_injected,
        second.stats.snapshot().faults_injected
    );
}

/// Uploads 12 different files, starts one job for each, and returns each file's end status
/// and number of error lines, keyed by the file's first custom_id.
async fn batch_outcomes(sim: &TestSim) -> BTreeMap<String, (String, usize)> {
    let mut jobs = Vec::new();
    for i in 0..12 {
        let prefix = format!("f{i}");
        let file_id = sim.upload("in.jsonl", &chat_file(&prefix, 10)).await;
        let job = sim.create_job(&file_id).await;
        jobs.push((prefix, job["id"].as_str().unwrap().to_owned()));
    }
    let mut outcomes = BTreeMap::new();
    for (prefix, batch_id) in jobs {
        let job = sim.wait_for_end(&batch_id).await;
        let error_lines = match job["error_file_id"].as_str() {
            Some(file_id) => sim.content(file_id).await.lines().count(),
            None => 0,
        };
        outcomes.insert(
            prefix,
            (job["status"].as_str().unwrap().to_owned(), error_lines),
        );
    }
    outcomes
}

#[tokio::test]
async fn same_seed_same_batch_faults() {
    let faults = || Faults {
        batch_fail_rate: 0.3,
        line_error_rate: 0.3,
        ..Faults::default()
    };
    let first = seeded(5, faults()).await;
    let second = seeded(5, faults()).await;
    let outcomes = batch_outcomes(&first).await;
    assert_eq!(outcomes, batch_outcomes(&second).await);

    let statuses: Vec<&str> = outcomes
        .values()
        .map(|(status, _)| status.as_str())
        .collect();
    assert!(statuses.contains(&"FAILED"), "{outcomes:?}");
    assert!(statuses.contains(&"COMPLETED"), "{outcomes:?}");
}

#[tokio::test]
async fn cli_reads_fault_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faults.toml");
    std::fs::write(&path, "server_error_rate = 1.0\nshould_retry = true\n").unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["simulate", "--listen", "127.0.0.1:0", "--faults"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let base_url = lines.next_line().await.unwrap().unwrap();

    let response = reqwest::Client::new()
        .post(format!("{base_url}/chat/completions"))
        .bearer_auth(API_KEY)
        .json(&chat_body(CHAT_MODEL, "hi"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_server_error(), "{}", response.status());
    assert_eq!(response.headers()["x-should-retry"], "true");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn cli_rejects_bad_fault_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faults.toml");
    std::fs::write(
        &path,
        "drop_rate = 2.0\nlatency_min_ms = 9\nlatency_max_ms = 1\n",
    )
    .unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["simulate", "--listen", "127.0.0.1:0", "--faults"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`drop_rate` is 2"), "{stderr}");
    assert!(stderr.contains("latency_min_ms"), "{stderr}");

    std::fs::write(&path, "no_such_fault = true\n").unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["simulate", "--listen", "127.0.0.1:0", "--faults"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no_such_fault"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}
