//! The operator's commands run against a database made by the real daemon: `status`, `files`,
//! `results`, `retry` and `cancel`, in text and JSON, with the daemon running.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use batchd::simulate::SimConfig;
use common::{Daemon, PATIENCE, Sim, read_jsonl, wait_for};
use serde_json::{Value, json};
use sqlx::{Row, SqlitePool};

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

/// Runs `batchd ARGS --config CONFIG` and returns its output.
fn batchd(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(args)
        .arg("--config")
        .arg(&daemon.config_path)
        .env("TOGETHER_API_KEY", "test-key")
        .output()
        .unwrap()
}

/// Runs a command that must succeed and returns its stdout.
fn stdout_of(daemon: &Daemon, args: &[&str]) -> String {
    let output = batchd(daemon, args);
    assert!(
        output.status.success(),
        "batchd {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs a command that must fail and returns its stderr.
fn stderr_of_failure(daemon: &Daemon, args: &[&str]) -> String {
    let output = batchd(daemon, args);
    assert!(!output.status.success(), "batchd {args:?} succeeded");
    String::from_utf8(output.stderr).unwrap()
}

fn json_of(daemon: &Daemon, args: &[&str]) -> Value {
    serde_json::from_str(&stdout_of(daemon, args)).unwrap()
}

/// Waits until the items of `file` number `count` and `condition` holds for their states.
async fn wait_items(db: &SqlitePool, file: &str, count: i64, sql_condition: &str) {
    let started = std::time::Instant::now();
    loop {
        let sql = format!(
            "SELECT COUNT(*) AS n, COALESCE(SUM({sql_condition}), 0) AS ok FROM items WHERE input_file = ?1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(file)
            .fetch_one(db)
            .await
            .unwrap();
        let (n, ok): (i64, i64) = (row.get("n"), row.get("ok"));
        if n == count && ok == count {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "items of {file} never reached {sql_condition}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_describe_a_finished_file() {
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(&sim.base_url, SETTINGS);
    let lines = vec![
        chat_line("q2", MODEL),
        chat_line("q1", MODEL),
        chat_line("unknown", "no-such/model-for-status"),
        json!({"custom_id": "e1", "body": {"model": EMBEDDING_MODEL, "input": "a passage"}}),
    ];
    let mut bytes = jsonl(&lines);
    bytes.extend_from_slice(b"\nnot json\n");
    daemon.drop_file("evals.jsonl", &bytes);
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 4).await;

    let status = stdout_of(&daemon, &["status"]);
    assert!(
        status.contains("evals.jsonl: 4/4 done (100%), 3 succeeded, 1 failed, 0 queued, 0 in progress, 1 bad lines; finished"),
        "{status}"
    );
    assert!(status.contains("batch jobs in flight:\n  none"), "{status}");
    assert!(
        status.contains("real-time items finished in the last minute:"),
        "{status}"
    );

    let status = json_of(&daemon, &["status", "--json"]);
    assert_eq!(status["items"]["total"], 4);
    assert_eq!(status["items"]["succeeded"], 3);
    let file = &status["files"][0];
    assert_eq!(file["name"], "evals.jsonl");
    assert_eq!(file["progress"], 1.0);
    assert_eq!(file["pending"], 0);
    assert_eq!(file["eta_secs"], 0);
    assert_eq!(file["errors"], 1);
    assert!(status["jobs_in_flight"].as_array().unwrap().is_empty());
    assert!(status["realtime"].is_array());

    let files = stdout_of(&daemon, &["files"]);
    let header = files.lines().next().unwrap();
    assert!(header.starts_with("NAME"), "{files}");
    assert!(header.contains("PENDING"), "{files}");
    let row = files.lines().nth(1).unwrap();
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &fields[..7],
        ["evals.jsonl", "4", "3", "1", "0", "1", "processed"],
        "{files}"
    );

    let files = json_of(&daemon, &["files", "--json"]);
    assert_eq!(files[0]["name"], "evals.jsonl");
    assert_eq!(files[0]["stored_name"], "evals.jsonl");
    assert_eq!(files[0]["items"], 4);
    assert_eq!(files[0]["failed"], 1);
    assert_eq!(files[0]["disposition"], "processed");
    assert!(files[0]["ingested_at"].is_string());

    let results = stdout_of(&daemon, &["results", "--file", "evals.jsonl"]);
    let lines: Vec<Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["q2", "q1", "unknown", "e1"]);
    assert_eq!(lines[0]["response"]["status_code"], 200);
    assert_eq!(lines[0]["error"], Value::Null);
    assert_eq!(lines[2]["response"], Value::Null);
    assert!(
        lines[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such/model-for-status"),
        "{results}"
    );

    let table = stdout_of(
        &daemon,
        &["results", "--file", "evals.jsonl", "--format", "table"],
    );
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].contains("CUSTOM_ID"), "{table}");
    assert!(rows[1].contains("q2"), "{table}");
    assert!(rows[1].contains("succeeded"), "{table}");
    assert!(rows[1].contains("200"), "{table}");
    assert!(rows[3].contains("unknown"), "{table}");
    assert!(rows[3].contains("failed"), "{table}");
    assert!(rows[4].contains("embedding of"), "{table}");

    let error = stderr_of_failure(&daemon, &["results", "--file", "missing.jsonl"]);
    assert!(
        error.contains("no input file named \"missing.jsonl\""),
        "{error}"
    );
    assert!(error.contains("batchd files"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_requeues_and_daemon_finishes() {
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(&sim.base_url, SETTINGS);
    // The model is unknown at ingest, so its items fail there; once the simulator serves it,
    // a retry must succeed.
    let late_model = "example-org/model-added-for-retry";
    let lines = vec![
        chat_line("a", late_model),
        chat_line("b", MODEL),
        chat_line("c", late_model),
    ];
    daemon.drop_file("late.jsonl", &jsonl(&lines));
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 3).await;
    wait_for(
        || daemon.path("outbox/late.results.jsonl").exists(),
        "the first export",
    );

    let error = stderr_of_failure(&daemon, &["retry"]);
    assert!(error.contains("--file NAME"), "{error}");
    assert!(error.contains("--all"), "{error}");
    let error = stderr_of_failure(&daemon, &["retry", "--file", "other.jsonl"]);
    assert!(
        error.contains("no input file named \"other.jsonl\""),
        "{error}"
    );

    batchd::simulate::add_model(late_model, "/v1/chat/completions");
    let retried = stdout_of(&daemon, &["retry", "--file", "late.jsonl"]);
    assert!(
        retried.contains("requeued 2 failed items of late.jsonl"),
        "{retried}"
    );
    let retried = json_of(&daemon, &["retry", "--all", "--json"]);
    assert_eq!(retried["requeued"], 0);

    wait_items(&db, "late.jsonl", 3, "state = 'succeeded'").await;
    // The retry cleared the export, so the file is exported again with the new results.
    let started = std::time::Instant::now();
    loop {
        let exported: Option<String> =
            sqlx::query_scalar("SELECT exported_at FROM files WHERE input_file = 'late.jsonl'")
                .fetch_one(&db)
                .await
                .unwrap();
        if exported.is_some() {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the retried file was not exported again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let export = read_jsonl(&daemon.path("outbox/late.results.jsonl"));
    assert_eq!(export.len(), 3);
    for line in &export {
        assert_eq!(line["error"], Value::Null, "{line}");
        assert_eq!(line["response"]["status_code"], 200, "{line}");
    }
    assert!(!daemon.path("outbox/late-1.results.jsonl").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_spares_items_in_jobs() {
    // Jobs take far longer than the test, and one job at a time keeps later items queued.
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_secs(3600),
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\nmax_in_flight = 1\n",
    );
    let running: Vec<Value> = (0..3).map(|i| chat_line(&format!("r{i}"), MODEL)).collect();
    daemon.drop_file("running.jsonl", &jsonl(&running));
    let db = daemon.db().await;
    wait_items(&db, "running.jsonl", 3, "state = 'submitted'").await;
    let waiting: Vec<Value> = (0..2).map(|i| chat_line(&format!("w{i}"), MODEL)).collect();
    daemon.drop_file("waiting.jsonl", &jsonl(&waiting));
    wait_items(&db, "waiting.jsonl", 2, "state = 'queued'").await;

    let job: String = sqlx::query_scalar(
        "SELECT provider_batch_id FROM jobs WHERE provider_batch_id IS NOT NULL",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let status = stdout_of(&daemon, &["status"]);
    assert!(status.contains(&format!("  {job}: ")), "{status}");
    assert!(status.contains("3 items of"), "{status}");
    assert!(status.contains("waiting.jsonl: 0/2 done (0%)"), "{status}");

    let cancelled = stdout_of(&daemon, &["cancel", "--file", "waiting.jsonl"]);
    assert!(
        cancelled.contains("cancelled 2 queued items of waiting.jsonl"),
        "{cancelled}"
    );
    let cancelled = json_of(&daemon, &["cancel", "--file", "running.jsonl", "--json"]);
    assert_eq!(cancelled["cancelled"], 0);
    assert_eq!(cancelled["left_running"], 3);
    wait_items(&db, "running.jsonl", 3, "state = 'submitted'").await;

    // The cancelled file is complete now, so the daemon exports it.
    wait_for(
        || daemon.path("outbox/waiting.results.jsonl").exists(),
        "the export of the cancelled file",
    );
    let export = read_jsonl(&daemon.path("outbox/waiting.results.jsonl"));
    assert_eq!(export.len(), 2);
    for line in &export {
        assert_eq!(
            line["error"]["message"], "cancelled by the operator",
            "{line}"
        );
        assert_eq!(line["response"], Value::Null, "{line}");
    }

    let error = stderr_of_failure(&daemon, &["cancel", "--job", "batch-not-ours"]);
    assert!(error.contains("no batch job \"batch-not-ours\""), "{error}");
    assert!(error.contains("batchd status"), "{error}");

    let cancelled = json_of(&daemon, &["cancel", "--job", &job, "--json"]);
    assert_eq!(cancelled["job"], job.as_str());
    assert_eq!(cancelled["items"], 3);
    // The poller harvests the cancelled job and requeues its items, which go out again in a
    // new job: none of them fails.
    let started = std::time::Instant::now();
    loop {
        let harvested: Option<String> = sqlx::query_scalar(
            "SELECT status FROM jobs WHERE provider_batch_id = ?1 AND local_state = 'harvested'",
        )
        .bind(&job)
        .fetch_optional(&db)
        .await
        .unwrap();
        if let Some(status) = harvested {
            assert_eq!(status, "CANCELLED");
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the cancelled job was never harvested"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_items(
        &db,
        "running.jsonl",
        3,
        "state = 'submitted' AND attempts = 1",
    )
    .await;
    let error = stderr_of_failure(&daemon, &["cancel", "--job", &job]);
    assert!(error.contains("already finished (CANCELLED)"), "{error}");
}
