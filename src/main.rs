//! The `batchd` command: parse the command line, set up logging, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use batchd::cli::{Status, demo};
use batchd::config::{Config, LogFormat};
use batchd::logging;
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
    /// Check a config as `run` reads it (file, BATCHD_* variables, API key) and print
    /// the resolved settings; exits 1 listing every problem. Touches no network or database.
    Validate {
        /// TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show items by state, batch jobs in flight, real-time rates and progress per input file.
    Status {
        /// TOML config file (its `paths.database` is read).
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List ingested input files with their items counted and their exports.
    Files {
        /// TOML config file (its `paths.database` is read).
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the results of one input file to stdout.
    Results {
        /// TOML config file (its `paths.database` is read).
        #[arg(long)]
        config: PathBuf,
        /// Input file: the name it was dropped under, or the name it got in processed/.
        #[arg(long, value_name = "NAME")]
        file: String,
        /// `jsonl` writes export lines of the finished items; `table` a row per item.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: batchd::cli::results::Format,
    },
    /// Move failed items back to the queue, so the daemon sends them again.
    Retry {
        /// TOML config file (its `paths.database` is read).
        #[arg(long)]
        config: PathBuf,
        /// Retry the failed items of this input file.
        #[arg(long, value_name = "NAME", conflicts_with = "all")]
        file: Option<String>,
        /// Retry every failed item.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a provider batch job, or the queued items of an input file.
    Cancel {
        /// TOML config file (its `paths.database` and `[provider]` are read).
        #[arg(long)]
        config: PathBuf,
        /// The provider's id of a batch job to cancel; its unfinished items are requeued.
        #[arg(
            long,
            value_name = "PROVIDER_BATCH_ID",
            conflicts_with = "file",
            required_unless_present = "file"
        )]
        job: Option<String>,
        /// Fail the queued items of this input file with "cancelled by the operator".
        #[arg(long, value_name = "NAME")]
        file: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check input files as the daemon would, without a daemon; exits 1 if any line is bad.
    Check {
        /// JSONL files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Config file whose `[ingest]` limits and policy apply (defaults otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a local Together API simulator (loopback only) for tests and dry runs.
    Simulate(batchd::simulate::SimulateArgs),
    /// Run the simulator and the daemon together on example input or your own files.
    Demo(demo::DemoArgs),
}

async fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Run { config: path } => {
            let config = Config::load(&path)?;
            let log = logging::init(&config.daemon.log_level, config.daemon.log_format);
            let cancel = CancellationToken::new();
            tokio::spawn(batchd::daemon::cancel_on_signals(cancel.clone()));
            let reload = batchd::daemon::ReloadSource {
                config_path: path,
                log: Some(log),
            };
            batchd::daemon::run_with_reload(config, Some(reload), cancel).await?;
            Ok(0)
        }
        Command::Validate { config: path } => {
            let config = Config::load(&path)?;
            print!("{}", config.to_toml());
            // `run` refuses to start without a key, so as `ExecStartPre=` this must fail too.
            if config.provider.api_key.expose().is_none() {
                eprintln!(
                    "error: no API key, so `batchd run` would not start: give the systemd credential `{}` or set {}",
                    batchd::config::API_KEY_CREDENTIAL,
                    batchd::config::API_KEY_ENV
                );
                return Ok(1);
            }
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
        Command::Files { config, json } => {
            let config = Config::load(&config)?;
            let store = Store::open_existing(&config.paths.database).await?;
            let files = batchd::cli::files::read(&store).await?;
            if json {
                print_json(&files)?;
            } else {
                print!("{}", batchd::cli::files::render(&files));
            }
            Ok(0)
        }
        Command::Results {
            config,
            file,
            format,
        } => {
            let config = Config::load(&config)?;
            let store = Store::open_existing(&config.paths.database).await?;
            let written = batchd::cli::results::run(&store, &config.paths.database, &file, format);
            match written.await {
                // A reader such as `head` that stops early closes the pipe: that is not an error.
                Err(batchd::cli::CliError::Export(batchd::export::ExportError::Write(error)))
                    if error.kind() == std::io::ErrorKind::BrokenPipe =>
                {
                    Ok(0)
                }
                Err(error) => Err(error.into()),
                Ok(_) => Ok(0),
            }
        }
        Command::Retry {
            config,
            file,
            all,
            json,
        } => {
            let config = Config::load(&config)?;
            let store = Store::open_existing(&config.paths.database).await?;
            let retried =
                batchd::cli::retry::run(&store, &config.paths.database, file.as_deref(), all)
                    .await?;
            if json {
                print_json(&retried)?;
            } else {
                print!("{}", retried.render());
            }
            Ok(0)
        }
        Command::Cancel {
            config,
            job,
            file,
            json,
        } => {
            let config = Config::load(&config)?;
            let store = Store::open_existing(&config.paths.database).await?;
            match (job, file) {
                (Some(job), _) => {
                    let done = batchd::cli::cancel::job(&store, &config, &job).await?;
                    if json {
                        print_json(&done)?;
                    } else {
                        print!("{}", done.render());
                    }
                }
                (None, Some(file)) => {
                    let done =
                        batchd::cli::cancel::file(&store, &config.paths.database, &file).await?;
                    if json {
                        print_json(&done)?;
                    } else {
                        print!("{}", done.render());
                    }
                }
                (None, None) => unreachable!("clap requires --job or --file"),
            }
            Ok(0)
        }
        Command::Check {
            files,
            config,
            json,
        } => check(&files, config.as_deref(), json).await,
        Command::Simulate(args) => {
            logging::init("info", LogFormat::Text);
            let cancel = CancellationToken::new();
            tokio::spawn(batchd::daemon::cancel_on_signals(cancel.clone()));
            batchd::simulate::run_cli(args, cancel).await?;
            Ok(0)
        }
        Command::Demo(args) => {
            logging::init("warn,batchd=info", LogFormat::Text);
            demo::run(args).await
        }
    }
}

/// Prints a value as indented JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("failed to encode JSON output")?
    );
    Ok(())
}

/// Runs `batchd check`: prints each file's report and returns 1 if any file has a bad line.
async fn check(
    files: &[PathBuf],
    config: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<i32> {
    let ingest = match config {
        Some(path) => Config::load(path)?.ingest,
        None => {
            let defaults = "[paths]\ninbox = \".\"\ndatabase = \"unused.db\"\n";
            Config::from_toml(defaults, batchd::config::ApiKey::default())?.ingest
        }
    };
    let limits = batchd::ingest::FileLimits::from(&ingest);
    let mut reports = Vec::new();
    for path in files {
        reports.push(batchd::ingest::check_file(path, &limits).await?);
    }
    let clean = reports
        .iter()
        .all(|r| r.error_count == 0 && r.disposition != "rejected");
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for (path, report) in files.iter().zip(&reports) {
            println!(
                "{}: {} lines, {} valid, {} invalid",
                path.display(),
                report.lines,
                report.items,
                report.error_count
            );
            for error in &report.errors {
                println!("{}", error.message);
            }
            if report.error_count as usize > report.errors.len() {
                println!(
                    "... and {} more",
                    report.error_count as usize - report.errors.len()
                );
            }
            if let Some(reason) = &report.reason {
                println!(
                    "{}: the daemon would reject the whole file: {reason}",
                    path.display()
                );
            }
        }
    }
    Ok(if clean { 0 } else { 1 })
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
