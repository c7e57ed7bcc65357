//! Property tests of the line parser and the line reader on arbitrary bytes: no panic, no line
//! longer than the cap, and the same lines whatever the read buffer size.

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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

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
}
