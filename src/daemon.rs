//! The daemon: opens the database, starts every stage as a named task under one cancellation
//! token, reports readiness to systemd, and on cancellation stops intake and new submissions,
//! lets calls already sent finish within the grace period, then exits.

use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::export::Exporter;
use crate::ingest::{self, IngestError, Intake};
use crate::models::Catalogue;
use crate::pack::Packer;
use crate::poll::Poller;
use crate::provider::wait::RetryPolicy;
use crate::provider::{Provider, ProviderError};
use crate::realtime::Realtime;
use crate::store::{ItemState, Store, StoreError};
use crate::submit::Submitter;
use crate::wake::Signal;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
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
        "no API key: set {} (any value works for `batchd simulate`)",
        crate::config::API_KEY_ENV
    )]
    NoApiKey,
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
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(error) = sd_notify::notify(state)
    {
        tracing::debug!(%error, "failed to notify systemd");
    }
}

/// Runs the daemon until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), DaemonError> {
    if config.provider.api_key.expose().is_none() {
        return Err(DaemonError::NoApiKey);
    }
    let _lock = lock_database(&config)?;
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
    let packed = Signal::new();
    let submitted = Signal::new();
    let flush = Signal::new();
    let stored = Signal::new();
    let stages = TaskTracker::new();
    let calls = TaskTracker::new();

    let catalogue = Catalogue::default();
    if config.ingest.check_models {
        match catalogue.refresh(&provider).await {
            Some(models) => tracing::info!(models, "model catalogue fetched"),
            None => tracing::warn!(
                "starting without a model catalogue; items are not checked against it until a refresh succeeds"
            ),
        }
        let refresh = catalogue.clone().run(
            provider.clone(),
            config.ingest.models_refresh,
            cancel.clone(),
        );
        spawn_stage(&stages, "models", refresh);
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
    spawn_stage(&stages, "ingest", intake.run(events, cancel.clone()));

    let packer = Packer::new(store.clone(), config.batch.clone(), packed.clone());
    spawn_stage(
        &stages,
        "pack",
        packer.run(work.listen(), flush.listen(), cancel.clone()),
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
        "submit",
        submitter.run(packed.listen(), cancel.clone()),
    );

    let poller = Poller::new(
        store.clone(),
        provider.clone(),
        config.batch.clone(),
        work.clone(),
        stored.clone(),
    );
    spawn_stage(
        &stages,
        "poll",
        poller.run(submitted.listen(), cancel.clone()),
    );

    let realtime = Realtime::new(
        store.clone(),
        provider,
        config.realtime.clone(),
        &config.batch,
        work.clone(),
        stored.clone(),
        calls.clone(),
    );
    spawn_stage(&stages, "realtime", realtime.run(cancel.clone()));

    let exporter = Exporter::new(store.clone(), config.paths.outbox.clone());
    spawn_stage(
        &stages,
        "export",
        exporter.run(stored.listen(), cancel.clone()),
    );

    let wake_on = [work.clone(), stored.clone()];
    spawn_stage(
        &stages,
        "operator",
        watch_operator_changes(store.clone(), wake_on, cancel.clone()),
    );

    spawn_stage(
        &stages,
        "status",
        report_status(store.clone(), cancel.clone()),
    );
    stages.close();

    notify(&[sd_notify::NotifyState::Ready]);
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

/// Spawns a stage with a span named after it, and logs how it ended.
fn spawn_stage<F>(tracker: &TaskTracker, name: &'static str, stage: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tracker.spawn(
        async move {
            stage.await;
            tracing::debug!(stage = name, "stage stopped");
        }
        .instrument(tracing::info_span!("stage", name)),
    );
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

/// Publishes queue depth and jobs in flight to systemd's STATUS every few seconds.
async fn report_status(store: Store, cancel: CancellationToken) {
    loop {
        if let (Ok(items), Ok(batches)) = (
            store.item_counts().await,
            store.count_unfinished_batches().await,
        ) {
            let waiting = items[&ItemState::Queued] + items[&ItemState::Packed];
            let status = format!(
                "queued {waiting}, batch jobs in flight {batches}, real-time calls in flight {}, succeeded {}, failed {}",
                items[&ItemState::InFlight],
                items[&ItemState::Succeeded],
                items[&ItemState::Failed],
            );
            notify(&[sd_notify::NotifyState::Status(&status)]);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Cancels `cancel` on SIGTERM or SIGINT: the one place the daemon handles signals.
pub async fn cancel_on_signals(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
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
