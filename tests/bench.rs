//! Benchmarks of the real daemon binary against the in-process simulator, each printing its
//! figures (run with `--nocapture`). docs/benchmarks.md has the full-size commands and results.
//!
//! The sizes come from environment variables and default to small values, so that the test
//! command runs every benchmark once as a smoke run. Nothing here asserts a time or a rate: the
//! assertions check that the work was done, and the figures are for people to read. Run one at a
//! time (`--test-threads=1`) and with `--release` when the figures matter.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use batchd::simulate::SimConfig;
use common::{CHAT_MODEL, Daemon, PATIENCE, Sim, wait_for};
use sqlx::SqlitePool;

/// Reads a size from the environment, or `default` when unset.
fn size(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{var}={value:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Reads seconds from the environment, or `default` when unset.
fn seconds(var: &str, default: f64) -> Duration {
    match std::env::var(var) {
        Ok(value) => Duration::from_secs_f64(
            value
                .parse()
                .unwrap_or_else(|_| panic!("{var}={value:?} is not a number of seconds")),
        ),
        Err(_) => Duration::from_secs_f64(default),
    }
}

/// Writes `count` chat requests of about 650 bytes each, shaped like a user's evaluation set: a
/// system prompt, a word problem and sampling settings.
fn write_requests(path: &Path, count: u64) {
    let system = "You are a careful math tutor. Solve the word problem step by step, show each \
                  intermediate calculation on its own line, and finish with a line of the form \
                  'Answer: <number>'. Keep the explanation short and plain.";
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..count {
        let question = format!(
            "Question {i}: a farmer has {} cows and {} sheep. She buys {} more cows at the \
             market, sells {} sheep to a neighbour, and each cow gives {} litres of milk a day. \
             How many animals does she have now, and how much milk do the cows give in a week?",
            i % 97,
            i % 89,
            i % 13,
            i % 7,
            i % 11 + 5
        );
        let line = serde_json::json!({
            "custom_id": format!("q-{i:07}"),
            "body": {
                "model": CHAT_MODEL,
                "max_tokens": 512,
                "temperature": 0.2,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
            },
        });
        writeln!(out, "{line}").unwrap();
    }
    out.flush().unwrap();
}

/// Moves a written file into the daemon's inbox in one rename, the way the README describes.
fn drop_path(daemon: &Daemon, source: &Path, name: &str) {
    let inbox = daemon.path("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::rename(source, inbox.join(name)).unwrap();
}

/// Readings of `/proc` for one running process.
struct Proc {
    pid: u32,
}

impl Proc {
    /// Returns the user plus system CPU time, in the kernel's 10 ms ticks.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        // The command name may contain spaces, so fields are counted from its closing parenthesis.
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }

    /// Returns a `kB` field of `/proc/PID/status`, such as `VmRSS` or `VmHWM`, in MiB.
    fn memory_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid));
        kib / 1024.0
    }

    /// Returns the context switches of all the process's threads so far. Each is a wakeup or a
    /// preemption.
    fn switches(&self) -> u64 {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid)).unwrap();
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
            .flat_map(|status| {
                status
                    .lines()
                    .filter(|line| line.contains("ctxt_switches:"))
                    .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }
}

/// Waits for a line of the daemon's log containing `text`, polling the file.
fn wait_for_log(daemon: &Daemon, text: &str) {
    wait_for(|| daemon.log().contains(text), text);
}

/// Counts the items that reached a final state, through the partial `finished_at` index.
async fn finished(db: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM work_items WHERE finished_at IS NOT NULL")
        .fetch_one(db)
        .await
        .unwrap()
}

/// Waits until `expected` items have finished, checking every 50 ms, and returns that moment.
async fn wait_finished(daemon: &Daemon, db: &SqlitePool, expected: u64) -> Instant {
    let started = Instant::now();
    loop {
        if finished(db).await as u64 >= expected {
            return Instant::now();
        }
        assert!(
            started.elapsed() < PATIENCE * 4,
            "items stopped finishing; daemon log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes every dirty page to disk, so that the kernel flushing what an earlier step wrote
/// (the generated file, the other side's database) does not slow the step being timed.
fn flush_disk() {
    let _ = Command::new("sync").status();
}

/// Loads the lines of `file` into a one-column table with the `sqlite3` shell and returns the
/// time it took, or `None` when the shell is missing outside CI.
fn sqlite_import(file: &Path, dir: &Path) -> Option<Duration> {
    let script = format!(
        "CREATE TABLE t(line TEXT);\n.mode ascii\n.separator \"\\037\" \"\\n\"\n.import {} t\n",
        file.display()
    );
    let started = Instant::now();
    let child = Command::new("sqlite3")
        .arg(dir.join("import.db"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "the sqlite3 shell is missing under CI ({error}); .ci/run must install it"
            );
            eprintln!("skipped the sqlite3 comparison: the sqlite3 shell is not installed");
            return None;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sqlite3 .import failed");
    Some(started.elapsed())
}

/// Runs `batchd` with `args` and returns how long it took.
fn time_command(args: &[&str]) -> Duration {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(args)
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "batchd {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

/// Returns the median and the largest of `times`, in milliseconds.
fn median_and_max_ms(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(times[times.len() / 2]), ms(*times.last().unwrap()))
}

/// Measures the ingest rate against `sqlite3 .import`, then, with every item still queued behind ten jobs
/// that do not finish, the time `batchd status` takes and the daemon's memory.
/// Full size: `BATCHD_BENCH_ITEMS=1000000`. `BATCHD_BENCH_COMMIT_LINES` sets
/// `ingest.commit_lines` (0, one transaction per file, unless set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_rate_and_a_large_queue() {
    let items = size("BATCHD_BENCH_ITEMS", 5_000);
    let commit_lines = size("BATCHD_BENCH_COMMIT_LINES", 0);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("requests.jsonl");
    write_requests(&file, items);
    let bytes = std::fs::metadata(&file).unwrap().len();
    flush_disk();
    let import = sqlite_import(&file, work.path());

    // Jobs take an hour, so ten are in flight and the rest stay queued, as in a large backlog.
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_secs(3600),
        ..SimConfig::default()
    })
    .await;
    let settings = format!("[ingest]\nsettle_secs = 0.1\ncommit_lines = {commit_lines}\n");
    let daemon = Daemon::start(&sim.base_url, &settings);
    wait_for_log(&daemon, "batchd started");
    let process = Proc { pid: daemon.pid() };
    flush_disk();
    let started = Instant::now();
    drop_path(&daemon, &file, "requests.jsonl");
    wait_for_log(&daemon, "input file ingested");
    let ingest = started.elapsed();
    let ingest_peak = process.memory_mib("VmHWM");

    wait_for(
        || sim.stats.snapshot().batches_created >= 10,
        "ten batch jobs in flight",
    );
    let config = daemon.config_path.display().to_string();
    let text: Vec<_> = (0..20)
        .map(|_| time_command(&["status", "--config", &config]))
        .collect();
    let json: Vec<_> = (0..20)
        .map(|_| time_command(&["status", "--json", "--config", &config]))
        .collect();
    let (text_median, text_max) = median_and_max_ms(text);
    let (json_median, json_max) = median_and_max_ms(json);
    let slow_statements = daemon.log().matches("slow statement").count();

    let rate = items as f64 / ingest.as_secs_f64();
    println!(
        "ingest: {items} lines, {:.1} MB, ingest.commit_lines = {commit_lines}",
        bytes as f64 / 1e6
    );
    if let Some(import) = import {
        let import_rate = items as f64 / import.as_secs_f64();
        println!(
            "  sqlite3 .import {:.2} s ({import_rate:.0} lines/s); batchd {:.2} s ({rate:.0} lines/s); ratio {:.2}",
            import.as_secs_f64(),
            ingest.as_secs_f64(),
            rate / import_rate
        );
    } else {
        println!("  batchd {:.2} s ({rate:.0} lines/s)", ingest.as_secs_f64());
    }
    println!("  daemon peak RSS while ingesting: {ingest_peak:.1} MiB");
    println!("queue of {items} items, 10 jobs in flight:");
    println!("  batchd status: median {text_median:.1} ms, max {text_max:.1} ms (20 runs)");
    println!("  batchd status --json: median {json_median:.1} ms, max {json_max:.1} ms (20 runs)");
    println!(
        "  daemon RSS {:.1} MiB, peak {:.1} MiB; slow statements logged: {slow_statements}",
        process.memory_mib("VmRSS"),
        process.memory_mib("VmHWM")
    );

    let db = daemon.db().await;
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM work_items")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(stored as u64, items, "every line is stored as one item");
}

/// Measures batch slots: items pass through ten jobs at a time with a turnaround T; the ideal drain
/// time is the number of job waves times T. Full size:
/// `BATCHD_BENCH_SLOT_ITEMS=20000 BATCHD_BENCH_TURNAROUND_SECS=10`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_slots_refill_when_jobs_finish() {
    let items = size("BATCHD_BENCH_SLOT_ITEMS", 2_000);
    let turnaround = seconds("BATCHD_BENCH_TURNAROUND_SECS", 1.0);
    let sim = Sim::start(SimConfig {
        turnaround,
        ..SimConfig::default()
    })
    .await;
    // Polling at a hundredth of the turnaround, as a 30 s poll does for jobs of an hour.
    let config = format!(
        "[ingest]\nsettle_secs = 0.1\n\n[batch]\nmax_linger_secs = 0.2\npoll_interval_secs = {}\n",
        turnaround.as_secs_f64() / 100.0
    );
    let daemon = Daemon::start(&sim.base_url, &config);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("requests.jsonl");
    write_requests(&file, items);
    wait_for_log(&daemon, "batchd started");
    let db = daemon.db().await;

    drop_path(&daemon, &file, "requests.jsonl");
    wait_for_log(&daemon, "input file ingested");
    let started = Instant::now();
    let done = wait_finished(&daemon, &db, items).await;
    let actual = done - started;

    let jobs = items.div_ceil(100);
    let waves = jobs.div_ceil(10);
    let ideal = turnaround * waves as u32;
    let snapshot = sim.stats.snapshot();
    println!(
        "batch slots: {items} items, {jobs} jobs in {waves} waves of T = {:.1} s",
        turnaround.as_secs_f64()
    );
    println!(
        "  ideal {:.1} s, actual {:.1} s, ideal/actual {:.3}; jobs created {}",
        ideal.as_secs_f64(),
        actual.as_secs_f64(),
        ideal.as_secs_f64() / actual.as_secs_f64(),
        snapshot.batches_created
    );
    assert_eq!(snapshot.batches_created, jobs, "each job holds 100 items");
}

/// Measures the daemon's CPU time per item, from a file landing in the inbox to its export.
/// Full size: `BATCHD_BENCH_COST_ITEMS=100000`; `BATCHD_BENCH_COST_JOB_SIZE` sets `batch.max_requests`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_time_per_item() {
    let items = size("BATCHD_BENCH_COST_ITEMS", 5_000);
    // Runs at two job sizes separate the cost per job from the cost per item.
    let job_size = size("BATCHD_BENCH_COST_JOB_SIZE", 100);
    let sim = Sim::start(SimConfig {
        turnaround: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await;
    let daemon = Daemon::start(
        &sim.base_url,
        &format!(
            "[ingest]\nsettle_secs = 0.1\n\n[batch]\nmax_linger_secs = 0.2\npoll_interval_secs = 0.25\nmax_requests = {job_size}\n"
        ),
    );
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("requests.jsonl");
    write_requests(&file, items);
    wait_for_log(&daemon, "batchd started");
    let db = daemon.db().await;
    let process = Proc { pid: daemon.pid() };
    let before = process.cpu();
    let started = Instant::now();

    drop_path(&daemon, &file, "requests.jsonl");
    wait_finished(&daemon, &db, items).await;
    let export = daemon.path("outbox/requests.results.jsonl");
    wait_for(|| export.exists(), "the export");
    let cpu = process.cpu() - before;
    let wall = started.elapsed();
    println!(
        "cost per item: {items} items in jobs of {job_size} in {:.1} s; daemon CPU {:.2} s = {:.1} µs per item; peak RSS {:.1} MiB",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / items as f64,
        process.memory_mib("VmHWM")
    );
    let succeeded: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM work_items WHERE state = 'succeeded'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(succeeded as u64, items);
}

/// Measures an idle daemon: empty inbox, no work. Full size: `BATCHD_BENCH_IDLE_SECS=60`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_daemon_sleeps() {
    let span = seconds("BATCHD_BENCH_IDLE_SECS", 3.0);
    let sim = Sim::fast().await;
    let daemon = Daemon::start(&sim.base_url, "");
    wait_for_log(&daemon, "batchd started");
    // Start-up work (migrations, the model catalogue, the first scans) takes well under 2 s here.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let process = Proc { pid: daemon.pid() };
    let (cpu, switches) = (process.cpu(), process.switches());
    tokio::time::sleep(span).await;
    let cpu = process.cpu() - cpu;
    let switches = process.switches() - switches;
    let secs = span.as_secs_f64();
    println!(
        "idle for {secs:.0} s: CPU {:.0} ms ({:.3}% of one core), {:.1} wakeups/s, RSS {:.1} MiB",
        cpu.as_secs_f64() * 1000.0,
        cpu.as_secs_f64() * 100.0 / secs,
        switches as f64 / secs,
        process.memory_mib("VmRSS")
    );
    assert!(
        !daemon.log().contains("ERROR"),
        "the idle daemon logged an error:\n{}",
        daemon.log()
    );
}
