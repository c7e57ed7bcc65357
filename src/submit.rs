//! Submission: upload a packed batch's JSONL and create the provider job.
//!
//! Each remote call that creates remote state is bracketed by commits: the intent
//! (`uploading`, `creating`) before, the remote id after. A batch found in an intent state was
//! interrupted mid-call, so before calling again the provider is asked whether the call took
//! effect: uploaded files are looked up by the unique name batchd gave them, and jobs by their
//! input file id. A job is therefore never created twice for the same items.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::BatchConfig;
use crate::provider::wait::RetryPolicy;
use crate::provider::{Failure, Provider, ProviderError};
use crate::results::{self, line_id};
use crate::store::{BatchRow, BatchState, Store, StoreError};
use crate::wake::{Listener, Signal};

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{step:?} failed: {source}")]
    Provider { step: Step, source: ProviderError },
}

/// The remote call of a submission that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Upload,
    Create,
}

impl Step {
    /// Wraps a provider error of this step.
    fn err(self) -> impl FnOnce(ProviderError) -> SubmitError {
        move |source| SubmitError::Provider { step: self, source }
    }
}

/// Returns one line of an uploaded batch file (with its newline).
pub fn batch_line(item_id: i64, body: &str) -> String {
    format!(
        "{{\"custom_id\":\"{}\",\"body\":{body}}}\n",
        line_id(item_id)
    )
}

/// Returns the length of [`batch_line`] without building it.
pub fn line_len(item_id: i64, body_bytes: u64) -> u64 {
    let id_digits = item_id.max(0).to_string().len() as u64;
    // {"custom_id":"bd- ... ","body": ... }\n
    17 + id_digits + 9 + body_bytes + 2
}

/// The submitter stage.
pub struct Submitter {
    store: Store,
    provider: Provider,
    config: BatchConfig,
    policy: RetryPolicy,
    /// Batches waiting out a backoff after a failed call, with their failure count.
    backoff: HashMap<i64, (Instant, u32)>,
    /// Failed create calls per batch, against `batch.max_create_attempts`.
    create_failures: HashMap<i64, u32>,
    /// The earliest time a paused model may get a job again.
    next_unpause: Option<Instant>,
    /// Raised after a job was created, so the poller schedules it.
    submitted: Signal,
    /// Raised when a batch was abandoned and its items requeued.
    work: Signal,
}

impl Submitter {
    pub fn new(
        store: Store,
        provider: Provider,
        config: BatchConfig,
        policy: RetryPolicy,
        submitted: Signal,
        work: Signal,
    ) -> Self {
        Submitter {
            store,
            provider,
            config,
            policy,
            backoff: HashMap::new(),
            create_failures: HashMap::new(),
            next_unpause: None,
            submitted,
            work,
        }
    }

    /// Moves every unsubmitted batch as far as it goes. Returns how many jobs were created.
    pub async fn submit_once(&mut self) -> Result<u64, StoreError> {
        let mut created = 0;
        self.next_unpause = None;
        for batch in self.store.unfinished_batches().await? {
            if batch.state == BatchState::Submitted {
                continue;
            }
            if let Some((until, _)) = self.backoff.get(&batch.id)
                && *until > Instant::now()
            {
                continue;
            }
            match self.advance(&batch).await {
                Ok(true) => {
                    created += 1;
                    self.backoff.remove(&batch.id);
                    self.create_failures.remove(&batch.id);
                }
                Ok(false) => {}
                Err(SubmitError::Store(error)) => return Err(error),
                Err(SubmitError::Provider { step, source }) => {
                    self.failed(&batch, step, source).await?
                }
            }
        }
        Ok(created)
    }

    /// Handles a failed call. A failed upload is retried unless fatal. A failed create is
    /// retried with the same file, a 404 included, because a freshly uploaded file can take a
    /// moment to become visible; once `max_create_attempts` is used up, or on another fatal
    /// response, the items go back to the queue and the orphan file is deleted.
    async fn failed(
        &mut self,
        batch: &BatchRow,
        step: Step,
        error: ProviderError,
    ) -> Result<(), StoreError> {
        let give_up = match step {
            Step::Upload => error.class() == Failure::Fatal,
            Step::Create => {
                let failures = self.create_failures.entry(batch.id).or_insert(0);
                *failures += 1;
                let not_found = error.status() == Some(404);
                *failures >= self.config.max_create_attempts
                    || (error.class() == Failure::Fatal && !not_found)
            }
        };
        if give_up {
            self.abandon(batch, step, &error).await?;
            return Ok(());
        }
        let failures = self.backoff.get(&batch.id).map_or(0, |(_, n)| *n);
        let delay = self.policy.delay(error.server_wait(), failures);
        tracing::warn!(batch = batch.id, %error, retry_in_ms = delay.as_millis() as u64, "batch submission failed; retrying");
        self.backoff
            .insert(batch.id, (Instant::now() + delay, failures + 1));
        Ok(())
    }

    /// Returns a batch's items to the queue and deletes its uploaded file, if any.
    async fn abandon(
        &mut self,
        batch: &BatchRow,
        step: Step,
        error: &ProviderError,
    ) -> Result<(), StoreError> {
        let reason = format!("batch could not be submitted: {error}");
        let (requeued, failed) =
            results::abandon_batch(&self.store, batch.id, &reason, self.config.max_attempts)
                .await?;
        tracing::error!(batch = batch.id, ?step, %error, requeued, failed, "batch rejected by the provider; items returned to the queue");
        let file_id = self
            .store
            .batch(batch.id)
            .await?
            .and_then(|b| b.input_file_id);
        if let Some(file_id) = file_id
            && let Err(error) = self.provider.delete_file(&file_id).await
        {
            tracing::warn!(batch = batch.id, file = %file_id, %error, "failed to delete the uploaded file of an abandoned batch");
        }
        self.backoff.remove(&batch.id);
        self.create_failures.remove(&batch.id);
        self.work.raise();
        Ok(())
    }

    /// Returns true when the batch's model may get a job now. A model paused after a capacity
    /// failure gets at most one create per cooldown until one of its jobs completes.
    async fn model_ready(&mut self, batch: &BatchRow) -> Result<bool, StoreError> {
        let Some(until) = self.store.model_pause(&batch.model).await? else {
            return Ok(true);
        };
        let now = Utc::now();
        if until > now {
            let wait = (until - now).to_std().unwrap_or_default();
            let at = Instant::now() + wait;
            self.next_unpause = Some(self.next_unpause.map_or(at, |t| t.min(at)));
            return Ok(false);
        }
        let next =
            now + chrono::Duration::from_std(self.config.capacity_cooldown).unwrap_or_default();
        self.store
            .pause_model(&batch.model, next, "probing after a capacity failure")
            .await?;
        Ok(true)
    }

    /// Takes one batch through its remaining steps. Returns true once its job exists.
    async fn advance(&mut self, batch: &BatchRow) -> Result<bool, SubmitError> {
        let mut state = batch.state;
        let mut input_file_id = batch.input_file_id.clone();
        loop {
            match state {
                BatchState::Packed => {
                    self.store
                        .set_batch_state(batch.id, BatchState::Packed, BatchState::Uploading)
                        .await?;
                    input_file_id = Some(self.upload(batch).await?);
                    state = BatchState::Uploaded;
                }
                BatchState::Uploading => {
                    // Interrupted upload: reuse the file if it arrived whole, else upload again.
                    input_file_id = Some(match self.find_upload(batch).await? {
                        Some(id) => {
                            self.store.record_upload(batch.id, &id).await?;
                            tracing::info!(batch = batch.id, file = %id, "adopted a file uploaded before a restart");
                            id
                        }
                        None => self.upload(batch).await?,
                    });
                    state = BatchState::Uploaded;
                }
                BatchState::Uploaded => {
                    if !self.model_ready(batch).await? {
                        return Ok(false);
                    }
                    self.store
                        .set_batch_state(batch.id, BatchState::Uploaded, BatchState::Creating)
                        .await?;
                    let file_id = input_file_id.clone().unwrap_or_default();
                    self.create(batch, &file_id).await?;
                    return Ok(true);
                }
                BatchState::Creating => {
                    let file_id = input_file_id.clone().unwrap_or_default();
                    // The create call may have taken effect before its response was stored.
                    let existing = self
                        .provider
                        .list_batches()
                        .await
                        .map_err(Step::Create.err())?
                        .into_iter()
                        .find(|job| job.input_file_id.as_deref() == Some(file_id.as_str()));
                    match existing {
                        Some(job) => {
                            self.record_job(batch, &job.id, job.status.as_str()).await?;
                            tracing::info!(batch = batch.id, job = %job.id, "adopted a batch job created before a restart");
                        }
                        None => {
                            if !self.model_ready(batch).await? {
                                return Ok(false);
                            }
                            self.create(batch, &file_id).await?
                        }
                    }
                    return Ok(true);
                }
                BatchState::Submitted | BatchState::Harvested => return Ok(false),
            }
        }
    }

    /// Builds and uploads the batch file, then records its id.
    async fn upload(&self, batch: &BatchRow) -> Result<String, SubmitError> {
        let mut content = String::new();
        for (item_id, body) in self.store.batch_requests(batch.id).await? {
            content.push_str(&batch_line(item_id, &body));
        }
        let file = self
            .provider
            .upload_batch_file(&batch.upload_name, content.into_bytes())
            .await
            .map_err(Step::Upload.err())?;
        crate::fault::point("after-upload");
        self.store.record_upload(batch.id, &file.id).await?;
        Ok(file.id)
    }

    /// Looks for this batch's file among the provider's files by its unique name. Only a file
    /// whose upload completed (its line count is known and matches) is reused.
    async fn find_upload(&self, batch: &BatchRow) -> Result<Option<String>, SubmitError> {
        let files = self
            .provider
            .list_files()
            .await
            .map_err(Step::Upload.err())?;
        let expected_lines = batch.item_count;
        Ok(files
            .into_iter()
            .filter(|f| f.filename.as_deref() == Some(batch.upload_name.as_str()))
            .find(|f| f.line_count == Some(expected_lines))
            .map(|f| f.id))
    }

    async fn create(&self, batch: &BatchRow, input_file_id: &str) -> Result<(), SubmitError> {
        let job = self
            .provider
            .create_batch(&batch.endpoint, input_file_id, &batch.model)
            .await
            .map_err(Step::Create.err())?;
        crate::fault::point("after-create");
        self.record_job(batch, &job.id, job.status.as_str()).await
    }

    async fn record_job(
        &self,
        batch: &BatchRow,
        job_id: &str,
        status: &str,
    ) -> Result<(), SubmitError> {
        let next_poll =
            Utc::now() + chrono::Duration::from_std(self.config.poll_interval).unwrap_or_default();
        self.store
            .record_created(batch.id, job_id, status, next_poll)
            .await?;
        tracing::info!(batch = batch.id, job = %job_id, items = batch.item_count, model = %batch.model, "batch job submitted");
        self.submitted.raise();
        Ok(())
    }

    /// Runs until cancelled, submitting when a batch is packed and retrying after failures.
    pub async fn run(mut self, mut packed: Listener, cancel: CancellationToken) {
        loop {
            let submitted = {
                let _busy = crate::watchdog::busy();
                crate::fault::stall("submit").await;
                self.submit_once().await
            };
            if let Err(error) = submitted {
                tracing::warn!(%error, "submitting batches failed; retrying");
            }
            let next_retry = self
                .backoff
                .values()
                .map(|(until, _)| *until)
                .chain(self.next_unpause)
                .map(|until| until.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(Duration::from_secs(30));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = packed.wait() => {}
                _ = tokio::time::sleep(next_retry.max(Duration::from_millis(50))) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_len_matches_batch_line() {
        for (id, body) in [(1, "{}"), (12345, r#"{"model":"m","messages":[]}"#)] {
            assert_eq!(
                line_len(id, body.len() as u64),
                batch_line(id, body).len() as u64
            );
        }
    }
}
