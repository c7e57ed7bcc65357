//! The `batchd` command: parse the command line, set up logging, hand over to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use batchd::cli::{Status, demo};
use batchd::config::Config;
use batchd::store::Store;

/// Batch LLM inference on Together AI: JSONL files in, results in SQLite.
#[derive(Debug, Parser)]
#[command(name = "batchd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: watch the inbox, send requests, store results.
    Run {
        /// TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show items by state, batch jobs by status and progress per input file.
    Status {
        /// TOML config file (its `paths.database` is read).
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a local Together API simulator (loopback only) for tests and dry runs.
    Simulate(batchd::simulate::SimulateArgs),
    /// Run the simulator and the daemon together on example input or your own files.
    Demo(demo::DemoArgs),
}

fn init_logging(default_level: &str) {
    let filter = EnvFilter::try_from_env("BATCHD_LOG")
        .or_else(|_| EnvFilter::try_new(default_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            init_logging(&config.daemon.log_level);
            let cancel = CancellationToken::new();
            tokio::spawn(batchd::daemon::cancel_on_signals(cancel.clone()));
            batchd::daemon::run(config, cancel).await?;
            Ok(0)
        }
        Command::Status { config, json } => {
            let config = Config::load(&config)?;
            let store = Store::open_existing(&config.paths.database).await?;
            let status = Status::read(&store).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).context("failed to encode status")?
                );
            } else {
                print!("{}", status.render());
            }
            Ok(0)
        }
        Command::Simulate(args) => {
            init_logging("info");
            let cancel = CancellationToken::new();
            tokio::spawn(batchd::daemon::cancel_on_signals(cancel.clone()));
            batchd::simulate::run_cli(args, cancel).await?;
            Ok(0)
        }
        Command::Demo(args) => {
            init_logging("warn,batchd=info");
            demo::run(args).await
        }
    }
}

/// Joins an error and its causes with ": ", skipping a cause whose text the message already
/// includes (many messages quote their cause).
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}
