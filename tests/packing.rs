//! Packing limits: no uploaded batch file exceeds the line or byte cap, and a request too large
//! for any batch fails alone with the reason.

mod common;

use std::time::Duration;

use batchd::simulate::SimConfig;
use common::{Daemon, Sim};
use serde_json::{Value, json};
use sqlx::Row;

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";

/// Builds a chat body whose compact JSON, as batchd stores it, is exactly `len` bytes.
fn body_of_len(len: usize) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": ""}]});
    let base = body.to_string().len();
    body["messages"][0]["content"] = Value::String("q".repeat(len - base));
    assert_eq!(body.to_string().len(), len);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_split_at_line_and_byte_caps() {
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\n\n[batch]\nmax_requests = 3\nmax_bytes = 600\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n",
    );
    // Items 1 to 7 become upload lines of 150 bytes: `{"custom_id":"bd-N","body":` (28
    // bytes with the closing brace and newline, plus one digit) and a 121-byte body.
    let mut lines: Vec<String> = (1..=7)
        .map(|i| json!({"custom_id": format!("q{i}"), "body": body_of_len(121)}).to_string())
        .collect();
    lines.push(json!({"custom_id": "huge", "body": body_of_len(700)}).to_string());
    daemon.drop_file("sized.jsonl", lines.join("\n").as_bytes());

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 8).await;
    let batches: Vec<(i64, i64)> = sqlx::query("SELECT item_count, bytes FROM batches ORDER BY id")
        .fetch_all(&db)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("item_count"), r.get("bytes")))
        .collect();
    assert_eq!(batches, [(3, 450), (3, 450), (1, 150)]);
    assert_eq!(sim.stats.snapshot().max_batch_lines, 3);

    let huge = sqlx::query("SELECT state, error FROM results WHERE custom_id = 'huge'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(huge.get::<String, _>("state"), "failed");
    let error: String = huge.get("error");
    assert!(
        error.contains("more than the batch limit of 600 bytes"),
        "{error}"
    );
    let succeeded: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM results WHERE state = 'succeeded'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(succeeded, 7);
}
