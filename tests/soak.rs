//! Soak: thousands of mixed items (batch chat, urgent chat, embeddings) through every fault at
//! once. Every item must end terminal and every response must belong to its own request.
//!
//! `BATCHD_SOAK_ITEMS` sets the size (default 5,000; a fifth urgent chat, a fifth embeddings,
//! the rest batch chat).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use batchd::simulate::{Faults, RateLimits, RetryAfterStyle, SimConfig};
use common::{Daemon, Sim, assert_answers_request};
use serde_json::{Value, json};
use sqlx::Row;

const CHAT_MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const EMBEDDING_MODEL: &str = "BAAI/bge-large-en-v1.5";

fn soak_size() -> usize {
    std::env::var("BATCHD_SOAK_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000)
}

/// Input files as (file name, lines).
type InputFiles = Vec<(String, Vec<String>)>;

/// Builds the input files, and every request keyed by its custom_id.
fn build_input(size: usize) -> (InputFiles, HashMap<String, Value>) {
    let mut requests = HashMap::new();
    let mut files = Vec::new();
    let fifth = size / 5;
    let kinds = [
        ("batch", size - 2 * fifth),
        ("urgent", fifth),
        ("embed", fifth),
    ];
    for (kind, count) in kinds {
        let mut lines = Vec::new();
        for i in 0..count {
            let id = format!("{kind}-{i:05}");
            let line = match kind {
                "embed" => {
                    json!({"custom_id": id, "body": {"model": EMBEDDING_MODEL, "input": format!("passage {i} of the soak corpus")}})
                }
                _ => {
                    json!({"custom_id": id, "urgent": kind == "urgent", "body": {"model": CHAT_MODEL,
                    "messages": [{"role": "user", "content": format!("{kind} question number {i}")}]}})
                }
            };
            lines.push(line.to_string());
            requests.insert(id, line);
        }
        // Split into files of at most 1,000 lines, as users drop them.
        for (n, chunk) in lines.chunks(1000).enumerate() {
            files.push((format!("{kind}-{n}.jsonl"), chunk.to_vec()));
        }
    }
    (files, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_items_survive_every_fault() {
    let size = soak_size();
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(500),
        seed: 7,
        limits: RateLimits {
            chat_per_minute: 1_000_000,
            completions_per_minute: 1_000_000,
            embeddings_per_minute: 1_000_000,
            images_per_minute: 1_000_000,
        },
        faults: Faults {
            server_error_rate: 0.10,
            rate_limit_rate: 0.05,
            retry_after: RetryAfterStyle::Millis,
            retry_after_secs: 0.05,
            drop_rate: 0.01,
            batch_expire_rate: 0.05,
            // Jobs that expire run until this deadline, so keep it short.
            job_deadline_secs: 3.0,
            batch_fail_rate: 0.05,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\n\n\
         [batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\nmax_attempts = 12\ncapacity_cooldown_secs = 0.2\n\n\
         [realtime]\nchat_per_minute = 600000\nembeddings_per_minute = 600000\nmax_concurrency = 32\n\
         backoff_initial_secs = 0.02\nbackoff_max_secs = 0.5\nmax_attempts = 12\n",
    );
    let (files, requests) = build_input(size);
    for (name, lines) in &files {
        daemon.drop_file(name, lines.join("\n").as_bytes());
    }

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, size as i64).await;

    let rows = sqlx::query("SELECT custom_id, state, response, error, attempts, path FROM results")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(rows.len(), size);
    let mut retries: HashMap<String, i64> = HashMap::new();
    let mut failed = Vec::new();
    for row in &rows {
        let id: String = row.get("custom_id");
        let state: String = row.get("state");
        let attempts: i64 = row.get("attempts");
        *retries.entry(row.get("path")).or_default() += attempts - 1;
        if state != "succeeded" {
            failed.push(format!(
                "{id}: {}",
                row.get::<Option<String>, _>("error").unwrap_or_default()
            ));
            continue;
        }
        let response: Value = serde_json::from_str(&row.get::<String, _>("response")).unwrap();
        let body = &requests[&id]["body"];
        assert_answers_request(&id, body, &response);
    }
    assert!(
        failed.is_empty(),
        "{} items failed, first: {:?}",
        failed.len(),
        failed.first()
    );

    let stats = sim.stats.snapshot();
    let jobs: Vec<(String, i64)> =
        sqlx::query("SELECT provider_status, COUNT(*) AS n FROM batches GROUP BY 1")
            .fetch_all(&db)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get("provider_status"), r.get("n")))
            .collect();
    eprintln!(
        "soak summary: {size} items succeeded; retries by path {retries:?}; batch jobs by status {jobs:?}; \
         faults injected {:?}; real-time requests {:?}",
        stats.faults_injected, stats.realtime_requests
    );
}
