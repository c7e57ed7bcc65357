//! Operations features seen from outside: the Prometheus endpoint and cron schedules.

mod common;

use std::time::Duration;

use batchd::simulate::SimConfig;
use common::{Daemon, Sim};

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";

fn chat_lines(prefix: &str, count: usize, urgent: bool) -> Vec<u8> {
    (0..count)
        .map(|n| {
            format!(
                r#"{{"custom_id": "{prefix}{n}", "urgent": {urgent}, "body": {{"model": "{MODEL}", "messages": [{{"role": "user", "content": "question {n}"}}]}}}}"#
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_items_jobs_and_requests() {
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let port = free_port();
    let daemon = Daemon::start(
        &sim.base_url,
        &format!(
            "[ingest]\nsettle_secs = 0.1\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
        ),
    );
    daemon.drop_file("batch.jsonl", &chat_lines("b", 5, false));
    daemon.drop_file("urgent.jsonl", &chat_lines("u", 3, true));
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
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_metrics_port_is_a_startup_error() {
    let sim = Sim::start(SimConfig::default()).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
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
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    // A partial batch would wait an hour; the schedule flushes every second instead.
    let daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.1\n\n[batch]\nmax_linger_secs = 3600\npoll_interval_secs = 0.1\n\n[schedules]\nflush = \"* * * * * *\"\n",
    );
    daemon.drop_file("few.jsonl", &chat_lines("f", 4, false));
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 4).await;
    let paths: Vec<String> = sqlx::query_scalar("SELECT DISTINCT path FROM results")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(paths, ["batch"]);
}
