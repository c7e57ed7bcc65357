//! Checks the simulator's wire format with the official Together Python SDK: runs
//! `tests/sdk/contract.py` against two in-process simulators and expects exit status 0.
//!
//! `BATCHD_SDK_PYTHON` names a Python interpreter with `together==3.1.1` installed; `.ci/run`
//! creates one in `target/sdk-venv`. Without it the test is skipped, except under CI (`CI` set),
//! where a missing interpreter means the setup step is broken and the test fails.

mod common;

use std::path::Path;
use std::time::Duration;

use batchd::simulate::{SimConfig, Simulator};
use tokio_util::sync::CancellationToken;

/// Upper bound on the script's run; only a hung script reaches it.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// Starts a simulator on a loopback port and returns its base URL.
async fn start(config: SimConfig, cancel: &CancellationToken) -> String {
    let simulator = Simulator::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let base_url = simulator.base_url();
    tokio::spawn(simulator.run(cancel.clone()));
    base_url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_accepts_simulator() {
    let Some(python) = common::sdk_python("the SDK contract test") else {
        return;
    };
    let cancel = CancellationToken::new();
    let quick = start(
        SimConfig {
            turnaround: Duration::from_millis(300),
            ..SimConfig::default()
        },
        &cancel,
    )
    .await;
    let slow = start(
        SimConfig {
            turnaround: Duration::from_secs(600),
            ..SimConfig::default()
        },
        &cancel,
    )
    .await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/contract.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&quick)
        .arg(&slow)
        // The SDK reads these variables; values from the caller's environment must not leak in.
        .env_remove("TOGETHER_API_KEY")
        .env_remove("TOGETHER_BASE_URL")
        .env_remove("TOGETHER_PROJECT_ID")
        .env_remove("TOGETHER_CUSTOM_HEADERS")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("the SDK contract script timed out after {SCRIPT_TIMEOUT:?}"))
        .unwrap_or_else(|error| panic!("failed to run {}: {error}", python.display()));
    cancel.cancel();

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK contract script failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.contains("together SDK 3.1.1"), "{stdout}");
}
