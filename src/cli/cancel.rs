//! `batchd cancel`: cancels one provider batch job, or the queued work of one input file.
//!
//! A cancelled job ends `CANCELLED` at the provider. The daemon's poller then harvests it as it
//! harvests any terminal job: lines the job finished are stored, and its other items go back to
//! the queue with one more attempt, so they are sent again. `cancel --file` is the way to stop
//! a file's work: its queued items fail at once, and items already in a job or a real-time call
//! are left to finish, because the daemon owns them until their results arrive.

use std::path::Path;

use serde::Serialize;

use super::{CliError, find_file};
use crate::config::Config;
use crate::provider::Provider;
use crate::store::{BatchState, Store};

/// The error stored on an item cancelled by `batchd cancel --file`.
pub const CANCELLED_MESSAGE: &str = "cancelled by the operator";

/// The outcome of `batchd cancel --file`.
#[derive(Debug, Clone, Serialize)]
pub struct FileCancelled {
    pub file: String,
    pub cancelled: u64,
    pub left_running: u64,
}

impl FileCancelled {
    pub fn render(&self) -> String {
        let mut out = format!(
            "cancelled {} queued items of {}\n",
            self.cancelled, self.file
        );
        if self.left_running > 0 {
            out.push_str(&format!(
                "{} items are already in batch jobs or real-time calls; the daemon stores their results when they finish\n",
                self.left_running
            ));
        }
        out
    }
}

/// The outcome of `batchd cancel --job`.
#[derive(Debug, Clone, Serialize)]
pub struct JobCancelled {
    pub job: String,
    /// The provider's status of the job after the cancel request.
    pub status: String,
    pub items: u64,
}

impl JobCancelled {
    pub fn render(&self) -> String {
        format!(
            "asked the provider to cancel batch job {} (status now {}); the daemon keeps the lines it finished and requeues the rest of its {} items; run `batchd cancel --file NAME` to stop an input file's work instead\n",
            self.job, self.status, self.items
        )
    }
}

/// Fails the queued items of one input file.
pub async fn file(store: &Store, database: &Path, name: &str) -> Result<FileCancelled, CliError> {
    let found = find_file(store, database, name).await?;
    let done = store.cancel_queued(found.id, CANCELLED_MESSAGE).await?;
    Ok(FileCancelled {
        file: name.to_string(),
        cancelled: done.cancelled,
        left_running: done.left_running,
    })
}

/// Asks the provider to cancel one of this database's batch jobs.
pub async fn job(store: &Store, config: &Config, job_id: &str) -> Result<JobCancelled, CliError> {
    let database = &config.paths.database;
    let Some(batch) = store.batch_by_provider_id(job_id).await? else {
        return Err(CliError::NoSuchJob {
            id: job_id.to_string(),
            database: database.clone(),
        });
    };
    if batch.state == BatchState::Harvested {
        return Err(CliError::JobFinished {
            id: job_id.to_string(),
            status: batch
                .provider_status
                .unwrap_or_else(|| batch.state.as_str().to_string()),
        });
    }
    if config.provider.api_key.expose().is_none() {
        return Err(CliError::NoApiKey);
    }
    let provider = Provider::new(&config.provider, config.realtime.max_retry_wait)?;
    let cancelled = provider.cancel_batch(job_id).await?;
    Ok(JobCancelled {
        job: job_id.to_string(),
        status: cancelled.status.as_str().to_string(),
        items: batch.item_count,
    })
}
