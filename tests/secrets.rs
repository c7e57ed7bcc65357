//! The API key never leaves the process except in the Authorization header: not in the log,
//! the command line, the database, reports, or the output of `status` and `validate`.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use batchd::simulate::SimConfig;
use common::{Daemon, Sim, wait_for};
use serde_json::json;

/// A key distinctive enough that any occurrence is a leak.
const SECRET: &str = "sk-leakcheck-7f3a9c2e5d1b";

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";

fn batchd(args: &[&str], config: &Path, credentials: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("CREDENTIALS_DIRECTORY", credentials)
        .env_remove("TOGETHER_API_KEY")
        .output()
        .unwrap()
}

/// Returns the files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_appears_nowhere() {
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(200),
        ..SimConfig::default()
    })
    .await;
    // The credential lives outside the data directory, as systemd keeps it.
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(
        credentials.path().join("together_api_key"),
        format!("{SECRET}\n"),
    )
    .unwrap();
    let mut daemon = Daemon::prepare(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n",
    );
    // With the environment key empty, the daemon only starts if it read the credential.
    daemon.spawn_with_env(&[
        (
            "CREDENTIALS_DIRECTORY",
            credentials.path().to_str().unwrap(),
        ),
        ("TOGETHER_API_KEY", ""),
        ("BATCHD_LOG", "debug"),
    ]);

    let mut lines: Vec<String> = (0..5)
        .map(|i| {
            json!({"custom_id": format!("b{i}"), "body": {"model": MODEL, "messages": [{"role": "user", "content": format!("question {i}")}]}})
                .to_string()
        })
        .collect();
    lines.push(
        json!({"custom_id": "fast", "urgent": true, "body": {"model": MODEL, "messages": [{"role": "user", "content": "now"}]}})
            .to_string(),
    );
    // The simulator rejects `stream: true` with a 400, so this item fails.
    lines.push(
        json!({"custom_id": "refused", "urgent": true, "body": {"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "stream"}]}})
            .to_string(),
    );
    daemon.drop_file("work.jsonl", lines.join("\n").as_bytes());
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 7).await;
    let failed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM work_items WHERE state = 'failed'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(failed, 1);
    db.close().await;

    let status = batchd(&["status"], &daemon.config_path, credentials.path());
    assert!(status.status.success(), "{status:?}");
    let validate = batchd(&["validate"], &daemon.config_path, credentials.path());
    assert!(validate.status.success(), "{validate:?}");
    assert!(contains(&validate.stdout, "api_key = \"<redacted>\""));

    let cmdline = std::fs::read(format!("/proc/{}/cmdline", daemon.pid())).unwrap();
    assert!(
        !contains(&cmdline, SECRET),
        "the key is in the command line"
    );
    wait_for(
        || daemon.log().contains("batch job submitted"),
        "a batch job",
    );
    assert!(daemon.stop().success());

    for (what, bytes) in [
        ("status stdout", &status.stdout),
        ("status stderr", &status.stderr),
        ("validate stdout", &validate.stdout),
        ("validate stderr", &validate.stderr),
    ] {
        assert!(!contains(bytes, SECRET), "the key is in the {what}");
    }
    let log = daemon.log();
    assert!(
        log.contains("DEBUG"),
        "the daemon did not log at debug level"
    );
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
    let files = files_under(daemon.dir.path());
    assert!(files.iter().any(|f| f.ends_with("batchd.db")));
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !contains(&bytes, SECRET),
            "the key is in {}",
            file.display()
        );
    }
}
