//! Result exports written by the real daemon: the line format, input line order, failed
//! items, distinct names for files dropped under one name, and one export per file, also
//! across a restart.

mod common;

use std::time::Duration;

use batchd::simulate::SimConfig;
use common::{Daemon, Sim, read_jsonl, wait_for};
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const EMBEDDING_MODEL: &str = "BAAI/bge-large-en-v1.5";
const SETTINGS: &str =
    "[ingest]\nsettle_secs = 0.2\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n";

fn chat_line(id: &str, model: &str) -> Value {
    json!({"custom_id": id, "body": {"model": model, "messages": [{"role": "user", "content": format!("question {id}")}]}})
}

fn jsonl(lines: &[Value]) -> Vec<u8> {
    lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

fn custom_ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect()
}

/// Counts the daemon's log lines that report writing the export file `name`.
fn exports_logged(daemon: &Daemon, name: &str) -> usize {
    daemon
        .log()
        .lines()
        .filter(|l| l.contains("results exported") && l.contains(&format!("/{name} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_follows_input_order_once_per_file() {
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let mut daemon = Daemon::start(&sim.base_url, SETTINGS);

    // Ids out of order, batch and real-time items, and one item failed at ingest.
    let first = vec![
        chat_line("z9", MODEL),
        chat_line("a1", MODEL),
        json!({"custom_id": "m5", "body": {"model": EMBEDDING_MODEL, "input": "a passage"}}),
        chat_line("b2", "no-such/model-for-export"),
        chat_line("c3", MODEL),
    ];
    daemon.drop_file("mixed.jsonl", &jsonl(&first));
    let export = daemon.path("outbox/mixed.results.jsonl");
    wait_for(|| export.exists(), "the export of mixed.jsonl");

    let lines = read_jsonl(&export);
    assert_eq!(custom_ids(&lines), ["z9", "a1", "m5", "b2", "c3"]);
    for index in [0, 1, 4] {
        let line = &lines[index];
        assert_eq!(line["response"]["status_code"], 200, "{line}");
        assert!(line["response"]["body"]["choices"].is_array(), "{line}");
        assert_eq!(line["error"], Value::Null, "{line}");
    }
    assert!(lines[2]["response"]["body"]["data"][0]["embedding"].is_array());
    let failed = &lines[3];
    assert_eq!(failed["response"], Value::Null, "{failed}");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such/model-for-export"),
        "{failed}"
    );
    assert!(failed["error"].get("code").is_some(), "{failed}");
    let leftovers: Vec<_> = std::fs::read_dir(daemon.path("outbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let db = daemon.db().await;
    let (exported_at, path): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT exported_at, export_path FROM files WHERE input_file = 'mixed.jsonl'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(exported_at.is_some());
    assert_eq!(path.unwrap(), export.display().to_string());
    let written = std::fs::metadata(&export).unwrap().modified().unwrap();

    // After a restart, a second file under the same name gets its own export. The exporter
    // handles files in ingest order, so once the second export exists, a second export of the
    // first file would have happened already.
    assert!(daemon.stop().success());
    daemon.spawn();
    let second = vec![chat_line("only", MODEL)];
    daemon.drop_file("mixed.jsonl", &jsonl(&second));
    let second_export = daemon.path("outbox/mixed-1.results.jsonl");
    // The export is logged just after its file appears, so wait for the log line too.
    wait_for(
        || second_export.exists() && exports_logged(&daemon, "mixed-1.results.jsonl") > 0,
        "the export of the second mixed.jsonl",
    );
    assert_eq!(custom_ids(&read_jsonl(&second_export)), ["only"]);
    assert_eq!(custom_ids(&read_jsonl(&export)), custom_ids(&lines));
    assert_eq!(
        std::fs::metadata(&export).unwrap().modified().unwrap(),
        written
    );
    assert_eq!(
        exports_logged(&daemon, "mixed.results.jsonl"),
        1,
        "{}",
        daemon.log()
    );
    assert_eq!(
        exports_logged(&daemon, "mixed-1.results.jsonl"),
        1,
        "{}",
        daemon.log()
    );
}
