//! The command line as a user runs it: `simulate`, `demo` and their error messages.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn batchd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_batchd"))
}

#[test]
fn simulate_prints_base_url_first() {
    let mut child = batchd()
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let url = first.trim_end();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(url.ends_with("/v1"), "{url}");
    let port: u16 = url["http://127.0.0.1:".len()..url.len() - 3]
        .parse()
        .unwrap();
    assert_ne!(port, 0);
}

#[test]
fn simulate_refuses_non_loopback_address() {
    let output = batchd()
        .args(["simulate", "--listen", "0.0.0.0:8080"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("0.0.0.0:8080"), "{stderr}");
    assert!(stderr.contains("loopback"), "{stderr}");
}

#[test]
fn run_without_api_key_names_variable() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("batchd.toml");
    std::fs::write(
        &config,
        format!(
            "[provider]\nbase_url = \"http://127.0.0.1:9/v1\"\n[paths]\ninbox = {:?}\ndatabase = {:?}\n",
            dir.path().join("inbox").display().to_string(),
            dir.path().join("db.sqlite").display().to_string()
        ),
    )
    .unwrap();
    let output = batchd()
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("TOGETHER_API_KEY")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("TOGETHER_API_KEY"));
}

#[test]
fn invalid_config_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("batchd.toml");
    std::fs::write(
        &config,
        "[paths]\ninbox = \"/tmp/x\"\n[batch]\nmax_requests = 0\n",
    )
    .unwrap();
    let output = batchd()
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("paths.database"), "{stderr}");
    assert!(stderr.contains("batch.max_requests"), "{stderr}");
}

#[test]
fn demo_runs_a_users_file_offline() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mine.jsonl");
    let lines: Vec<String> = (0..5)
        .map(|i| format!(r#"{{"custom_id": "q{i}", "body": {{"model": "meta-llama/Llama-3.3-70B-Instruct-Turbo", "messages": [{{"role": "user", "content": "question {i}"}}]}}}}"#))
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let workdir = dir.path().join("demo");
    let output = batchd()
        .args(["demo", "--turnaround", "0.3", "--workdir"])
        .arg(&workdir)
        .arg(&input)
        .env_remove("TOGETHER_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("succeeded         5"), "{stdout}");
    assert!(workdir.join("batchd.db").exists());
    let export = std::fs::read_to_string(workdir.join("outbox/mine.results.jsonl"))
        .expect("the demo waits for the export");
    assert_eq!(export.lines().count(), 5);
}

#[test]
fn check_reports_bad_lines_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        r#"{"custom_id": "a", "body": {"model": "m", "input": "text"}}"#,
    )
    .unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"custom_id\": \"a\", \"body\": {\"model\": \"m\", \"input\": \"text\"}}\nnot json\n\
         {\"custom_id\": \"a\", \"body\": {\"model\": \"m\", \"input\": \"more\"}}\n",
    )
    .unwrap();

    let output = batchd().arg("check").arg(&good).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    let output = batchd().arg("check").arg(&good).arg(&bad).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("good.jsonl: 1 lines, 1 valid, 0 invalid"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{}:2: not valid JSON", bad.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{}:3: \"custom_id\" \"a\" repeats the one on line 1",
            bad.display()
        )),
        "{stdout}"
    );
}
