//! End to end on the real example input: the simulator, the real daemon binary, all 1,638
//! items, and what the provider saw.

mod common;

use std::collections::HashMap;

use batchd::simulate::{RateLimits, SimConfig, embedding_vector};
use common::{Daemon, Sim, examples_dir, last_user_message, read_jsonl};
use serde_json::Value;
use sqlx::Row;

const CHAT_PER_MINUTE: u32 = 240;
const EMBEDDINGS_PER_MINUTE: u32 = 120;

/// Daemon settings of this test: short waits, and real-time rates set to the simulator's own
/// limits, so any request over the rate would come back as a 429.
fn daemon_settings() -> String {
    format!(
        "[ingest]\nsettle_secs = 0.2\n\n\
         [batch]\nmax_linger_secs = 0.5\npoll_interval_secs = 0.2\n\n\
         [realtime]\nchat_per_minute = {CHAT_PER_MINUTE}\nembeddings_per_minute = {EMBEDDINGS_PER_MINUTE}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_files_all_succeed_within_provider_limits() {
    let sim = Sim::start(SimConfig {
        turnaround: std::time::Duration::from_millis(800),
        limits: RateLimits {
            chat_per_minute: CHAT_PER_MINUTE,
            embeddings_per_minute: EMBEDDINGS_PER_MINUTE,
            ..RateLimits::default()
        },
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(&sim.base_url, &daemon_settings());

    let names = [
        "gsm8k-test-chat.jsonl",
        "gsm8k-answers-embed.jsonl",
        "gsm8k-urgent-chat.jsonl",
    ];
    let mut requests: HashMap<String, Value> = HashMap::new();
    // The urgent file repeats questions of the chat file with other parameters, so urgent
    // requests are identified by their whole body.
    let mut urgent_bodies = Vec::new();
    for name in names {
        let path = examples_dir().join(name);
        for line in read_jsonl(&path) {
            if line["urgent"] == Value::Bool(true) {
                urgent_bodies.push(line["body"].clone());
            }
            requests.insert(line["custom_id"].as_str().unwrap().to_string(), line);
        }
        daemon.drop_file(name, &std::fs::read(&path).unwrap());
    }
    assert_eq!(requests.len(), 1638);
    assert_eq!(urgent_bodies.len(), 19);

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 1638).await;

    // Every item succeeded, and its response belongs to its own request.
    let rows = sqlx::query("SELECT custom_id, state, status_code, response, path FROM results")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1638);
    for row in &rows {
        let custom_id: String = row.get("custom_id");
        let state: String = row.get("state");
        assert_eq!(state, "succeeded", "{custom_id} ended {state}");
        assert_eq!(row.get::<i64, _>("status_code"), 200, "{custom_id}");
        let response: Value = serde_json::from_str(&row.get::<String, _>("response")).unwrap();
        let request = &requests[&custom_id]["body"];
        if request.get("messages").is_some() {
            let content = response["choices"][0]["message"]["content"]
                .as_str()
                .unwrap();
            let question = last_user_message(request);
            assert!(
                content.starts_with(&question),
                "{custom_id} got the answer to another request"
            );
        } else {
            let expected = embedding_vector(request["input"].as_str().unwrap());
            let got: Vec<f32> =
                serde_json::from_value(response["data"][0]["embedding"].clone()).unwrap();
            assert_eq!(got, expected, "{custom_id} got another input's embedding");
        }
    }

    // Batches: within the caps, chat only, and every batchable item sent in exactly one.
    let stats = sim.stats.snapshot();
    assert!(
        stats.max_batch_lines <= 100,
        "a batch held {} lines",
        stats.max_batch_lines
    );
    assert!(
        stats.max_batches_in_flight <= 10,
        "{} batch jobs were in flight",
        stats.max_batches_in_flight
    );
    assert_eq!(
        stats.batches_created, 14,
        "1,319 chat items make 14 batches of at most 100"
    );
    assert_eq!(stats.batch_lines_total, 1319);

    // Urgent items never went into a batch, as the provider's stored files show.
    let client = reqwest::Client::new();
    let files: Value = client
        .get(format!("{}/files", sim.base_url))
        .bearer_auth("test-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut batched = 0;
    for file in files["data"].as_array().unwrap() {
        if file["purpose"] != "batch-api" {
            continue;
        }
        let content = client
            .get(format!(
                "{}/files/{}/content",
                sim.base_url,
                file["id"].as_str().unwrap()
            ))
            .bearer_auth("test-key")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in content.lines() {
            let line: Value = serde_json::from_str(line).unwrap();
            assert!(line["custom_id"].as_str().unwrap().len() <= 64);
            assert!(
                !urgent_bodies.contains(&line["body"]),
                "an urgent item was batched: {}",
                line["body"]
            );
            batched += 1;
        }
    }
    assert_eq!(batched, 1319);

    // Real time: embeddings coalesced, and no endpoint over its configured rate.
    assert!(
        stats.embedding_max_inputs <= 20,
        "an embedding request carried {} inputs",
        stats.embedding_max_inputs
    );
    assert!(
        stats.embedding_max_inputs > 1,
        "embedding inputs were never coalesced"
    );
    assert_eq!(
        stats.realtime_requests.get("/v1/embeddings").copied(),
        Some(15),
        "300 inputs make 15 requests of 20"
    );
    assert_eq!(
        stats.realtime_requests.get("/v1/chat/completions").copied(),
        Some(19)
    );
    let per_minute = |path: &str| {
        stats
            .realtime_max_per_minute
            .get(path)
            .copied()
            .unwrap_or(0)
    };
    assert!(per_minute("/v1/chat/completions") <= CHAT_PER_MINUTE as u64);
    assert!(per_minute("/v1/embeddings") <= EMBEDDINGS_PER_MINUTE as u64);
    assert_eq!(
        stats.rate_limited, 0,
        "the simulator refused requests over its limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_are_reported_and_good_lines_ingested() {
    let sim = Sim::start(SimConfig {
        turnaround: std::time::Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(&sim.base_url, &daemon_settings());
    let good = r#"{"custom_id": "ok-1", "body": {"model": "meta-llama/Llama-3.3-70B-Instruct-Turbo", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}}"#;
    let content = format!(
        "{good}\nnot json at all\n{{\"body\": {{\"model\": \"m\", \"messages\": []}}}}\n{{\"custom_id\": \"no-body\"}}\n\n{}\n",
        good.replace("ok-1", "ok-2")
    );
    daemon.drop_file("mixed.jsonl", content.as_bytes());

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 2).await;
    let report_path = daemon.path("processed/mixed.jsonl.report.json");
    common::wait_for(|| report_path.exists(), "the report");
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["items"], 2);
    assert_eq!(report["error_count"], 3);
    let inbox_path = daemon.path("inbox/mixed.jsonl").display().to_string();
    let messages: Vec<&str> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        messages[0].starts_with(&format!("{inbox_path}:2: not valid JSON")),
        "{}",
        messages[0]
    );
    assert!(
        messages[1].starts_with(&format!("{inbox_path}:3: missing \"custom_id\"")),
        "{}",
        messages[1]
    );
    assert!(
        messages[2].starts_with(&format!("{inbox_path}:4: missing \"body\"")),
        "{}",
        messages[2]
    );
    assert!(daemon.path("processed/mixed.jsonl").exists());
    assert!(!daemon.path("inbox/mixed.jsonl").exists());

    let states: Vec<String> = sqlx::query_scalar(
        "SELECT state FROM results WHERE input_file = 'mixed.jsonl' ORDER BY line_no",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(states, vec!["succeeded", "succeeded"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_counts_items_by_state() {
    let sim = Sim::start(SimConfig {
        turnaround: std::time::Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let mut daemon = Daemon::start(&sim.base_url, &daemon_settings());
    let path = examples_dir().join("gsm8k-urgent-chat.jsonl");
    daemon.drop_file("urgent.jsonl", &std::fs::read(&path).unwrap());
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 19).await;

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["status", "--json", "--config"])
        .arg(&daemon.config_path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["items"]["succeeded"], 19);
    assert_eq!(status["items"]["total"], 19);
    for state in ["queued", "packed", "submitted", "in_flight", "failed"] {
        assert_eq!(status["items"][state], 0, "{state}");
    }
    assert!(
        daemon.stop().success(),
        "SIGTERM ends the daemon with status 0"
    );
}
