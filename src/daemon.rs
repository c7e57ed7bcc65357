//! The daemon: opens the database, starts every stage as a named task under one cancellation
//! token, reports readiness to systemd, and on cancellation stops intake and new submissions,
//! lets calls already sent finish within the grace period, then exits.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::export::Exporter;
use crate::ingest::{self, IngestError, Intake};
use crate::logging::LogControl;
use crate::models::Catalogue;
use crate::pack::Packer;
use crate::poll::Poller;
use crate::provider::wait::RetryPolicy;
use crate::provider::{Provider, ProviderError};
use crate::realtime::Realtime;
use crate::reload::Reloader;
use crate::schedule::Housekeeping;
use crate::store::{ItemState, Store, StoreError};
use crate::submit::Submitter;
use crate::wake::Signal;
use crate::watchdog::Watchdog;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("failed to lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another batchd is already running on {path}: stop it first, or give this one its own `paths.database`"
    )]
    AlreadyRunning { path: PathBuf },
    #[error(
        "no API key: give the systemd credential `{}` (LoadCredential=) or set {} (any value works for `batchd simulate`)",
        crate::config::API_KEY_CREDENTIAL,
        crate::config::API_KEY_ENV
    )]
    NoApiKey,
    #[error("failed to install the SIGHUP handler: {source}")]
    Signal { source: std::io::Error },
}

/// Takes an exclusive lock beside the database, so two daemons never share one queue.
fn lock_database(config: &Config) -> Result<File, DaemonError> {
    let path = PathBuf::from(format!("{}.lock", config.paths.database.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Lock {
            path: path.clone(),
            source,
        })?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| DaemonError::Lock {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DaemonError::AlreadyRunning {
            path: config.paths.database.clone(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(DaemonError::Lock { path, source }),
    }
}

/// Sends a state line to systemd when it supervises the process; a no-op otherwise.
pub(crate) fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(error) = sd_notify::notify(state)
    {
        tracing::debug!(%error, "failed to notify systemd");
    }
}

/// The inputs of a SIGHUP reload: the config file and the log filter.
pub struct ReloadSource {
    /// The config file to read again.
    pub config_path: PathBuf,
    /// The log filter to change when `daemon.log_level` changes.
    pub log: Option<LogControl>,
}

/// Runs the daemon until `cancel` fires, with the config fixed for its lifetime.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), DaemonError> {
    run_with_reload(config, None, cancel).await
}

/// Runs the daemon until `cancel` fires. With `reload`, SIGHUP reloads the config.
pub async fn run_with_reload(
    config: Config,
    reload: Option<ReloadSource>,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    if config.provider.api_key.expose().is_none() {
        return Err(DaemonError::NoApiKey);
    }
    // Installed first: until a handler exists, SIGHUP's default action ends the process.
    let hangup = match reload {
        Some(_) => {
            Some(signal(SignalKind::hangup()).map_err(|source| DaemonError::Signal { source })?)
        }
        None => None,
    };
    let _lock = lock_database(&config)?;
    // Bound before READY, so a taken port is a start-up error rather than a silent gap.
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let store = Store::open(&config.paths.database).await?;
    ingest::create_dirs(&config.paths)?;
    let policy = RetryPolicy {
        initial: config.realtime.backoff_initial,
        max_backoff: config.realtime.backoff_max,
        max_wait: config.realtime.max_retry_wait,
    };
    let provider = Provider::new(&config.provider, policy.max_wait)?;

    // The lock proves no other daemon holds a lease, so every in-flight item is an orphan of
    // a previous run and goes back to the queue now rather than when its lease expires.
    let orphans = store.release_all_leases().await?;
    if orphans > 0 {
        tracing::warn!(
            items = orphans,
            "returned real-time items interrupted by the last stop to the queue"
        );
    }

    let work = Signal::new();
    let reloader = reload
        .map(|source| Reloader::new(source.config_path, config.clone(), source.log, work.clone()));
    let live = match &reloader {
        Some(reloader) => reloader.subscribe(),
        None => crate::config::fixed_live(&config),
    };
    let freed = Signal::new();
    let packed = Signal::new();
    let submitted = Signal::new();
    let flush = Signal::new();
    let stored = Signal::new();
    let stages = TaskTracker::new();
    let calls = TaskTracker::new();
    let watchdog = Watchdog::new();

    let catalogue = Catalogue::default();
    if config.ingest.check_models {
        match catalogue.refresh(&provider).await {
            Some(models) => tracing::info!(models, "model catalogue fetched"),
            None => tracing::warn!(
                "starting without a model catalogue; items are not checked against it until a refresh succeeds"
            ),
        }
    }
    let checked = config.ingest.check_models.then(|| catalogue.clone());
    let intake = Intake::new(
        store.clone(),
        config.paths.clone(),
        config.ingest.clone(),
        work.clone(),
        checked,
    );
    let (watcher, events) = intake.watch()?;
    spawn_stage(
        &stages,
        &watchdog,
        "ingest",
        intake.run(events, cancel.clone()),
    );

    let packer = Packer::new(
        store.clone(),
        config.batch.clone(),
        live.clone(),
        packed.clone(),
    );
    spawn_stage(
        &stages,
        &watchdog,
        "pack",
        packer.run(
            [work.listen(), freed.listen()],
            flush.listen(),
            cancel.clone(),
        ),
    );

    let submitter = Submitter::new(
        store.clone(),
        provider.clone(),
        config.batch.clone(),
        policy,
        submitted.clone(),
        work.clone(),
    );
    spawn_stage(
        &stages,
        &watchdog,
        "submit",
        submitter.run(packed.listen(), cancel.clone()),
    );

    let poller = Poller::new(
        store.clone(),
        provider.clone(),
        config.batch.clone(),
        freed.clone(),
        work.clone(),
        stored.clone(),
    );
    spawn_stage(
        &stages,
        &watchdog,
        "poll",
        poller.run(submitted.listen(), cancel.clone()),
    );

    let housekeeping = Housekeeping {
        store: store.clone(),
        flush: flush.clone(),
        models: config
            .ingest
            .check_models
            .then(|| (catalogue.clone(), provider.clone())),
    };
    spawn_stage(
        &stages,
        &watchdog,
        "schedule",
        crate::schedule::run(housekeeping, live.clone(), cancel.clone()),
    );

    let realtime = Realtime::new(
        store.clone(),
        provider,
        &config,
        live,
        work.clone(),
        stored.clone(),
        calls.clone(),
    );
    spawn_stage(&stages, &watchdog, "realtime", realtime.run(cancel.clone()));

    let exporter = Exporter::new(store.clone(), config.paths.outbox.clone());
    spawn_stage(
        &stages,
        &watchdog,
        "export",
        exporter.run(stored.listen(), cancel.clone()),
    );

    let wake_on = [work.clone(), stored.clone()];
    spawn_stage(
        &stages,
        &watchdog,
        "operator",
        watch_operator_changes(store.clone(), wake_on, cancel.clone()),
    );

    spawn_stage(
        &stages,
        &watchdog,
        "status",
        report_status(store.clone(), cancel.clone()),
    );
    let writes = [&work, &freed, &packed, &submitted, &stored]
        .map(Signal::listen)
        .into();
    spawn_stage(
        &stages,
        &watchdog,
        "checkpoint",
        crate::checkpoint::run(store.clone(), writes, cancel.clone()),
    );
    if let Some(listener) = metrics_listener {
        let serve = crate::metrics::serve(listener, store.clone(), cancel.clone());
        spawn_stage(&stages, &watchdog, "metrics", serve);
    }
    if let (Some(reloader), Some(hangup)) = (reloader, hangup) {
        spawn_stage(
            &stages,
            &watchdog,
            "reload",
            reload_on_hangup(hangup, reloader, cancel.clone()),
        );
    }

    notify(&[sd_notify::NotifyState::Ready]);
    // Started after READY=1, so systemd never hears a ping before the service is up.
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Some(period) = sd_notify::watchdog_enabled()
    {
        tracing::info!(
            period_secs = period.as_secs_f64(),
            "systemd watchdog enabled"
        );
        stages.spawn(watchdog.clone().run(period, cancel.clone()));
    }
    stages.close();

    tracing::info!(
        inbox = %config.paths.inbox.display(),
        database = %config.paths.database.display(),
        provider = %config.provider.base_url,
        "batchd started"
    );

    cancel.cancelled().await;
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        grace_secs = config.daemon.shutdown_grace.as_secs_f64(),
        "stopping: intake and submissions halted, waiting for calls in flight"
    );
    drop(watcher);
    calls.close();
    let drained = tokio::time::timeout(config.daemon.shutdown_grace, async {
        stages.wait().await;
        calls.wait().await;
    })
    .await;
    if drained.is_err() {
        let counts = store.item_counts().await.unwrap_or_default();
        tracing::warn!(
            in_flight = counts.get(&ItemState::InFlight).copied().unwrap_or(0),
            "grace period ran out with calls still in flight; their items return to the queue at the next start"
        );
    }
    store.close().await;
    tracing::info!("batchd stopped");
    Ok(())
}

/// Spawns a stage watched under its name, with a span named after it, and logs how it ended.
fn spawn_stage<F>(tracker: &TaskTracker, watchdog: &Watchdog, name: &'static str, stage: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let stage = watchdog.scope(name, async move {
        stage.await;
        tracing::debug!(stage = name, "stage stopped");
    });
    // The field is not called `name`: JSON logs would then carry two `name` keys in one span.
    tracker.spawn(stage.instrument(tracing::info_span!("stage", stage = name)));
}

/// Wakes the stages when `batchd retry` or `batchd cancel` changed items. Those commands run in
/// another process and cannot raise a signal here. Instead they raise a counter in the
/// database, which this stage reads every second.
async fn watch_operator_changes(store: Store, wake: [Signal; 2], cancel: CancellationToken) {
    let mut seen = None;
    loop {
        match store.operator_generation().await {
            Ok(generation) => {
                if seen.is_some_and(|seen| seen != generation) {
                    tracing::debug!(generation, "operator changed items; waking the stages");
                    for signal in &wake {
                        signal.raise();
                    }
                }
                seen = Some(generation);
            }
            Err(error) => {
                tracing::warn!(%error, "reading the operator change counter failed; retrying")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Publishes queue depth, jobs in flight and the real-time request rate to systemd's STATUS.
async fn report_status(store: Store, cancel: CancellationToken) {
    let mut rate = RequestRate::default();
    loop {
        let sent = crate::config::SUPPORTED_ENDPOINTS
            .iter()
            .map(|endpoint| crate::metrics::global().realtime_requests(endpoint))
            .sum();
        let per_minute = rate.sample(Instant::now(), sent);
        if let (Ok(items), Ok(batches)) = (
            store.item_counts().await,
            store.count_unfinished_batches().await,
        ) {
            let waiting = items[&ItemState::Queued] + items[&ItemState::Packed];
            let status = format!(
                "queued {waiting}, batch jobs in flight {batches}, real-time {per_minute} requests/min, {} calls in flight, succeeded {}, failed {}",
                items[&ItemState::InFlight],
                items[&ItemState::Succeeded],
                items[&ItemState::Failed],
            );
            notify(&[sd_notify::NotifyState::Status(&status)]);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(STATUS_EVERY) => {}
        }
    }
}

/// The real-time request rate over the last minute, from samples of the running total.
#[derive(Debug, Default)]
struct RequestRate {
    samples: VecDeque<(Instant, u64)>,
}

impl RequestRate {
    /// Records the total sent by `now` and returns the requests per minute over the samples
    /// of the last minute.
    fn sample(&mut self, now: Instant, total: u64) -> u64 {
        self.samples.push_back((now, total));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > Duration::from_secs(60))
        {
            self.samples.pop_front();
        }
        let (first_at, first_total) = self.samples[0];
        let span = now.duration_since(first_at).as_secs_f64();
        if span < 1.0 {
            return 0;
        }
        ((total - first_total) as f64 * 60.0 / span).round() as u64
    }
}

/// Reloads the config on each SIGHUP until `cancel` fires.
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    mut reloader: Reloader,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            received = hangup.recv() => {
                if received.is_none() {
                    return;
                }
            }
        }
        tracing::info!("SIGHUP received; reloading the config");
        // systemd 253 and newer fail a reload whose RELOADING=1 comes without MONOTONIC_USEC.
        match sd_notify::NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[sd_notify::NotifyState::Reloading, now]),
            Err(error) => tracing::debug!(%error, "failed to read the monotonic clock"),
        }
        // The outcome, good or bad, is logged by the reloader.
        let _ = reloader.reload();
        notify(&[sd_notify::NotifyState::Ready]);
    }
}

/// Cancels `cancel` on SIGTERM or SIGINT. Together with [`reload_on_hangup`], this is all of
/// the daemon's signal handling.
pub async fn cancel_on_signals(cancel: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("failed to install signal handlers; stop batchd with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    cancel.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_rate_covers_the_last_minute() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut rate = RequestRate::default();
        assert_eq!(rate.sample(at(0), 0), 0, "no span yet");
        assert_eq!(rate.sample(at(30), 50), 100);
        assert_eq!(rate.sample(at(60), 100), 100);
        // The sample at 0 s falls out of the window: 60 requests between 30 s and 90 s.
        assert_eq!(rate.sample(at(90), 110), 60);
        assert_eq!(rate.sample(at(200), 110), 0, "nothing sent for a minute");
    }
}
