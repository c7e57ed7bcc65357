//! Config from the operator's side: `batchd validate`, every problem reported at once, JSON
//! logs, and SIGHUP applying live settings to a running daemon or rejecting a bad config.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use batchd::simulate::SimConfig;
use common::{Daemon, Sim, wait_for};
use serde_json::json;
use sqlx::SqlitePool;

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";

/// Runs `batchd validate` on the daemon's config with extra environment variables.
fn validate(daemon: &Daemon, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_batchd"))
        .arg("validate")
        .arg("--config")
        .arg(&daemon.config_path)
        .env("TOGETHER_API_KEY", "test-key")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn chat_lines(prefix: &str, count: usize) -> Vec<u8> {
    let lines: Vec<String> = (0..count)
        .map(|i| {
            json!({
                "custom_id": format!("{prefix}-{i}"),
                "body": {"model": MODEL, "messages": [{"role": "user", "content": format!("{prefix} {i}")}]}
            })
            .to_string()
        })
        .collect();
    lines.join("\n").into_bytes()
}

/// Returns the item counts of the batches that hold items of `prefix`, in packing order.
async fn batch_sizes(db: &SqlitePool, prefix: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT b.item_count FROM batches b WHERE EXISTS (SELECT 1 FROM work_items w \
         WHERE w.batch_id = b.id AND w.custom_id LIKE ?) ORDER BY b.id",
    )
    .bind(format!("{prefix}-%"))
    .fetch_all(db)
    .await
    .unwrap()
}

fn hang_up(daemon: &Daemon) {
    let status = Command::new("kill")
        .arg("-HUP")
        .arg(daemon.pid().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn validate_prints_resolved_config_with_key_hidden() {
    let daemon = Daemon::prepare("http://127.0.0.1:9", "[batch]\nmax_requests = 40\n");
    let output = validate(&daemon, &[("BATCHD_REALTIME__CHAT_PER_MINUTE", "120")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let resolved: toml::Table = toml::from_str(&stdout).unwrap();
    assert_eq!(resolved["batch"]["max_requests"].as_integer(), Some(40));
    assert_eq!(
        resolved["realtime"]["chat_per_minute"].as_integer(),
        Some(120)
    );
    assert_eq!(resolved["batch"]["max_in_flight"].as_integer(), Some(10));
    assert_eq!(resolved["daemon"]["log_format"].as_str(), Some("text"));
    assert_eq!(resolved["provider"]["api_key"].as_str(), Some("<redacted>"));
    assert!(!stdout.contains("test-key"), "{stdout}");
}

#[test]
fn validate_fails_without_a_key() {
    let daemon = Daemon::prepare("http://127.0.0.1:9", "");
    let output = validate(&daemon, &[("TOGETHER_API_KEY", "")]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("api_key = \"<unset>\""), "{stdout}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no API key"), "{stderr}");
}

#[test]
fn validate_lists_every_problem_and_fails() {
    let daemon = Daemon::prepare(
        "http://127.0.0.1:9",
        "[batch]\nmax_request = 5\nmax_in_flight = \"ten\"\n\n[realtime]\nchat_per_minute = 0\n",
    );
    let output = validate(&daemon, &[("BATCHD_BATCH__MAX_BYTES", "lots")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let config = daemon.config_path.display().to_string();
    let expected = [
        format!("{config}: `batch.max_request` is not a known key: did you mean `batch.max_requests`?"),
        format!("{config}: `batch.max_in_flight` = \"ten\" is a string, expected a whole number"),
        format!("{config}: `realtime.chat_per_minute` = 0 is out of range"),
        "BATCHD_BATCH__MAX_BYTES: `batch.max_bytes` = \"lots\" is a string, expected a whole number"
            .to_string(),
    ];
    for line in &expected {
        assert!(
            stderr.contains(line.as_str()),
            "{line:?} missing from:\n{stderr}"
        );
    }
    assert!(stderr.contains("(4 problems)"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_json_lines() {
    let sim = Sim::start(SimConfig::default()).await;
    let mut daemon = Daemon::prepare(&sim.base_url, "");
    daemon.spawn_with_env(&[("BATCHD_LOG_FORMAT", "json")]);
    wait_for(
        || daemon.log().contains("batchd started"),
        "the daemon to start",
    );
    assert!(daemon.stop().success());

    let log = daemon.log();
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(event["level"].is_string(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_applies_good_config_and_rejects_bad() {
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(200),
        ..SimConfig::default()
    })
    .await;
    let mut daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\n\n[batch]\nmax_requests = 100\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n",
    );
    wait_for(
        || daemon.log().contains("batchd started"),
        "the daemon to start",
    );
    let original = std::fs::read_to_string(&daemon.config_path).unwrap();
    let db = daemon.db().await;

    daemon.drop_file("before.jsonl", &chat_lines("before", 12));
    daemon.wait_all_terminal(&db, 12).await;
    assert_eq!(batch_sizes(&db, "before").await, [12]);

    // A live key and a key that needs a restart.
    let good = original
        .replace("max_requests = 100", "max_requests = 5")
        .replace("settle_secs = 0.2", "settle_secs = 0.25");
    std::fs::write(&daemon.config_path, &good).unwrap();
    hang_up(&daemon);
    wait_for(
        || daemon.log().contains("needs a restart"),
        "the reload to be logged",
    );
    let log = daemon.log();
    let reloaded = log
        .lines()
        .find(|l| l.contains("config reloaded") && l.contains("batch.max_requests"))
        .unwrap_or_else(|| panic!("no reload line for batch.max_requests:\n{log}"));
    assert!(
        reloaded.contains("old=100") && reloaded.contains("new=5"),
        "{reloaded}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("needs a restart") && l.contains("ingest.settle_secs")),
        "{log}"
    );

    daemon.drop_file("after.jsonl", &chat_lines("after", 12));
    daemon.wait_all_terminal(&db, 24).await;
    assert_eq!(batch_sizes(&db, "after").await, [5, 5, 2]);

    let bad = good.replace("max_requests = 5", "max_requests = 0\nmax_lingr_secs = 1");
    std::fs::write(&daemon.config_path, &bad).unwrap();
    hang_up(&daemon);
    wait_for(
        || daemon.log().contains("config reload rejected"),
        "the rejection to be logged",
    );
    let log = daemon.log();
    let rejected = log
        .lines()
        .find(|l| l.contains("config reload rejected"))
        .unwrap();
    assert!(rejected.contains("ERROR"), "{rejected}");
    assert!(rejected.contains("`batch.max_requests` = 0"), "{rejected}");
    assert!(rejected.contains("`batch.max_lingr_secs`"), "{rejected}");

    daemon.drop_file("rejected.jsonl", &chat_lines("kept", 7));
    daemon.wait_all_terminal(&db, 31).await;
    assert_eq!(batch_sizes(&db, "kept").await, [5, 2]);
    assert!(daemon.stop().success(), "{}", daemon.log());
}
