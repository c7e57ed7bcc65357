//! Crash safety: the daemon aborts at each named fault point, restarts, and must end with every
//! item terminal, one result each, no duplicate provider job and every input file stored once.
//!
//! Needs the `failpoints` feature: `cargo test --all-targets --all-features`.

mod common;

use std::time::Duration;

use batchd::simulate::SimConfig;
use common::{Daemon, Sim, last_user_message, read_jsonl};
use serde_json::{Value, json};
use sqlx::Row;

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const EMBEDDING_MODEL: &str = "BAAI/bge-large-en-v1.5";
const SETTINGS: &str =
    "[ingest]\nsettle_secs = 0.2\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n";

/// Ten batch chat items, five urgent chat items and five embedding items in one file.
fn input() -> Vec<u8> {
    let mut lines = Vec::new();
    for i in 0..10 {
        lines.push(json!({"custom_id": format!("b{i}"), "body": {"model": MODEL, "messages": [{"role": "user", "content": format!("batch question {i}")}]}}));
    }
    for i in 0..5 {
        lines.push(json!({"custom_id": format!("u{i}"), "urgent": true, "body": {"model": MODEL, "messages": [{"role": "user", "content": format!("urgent question {i}")}]}}));
    }
    for i in 0..5 {
        lines.push(json!({"custom_id": format!("e{i}"), "body": {"model": EMBEDDING_MODEL, "input": format!("passage {i}")}}));
    }
    lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// Aborts the daemon at `point`, restarts it, and checks that nothing was lost or doubled.
/// Returns the daemon and the simulator for checks of the specific recovery.
async fn crash_and_recover(point: &str) -> (Daemon, Sim) {
    crash_and_recover_with(point, SETTINGS).await
}

async fn crash_and_recover_with(point: &str, settings: &str) -> (Daemon, Sim) {
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let mut daemon = Daemon::prepare(&sim.base_url, settings);
    let input = input();
    daemon.drop_file("work.jsonl", &input);
    daemon.spawn_with_env(&[("BATCHD_FAULT_POINT", point)]);
    let status = daemon.wait_exit();
    assert!(!status.success(), "the daemon did not stop at {point}");
    let name = point.split(':').next().unwrap();
    assert!(
        daemon
            .log()
            .contains(&format!("fault point {name} reached")),
        "{}",
        daemon.log()
    );

    daemon.spawn();
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 20).await;

    let requests: Vec<Value> = String::from_utf8(input)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rows = sqlx::query("SELECT custom_id, state, response FROM results")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 20, "one row per input line");
    for row in &rows {
        let id: String = row.get("custom_id");
        assert_eq!(row.get::<String, _>("state"), "succeeded", "{id}");
        let response: Value = serde_json::from_str(&row.get::<String, _>("response")).unwrap();
        let request = requests
            .iter()
            .find(|r| r["custom_id"] == id.as_str())
            .unwrap();
        if request["body"].get("messages").is_some() {
            let content = response["choices"][0]["message"]["content"]
                .as_str()
                .unwrap();
            assert!(
                content.starts_with(&last_user_message(&request["body"])),
                "{id}"
            );
        }
    }

    let stats = sim.stats.snapshot();
    assert_eq!(
        stats.max_jobs_per_input_file, 1,
        "a second job was created for the same file"
    );
    assert_eq!(
        stats.batch_lines_total, 10,
        "batch items were sent in more than one job"
    );
    let files: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM input_files")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(files, 1, "the input file was stored twice");
    assert!(daemon.path("processed/work.jsonl").exists());
    assert!(
        !daemon.path("processed/work-1.jsonl").exists(),
        "the input file was moved twice"
    );
    assert!(!daemon.path("inbox/work.jsonl").exists());
    let report = read_jsonl(&daemon.path("processed/work.jsonl"));
    assert_eq!(report.len(), 20, "the processed file is the original");
    (daemon, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_upload() {
    let (daemon, sim) = crash_and_recover("after-upload").await;
    assert!(
        daemon
            .log()
            .contains("adopted a file uploaded before a restart"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        sim.stats.snapshot().files_uploaded,
        1,
        "the batch file was uploaded twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_create_before_commit() {
    let (daemon, sim) = crash_and_recover("after-create").await;
    assert!(
        daemon
            .log()
            .contains("adopted a batch job created before a restart"),
        "{}",
        daemon.log()
    );
    assert_eq!(sim.stats.snapshot().batch_create_requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_results() {
    crash_and_recover("mid-results").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_ingest() {
    crash_and_recover("mid-ingest:7").await;
}

/// A file committed in parts of 4 lines, stopped in its third part, is read on from line 9:
/// every line becomes one item and the 10 batch items still go out in one full job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_ingest_after_committed_parts() {
    let settings = "[ingest]\nsettle_secs = 0.2\ncommit_lines = 4\n\n\
                    [batch]\nmax_requests = 10\nmax_linger_secs = 60\npoll_interval_secs = 0.1\n";
    let (daemon, _sim) = crash_and_recover_with("mid-ingest:11", settings).await;
    assert!(
        daemon
            .log()
            .contains("reading on in a file stored in part before a restart"),
        "{}",
        daemon.log()
    );
    let report: Value = serde_json::from_slice(
        &std::fs::read(daemon.path("processed/work.jsonl.report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["lines"], 20);
    assert_eq!(report["items"], 20);
    assert_eq!(report["error_count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_realtime_answer() {
    let (daemon, _sim) = crash_and_recover("after-realtime-answer").await;
    // The response arrived but was not committed, so the item was queued and sent again.
    assert!(
        daemon
            .log()
            .contains("returned real-time items interrupted by the last stop"),
        "{}",
        daemon.log()
    );
}

/// Aborts the daemon at an export fault point and checks that the restart writes the export
/// of the input file once, to the same path, with no temporary file left behind.
async fn export_survives_crash(point: &str) {
    let (daemon, _sim) = crash_and_recover(point).await;
    let db = daemon.db().await;
    let started = std::time::Instant::now();
    loop {
        let exported: Option<String> =
            sqlx::query_scalar("SELECT exported_at FROM files WHERE input_file = 'work.jsonl'")
                .fetch_one(&db)
                .await
                .unwrap();
        if exported.is_some() {
            break;
        }
        assert!(
            started.elapsed() < common::PATIENCE,
            "the file was not exported after the restart; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut names: Vec<String> = std::fs::read_dir(daemon.path("outbox"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["work.results.jsonl"]);
    let lines = read_jsonl(&daemon.path("outbox/work.results.jsonl"));
    let ids: Vec<&str> = lines
        .iter()
        .map(|line| line["custom_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = read_jsonl(&daemon.path("processed/work.jsonl"))
        .iter()
        .map(|line| line["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_export_rename() {
    export_survives_crash("before-export-rename").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_export_rename() {
    export_survives_crash("after-export-rename").await;
}
