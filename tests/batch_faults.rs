//! The daemon under batch-job faults: each test switches one simulator fault on and checks
//! where every item ends.

mod common;

use std::time::Duration;

use batchd::simulate::{Faults, SimConfig, StatusCase};
use common::{Daemon, Sim};
use serde_json::{Value, json};
use sqlx::{Row, SqlitePool};

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";

fn sim_with(faults: Faults) -> SimConfig {
    SimConfig {
        turnaround: Duration::from_millis(400),
        faults,
        ..SimConfig::default()
    }
}

/// Daemon settings with short waits; `extra` is appended to the `[batch]` table.
fn settings(extra: &str) -> String {
    format!(
        "[ingest]\nsettle_secs = 0.2\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n{extra}\n"
    )
}

/// Builds a chat line; a `max_tokens` out of range makes the provider reject it.
fn chat(id: &str, max_tokens: i64) -> String {
    json!({"custom_id": id, "body": {"model": MODEL, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": format!("question {id}")}]}})
    .to_string()
}

fn file(lines: impl IntoIterator<Item = String>) -> Vec<u8> {
    lines
        .into_iter()
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// Reads (custom_id, state, attempts, error) of every item, in input order.
async fn outcomes(db: &SqlitePool) -> Vec<(String, String, i64, Option<String>)> {
    sqlx::query(
        "SELECT custom_id, state, attempts, error FROM results ORDER BY input_file, line_no",
    )
    .fetch_all(db)
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get("custom_id"),
            r.get("state"),
            r.get("attempts"),
            r.get("error"),
        )
    })
    .collect()
}

async fn requests(sim: &Sim) -> Vec<Value> {
    reqwest::get(sim.base_url.replace("/v1", "/_sim/requests"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_lines_fail_items_without_retry() {
    let sim = Sim::start(sim_with(Faults::default())).await;
    let daemon = Daemon::start(&sim.base_url, &settings(""));
    // Three requests asking for more tokens than the model allows.
    daemon.drop_file(
        "big.jsonl",
        &file((0..3).map(|i| chat(&format!("big-{i}"), 10_000_000))),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 3).await;
    for (id, state, attempts, error) in outcomes(&db).await {
        assert_eq!(state, "failed", "{id}");
        assert_eq!(attempts, 1, "{id} was retried");
        assert!(
            error
                .unwrap()
                .contains("max_tokens 10000000 is larger than the maximum"),
            "{id}"
        );
    }
    assert_eq!(sim.stats.snapshot().batches_created, 1);
    // Only the error file exists, so only one file was downloaded.
    let downloads = requests(&sim)
        .await
        .iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with("/content"))
        .count();
    assert_eq!(downloads, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_and_error_lines_both_count() {
    let sim = Sim::start(sim_with(Faults::default())).await;
    let daemon = Daemon::start(&sim.base_url, &settings(""));
    daemon.drop_file(
        "mixed.jsonl",
        &file([
            chat("ok-1", 100),
            chat("too-big", 10_000_000),
            chat("ok-2", 100),
        ]),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 3).await;
    let states: Vec<String> = outcomes(&db).await.into_iter().map(|o| o.1).collect();
    assert_eq!(states, ["succeeded", "failed", "succeeded"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_job_requeues_missing_items() {
    let sim = Sim::start(sim_with(Faults {
        expire_first_jobs: 1,
        expire_completed_fraction: 0.6,
        job_deadline_secs: 1.0,
        ..Faults::default()
    }))
    .await;
    let daemon = Daemon::start(&sim.base_url, &settings(""));
    daemon.drop_file(
        "hundred.jsonl",
        &file((0..100).map(|i| chat(&format!("q{i:03}"), 100))),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 100).await;
    let all = outcomes(&db).await;
    assert!(all.iter().all(|o| o.1 == "succeeded"), "none failed");
    assert_eq!(
        all.iter().filter(|o| o.2 == 1).count(),
        60,
        "60 answered by the expired job"
    );
    assert_eq!(
        all.iter().filter(|o| o.2 == 2).count(),
        40,
        "40 requeued with one more attempt"
    );

    let jobs: Vec<(String, i64)> =
        sqlx::query("SELECT provider_status, item_count FROM batches ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get("provider_status"), r.get("item_count")))
            .collect();
    assert_eq!(
        jobs,
        [("EXPIRED".to_string(), 100), ("COMPLETED".to_string(), 40)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_case_statuses_are_understood() {
    let sim = Sim::start(sim_with(Faults {
        status_case: StatusCase::Lower,
        ..Faults::default()
    }))
    .await;
    let daemon = Daemon::start(&sim.base_url, &settings(""));
    daemon.drop_file(
        "lower.jsonl",
        &file((0..5).map(|i| chat(&format!("q{i}"), 100))),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 5).await;
    assert!(outcomes(&db).await.iter().all(|o| o.1 == "succeeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_status_job_is_reconciled_after_max_age() {
    let sim = Sim::start(sim_with(Faults {
        in_progress_status: Some("QUEUED".into()),
        stall_batches: true,
        ..Faults::default()
    }))
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        &settings("max_job_age_secs = 1.5\nmax_attempts = 2"),
    );
    daemon.drop_file(
        "stuck.jsonl",
        &file((0..5).map(|i| chat(&format!("q{i}"), 100))),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 5).await;
    // Each stalled job was cancelled at the maximum age; with two attempts the items end failed
    // with the reason, instead of being polled forever.
    for (id, state, attempts, error) in outcomes(&db).await {
        assert_eq!(state, "failed", "{id}");
        assert_eq!(attempts, 2, "{id}");
        assert!(error.unwrap().contains("CANCELLED"), "{id}");
    }
    let cancels = requests(&sim)
        .await
        .iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with("/cancel"))
        .count();
    assert_eq!(cancels, 2, "one cancel per stalled job");
    let log = daemon.log();
    assert_eq!(
        log.matches("unknown batch status").count(),
        1,
        "logged once:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_failure_fails_only_the_bad_line() {
    let sim = Sim::start(sim_with(Faults::default())).await;
    let daemon = Daemon::start(&sim.base_url, &settings(""));
    daemon.drop_file(
        "one-bad.jsonl",
        &file([
            chat("a", 100),
            chat("b", 100),
            chat("bad", -5),
            chat("c", 100),
        ]),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 4).await;
    let all = outcomes(&db).await;
    let by_id = |id: &str| all.iter().find(|o| o.0 == id).unwrap().clone();
    let (_, state, _, error) = by_id("bad");
    assert_eq!(state, "failed");
    assert!(
        error
            .unwrap()
            .contains("max_tokens must be a positive integer")
    );
    for id in ["a", "b", "c"] {
        let (_, state, attempts, _) = by_id(id);
        assert_eq!(state, "succeeded", "{id}");
        assert_eq!(attempts, 1, "{id} lost an attempt to another line's fault");
    }
    assert_eq!(
        sim.stats.snapshot().batches_created,
        2,
        "the innocent items were packed again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_failure_pauses_the_model() {
    let sim = Sim::start(sim_with(Faults {
        capacity_fail_models: vec![MODEL.into()],
        ..Faults::default()
    }))
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        &settings("capacity_cooldown_secs = 1.0\nmax_attempts = 3"),
    );
    daemon.drop_file(
        "busy.jsonl",
        &file((0..5).map(|i| chat(&format!("q{i}"), 100))),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 5).await;
    for (id, state, attempts, error) in outcomes(&db).await {
        assert_eq!(state, "failed", "{id}");
        assert_eq!(attempts, 3, "{id}");
        assert!(error.unwrap().contains("at capacity"), "{id}");
    }
    // At most one create per cooldown while the model is paused.
    let creates: Vec<u64> = requests(&sim)
        .await
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"] == "/v1/batches")
        .map(|r| r["at_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(creates.len(), 3);
    for pair in creates.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1000,
            "creates {} ms apart",
            pair[1] - pair[0]
        );
    }
    assert!(daemon.log().contains("pausing its batch jobs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_not_found_retries_same_file() {
    let sim = Sim::start(sim_with(Faults {
        create_not_found: 2,
        ..Faults::default()
    }))
    .await;
    let daemon = Daemon::start(&sim.base_url, &settings(""));
    daemon.drop_file(
        "late-file.jsonl",
        &file((0..3).map(|i| chat(&format!("q{i}"), 100))),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 3).await;
    assert!(outcomes(&db).await.iter().all(|o| o.1 == "succeeded"));
    let stats = sim.stats.snapshot();
    assert_eq!(stats.files_uploaded, 1, "one upload");
    assert_eq!(stats.batch_create_requests, 3, "three creates");
    assert_eq!(stats.batches_created, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_not_found_exhausted_deletes_the_orphan_file() {
    let sim = Sim::start(sim_with(Faults {
        create_not_found: 100,
        ..Faults::default()
    }))
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        &settings("max_create_attempts = 3\nmax_attempts = 1"),
    );
    daemon.drop_file(
        "never.jsonl",
        &file((0..3).map(|i| chat(&format!("q{i}"), 100))),
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 3).await;
    for (id, state, _, error) in outcomes(&db).await {
        assert_eq!(state, "failed", "{id}");
        assert!(error.unwrap().contains("file not found"), "{id}");
    }
    let stats = sim.stats.snapshot();
    assert_eq!(stats.batch_create_requests, 3);
    assert_eq!(stats.files_deleted, 1, "the orphan upload was deleted");
}
