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
    #[error(transparent)]
    Provider(#[from] ProviderError),
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
            submitted,
            work,
        }
    }

    /// Moves every unsubmitted batch as far as it goes. Returns how many jobs were created.
    pub async fn submit_once(&mut self) -> Result<u64, StoreError> {
        let mut created = 0;
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
                }
                Ok(false) => {}
                Err(SubmitError::Store(error)) => return Err(error),
                Err(SubmitError::Provider(error)) => self.failed(&batch, error).await?,
            }
        }
        Ok(created)
    }

    /// Handles a failed call: fatal errors abandon the batch, others back off.
    async fn failed(&mut self, batch: &BatchRow, error: ProviderError) -> Result<(), StoreError> {
        if error.class() == Failure::Fatal {
            let reason = format!("batch could not be submitted: {error}");
            let (requeued, failed) =
                results::abandon_batch(&self.store, batch.id, &reason, self.config.max_attempts)
                    .await?;
            tracing::error!(batch = batch.id, %error, requeued, failed, "batch rejected by the provider");
            self.backoff.remove(&batch.id);
            self.work.raise();
            return Ok(());
        }
        let failures = self.backoff.get(&batch.id).map_or(0, |(_, n)| *n);
        let delay = self.policy.delay(error.server_wait(), failures);
        tracing::warn!(batch = batch.id, %error, retry_in_ms = delay.as_millis() as u64, "batch submission failed; retrying");
        self.backoff
            .insert(batch.id, (Instant::now() + delay, failures + 1));
        Ok(())
    }

    /// Takes one batch through its remaining steps. Returns true once its job exists.
    async fn advance(&self, batch: &BatchRow) -> Result<bool, SubmitError> {
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
                        .await?
                        .into_iter()
                        .find(|job| job.input_file_id.as_deref() == Some(file_id.as_str()));
                    match existing {
                        Some(job) => {
                            self.record_job(batch, &job.id, job.status.as_str()).await?;
                            tracing::info!(batch = batch.id, job = %job.id, "adopted a batch job created before a restart");
                        }
                        None => self.create(batch, &file_id).await?,
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
            .await?;
        self.store.record_upload(batch.id, &file.id).await?;
        Ok(file.id)
    }

    /// Looks for this batch's file among the provider's files by its unique name.
    async fn find_upload(&self, batch: &BatchRow) -> Result<Option<String>, SubmitError> {
        let files = self.provider.list_files().await?;
        let expected_lines = batch.item_count;
        Ok(files
            .into_iter()
            .filter(|f| f.filename.as_deref() == Some(batch.upload_name.as_str()))
            .find(|f| f.line_count.is_none_or(|n| n == expected_lines))
            .map(|f| f.id))
    }

    async fn create(&self, batch: &BatchRow, input_file_id: &str) -> Result<(), SubmitError> {
        let job = self
            .provider
            .create_batch(&batch.endpoint, input_file_id, &batch.model)
            .await?;
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
            if let Err(error) = self.submit_once().await {
                tracing::warn!(%error, "submitting batches failed; retrying");
            }
            let next_retry = self
                .backoff
                .values()
                .map(|(until, _)| until.saturating_duration_since(Instant::now()))
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
