//! Property tests of the line parser, the line reader and whole-file checks on arbitrary bytes:
//! no panic, no line longer than the cap, and the same lines whatever the read buffer size.
//!
//! Each property runs 512 cases; set `BATCHD_FUZZ_CASES` to run more, for example
//! `BATCHD_FUZZ_CASES=200000 cargo test --release --test fuzz_input`.

use batchd::ingest::FileLimits;
use batchd::ingest::lines::LineReader;
use batchd::ingest::parse::parse_line;
use proptest::prelude::*;

/// Reads every line of `data` with a buffer of `capacity` bytes and a cap of `max` bytes.
fn read_lines(data: &[u8], capacity: usize, max: usize) -> Vec<(u64, Vec<u8>, bool)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let reader = tokio::io::BufReader::with_capacity(capacity, data);
        let mut lines = LineReader::new(reader, max);
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            out.push((line.number, line.bytes.to_vec(), line.too_long));
        }
        out
    })
}

fn cases() -> u32 {
    std::env::var("BATCHD_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(512)
}

/// Runs `batchd check`'s file checks on `data` stored under `name`.
fn check_bytes(name: &str, data: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, data).unwrap();
    let limits = FileLimits {
        max_line_bytes: 300,
        max_file_bytes: 4096,
        reject_file_on_error: false,
        commit_lines: 0,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let report = runtime
        .block_on(batchd::ingest::check_file(&path, &limits))
        .unwrap();
    assert!(report.items + report.error_count <= report.lines);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_line(&bytes);
    }

    #[test]
    fn parser_never_panics_on_near_json(text in r#"\{("custom_id"|"body"|"url"|"urgent"|"deadline"|"model"|"messages"|:|,|\[|\]|\{|\}|"x"|1|true|null| ){0,40}"#) {
        let _ = parse_line(text.as_bytes());
    }

    #[test]
    fn reader_caps_lines_and_ignores_buffer_size(
        bytes in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), any::<u8>()], 0..600),
        capacity in 1usize..64,
        max in 1usize..80,
    ) {
        let lines = read_lines(&bytes, capacity, max);
        for (i, (number, line, _)) in lines.iter().enumerate() {
            prop_assert_eq!(*number, i as u64 + 1);
            prop_assert!(line.len() <= max);
        }
        prop_assert_eq!(lines, read_lines(&bytes, 4096, max));
    }

    #[test]
    fn file_check_never_panics(
        lines in proptest::collection::vec(prop_oneof![
            Just(r#"{"custom_id": "a", "body": {"model": "m", "input": "x"}}"#.to_string()),
            Just(r#"{"custom_id": "b", "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}"#.to_string()),
            "[ -~]{0,40}",
        ], 0..40),
        noise in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut data = lines.join("\n").into_bytes();
        data.extend_from_slice(&noise);
        check_bytes("input.jsonl", &data);
        check_bytes("input.jsonl.gz", &data);
    }
}
