//! Graceful stop: SIGTERM with real-time calls in flight and a file being ingested ends with
//! exit status 0 within the grace period, `STOPPING=1` sent to systemd, and nothing lost at the
//! next start.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use batchd::simulate::SimConfig;
use common::{Daemon, Sim};
use serde_json::Value;

const GRACE_SECS: u64 = 10;

/// Reads every datagram the daemon sent to the notify socket so far.
fn notifications(socket: &UnixDatagram) -> Vec<String> {
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_calls_and_loses_nothing() {
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(300),
        realtime_delay: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let mut daemon = Daemon::prepare(
        &sim.base_url,
        &format!(
            "[ingest]\nsettle_secs = 0.2\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n\n[daemon]\nshutdown_grace_secs = {GRACE_SECS}\n"
        ),
    );
    let socket_path = daemon.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_nonblocking(true).unwrap();
    daemon.spawn_with_env(&[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);

    daemon.drop_file("urgent.jsonl", &common::chat_lines("urgent", 3, true));
    let log_url = sim.base_url.replace("/v1", "/_sim/requests");
    let started = Instant::now();
    loop {
        let log: Vec<Value> = reqwest::get(&log_url).await.unwrap().json().await.unwrap();
        let in_flight = log
            .iter()
            .filter(|r| r["path"] == "/v1/chat/completions" && r["status"] == 0)
            .count();
        if in_flight == 3 {
            break;
        }
        assert!(
            started.elapsed() < common::PATIENCE,
            "the three calls never went out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.drop_file("big.jsonl", &common::chat_lines("big", 5000, false));
    tokio::time::sleep(Duration::from_millis(250)).await;

    let signalled = Instant::now();
    let status = daemon.stop();
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        daemon.log()
    );
    assert!(
        took < Duration::from_secs(GRACE_SECS + 1),
        "stopping took {took:?}"
    );

    let messages = notifications(&socket);
    let ready = messages
        .iter()
        .position(|m| m.contains("READY=1"))
        .expect("READY=1 sent");
    let stopping = messages
        .iter()
        .position(|m| m.contains("STOPPING=1"))
        .expect("STOPPING=1 sent");
    assert!(ready < stopping, "{messages:?}");

    // The calls in flight finished within the grace period and their responses were stored.
    let db = daemon.db().await;
    let urgent: Vec<String> =
        sqlx::query_scalar("SELECT state FROM results WHERE input_file = 'urgent.jsonl'")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(urgent, ["succeeded", "succeeded", "succeeded"]);
    assert_eq!(
        sim.stats.snapshot().realtime_requests["/v1/chat/completions"],
        3
    );

    daemon.spawn();
    daemon.wait_all_terminal(&db, 5003).await;
    let succeeded: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM results WHERE state = 'succeeded'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(succeeded, 5003);
    let files: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM input_files")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(files, 2);
    assert!(daemon.path("processed/big.jsonl").exists());
    assert!(!daemon.path("processed/big-1.jsonl").exists());
}
