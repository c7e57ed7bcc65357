//! Operations features seen from outside: the Prometheus endpoint and cron schedules.

mod common;

use std::time::Duration;

use batchd::simulate::SimConfig;
use common::{Daemon, Sim};

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_items_jobs_and_requests() {
    let sim = Sim::fast().await;
    let port = free_port();
    let daemon = Daemon::start(
        &sim.base_url,
        &format!(
            "{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            common::FAST_PIPELINE
        ),
    );
    daemon.drop_file("batch.jsonl", &common::chat_lines("b", 5, false));
    daemon.drop_file("urgent.jsonl", &common::chat_lines("u", 3, true));
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 8).await;

    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "batchd_items{state=\"succeeded\"} 8",
        "batchd_items{state=\"queued\"} 0",
        "batchd_jobs{status=\"COMPLETED\"} 1",
        "batchd_realtime_requests_total{endpoint=\"/v1/chat/completions\"} 3",
        "batchd_ingest_seconds_count 2",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    assert!(
        text.contains("# TYPE batchd_write_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("batchd_realtime_rate_limited_total{endpoint=\"/v1/embeddings\"} 0"),
        "series start at 0: {text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occupied_metrics_port_fails_startup() {
    let sim = Sim::start(SimConfig::default()).await;
    let occupied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = occupied.local_addr().unwrap().port();
    let mut daemon = Daemon::start(
        &sim.base_url,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(1));
    let log = daemon.log();
    assert!(
        log.contains(&format!("failed to listen for metrics on 127.0.0.1:{port}")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_flush_sends_a_partial_batch() {
    let sim = Sim::fast().await;
    // A partial batch would wait an hour; the schedule flushes every second instead.
    let daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.1\n\n[batch]\nmax_linger_secs = 3600\npoll_interval_secs = 0.1\n\n[schedules]\nflush = \"* * * * * *\"\n",
    );
    daemon.drop_file("few.jsonl", &common::chat_lines("f", 4, false));
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 4).await;
    let paths: Vec<String> = sqlx::query_scalar("SELECT DISTINCT path FROM results")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(paths, ["batch"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_old_exported_items() {
    let sim = Sim::fast().await;
    // Retention runs every second and deletes exports older than about 0.9 s.
    let daemon = Daemon::start(
        &sim.base_url,
        &format!(
            "{}\n[schedules]\nretention = \"* * * * * *\"\nretention_days = 0.00001\n",
            common::FAST_PIPELINE
        ),
    );
    let lines = common::chat_lines("r", 30, false);
    daemon.drop_file("old.jsonl", &lines);
    let export = daemon.path("outbox/old.results.jsonl");
    common::wait_for(|| export.exists(), "the export");

    let db = daemon.db().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let purged: Option<String> =
            sqlx::query_scalar("SELECT purged_at FROM files WHERE input_file = 'old.jsonl'")
                .fetch_one(&db)
                .await
                .unwrap();
        if purged.is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let items: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM work_items")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(items, 0, "the items are deleted");
    assert_eq!(common::read_jsonl(&export).len(), 30, "the export stays");
    let auto_vacuum: i64 = sqlx::query_scalar("PRAGMA auto_vacuum")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(auto_vacuum, 2, "new databases return freed pages");
    assert!(
        daemon
            .log()
            .contains("deleted the results of exported files past retention"),
        "{}",
        daemon.log()
    );

    // The commands report where the results went instead of printing an empty file.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_batchd"))
            .args(args)
            .arg("--config")
            .arg(&daemon.config_path)
            .output()
            .unwrap()
    };
    let results = cli(&["results", "--file", "old.jsonl"]);
    assert_eq!(results.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&results.stderr);
    assert!(stderr.contains("were deleted by retention at"), "{stderr}");
    assert!(stderr.contains("old.results.jsonl"), "{stderr}");
    let status = String::from_utf8_lossy(&cli(&["status"]).stdout).into_owned();
    assert!(
        status.contains("retention deleted the items at"),
        "{status}"
    );

    // The file row stays, so the same content is still a duplicate.
    daemon.drop_file("again.jsonl", &lines);
    let report = daemon.path("processed/again.jsonl.report.json");
    common::wait_for(|| report.exists(), "the second copy's report");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    assert_eq!(report["disposition"], "duplicate");
}
