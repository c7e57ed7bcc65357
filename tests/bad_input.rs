//! A corpus of broken input files dropped into a running daemon: each comes back with a report
//! naming every bad line and its reason, the good lines are ingested, and the daemon keeps
//! running.

mod common;

use std::time::Duration;

use common::{Daemon, Sim};
use serde_json::Value;

const GOOD: &str = r#"{"custom_id": "good", "body": {"model": "meta-llama/Llama-3.3-70B-Instruct-Turbo", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}}"#;

fn good(id: &str) -> String {
    GOOD.replace("\"good\"", &format!("{id:?}"))
}

/// One corpus file: its bytes, where it should end, and the expected (line, reason start).
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    disposition: &'static str,
    errors: Vec<(u64, &'static str)>,
}

fn case(name: &'static str, bad_line: &str, reason: &'static str) -> Case {
    Case {
        name,
        bytes: format!("{}\n{bad_line}\n{}\n", good("first"), good("last")).into_bytes(),
        disposition: "processed",
        errors: vec![(2, reason)],
    }
}

fn corpus() -> Vec<Case> {
    let chat = |body: &str| {
        format!(r#"{{"custom_id": "x", "url": "/v1/chat/completions", "body": {body}}}"#)
    };
    let mut cases = vec![
        case("not-json.jsonl", "hello there", "not valid JSON"),
        case("array.jsonl", "[1, 2]", "expected a JSON object like"),
        case(
            "missing-id.jsonl",
            r#"{"body": {"model": "m", "input": "x"}, "url": "/v1/embeddings"}"#,
            "missing \"custom_id\"",
        ),
        case(
            "empty-id.jsonl",
            r#"{"custom_id": " ", "body": {"model": "m", "input": "x"}}"#,
            "\"custom_id\" is empty",
        ),
        case(
            "numeric-id.jsonl",
            r#"{"custom_id": 5, "body": {"model": "m", "input": "x"}}"#,
            "\"custom_id\" must be a string, found a number",
        ),
        case(
            "duplicate-id.jsonl",
            &good("first"),
            "\"custom_id\" \"first\" repeats the one on line 1",
        ),
        case(
            "missing-body.jsonl",
            r#"{"custom_id": "x"}"#,
            "missing \"body\"",
        ),
        case(
            "body-string.jsonl",
            r#"{"custom_id": "x", "body": "hi"}"#,
            "\"body\" must be a JSON object, found a string",
        ),
        case(
            "bad-url.jsonl",
            r#"{"custom_id": "x", "url": "/v1/responses", "body": {"model": "m", "input": "x"}}"#,
            "\"url\" \"/v1/responses\" is not an endpoint batchd serves",
        ),
        case(
            "url-number.jsonl",
            r#"{"custom_id": "x", "url": 5, "body": {"model": "m", "input": "x"}}"#,
            "\"url\" must be a string",
        ),
        case(
            "get-method.jsonl",
            r#"{"custom_id": "x", "method": "GET", "body": {"model": "m", "input": "x"}}"#,
            "\"method\" must be \"POST\"",
        ),
        case(
            "no-model.jsonl",
            &chat(r#"{"messages": [{"role": "user", "content": "x"}]}"#),
            "missing \"body.model\"",
        ),
        case(
            "model-number.jsonl",
            &chat(r#"{"model": 3, "messages": [{"role": "user", "content": "x"}]}"#),
            "\"body.model\" must be a string",
        ),
        case(
            "no-messages.jsonl",
            &chat(r#"{"model": "m"}"#),
            "missing \"body.messages\"",
        ),
        case(
            "empty-messages.jsonl",
            &chat(r#"{"model": "m", "messages": []}"#),
            "\"body.messages\" is empty",
        ),
        case(
            "messages-string.jsonl",
            &chat(r#"{"model": "m", "messages": "hi"}"#),
            "\"body.messages\" must be an array",
        ),
        case(
            "embed-no-input.jsonl",
            r#"{"custom_id": "x", "url": "/v1/embeddings", "body": {"model": "m"}}"#,
            "missing \"body.input\"",
        ),
        case(
            "embed-number.jsonl",
            r#"{"custom_id": "x", "url": "/v1/embeddings", "body": {"model": "m", "input": 5}}"#,
            "\"body.input\" must be a string or an array",
        ),
        case(
            "no-endpoint.jsonl",
            r#"{"custom_id": "x", "body": {"model": "m"}}"#,
            "cannot tell the endpoint",
        ),
        case(
            "urgent-string.jsonl",
            r#"{"custom_id": "x", "urgent": "yes", "body": {"model": "m", "input": "x"}}"#,
            "\"urgent\" must be true or false",
        ),
        case(
            "bad-deadline.jsonl",
            r#"{"custom_id": "x", "deadline": "tomorrow", "body": {"model": "m", "input": "x"}}"#,
            "\"deadline\" \"tomorrow\" is not an RFC 3339 time",
        ),
        case(
            "deadline-number.jsonl",
            r#"{"custom_id": "x", "deadline": 5, "body": {"model": "m", "input": "x"}}"#,
            "\"deadline\" must be an RFC 3339 time string",
        ),
        case(
            "gemini.jsonl",
            r#"{"key": "k1", "request": {"contents": []}}"#,
            "this is a Gemini batch line",
        ),
        case(
            "anthropic.jsonl",
            r#"{"custom_id": "x", "params": {"model": "m"}}"#,
            "this is an Anthropic batch line",
        ),
        case(
            "bare-body.jsonl",
            r#"{"model": "m", "messages": []}"#,
            "this is a bare request body without an id",
        ),
        case(
            "long-line.jsonl",
            &format!(
                r#"{{"custom_id": "x", "body": {{"model": "m", "input": "{}"}}}}"#,
                "y".repeat(3000)
            ),
            "line is longer than the maximum of 2000 bytes",
        ),
    ];
    let mut invalid_utf8 = case("invalid-utf8.jsonl", "", "invalid UTF-8");
    invalid_utf8.bytes = [
        good("first").as_bytes(),
        b"\n{\"custom_id\": \"\xff\"}\n",
        good("last").as_bytes(),
    ]
    .concat();
    cases.push(invalid_utf8);
    let mut bom = case(
        "bom-in-middle.jsonl",
        "",
        "line starts with a byte-order mark",
    );
    bom.bytes = format!(
        "{}\n\u{feff}{}\n{}\n",
        good("first"),
        good("second"),
        good("last")
    )
    .into_bytes();
    cases.push(bom);
    let mut nul = case("nul-byte.jsonl", "", "NUL byte at byte");
    nul.bytes = [
        good("first").as_bytes(),
        b"\n{\"custom_id\": \"a\0\"}\n",
        good("last").as_bytes(),
    ]
    .concat();
    cases.push(nul);
    let rejected = |name, bytes: Vec<u8>, errors| Case {
        name,
        bytes,
        disposition: "rejected",
        errors,
    };
    cases.push(rejected("empty.jsonl", Vec::new(), vec![]));
    cases.push(rejected("blank.jsonl", b"\n   \n\t\n".to_vec(), vec![]));
    cases.push(rejected(
        "all-bad.jsonl",
        b"nope\n[1]\n".to_vec(),
        vec![(1, "not valid JSON"), (2, "expected a JSON object")],
    ));
    let utf16: Vec<u8> = good("wide")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    cases.push(rejected(
        "utf16.jsonl",
        utf16,
        vec![(1, "NUL byte at byte 2")],
    ));
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_file_gets_a_precise_report() {
    let sim = Sim::fast().await;
    let mut daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\nmax_line_bytes = 2000\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n",
    );
    let cases = corpus();
    assert!(cases.len() >= 30, "the corpus has {} files", cases.len());
    for case in &cases {
        daemon.drop_file(case.name, &case.bytes);
    }
    // A well-formed file with a BOM, CRLF line ends and no final newline is fine.
    daemon.drop_file(
        "crlf-bom.jsonl",
        format!("\u{feff}{}\r\n\r\n{}", good("a"), good("b")).as_bytes(),
    );

    // Every processed case has two good lines, and so has the CRLF file.
    let processed_good_lines = 2 * cases
        .iter()
        .filter(|c| c.disposition == "processed")
        .count() as i64
        + 2;
    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, processed_good_lines).await;

    for case in &cases {
        let report_path = daemon.path(&format!("{}/{}.report.json", case.disposition, case.name));
        common::wait_for(|| report_path.exists(), case.name);
        let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
        assert_eq!(report["disposition"], case.disposition, "{}", case.name);
        let errors = report["errors"].as_array().unwrap();
        assert_eq!(errors.len(), case.errors.len(), "{}: {errors:?}", case.name);
        for (error, (line, reason)) in errors.iter().zip(&case.errors) {
            assert_eq!(error["line"], *line, "{}", case.name);
            let text = error["reason"].as_str().unwrap();
            assert!(
                text.starts_with(reason),
                "{}: {text:?} should start with {reason:?}",
                case.name
            );
            let message = error["message"].as_str().unwrap();
            let expected_prefix = format!(
                "{}:{line}: ",
                daemon.path(&format!("inbox/{}", case.name)).display()
            );
            assert!(
                message.starts_with(&expected_prefix),
                "{}: {message}",
                case.name
            );
        }
        if case.disposition == "rejected" {
            assert!(
                report["reason"].as_str().is_some(),
                "{}: a rejected file says why",
                case.name
            );
        }
    }

    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT custom_id FROM results WHERE input_file = 'crlf-bom.jsonl' ORDER BY line_no",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        ids,
        ["a", "b"],
        "the byte-order mark is not part of the first id"
    );
    let inbox_left = std::fs::read_dir(daemon.path("inbox"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_file())
        .count();
    assert_eq!(inbox_left, 0, "every file left the inbox");
    assert!(
        daemon.stop().success(),
        "the daemon kept running through the corpus"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folders_and_outside_links_are_reported_once() {
    let sim = Sim::fast().await;
    let daemon = Daemon::prepare(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.1\nrescan_interval_secs = 0.1\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n",
    );
    let inbox = daemon.path("inbox");
    std::fs::create_dir_all(inbox.join("nested")).unwrap();
    std::fs::write(inbox.join("nested/inside.jsonl"), good("nested")).unwrap();
    std::fs::create_dir_all(inbox.join(".staging")).unwrap();
    std::fs::write(inbox.join(".staging/real.jsonl"), good("linked")).unwrap();
    std::os::unix::fs::symlink(
        inbox.join(".staging/real.jsonl"),
        inbox.join("linked.jsonl"),
    )
    .unwrap();
    let outside = daemon.path("outside.jsonl");
    std::fs::write(&outside, good("outside")).unwrap();
    std::os::unix::fs::symlink(&outside, inbox.join("outside-link.jsonl")).unwrap();
    let mut daemon = daemon;
    daemon.spawn();

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 1).await;
    // Let several rescans pass, to show that each skipped entry is logged once.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT custom_id FROM results")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(
        ids,
        ["linked"],
        "only the link inside the inbox was followed"
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("folders inside the inbox are not scanned")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("leads outside the inbox and is not followed")
            .count(),
        1,
        "{log}"
    );
    assert!(
        inbox.join("nested/inside.jsonl").exists(),
        "files in folders are left alone"
    );
    assert!(
        inbox.join("outside-link.jsonl").exists(),
        "the outside link is left alone"
    );
    assert!(outside.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_content_and_taken_names() {
    let sim = Sim::fast().await;
    let daemon = Daemon::start(&sim.base_url, common::FAST_PIPELINE);
    daemon.drop_file("first.jsonl", good("one").as_bytes());
    common::wait_for(
        || daemon.path("processed/first.jsonl.report.json").exists(),
        "the first file",
    );

    // The same content under another name is moved away as a duplicate, with no new item.
    daemon.drop_file("copy.jsonl", good("one").as_bytes());
    common::wait_for(
        || daemon.path("processed/copy.jsonl.report.json").exists(),
        "the copy",
    );
    let report: Value = serde_json::from_slice(
        &std::fs::read(daemon.path("processed/copy.jsonl.report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["disposition"], "duplicate");
    assert_eq!(report["duplicate_of"], "first.jsonl");
    assert_eq!(report["items"], 0);

    // New content under a name already in processed/ gets a free name; nothing is overwritten.
    daemon.drop_file("first.jsonl", good("two").as_bytes());
    common::wait_for(
        || daemon.path("processed/first-1.jsonl.report.json").exists(),
        "the second first.jsonl",
    );
    assert!(
        std::fs::read_to_string(daemon.path("processed/first.jsonl"))
            .unwrap()
            .contains("\"one\"")
    );
    assert!(
        std::fs::read_to_string(daemon.path("processed/first-1.jsonl"))
            .unwrap()
            .contains("\"two\"")
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 2).await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT custom_id FROM results ORDER BY custom_id")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(ids, ["one", "two"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_file_retried_until_readable() {
    use std::os::unix::fs::PermissionsExt;

    let sim = Sim::fast().await;
    let mut daemon = Daemon::prepare(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.1\nrescan_interval_secs = 0.1\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n",
    );
    let inbox = daemon.path("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let partial = inbox.join("locked.jsonl.part");
    std::fs::write(&partial, good("locked")).unwrap();
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::rename(&partial, inbox.join("locked.jsonl")).unwrap();
    daemon.drop_file("open.jsonl", good("open").as_bytes());
    daemon.spawn_honouring_permissions();

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 1).await;
    // Let several rescans pass, to show that the failure is logged once and the file stays.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let log = daemon.log();
    assert_eq!(
        log.matches("failed to ingest input file").count(),
        1,
        "{log}"
    );
    assert!(log.contains("Permission denied"), "{log}");
    assert!(inbox.join("locked.jsonl").exists(), "the file is not moved");

    std::fs::set_permissions(
        inbox.join("locked.jsonl"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    daemon.wait_all_terminal(&db, 2).await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT custom_id FROM results ORDER BY custom_id")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(ids, ["locked", "open"]);
    assert!(daemon.path("processed/locked.jsonl").exists());
}

/// Compresses `text` with the system's gzip, as a user would.
fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap().stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_files_are_decompressed_and_checked() {
    let sim = Sim::fast().await;
    let daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.1\nmax_file_bytes = 20000\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n",
    );
    let lines = format!("{}\nnot json\n{}\n", good("a"), good("b"));
    daemon.drop_file("mixed.jsonl.gz", &gzip(&lines));
    daemon.drop_file("broken.jsonl.gz", b"this is not gzip at all\n");
    // 200 lines of about 160 bytes are 32 kB once decompressed, over the 20 kB limit, while
    // the compressed file is far under it.
    let big: String = (0..200).map(|n| good(&format!("big-{n}")) + "\n").collect();
    let compressed = gzip(&big);
    assert!(compressed.len() < 20_000);
    daemon.drop_file("bomb.jsonl.gz", &compressed);

    let report = |path: &str| -> Value {
        let path = daemon.path(path);
        common::wait_for(|| path.exists(), "a report");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let mixed = report("processed/mixed.jsonl.gz.report.json");
    assert_eq!(mixed["items"], 2);
    assert_eq!(mixed["errors"][0]["line"], 2);
    assert!(
        mixed["errors"][0]["message"]
            .as_str()
            .unwrap()
            .ends_with("mixed.jsonl.gz:2: not valid JSON: expected ident at line 1 column 2"),
        "{mixed}"
    );
    let broken = report("rejected/broken.jsonl.gz.report.json");
    assert!(
        broken["reason"]
            .as_str()
            .unwrap()
            .starts_with("file is not valid gzip"),
        "{broken}"
    );
    let bomb = report("rejected/bomb.jsonl.gz.report.json");
    assert!(
        bomb["reason"]
            .as_str()
            .unwrap()
            .starts_with("decompressed content is more than the maximum of 20000 bytes"),
        "{bomb}"
    );

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 2).await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT custom_id FROM results ORDER BY custom_id")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(ids, ["a", "b"], "a rejected file leaves no items");
}
