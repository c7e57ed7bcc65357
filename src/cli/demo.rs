//! `batchd demo`: the simulator and the daemon together, in one process, on example input or
//! the user's own files. It needs no API key and no config, and is also how a user dry-runs a
//! file offline before spending money.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::Status;
use crate::config::{ApiKey, Config};
use crate::simulate::{SimConfig, Simulator};
use crate::store::Store;

/// The bundled example files, compiled in so the demo runs from any directory.
const EXAMPLES: [(&str, &[u8]); 3] = [
    (
        "gsm8k-test-chat.jsonl",
        include_bytes!("../../examples/gsm8k-test-chat.jsonl"),
    ),
    (
        "gsm8k-answers-embed.jsonl",
        include_bytes!("../../examples/gsm8k-answers-embed.jsonl"),
    ),
    (
        "gsm8k-urgent-chat.jsonl",
        include_bytes!("../../examples/gsm8k-urgent-chat.jsonl"),
    ),
];

/// The demo stops with an error if no item changes state for this long.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// Options of `batchd demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's inbox, database and reports; its earlier demo state is replaced.
    #[arg(long, default_value = "batchd-demo")]
    pub workdir: PathBuf,
    /// Simulated batch turnaround in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub turnaround: f64,
    /// JSONL files to run instead of the bundled examples.
    pub files: Vec<PathBuf>,
}

/// Counts the non-blank lines of an input file.
fn count_lines(bytes: &[u8]) -> u64 {
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .count() as u64
}

/// Removes what an earlier demo left in `workdir`, and nothing else.
fn reset_workdir(workdir: &Path) -> anyhow::Result<()> {
    for name in [
        "batchd.db",
        "batchd.db-wal",
        "batchd.db-shm",
        "batchd.db.lock",
    ] {
        let path = workdir.join(name);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("failed to remove {}", path.display()))?;
        }
    }
    for name in ["inbox", "processed", "rejected", "outbox"] {
        let path = workdir.join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("failed to remove {}", path.display()))?;
        }
    }
    std::fs::create_dir_all(workdir)
        .with_context(|| format!("failed to create {}", workdir.display()))
}

fn demo_config(workdir: &Path, base_url: &str) -> anyhow::Result<Config> {
    let text = format!(
        r#"
        [provider]
        base_url = {base_url:?}
        [paths]
        inbox = {inbox:?}
        database = {database:?}
        [ingest]
        settle_secs = 0.2
        [batch]
        max_linger_secs = 1.0
        poll_interval_secs = 0.5
        [realtime]
        backoff_initial_secs = 0.2
        "#,
        inbox = workdir.join("inbox").display().to_string(),
        database = workdir.join("batchd.db").display().to_string(),
    );
    Ok(Config::from_toml(
        &text,
        ApiKey::new(Some("demo-key".into())),
    )?)
}

/// Runs the demo. Returns the process exit code: 0 once every item is terminal and every
/// input line is either an item or a reported bad line, 1 if any line was lost.
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    if args.files.is_empty() {
        for (name, bytes) in EXAMPLES {
            inputs.push((name.to_string(), bytes.to_vec()));
        }
    } else {
        for path in &args.files {
            let bytes = std::fs::read(path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !crate::ingest::is_input_name(&name) {
                bail!(
                    "{} is not a .jsonl file: batchd only takes *.jsonl input",
                    path.display()
                );
            }
            register_models(&bytes);
            inputs.push((name, bytes));
        }
    }
    let lines: u64 = inputs.iter().map(|(_, bytes)| count_lines(bytes)).sum();

    reset_workdir(&args.workdir)?;
    let workdir = std::fs::canonicalize(&args.workdir)?;
    let cancel = CancellationToken::new();
    let sim_config = SimConfig {
        turnaround: Duration::from_secs_f64(args.turnaround.max(0.0)),
        ..SimConfig::default()
    };
    let simulator = Simulator::bind("127.0.0.1:0".parse()?, sim_config).await?;
    let base_url = simulator.base_url();
    let stats = simulator.stats();
    let sim_task = tokio::spawn(simulator.run(cancel.clone()));
    eprintln!("simulator listening at {base_url}");

    let config = demo_config(&workdir, &base_url)?;
    let database = config.paths.database.clone();
    let inbox = config.paths.inbox.clone();
    // Created here, before the daemon starts, so the files can be dropped at once.
    crate::ingest::create_dirs(&config.paths)?;
    let store = Store::open(&database).await?;
    let daemon = tokio::spawn(crate::daemon::run(config, cancel.clone()));
    let interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            interrupt.cancel();
        }
    });

    for (name, bytes) in &inputs {
        // Written beside the inbox and renamed in, the documented way to drop a file.
        let partial = inbox.join(format!("{name}.part"));
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, inbox.join(name))?;
    }
    eprintln!(
        "dropped {} files ({lines} lines) into {}",
        inputs.len(),
        inbox.display()
    );

    let status = wait_until_done(&store, &inbox, inputs.len(), &daemon, &cancel).await;
    cancel.cancel();
    daemon.await??;
    sim_task.await??;
    let status = status?;
    let stats = stats.snapshot();

    let reports = read_reports(&workdir);
    let bad_lines: u64 = reports.iter().map(|r| r.error_count).sum();
    let total = status.items.get("total").copied().unwrap_or(0);
    let lost = lines.saturating_sub(total + bad_lines) + status.unfinished();
    println!("{}", status.render().trim_end());
    for report in reports.iter().filter(|r| r.disposition == "rejected") {
        println!(
            "rejected file: {} ({} bad lines, no usable line; see rejected/{}.report.json)",
            report.file, report.error_count, report.file
        );
    }
    println!("batch jobs created: {}", stats.batches_created);
    println!("batch lines sent: {}", stats.batch_lines_total);
    let realtime: u64 = stats.realtime_requests.values().sum();
    println!(
        "real-time calls: {realtime} (rate limited: {})",
        stats.rate_limited
    );
    println!("wall time: {:.1} s", started.elapsed().as_secs_f64());
    println!("database: {}", database.display());
    println!(
        "try: sqlite3 {} \"SELECT custom_id, state, json_extract(response, '$.choices[0].message.content') FROM items WHERE endpoint = '/v1/chat/completions' LIMIT 3\"",
        database.display()
    );
    if lost > 0 {
        eprintln!("error: {lost} of {lines} input lines did not reach a final state");
        return Ok(1);
    }
    Ok(0)
}

/// Adds the models a user's file names to the simulator's catalogue, so that a dry run accepts
/// any model the real service might serve. Lines that do not parse are left to ingest to report.
fn register_models(bytes: &[u8]) {
    for line in bytes.split(|&b| b == b'\n') {
        if let Ok(parsed) = crate::ingest::parse::parse_line(line.trim_ascii()) {
            crate::simulate::add_model(&parsed.model, &parsed.endpoint);
        }
    }
}

/// Reads the reports of every file that left the inbox.
fn read_reports(workdir: &Path) -> Vec<crate::ingest::Report> {
    let mut reports = Vec::new();
    for dir in ["processed", "rejected"] {
        let Ok(entries) = std::fs::read_dir(workdir.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.to_string_lossy().ends_with(".report.json") {
                continue;
            }
            if let Some(report) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                reports.push(report);
            }
        }
    }
    reports
}

/// Polls the database until every dropped file is ingested, every item is terminal and every
/// processed file is exported.
async fn wait_until_done(
    store: &Store,
    inbox: &Path,
    files: usize,
    daemon: &tokio::task::JoinHandle<Result<(), crate::daemon::DaemonError>>,
    cancel: &CancellationToken,
) -> anyhow::Result<Status> {
    let mut last_change = Instant::now();
    let mut last_report = Instant::now();
    let mut previous = None;
    loop {
        let status = Status::read(store).await?;
        let ingested = status.files.len() >= files || inbox_is_empty(inbox);
        if ingested && status.unfinished() == 0 && store.count_unexported().await? == 0 {
            return Ok(status);
        }
        if daemon.is_finished() {
            bail!("the daemon stopped before every item was finished");
        }
        let snapshot = status.items.clone();
        if previous.as_ref() != Some(&snapshot) {
            previous = Some(snapshot);
            last_change = Instant::now();
        }
        if last_change.elapsed() > STALL_LIMIT {
            bail!(
                "no progress for {} s: {}",
                STALL_LIMIT.as_secs(),
                status.render()
            );
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            let done = status.items["succeeded"] + status.items["failed"];
            eprintln!("progress: {done}/{} items terminal", status.items["total"]);
        }
        tokio::select! {
            _ = cancel.cancelled() => bail!("interrupted"),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

fn inbox_is_empty(inbox: &Path) -> bool {
    std::fs::read_dir(inbox)
        .map(|entries| {
            entries
                .flatten()
                .all(|e| !crate::ingest::is_input_name(&e.file_name().to_string_lossy()))
        })
        .unwrap_or(false)
}
