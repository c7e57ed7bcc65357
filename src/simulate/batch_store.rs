//! All batch jobs of one simulator, oldest first, and the count of batch creations per input
//! file that the `create_not_found` fault needs.

use std::collections::HashMap;

use tokio::time::Instant;

use super::error::BatchError;
use super::files::FileStore;
use super::jobs::{Batch, BatchJob, JobSettings};

/// All batch jobs, oldest first.
#[derive(Default)]
pub(super) struct BatchStore {
    batches: Vec<Batch>,
    /// Calls of `POST /v1/batches` per input file id, refused ones included.
    create_attempts: HashMap<String, u32>,
}

impl BatchStore {
    /// Ends every job whose time has come, and returns the number of lines that a fault moved to
    /// the error file.
    pub fn refresh_all(
        &mut self,
        now: Instant,
        settings: &JobSettings,
        files: &mut FileStore,
    ) -> u64 {
        self.batches
            .iter_mut()
            .map(|batch| batch.refresh(now, settings, files))
            .sum()
    }

    /// Adds a job and returns it with two counts: the jobs in flight, the new one included unless
    /// a zero turnaround already ended it, and the jobs created for its input file.
    pub fn insert(
        &mut self,
        mut batch: Batch,
        settings: &JobSettings,
        files: &mut FileStore,
    ) -> (&Batch, usize, usize) {
        batch.refresh(Instant::now(), settings, files);
        let same_input = self
            .batches
            .iter()
            .filter(|other| other.input_file_id == batch.input_file_id)
            .count()
            + 1;
        self.batches.push(batch);
        let in_flight = self
            .batches
            .iter()
            .filter(|batch| !batch.is_terminal())
            .count();
        (
            self.batches.last().expect("just pushed"),
            in_flight,
            same_input,
        )
    }

    /// Counts a `POST /v1/batches` call for `input_file_id` and returns how many there were,
    /// this one included.
    pub fn count_create_attempt(&mut self, input_file_id: &str) -> u32 {
        let attempts = self
            .create_attempts
            .entry(input_file_id.to_owned())
            .or_default();
        *attempts += 1;
        *attempts
    }

    pub fn get_mut(&mut self, id: &str) -> Result<&mut Batch, BatchError> {
        self.batches
            .iter_mut()
            .find(|batch| batch.id == id)
            .ok_or_else(|| {
                BatchError::not_found(format!(
                    "batch {id} not found; GET /v1/batches lists the existing batches"
                ))
            })
    }

    /// Returns every job object, oldest first.
    pub fn jobs(&self, now: Instant, settings: &JobSettings) -> Vec<BatchJob<'_>> {
        self.batches
            .iter()
            .map(|batch| batch.job(now, settings))
            .collect()
    }
}
