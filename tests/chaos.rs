//! Chaos: the real daemon binary is killed with SIGKILL at pseudo-random moments and restarted,
//! while it works through mixed batch and real-time items. No item may be lost, stored with two
//! results, billed in two jobs, and no input file stored twice.
//!
//! `BATCHD_CHAOS_ITEMS` (default 1,000) and `BATCHD_CHAOS_KILLS` (default 10) set the size;
//! docs/benchmarks.md gives the full-size command (5,000 items, 30 kills).
//! `BATCHD_CHAOS_SEED` picks the kill schedule.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use batchd::simulate::{RateLimits, SimConfig};
use common::{Daemon, Sim, assert_answers_request};
use serde_json::{Value, json};
use sqlx::Row;

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const EMBEDDING_MODEL: &str = "BAAI/bge-large-en-v1.5";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (xorshift64), so a seed replays the same kill schedule.
struct Schedule(u64);

impl Schedule {
    fn next_millis(&mut self, min: u64, max: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        min + self.0 % (max - min)
    }
}

/// Input files of 250 lines: 60% batch chat, 20% urgent chat, 20% embeddings.
fn build_input(size: usize) -> (Vec<(String, String)>, HashMap<String, Value>) {
    let mut requests = HashMap::new();
    let mut lines = Vec::new();
    for i in 0..size {
        let id = format!("item-{i:05}");
        let line = match i % 5 {
            0 => {
                json!({"custom_id": id, "body": {"model": EMBEDDING_MODEL, "input": format!("chaos passage {i}")}})
            }
            1 => {
                json!({"custom_id": id, "urgent": true, "body": {"model": MODEL, "messages": [{"role": "user", "content": format!("urgent chaos question {i}")}]}})
            }
            _ => {
                json!({"custom_id": id, "body": {"model": MODEL, "messages": [{"role": "user", "content": format!("chaos question {i}")}]}})
            }
        };
        lines.push(line.to_string());
        requests.insert(id, line);
    }
    let files = lines
        .chunks(250)
        .enumerate()
        .map(|(n, chunk)| (format!("chaos-{n:03}.jsonl"), chunk.join("\n")))
        .collect();
    (files, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() {
    let size = env_number("BATCHD_CHAOS_ITEMS", 1000) as usize;
    let kills = env_number("BATCHD_CHAOS_KILLS", 10);
    let mut schedule = Schedule(env_number("BATCHD_CHAOS_SEED", 0x9E37_79B9_7F4A_7C15).max(1));
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_millis(600),
        limits: RateLimits {
            chat_per_minute: 1_000_000,
            completions_per_minute: 1_000_000,
            embeddings_per_minute: 1_000_000,
            images_per_minute: 1_000_000,
        },
        ..SimConfig::default()
    })
    .await;
    let mut daemon = Daemon::start(
        &sim.base_url,
        "[ingest]\nsettle_secs = 0.2\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n\n\
         [realtime]\nchat_per_minute = 60000\nembeddings_per_minute = 60000\n",
    );
    let (files, requests) = build_input(size);
    // Half the files are there from the start; the rest arrive while the daemon is killed.
    let (early, late) = files.split_at(files.len() / 2);
    for (name, content) in early {
        daemon.drop_file(name, content.as_bytes());
    }
    let mut late = late.iter();
    for kill in 0..kills {
        tokio::time::sleep(Duration::from_millis(schedule.next_millis(50, 1500))).await;
        daemon.kill();
        if let Some((name, content)) = late.next() {
            daemon.drop_file(name, content.as_bytes());
        }
        eprintln!("chaos: kill {} of {kills}", kill + 1);
        daemon.spawn();
    }
    for (name, content) in late {
        daemon.drop_file(name, content.as_bytes());
    }

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, size as i64).await;

    let rows = sqlx::query("SELECT custom_id, state, response FROM results")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(rows.len(), size, "one result row per input line");
    for row in &rows {
        let id: String = row.get("custom_id");
        assert_eq!(row.get::<String, _>("state"), "succeeded", "{id}");
        let response: Value = serde_json::from_str(&row.get::<String, _>("response")).unwrap();
        let body = &requests[&id]["body"];
        assert_answers_request(&id, body, &response);
    }

    let batch_items = requests
        .values()
        .filter(|r| r["urgent"] != true && r["body"].get("messages").is_some())
        .count();
    let stats = sim.stats.snapshot();
    assert_eq!(
        stats.max_jobs_per_input_file, 1,
        "two jobs for one uploaded file"
    );
    assert_eq!(
        stats.batch_lines_total as usize, batch_items,
        "a batch item was sent in two jobs"
    );

    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM input_files")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        stored as usize,
        files.len(),
        "an input file was stored twice or not at all"
    );
    let mut processed: Vec<String> = std::fs::read_dir(daemon.path("processed"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl"))
        .collect();
    processed.sort();
    let mut expected: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    assert_eq!(
        processed, expected,
        "every input file in processed/ exactly once"
    );
    let realtime = stats.realtime_requests.values().sum::<u64>();
    eprintln!(
        "chaos summary: {size} items, {kills} kills, {} batch jobs, {} batch lines, {realtime} real-time requests",
        stats.batches_created, stats.batch_lines_total
    );
}
