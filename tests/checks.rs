//! Checks the daemon makes before sending anything: models against the provider's catalogue,
//! and embedding inputs against the token budget.

mod common;

use batchd::simulate::{SimConfig, embedding_vector};
use common::{Daemon, Sim};
use serde_json::{Value, json};
use sqlx::Row;

const CHAT_MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const EMBEDDING_MODEL: &str = "BAAI/bge-large-en-v1.5";

fn quick_sim() -> SimConfig {
    SimConfig {
        turnaround: std::time::Duration::from_millis(300),
        ..SimConfig::default()
    }
}

fn chat_line(id: &str, model: &str) -> String {
    json!({"custom_id": id, "urgent": true, "body": {"model": model, "messages": [{"role": "user", "content": format!("question {id}")}]}})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_fails_at_ingest_with_close_matches() {
    let sim = Sim::start(quick_sim()).await;
    let daemon = Daemon::start(&sim.base_url, "[ingest]\nsettle_secs = 0.2\n");
    let lines = [
        chat_line("known", CHAT_MODEL),
        chat_line("typo", "meta-llama/Llama-3.3-70B-Instruct"),
        chat_line("foreign", "gpt-4o"),
    ];
    daemon.drop_file("models.jsonl", lines.join("\n").as_bytes());

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 3).await;
    let rows = sqlx::query("SELECT custom_id, state, error FROM results ORDER BY line_no")
        .fetch_all(&db)
        .await
        .unwrap();
    let outcome =
        |i: usize| -> (String, Option<String>) { (rows[i].get("state"), rows[i].get("error")) };

    assert_eq!(outcome(0).0, "succeeded");
    let (state, error) = outcome(1);
    assert_eq!(state, "failed");
    let error = error.unwrap();
    assert!(
        error.contains("\"meta-llama/Llama-3.3-70B-Instruct\""),
        "{error}"
    );
    assert!(
        error.contains("close matches: meta-llama/Llama-3.3-70B-Instruct-Turbo"),
        "{error}"
    );
    let (state, error) = outcome(2);
    assert_eq!(state, "failed");
    assert!(
        error
            .unwrap()
            .contains("no model in the catalogue has a similar name")
    );

    // Only the known model reached the provider.
    let stats = sim.stats.snapshot();
    assert_eq!(stats.realtime_requests["/v1/chat/completions"], 1);

    let report: Value = serde_json::from_slice(
        &std::fs::read(daemon.path("processed/models.jsonl.report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["items"], 3);
    assert_eq!(report["items_failed"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_check_can_be_switched_off() {
    let sim = Sim::start(quick_sim()).await;
    let daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\ncheck_models = false\n",
    );
    daemon.drop_file(
        "models.jsonl",
        chat_line("typo", "meta-llama/Llama-3.3-70B-Instruct").as_bytes(),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 1).await;
    let error: String = sqlx::query_scalar("SELECT error FROM results")
        .fetch_one(&db)
        .await
        .unwrap();
    // The provider itself rejected the model, because batchd did not check it.
    assert!(error.contains("404"), "{error}");
    assert_eq!(
        sim.stats.snapshot().realtime_requests["/v1/chat/completions"],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedding_inputs_respect_token_budget() {
    let sim = Sim::start(quick_sim()).await;
    let daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\n\n[realtime]\nembedding_tokens_per_request = 100\nembedding_max_input_tokens = 60\n",
    );
    // Four characters make one estimated token.
    let tokens = [40, 40, 40, 10, 150];
    let inputs: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i}{}", "x".repeat(n * 4 - 1)))
        .collect();
    let lines: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| json!({"custom_id": format!("e{i}"), "body": {"model": EMBEDDING_MODEL, "input": input}}).to_string())
        .collect();
    daemon.drop_file("embed.jsonl", lines.join("\n").as_bytes());

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 5).await;
    let rows =
        sqlx::query("SELECT custom_id, state, response, error FROM results ORDER BY line_no")
            .fetch_all(&db)
            .await
            .unwrap();
    for (i, row) in rows.iter().take(4).enumerate() {
        assert_eq!(row.get::<String, _>("state"), "succeeded", "e{i}");
        let response: Value = serde_json::from_str(&row.get::<String, _>("response")).unwrap();
        let vector: Vec<f32> =
            serde_json::from_value(response["data"][0]["embedding"].clone()).unwrap();
        assert_eq!(
            vector,
            embedding_vector(&inputs[i]),
            "e{i} got another input's vector"
        );
    }
    assert_eq!(rows[4].get::<String, _>("state"), "failed");
    let error: String = rows[4].get("error");
    assert!(error.starts_with("input too long"), "{error}");

    // [40, 40] and [40, 10]: two requests of two inputs each.
    let stats = sim.stats.snapshot();
    assert_eq!(stats.realtime_requests["/v1/embeddings"], 2);
    assert_eq!(stats.embedding_max_inputs, 2);
}
