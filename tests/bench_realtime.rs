//! Benchmark: real-time throughput against an exact per-minute limit.
//!
//! Two simulators with the same settings enforce a sliding 60-second limit of L chat requests
//! and give each accepted request a log-normal latency. At the same time, the real batchd binary
//! (`realtime.chat_per_minute` = L, other settings at their defaults) works through urgent chat
//! items against one of them, and `tests/sdk/token_bucket_client.py`, an asyncio client on the
//! official Together SDK with a token bucket at L per minute, sends chat requests to the other.
//!
//! For each side, the measured window starts a warm-up after that side's first request reached
//! its simulator. The test prints, per side, the accepted requests per minute in the window
//! divided by L, and the 429s over the whole run. It asserts only correctness: every stored or
//! received response belongs to its request, nothing failed, and both clients exit cleanly.
//!
//! Settings: `BATCHD_BENCH_REALTIME_SECS` (measured window, default 20),
//! `BATCHD_BENCH_REALTIME_WARMUP_SECS` (default 5), `BATCHD_BENCH_REALTIME_LIMIT` (L, default 600),
//! and the latency's `BATCHD_BENCH_REALTIME_MEDIAN_MS` (default 1000) and
//! `BATCHD_BENCH_REALTIME_P99_MS` (default 5000). docs/benchmarks.md gives the full-size command. The Python side needs `BATCHD_SDK_PYTHON`, as `tests/sdk_contract.rs`
//! does, and is skipped without it outside CI.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use batchd::simulate::{LogNormalLatency, RateLimits, SimConfig, SimStats, SimStatsHandle};
use common::{Daemon, Sim, assert_answers_request, chat_lines};
use serde_json::Value;
use sqlx::Row;
use tokio::io::AsyncReadExt;

const CHAT: &str = "/v1/chat/completions";

/// Default latency of an accepted request, in milliseconds. NOTE: an estimate for short
/// responses of a 70B chat model, not a measurement of Together's service.
const DEFAULT_MEDIAN_MS: u64 = 1000;
const DEFAULT_P99_MS: u64 = 5000;

/// How often the test reads the simulators' counters; it bounds the error of each window edge.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Upper bound on the wait for a side's first request; only a broken start reaches it.
const START_PATIENCE: Duration = Duration::from_secs(120);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// The benchmark's size and the simulators' settings, from the environment.
struct Settings {
    /// Length of the measured window.
    window: Duration,
    /// Time from a side's first request to the start of its measured window.
    warmup: Duration,
    /// Chat requests per minute, for the simulators and for both clients.
    limit: u32,
    latency: LogNormalLatency,
}

impl Settings {
    fn from_env() -> Settings {
        let median = env_number("BATCHD_BENCH_REALTIME_MEDIAN_MS", DEFAULT_MEDIAN_MS);
        let p99 = env_number("BATCHD_BENCH_REALTIME_P99_MS", DEFAULT_P99_MS);
        let latency =
            LogNormalLatency::new(Duration::from_millis(median), Duration::from_millis(p99))
                .unwrap_or_else(|error| {
                    panic!(
                        "invalid BATCHD_BENCH_REALTIME_MEDIAN_MS or BATCHD_BENCH_REALTIME_P99_MS: \
                     {error}"
                    )
                });
        Settings {
            window: Duration::from_secs(env_number("BATCHD_BENCH_REALTIME_SECS", 20)),
            warmup: Duration::from_secs(env_number("BATCHD_BENCH_REALTIME_WARMUP_SECS", 5)),
            limit: env_number("BATCHD_BENCH_REALTIME_LIMIT", 600) as u32,
            latency,
        }
    }

    fn sim_config(&self) -> SimConfig {
        SimConfig {
            seed: 11,
            limits: RateLimits {
                chat_per_minute: self.limit,
                ..RateLimits::default()
            },
            realtime_latency: Some(self.latency),
            ..SimConfig::default()
        }
    }
}

/// Returns the chat requests a simulator accepted. No faults are injected, so every 429 is a
/// rejection by the per-minute window, and only the chat endpoint is used.
fn accepted(stats: &SimStats) -> u64 {
    stats.realtime_requests[CHAT] - stats.rate_limited
}

/// One client and the simulator it talks to, with the edges of its measured window.
struct Side {
    name: &'static str,
    stats: SimStatsHandle,
    first_request: Option<Instant>,
    window_start: Option<(Instant, u64)>,
    window_end: Option<(Instant, u64)>,
}

impl Side {
    fn new(name: &'static str, sim: &Sim) -> Side {
        Side {
            name,
            stats: sim.stats.clone(),
            first_request: None,
            window_start: None,
            window_end: None,
        }
    }

    /// Records the first request and the window's edges as the clock passes them.
    fn observe(&mut self, now: Instant, warmup: Duration, window: Duration) {
        let stats = self.stats.snapshot();
        if self.first_request.is_none() && stats.realtime_requests[CHAT] > 0 {
            self.first_request = Some(now);
        }
        let Some(first) = self.first_request else {
            return;
        };
        if self.window_start.is_none() && now >= first + warmup {
            self.window_start = Some((now, accepted(&stats)));
        }
        if self.window_end.is_none() && now >= first + warmup + window {
            self.window_end = Some((now, accepted(&stats)));
        }
    }

    /// Returns the accepted requests in the window and the window's length.
    fn measured(&self) -> (u64, Duration) {
        let (start, start_count) = self.window_start.expect("window started");
        let (end, end_count) = self.window_end.expect("window ended");
        (end_count - start_count, end - start)
    }
}

/// The Python client, started with its standard input open; closing it stops the client.
struct PythonClient {
    child: tokio::process::Child,
}

impl PythonClient {
    fn start(python: &Path, base_url: &str, limit: u32, max_secs: u64) -> PythonClient {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/token_bucket_client.py");
        let child = tokio::process::Command::new(python)
            .arg(&script)
            .arg(base_url)
            .arg(limit.to_string())
            .arg(max_secs.to_string())
            // The SDK reads these variables; values from the caller's environment must not leak in.
            .env_remove("TOGETHER_API_KEY")
            .env_remove("TOGETHER_BASE_URL")
            .env_remove("TOGETHER_PROJECT_ID")
            .env_remove("TOGETHER_CUSTOM_HEADERS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("failed to run {}: {error}", python.display()));
        PythonClient { child }
    }

    /// Closes the client's standard input and returns its summary line as JSON.
    async fn stop(mut self) -> Value {
        drop(self.child.stdin.take());
        let mut stdout = String::new();
        let mut stderr = String::new();
        let mut out = self.child.stdout.take().unwrap();
        let mut err = self.child.stderr.take().unwrap();
        let (read_out, read_err, status) = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(
                out.read_to_string(&mut stdout),
                err.read_to_string(&mut stderr),
                self.child.wait()
            )
        })
        .await
        .expect("the Python client did not exit within 60 s of its input closing");
        read_out.unwrap();
        read_err.unwrap();
        let status = status.unwrap();
        assert!(
            status.success(),
            "the Python client failed with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|error| {
            panic!("the Python client printed no JSON summary ({error}):\n{stdout}\n{stderr}")
        })
    }
}

/// Checks every item the daemon finished: none failed, and each response matches its own request.
/// Returns how many succeeded.
async fn check_daemon_results(daemon: &Daemon, requests: &HashMap<String, Value>) -> usize {
    let db = daemon.db().await;
    let rows = sqlx::query("SELECT custom_id, state, response, error FROM results")
        .fetch_all(&db)
        .await
        .unwrap();
    let mut succeeded = 0;
    for row in &rows {
        let id: String = row.get("custom_id");
        let state: String = row.get("state");
        assert_ne!(
            state,
            "failed",
            "{id} failed: {:?}",
            row.get::<Option<String>, _>("error")
        );
        if state == "succeeded" {
            let response: Value = serde_json::from_str(&row.get::<String, _>("response")).unwrap();
            assert_answers_request(&id, &requests[&id]["body"], &response);
            succeeded += 1;
        }
    }
    succeeded
}

fn print_table(settings: &Settings, rows: &[(&Side, SimStats)]) {
    let limit = settings.limit;
    eprintln!(
        "\nreal-time throughput against a sliding-window limit of {limit} chat requests per minute"
    );
    eprintln!(
        "latency: log-normal, median {} ms, p99 {} ms (mean {} ms); measured window {:.0} s after a {:.0} s warm-up",
        settings.latency.median().as_millis(),
        settings.latency.p99().as_millis(),
        settings.latency.mean().as_millis(),
        settings.window.as_secs_f64(),
        settings.warmup.as_secs_f64()
    );
    eprintln!(
        "{:<28} {:>9} {:>11} {:>7} {:>12} {:>14}",
        "client", "accepted", "per minute", "ratio", "429s (run)", "requests (run)"
    );
    for (side, stats) in rows {
        let (count, length) = side.measured();
        let per_minute = count as f64 * 60.0 / length.as_secs_f64();
        eprintln!(
            "{:<28} {:>9} {:>11.1} {:>7.3} {:>12} {:>14}",
            side.name,
            count,
            per_minute,
            per_minute / f64::from(limit),
            stats.rate_limited,
            stats.realtime_requests[CHAT]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_throughput_against_sliding_window_limit() {
    let settings = Settings::from_env();
    let (window, warmup, limit) = (settings.window, settings.warmup, settings.limit);
    let python = common::sdk_python("the Python side of the real-time benchmark");

    let batchd_sim = Sim::start(settings.sim_config()).await;
    let python_sim = Sim::start(settings.sim_config()).await;

    // A fifth more items than the limit allows over the run, so the daemon never runs dry.
    let run_secs = (warmup + window).as_secs() + 10;
    let items = (u64::from(limit) * run_secs / 60 * 6 / 5 + 50) as usize;
    let lines = chat_lines("bench", items, true);
    let requests: HashMap<String, Value> = lines
        .split(|&byte| byte == b'\n')
        .map(|line| serde_json::from_slice::<Value>(line).unwrap())
        .map(|line| (line["custom_id"].as_str().unwrap().to_owned(), line))
        .collect();
    let mut daemon = Daemon::prepare(
        &batchd_sim.base_url,
        &format!("[ingest]\nsettle_secs = 0.1\n\n[realtime]\nchat_per_minute = {limit}\n"),
    );
    daemon.drop_file("bench.jsonl", &lines);
    daemon.spawn();
    let client = python.as_deref().map(|python| {
        // Bounded in time even if this test dies before closing the client's input.
        let max_secs = START_PATIENCE.as_secs() + run_secs;
        PythonClient::start(python, &python_sim.base_url, limit, max_secs)
    });

    let mut sides = vec![Side::new("batchd", &batchd_sim)];
    if client.is_some() {
        sides.push(Side::new("Python SDK + token bucket", &python_sim));
    }
    let started = Instant::now();
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    while sides.iter().any(|side| side.window_end.is_none()) {
        ticks.tick().await;
        let now = Instant::now();
        for side in &mut sides {
            side.observe(now, warmup, window);
            assert!(
                side.first_request.is_some() || now - started < START_PATIENCE,
                "{} sent no request within {START_PATIENCE:?}; daemon log:\n{}",
                side.name,
                daemon.log()
            );
        }
    }

    let summary = match client {
        Some(client) => Some(client.stop().await),
        None => None,
    };
    // The daemon lets its calls under way finish, which takes simulated latency from the
    // simulators on this runtime, so this thread must not block the runtime while it waits.
    let status = tokio::task::block_in_place(|| daemon.stop());
    assert!(
        status.success(),
        "the daemon exited with {status}; log:\n{}",
        daemon.log()
    );

    let rows: Vec<(&Side, SimStats)> = sides
        .iter()
        .map(|side| (side, side.stats.snapshot()))
        .collect();
    print_table(&settings, &rows);

    let succeeded = check_daemon_results(&daemon, &requests).await;
    assert!(succeeded > 0, "the daemon stored no answer");
    if let Some(summary) = summary {
        eprintln!("Python client summary: {summary}");
        assert_eq!(summary["mismatched"], 0, "answers for other questions");
        assert_eq!(summary["failed"], 0, "failed requests: {summary}");
        assert!(
            summary["answered"].as_u64().unwrap() > 0,
            "no answer: {summary}"
        );
    }
}
