//! Polling: follow submitted jobs until they end, then download their output and error files
//! and hand the lines to `results`.
//!
//! A job of any terminal status (COMPLETED, FAILED, EXPIRED, CANCELLED) is harvested: both
//! files are read when the job names them, and items in neither are requeued. Statuses are
//! matched case-insensitively; an unknown one is logged once and treated as still running.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::BatchConfig;
use crate::provider::{BatchJob, BatchStatus, Provider, ProviderError, ResultLine};
use crate::results::{self, parse_result_file};
use crate::store::{BatchRow, Store, StoreError};
use crate::wake::{Listener, Signal};

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// The poller stage.
pub struct Poller {
    store: Store,
    provider: Provider,
    config: BatchConfig,
    /// Unknown statuses already logged, so each is logged once.
    unknown_logged: HashSet<String>,
    /// Raised when a job was harvested: a place under the in-flight cap is free again.
    harvested: Signal,
    /// Raised when a harvest returned items to the queue. Kept apart from `harvested`, which
    /// only the packer needs, so the real-time workers do not look for work after every job.
    requeued: Signal,
    /// Raised when results were stored, so the exporter looks for finished input files.
    stored: Signal,
}

impl Poller {
    pub fn new(
        store: Store,
        provider: Provider,
        config: BatchConfig,
        harvested: Signal,
        requeued: Signal,
        stored: Signal,
    ) -> Self {
        Poller {
            store,
            provider,
            config,
            unknown_logged: HashSet::new(),
            harvested,
            requeued,
            stored,
        }
    }

    /// Polls every job that is due. Returns how many were harvested.
    pub async fn poll_once(&mut self) -> Result<u64, StoreError> {
        let mut harvested = 0;
        for batch in self.store.due_polls(Utc::now()).await? {
            match self.poll_batch(&batch).await {
                // Raised per job, not after the pass, so the packer fills the freed place
                // while the other finished jobs are still being downloaded.
                Ok(true) => {
                    harvested += 1;
                    self.harvested.raise();
                    self.stored.raise();
                }
                Ok(false) => {}
                Err(PollError::Store(error)) => return Err(error),
                Err(PollError::Provider(error)) => {
                    tracing::warn!(batch = batch.id, job = ?batch.provider_batch_id, %error, "polling a batch job failed; retrying at the next poll");
                    let status = batch.provider_status.clone().unwrap_or_default();
                    self.store
                        .record_poll(batch.id, &status, batch.progress, self.next_poll())
                        .await?;
                }
            }
        }
        Ok(harvested)
    }

    fn next_poll(&self) -> chrono::DateTime<Utc> {
        Utc::now() + chrono::Duration::from_std(self.config.poll_interval).unwrap_or_default()
    }

    async fn poll_batch(&mut self, batch: &BatchRow) -> Result<bool, PollError> {
        let job_id = batch.provider_batch_id.clone().unwrap_or_default();
        let mut job = self.provider.batch(&job_id).await?;
        if !job.status.is_terminal() {
            if let BatchStatus::Unknown(status) = &job.status
                && self.unknown_logged.insert(status.clone())
            {
                tracing::warn!(job = %job_id, %status, "unknown batch status; treating the job as still running");
            }
            if !self.too_old(batch) {
                self.store
                    .record_poll(
                        batch.id,
                        job.status.as_str(),
                        job.progress,
                        self.next_poll(),
                    )
                    .await?;
                return Ok(false);
            }
            job = self.give_up(batch, job).await;
        }
        let output = self.download(job.output_file_id.as_deref()).await?;
        let errors = self.download(job.error_file_id.as_deref()).await?;
        let culprit = self.culprit(batch, &job, &output, &errors).await?;
        self.harvest(batch, &job, &output, &errors, culprit).await?;
        self.update_model_health(batch, &job, culprit).await?;
        Ok(true)
    }

    /// True once a job has run longer than `batch.max_job_age_secs`.
    fn too_old(&self, batch: &BatchRow) -> bool {
        let Some(submitted) = batch
            .submitted_at
            .as_deref()
            .and_then(crate::store::parse_timestamp)
        else {
            return false;
        };
        let age = (Utc::now() - submitted).to_std().unwrap_or_default();
        age > self.config.max_job_age
    }

    /// Cancels a job that ran past the maximum age, so that it is harvested in its current state:
    /// finished lines are kept and the rest requeued.
    async fn give_up(&self, batch: &BatchRow, job: BatchJob) -> BatchJob {
        tracing::warn!(
            batch = batch.id,
            job = %job.id,
            status = job.status.as_str(),
            max_age_secs = self.config.max_job_age.as_secs(),
            "batch job exceeded the maximum job age; cancelling it and requeueing unfinished items"
        );
        match self.provider.cancel_batch(&job.id).await {
            Ok(cancelled) => cancelled,
            Err(error) => {
                tracing::warn!(job = %job.id, %error, "failed to cancel an overdue batch job; harvesting it in its current state");
                job
            }
        }
    }

    /// Finds the one item a job that failed at validation blamed, if it named one.
    async fn culprit(
        &self,
        batch: &BatchRow,
        job: &BatchJob,
        output: &[ResultLine],
        errors: &[ResultLine],
    ) -> Result<Option<i64>, PollError> {
        if job.status != BatchStatus::Failed || !output.is_empty() || !errors.is_empty() {
            return Ok(None);
        }
        let Some(error) = job.error.as_deref() else {
            return Ok(None);
        };
        let ids = self.store.batch_item_ids(batch.id).await?;
        Ok(results::blamed_item(error, &ids))
    }

    /// Pauses job creation for a model after a job failed for a reason not tied to one line
    /// (capacity, a model the provider cannot batch), and lifts the pause after a success.
    async fn update_model_health(
        &self,
        batch: &BatchRow,
        job: &BatchJob,
        culprit: Option<i64>,
    ) -> Result<(), StoreError> {
        match job.status {
            BatchStatus::Completed => self.store.clear_model_pause(&batch.model).await,
            BatchStatus::Failed if culprit.is_none() => {
                let reason = job
                    .error
                    .clone()
                    .unwrap_or_else(|| "no reason given".to_string());
                let until = Utc::now()
                    + chrono::Duration::from_std(self.config.capacity_cooldown).unwrap_or_default();
                tracing::error!(
                    model = %batch.model,
                    job = %job.id,
                    error = %reason,
                    cooldown_secs = self.config.capacity_cooldown.as_secs(),
                    "batch job failed for the whole model; pausing its batch jobs"
                );
                self.store.pause_model(&batch.model, until, &reason).await
            }
            _ => Ok(()),
        }
    }

    /// Downloads and splits a result file; no file id means no file.
    async fn download(&self, file_id: Option<&str>) -> Result<Vec<ResultLine>, PollError> {
        let Some(file_id) = file_id.filter(|id| !id.is_empty()) else {
            return Ok(Vec::new());
        };
        let bytes = self.provider.file_content(file_id).await?;
        let (lines, bad) = parse_result_file(&bytes);
        if bad > 0 {
            tracing::warn!(file = %file_id, bad_lines = bad, "result file has lines that are not valid result JSON; their items will be requeued");
        }
        Ok(lines)
    }

    async fn harvest(
        &self,
        batch: &BatchRow,
        job: &BatchJob,
        output: &[ResultLine],
        errors: &[ResultLine],
        culprit: Option<i64>,
    ) -> Result<(), PollError> {
        let started = std::time::Instant::now();
        let counts = results::harvest(
            &self.store,
            batch.id,
            job,
            output,
            errors,
            self.config.max_attempts,
            culprit,
        )
        .await?;
        crate::metrics::global().write_took(started.elapsed());
        if counts.requeued > 0 {
            self.requeued.raise();
        }
        if counts.first {
            crate::metrics::global().retries("batch", counts.requeued);
            tracing::info!(
                batch = batch.id,
                job = %job.id,
                status = job.status.as_str(),
                succeeded = counts.succeeded,
                failed = counts.failed,
                requeued = counts.requeued,
                ignored_lines = counts.ignored,
                "batch job finished"
            );
        }
        Ok(())
    }

    /// Runs until cancelled.
    pub async fn run(mut self, mut submitted: Listener, cancel: CancellationToken) {
        loop {
            let polled = {
                let _busy = crate::watchdog::busy();
                self.poll_once().await
            };
            if let Err(error) = polled {
                tracing::warn!(%error, "polling batch jobs failed; retrying");
            }
            let wait = self
                .config
                .poll_interval
                .min(Duration::from_secs(5))
                .max(Duration::from_millis(50));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = submitted.wait() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
