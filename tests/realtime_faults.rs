//! The daemon under real-time faults: 429s of each kind, overloads with a fallback model.

mod common;

use std::time::{Duration, Instant};

use batchd::simulate::{Faults, RateLimitKind, RetryAfterStyle, SimConfig};
use common::{Daemon, Sim};
use serde_json::{Value, json};
use sqlx::Row;

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const FALLBACK: &str = "Qwen/Qwen2.5-7B-Instruct-Turbo";
const CHAT: &str = "/v1/chat/completions";

fn urgent_chat(count: usize) -> Vec<u8> {
    (0..count)
        .map(|i| {
            json!({"custom_id": format!("u{i:02}"), "urgent": true, "body": {"model": MODEL,
                "messages": [{"role": "user", "content": format!("urgent question {i}")}]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

async fn chat_requests(sim: &Sim) -> Vec<Value> {
    let all: Vec<Value> = reqwest::get(sim.base_url.replace("/v1", "/_sim/requests"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    all.into_iter().filter(|r| r["path"] == CHAT).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_credit_pauses_without_retry_storm() {
    let sim = Sim::start(SimConfig {
        faults: Faults {
            realtime_paths: vec![CHAT.into()],
            rate_limit_rate: 1.0,
            rate_limit_kind: RateLimitKind::InsufficientQuota,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\n\n[realtime]\nout_of_credit_pause_secs = 600\n",
    );
    daemon.drop_file("urgent.jsonl", &urgent_chat(20));

    let started = Instant::now();
    while chat_requests(&sim).await.is_empty() {
        assert!(started.elapsed() < common::PATIENCE, "no request arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Calls already past the limiter when the first 429 arrived may still land; after that,
    // the endpoint stays quiet for the whole pause.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = chat_requests(&sim).await.len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = chat_requests(&sim).await.len();
    assert_eq!(later, settled, "requests went on during the pause");
    assert!(settled <= 20, "{settled} requests for 20 items");

    let db = daemon.db().await;
    let rows = sqlx::query("SELECT state, attempts FROM results")
        .fetch_all(&db)
        .await
        .unwrap();
    for row in &rows {
        // One item may sit claimed at the paused limiter; none is finished or retried.
        let state: String = row.get("state");
        assert!(state == "queued" || state == "in_flight", "{state}");
        assert_eq!(row.get::<i64, _>("attempts"), 0, "a 429 used up an attempt");
    }
    let log = daemon.log();
    assert!(log.contains("ERROR"), "{log}");
    assert!(log.contains("out of credit"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_limited_retry_waits_for_retry_after() {
    let sim = Sim::start(SimConfig {
        faults: Faults {
            rate_limit_first: 1,
            rate_limit_kind: RateLimitKind::RequestLimited,
            retry_after: RetryAfterStyle::Seconds,
            retry_after_secs: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(&sim.base_url, "[ingest]\nsettle_secs = 0.2\n");
    daemon.drop_file("one.jsonl", &urgent_chat(1));

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 1).await;
    let state: String = sqlx::query_scalar("SELECT state FROM results")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(state, "succeeded");
    let requests = chat_requests(&sim).await;
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0]["status"], 429);
    assert_eq!(requests[1]["status"], 200);
    let gap = requests[1]["at_ms"].as_u64().unwrap() - requests[0]["at_ms"].as_u64().unwrap();
    assert!(gap >= 1000, "retried after {gap} ms, before Retry-After");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_retries_are_spread_by_jitter() {
    const RATE: u32 = 600;
    let sim = Sim::start(SimConfig {
        faults: Faults {
            rate_limit_first: 1,
            retry_after: RetryAfterStyle::Absent,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        &format!(
            "[ingest]\nsettle_secs = 0.2\n\n[realtime]\nchat_per_minute = {RATE}\nbackoff_initial_secs = 1.0\n"
        ),
    );
    daemon.drop_file("urgent.jsonl", &urgent_chat(20));

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 20).await;
    let requests = chat_requests(&sim).await;
    let first: Vec<u64> = requests
        .iter()
        .filter(|r| r["status"] == 429)
        .map(|r| r["at_ms"].as_u64().unwrap())
        .collect();
    let retries: Vec<u64> = requests
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| r["at_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(first.len(), 20);
    assert_eq!(retries.len(), 20);
    let mut distinct = retries.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= 10,
        "retries bunched at {} instants",
        distinct.len()
    );
    let spread = retries.iter().max().unwrap() - retries.iter().min().unwrap();
    assert!(spread >= 200, "retries spread over only {spread} ms");
    let stats = sim.stats.snapshot();
    assert!(stats.realtime_max_per_minute[CHAT] <= RATE as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_model_falls_back() {
    let sim = Sim::start(SimConfig {
        faults: Faults {
            overloaded_models: vec![MODEL.into()],
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        &format!(
            "[ingest]\nsettle_secs = 0.2\n\n[realtime]\nbackoff_initial_secs = 0.05\nfallback_after_attempts = 2\nfallback_models = {{ {MODEL:?} = {FALLBACK:?} }}\n"
        ),
    );
    daemon.drop_file("one.jsonl", &urgent_chat(1));

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 1).await;
    let row = sqlx::query("SELECT state, model_used, response FROM results")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("state"), "succeeded");
    assert_eq!(row.get::<String, _>("model_used"), FALLBACK);
    let response: Value = serde_json::from_str(&row.get::<String, _>("response")).unwrap();
    assert_eq!(response["model"], FALLBACK);
    let models: Vec<String> = chat_requests(&sim)
        .await
        .iter()
        .map(|r| r["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(models, [MODEL, MODEL, FALLBACK]);
}
