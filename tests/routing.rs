//! Which path an item takes: the batch path for ordinary chat items, the real-time path for
//! urgent ones, ones whose deadline is closer than the margin, and endpoints that are not batched.

mod common;

use common::{Daemon, Sim};

fn chat(id: &str, extra: &str) -> String {
    format!(
        r#"{{"custom_id": "{id}", {extra}"body": {{"model": "{}", "messages": [{{"role": "user", "content": "question {id}"}}]}}}}"#,
        common::CHAT_MODEL
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_and_near_deadline_items_go_realtime() {
    let sim = Sim::fast().await;
    let daemon = Daemon::start(&sim.base_url, common::FAST_PIPELINE);
    let soon = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let later = (chrono::Utc::now() + chrono::Duration::days(10)).to_rfc3339();
    let lines = [
        chat("plain-1", ""),
        chat("urgent", r#""urgent": true, "#),
        chat("soon", &format!(r#""deadline": "{soon}", "#)),
        chat("later", &format!(r#""deadline": "{later}", "#)),
        chat("plain-2", ""),
        r#"{"custom_id": "embed", "body": {"model": "BAAI/bge-base-en-v1.5", "input": "text"}}"#
            .to_string(),
    ];
    daemon.drop_file("mixed.jsonl", lines.join("\n").as_bytes());
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 6).await;

    let paths: Vec<(String, String, String)> =
        sqlx::query_as("SELECT custom_id, path, state FROM results ORDER BY line_no")
            .fetch_all(&db)
            .await
            .unwrap();
    let expected = [
        ("plain-1", "batch"),
        ("urgent", "realtime"),
        ("soon", "realtime"),
        ("later", "batch"),
        ("plain-2", "batch"),
        ("embed", "realtime"),
    ];
    for ((id, path, state), (want_id, want_path)) in paths.iter().zip(expected) {
        assert_eq!(id, want_id);
        assert_eq!(path, want_path, "{id}");
        assert_eq!(state, "succeeded", "{id}");
    }
}
