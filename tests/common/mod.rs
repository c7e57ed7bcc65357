//! Shared harness of the integration tests: a simulator on a loopback port, the real `batchd`
//! binary as the daemon, a temporary directory and a fresh database per test.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use batchd::simulate::{SimConfig, SimStatsHandle, Simulator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Row, SqlitePool};
use tokio_util::sync::CancellationToken;

/// Upper bound on any wait for the daemon; only a hung pipeline reaches it.
pub const PATIENCE: Duration = Duration::from_secs(300);

/// Config that takes files and sends partial batches within a fraction of a second.
pub const FAST_PIPELINE: &str =
    "[ingest]\nsettle_secs = 0.1\n\n[batch]\nmax_linger_secs = 0.3\npoll_interval_secs = 0.1\n";

/// The chat model of the generated requests.
pub const CHAT_MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";

/// Returns `count` chat request lines with ids `{prefix}-00000` and up.
pub fn chat_lines(prefix: &str, count: usize, urgent: bool) -> Vec<u8> {
    (0..count)
        .map(|i| {
            serde_json::json!({
                "custom_id": format!("{prefix}-{i:05}"),
                "urgent": urgent,
                "body": {"model": CHAT_MODEL,
                         "messages": [{"role": "user", "content": format!("{prefix} question {i}")}]}
            })
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// A simulator running in this process.
pub struct Sim {
    pub base_url: String,
    pub stats: SimStatsHandle,
    cancel: CancellationToken,
}

impl Sim {
    /// Starts a simulator whose batch jobs finish after 300 ms.
    pub async fn fast() -> Sim {
        Sim::start(SimConfig {
            turnaround: Duration::from_millis(300),
            ..SimConfig::default()
        })
        .await
    }

    pub async fn start(config: SimConfig) -> Sim {
        let simulator = Simulator::bind("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap();
        let base_url = simulator.base_url();
        let stats = simulator.stats();
        let cancel = CancellationToken::new();
        tokio::spawn(simulator.run(cancel.clone()));
        Sim {
            base_url,
            stats,
            cancel,
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The real daemon binary with its own directory, config and database.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Writes a config pointing at `base_url` (plus `extra` TOML) and starts `batchd run`.
    pub fn start(base_url: &str, extra: &str) -> Daemon {
        let mut daemon = Daemon::prepare(base_url, extra);
        daemon.spawn();
        daemon
    }

    /// Writes the config and directory of a daemon without starting it.
    pub fn prepare(base_url: &str, extra: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("batchd.toml");
        let config = format!(
            "[provider]\nbase_url = {base_url:?}\n\n[paths]\ninbox = {inbox:?}\ndatabase = {db:?}\n\n{extra}\n",
            inbox = dir.path().join("inbox").display().to_string(),
            db = dir.path().join("batchd.db").display().to_string(),
        );
        std::fs::write(&config_path, config).unwrap();
        Daemon {
            dir,
            config_path,
            child: None,
        }
    }

    /// Starts `batchd run`; its log is appended to `daemon.log` in the test directory.
    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// Starts `batchd run` with extra environment variables.
    pub fn spawn_with_env(&mut self, env: &[(&str, &str)]) {
        self.spawn_command(Command::new(env!("CARGO_BIN_EXE_batchd")), env);
    }

    /// Starts `batchd run` so that file permissions apply to it even when the tests run as
    /// root: `setpriv` drops the capabilities that let root read any file.
    pub fn spawn_honouring_permissions(&mut self) {
        let uid = Command::new("id").arg("-u").output().unwrap();
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return self.spawn();
        }
        let caps = "-dac_override,-dac_read_search";
        let mut setpriv = Command::new("setpriv");
        setpriv
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--bounding-set={caps}"))
            .arg(env!("CARGO_BIN_EXE_batchd"));
        self.spawn_command(setpriv, &[]);
    }

    fn spawn_command(&mut self, mut command: Command, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .unwrap();
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("TOGETHER_API_KEY", "test-key")
            .env("BATCHD_LOG", "warn,batchd=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the batchd binary starts");
        self.child = Some(child);
    }

    /// Returns everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Drops a file into the inbox the documented way: written as `.part`, then renamed.
    pub fn drop_file(&self, name: &str, bytes: &[u8]) {
        let inbox = self.path("inbox");
        // A daemon not started yet finds the file at its start-up scan.
        std::fs::create_dir_all(&inbox).unwrap();
        let partial = inbox.join(format!("{name}.part"));
        std::fs::write(&partial, bytes).unwrap();
        std::fs::rename(&partial, inbox.join(name)).unwrap();
    }

    pub async fn db(&self) -> SqlitePool {
        let path = self.path("batchd.db");
        wait_for(|| path.exists(), "the database to exist");
        let options = SqliteConnectOptions::new().filename(&path).read_only(true);
        let pool = SqlitePool::connect_with(options).await.unwrap();
        // The file appears before the migrations have run, and each migration commits on its
        // own, so wait until every one has.
        let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
            .unwrap()
            .count() as i64;
        let started = Instant::now();
        while sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&pool)
            .await
            .ok()
            != Some(migrations)
        {
            assert!(
                started.elapsed() < PATIENCE,
                "the database schema never appeared"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pool
    }

    /// Waits until `expected` items exist and none is unfinished.
    pub async fn wait_all_terminal(&self, db: &SqlitePool, expected: i64) {
        let started = Instant::now();
        loop {
            let row = sqlx::query(
                "SELECT COUNT(*) AS total, COALESCE(SUM(state NOT IN ('succeeded', 'failed')), 0) AS open FROM work_items",
            )
            .fetch_one(db)
            .await
            .unwrap();
            let (total, open): (i64, i64) = (row.get("total"), row.get("open"));
            if total >= expected && open == 0 {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "pipeline stalled: {total} items, {open} unfinished; daemon log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the daemon to exit by itself (at a fault point, say) and returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the daemon did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Returns the process id of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls a condition with a bound; panics naming what was awaited.
pub fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a JSONL file into values, skipping blank lines.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts that `response` belongs to the request `body` of item `id`: a simulated chat answer
/// starts with the last user message, and an embedding is the vector of the item's own input.
pub fn assert_answers_request(id: &str, body: &serde_json::Value, response: &serde_json::Value) {
    if body.get("messages").is_some() {
        let content = response["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        assert!(
            content.starts_with(&last_user_message(body)),
            "{id} got another request's answer"
        );
    } else {
        let vector: Vec<f32> =
            serde_json::from_value(response["data"][0]["embedding"].clone()).unwrap();
        let expected = batchd::simulate::embedding_vector(body["input"].as_str().unwrap());
        assert_eq!(vector, expected, "{id} got another input's vector");
    }
}

/// Returns the content of the last user message of a chat request body.
pub fn last_user_message(body: &serde_json::Value) -> String {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap()
        .to_string()
}

/// Returns the Python interpreter that has the official Together SDK, from `BATCHD_SDK_PYTHON`,
/// or `None` when `skipped_test` (such as "the SDK contract test") should be skipped. Under CI
/// (`CI` set) a missing interpreter means the setup step is broken, so it panics instead.
pub fn sdk_python(skipped_test: &str) -> Option<PathBuf> {
    let Some(python) = std::env::var_os("BATCHD_SDK_PYTHON") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "BATCHD_SDK_PYTHON is unset under CI; .ci/run must create the SDK's virtual \
             environment and export BATCHD_SDK_PYTHON before running the tests"
        );
        eprintln!(
            "skipped {skipped_test}: set BATCHD_SDK_PYTHON to a Python with together==3.1.1 installed, \
             for example after `python3 -m venv target/sdk-venv && \
             target/sdk-venv/bin/pip install together==3.1.1`"
        );
        return None;
    };
    let python = PathBuf::from(python);
    // A relative path is taken from the repository root, where .ci/run runs.
    Some(if python.is_absolute() {
        python
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(python)
    })
}
