//! `batchd simulate`: runs the simulator as a process. The first line on stdout is the API base
//! URL, so a script can start the simulator on port 0 and read where it listens. Logs go to
//! stderr. `--faults FILE` reads the faults to inject from a TOML file.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{
    DEFAULT_CHAT_PER_MINUTE, DEFAULT_COMPLETIONS_PER_MINUTE, DEFAULT_EMBEDDINGS_PER_MINUTE,
    DEFAULT_IMAGES_PER_MINUTE, Faults, LogNormalLatency, RateLimits, SimConfig, SimulateError,
    Simulator,
};

/// Options of `batchd simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on; only loopback addresses (127.0.0.0/8 or ::1) are allowed, and port 0
    /// picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// Seconds from batch creation to COMPLETED; fractions such as 0.5 are allowed.
    #[arg(long, value_name = "SECONDS", default_value = "3", value_parser = parse_seconds)]
    pub turnaround: Duration,

    /// Seed of the order of batch output lines, of injected faults and of real-time latencies.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// Chat completion requests accepted per minute; 0 rejects all.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CHAT_PER_MINUTE)]
    pub chat_rpm: u32,

    /// Text completion requests accepted per minute; 0 rejects all.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_COMPLETIONS_PER_MINUTE)]
    pub completions_rpm: u32,

    /// Embedding requests accepted per minute; 0 rejects all.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_EMBEDDINGS_PER_MINUTE)]
    pub embeddings_rpm: u32,

    /// Image generation requests accepted per minute; 0 rejects all.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_IMAGES_PER_MINUTE)]
    pub images_rpm: u32,

    /// Milliseconds to wait before each real-time response.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub realtime_delay_ms: u64,

    /// Median, in milliseconds, of a log-normal latency drawn for each accepted real-time
    /// request and added to --realtime-delay-ms. Needs --realtime-latency-p99-ms, and --seed
    /// seeds the draws.
    #[arg(long, value_name = "MS", requires = "realtime_latency_p99_ms")]
    pub realtime_latency_median_ms: Option<u64>,

    /// 99th percentile, in milliseconds, of the log-normal real-time latency. It must be at
    /// least the median, and needs --realtime-latency-median-ms.
    #[arg(long, value_name = "MS", requires = "realtime_latency_median_ms")]
    pub realtime_latency_p99_ms: Option<u64>,

    /// TOML file of faults to inject; its keys are the fields of `batchd::simulate::Faults`,
    /// such as `rate_limit_rate = 0.2`. Without it, no faults are injected.
    #[arg(long, value_name = "FILE")]
    pub faults: Option<PathBuf>,
}

impl SimulateArgs {
    /// Builds the simulator's settings, reading the fault file if one was given.
    pub fn config(&self) -> Result<SimConfig, SimulateError> {
        let faults = match &self.faults {
            Some(path) => Faults::load(path)?,
            None => Faults::default(),
        };
        let realtime_latency = match (
            self.realtime_latency_median_ms,
            self.realtime_latency_p99_ms,
        ) {
            (Some(median), Some(p99)) => Some(LogNormalLatency::new(
                Duration::from_millis(median),
                Duration::from_millis(p99),
            )?),
            _ => None,
        };
        Ok(SimConfig {
            turnaround: self.turnaround,
            seed: self.seed,
            limits: RateLimits {
                chat_per_minute: self.chat_rpm,
                completions_per_minute: self.completions_rpm,
                embeddings_per_minute: self.embeddings_rpm,
                images_per_minute: self.images_rpm,
            },
            realtime_delay: Duration::from_millis(self.realtime_delay_ms),
            realtime_latency,
            faults,
        })
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("invalid number of seconds `{text}`; expected e.g. 3 or 0.2"))?;
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        format!("invalid number of seconds `{text}`; expected a finite number of 0 or more")
    })
}

/// Binds the simulator, prints its base URL as the first line on stdout, and serves until
/// `cancel` is cancelled.
pub async fn run_cli(args: SimulateArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let simulator = Simulator::bind(args.listen, args.config()?).await?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", simulator.base_url())
        .and_then(|()| stdout.flush())
        .context("failed to print the simulator's base URL on stdout")?;
    drop(stdout);

    simulator.run(cancel).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_seconds_accepts_fractions() {
        assert_eq!(parse_seconds("0.2"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_seconds("3"), Ok(Duration::from_secs(3)));
    }

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn parse(flags: &[&str]) -> Result<SimulateArgs, clap::Error> {
        use clap::Parser;
        let argv = std::iter::once("simulate").chain(flags.iter().copied());
        Command::try_parse_from(argv).map(|command| command.args)
    }

    #[test]
    fn latency_flags_set_the_distribution() {
        let args = parse(&[
            "--realtime-latency-median-ms",
            "800",
            "--realtime-latency-p99-ms",
            "4000",
        ])
        .unwrap();
        let latency = args.config().unwrap().realtime_latency.unwrap();
        assert_eq!(latency.median(), Duration::from_millis(800));
        assert_eq!(latency.p99(), Duration::from_secs(4));
    }

    #[test]
    fn latency_is_off_by_default() {
        let config = parse(&[]).unwrap().config().unwrap();
        assert_eq!(config.realtime_latency, None);
        assert_eq!(config.realtime_delay, Duration::ZERO);
    }

    #[test]
    fn latency_median_alone_is_rejected() {
        let error = parse(&["--realtime-latency-median-ms", "800"]).unwrap_err();
        assert!(
            error.to_string().contains("--realtime-latency-p99-ms"),
            "{error}"
        );
    }

    #[test]
    fn latency_p99_below_median_is_rejected() {
        let args = parse(&[
            "--realtime-latency-median-ms",
            "800",
            "--realtime-latency-p99-ms",
            "100",
        ])
        .unwrap();
        let error = args.config().unwrap_err();
        assert!(error.to_string().contains("below the median"), "{error}");
    }

    #[test]
    fn parse_seconds_rejects_negative_and_text() {
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("NaN").is_err());
        assert!(parse_seconds("soon").is_err());
    }
}
