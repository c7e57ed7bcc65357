//! Counters that tests and benchmarks read to check how a client used the API. They count the
//! batches it created, their sizes, how many it kept in flight, how hard it pushed each real-time
//! endpoint, and which faults the simulator injected. `GET /_sim/stats` serves the same
//! [`SimStats`] as [`SimStatsHandle::snapshot`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::Shared;
use super::faults::FaultKind;
use super::limits::Endpoint;

/// A copy of the simulator's counters. Maps are keyed by endpoint path, such as
/// `/v1/chat/completions`, and list every rate-limited endpoint, including unused ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Batches accepted by `POST /v1/batches`.
    pub batches_created: u64,
    /// Calls of `POST /v1/batches`, rejected ones included.
    pub batch_create_requests: u64,
    /// Maximum number of batches created for one input file id.
    pub max_jobs_per_input_file: u64,
    /// Maximum line count of the input file of any created batch.
    pub max_batch_lines: u64,
    /// Maximum number of batches that were created but not yet terminal, measured at each create
    /// and counting the new batch.
    pub max_batches_in_flight: u64,
    /// Sum of the input line counts of all created batches.
    pub batch_lines_total: u64,
    /// Files whose content a client uploaded, by any of the upload routes.
    pub files_uploaded: u64,
    /// Files removed by `DELETE /v1/files/{file_id}`.
    pub files_deleted: u64,
    /// Requests received per real-time endpoint after authentication, rejected ones included.
    pub realtime_requests: BTreeMap<String, u64>,
    /// Maximum number of accepted requests inside any 60-second window, per real-time endpoint.
    pub realtime_max_per_minute: BTreeMap<String, u64>,
    /// Requests that got a 429, injected ones included, over all endpoints.
    pub rate_limited: u64,
    /// Maximum number of inputs in one embeddings request; a single string counts as one.
    pub embedding_max_inputs: u64,
    /// Injected faults by name, such as `rate_limit` or `line_error`; a fault never injected is
    /// absent.
    pub faults_injected: BTreeMap<String, u64>,
}

impl Default for SimStats {
    fn default() -> Self {
        let per_endpoint: BTreeMap<String, u64> = Endpoint::ALL
            .iter()
            .map(|endpoint| (endpoint.path().to_owned(), 0))
            .collect();
        Self {
            batches_created: 0,
            batch_create_requests: 0,
            max_jobs_per_input_file: 0,
            max_batch_lines: 0,
            max_batches_in_flight: 0,
            batch_lines_total: 0,
            files_uploaded: 0,
            files_deleted: 0,
            realtime_requests: per_endpoint.clone(),
            realtime_max_per_minute: per_endpoint,
            rate_limited: 0,
            embedding_max_inputs: 0,
            faults_injected: BTreeMap::new(),
        }
    }
}

/// A cloneable handle on the live counters of one [`super::Simulator`].
#[derive(Debug, Clone, Default)]
pub struct SimStatsHandle {
    inner: Arc<Mutex<SimStats>>,
}

impl SimStatsHandle {
    /// Returns a copy of the counters as they are now.
    pub fn snapshot(&self) -> SimStats {
        self.inner.lock().expect("stats lock poisoned").clone()
    }

    pub(super) fn update(&self, change: impl FnOnce(&mut SimStats)) {
        change(&mut self.inner.lock().expect("stats lock poisoned"));
    }

    /// Counts `count` injections of one fault.
    pub(super) fn record_faults(&self, kind: FaultKind, count: u64) {
        if count == 0 {
            return;
        }
        tracing::debug!(fault = kind.as_str(), count, "fault injected");
        self.update(|stats| {
            *stats
                .faults_injected
                .entry(kind.as_str().to_owned())
                .or_default() += count;
        });
    }

    pub(super) fn record_fault(&self, kind: FaultKind) {
        self.record_faults(kind, 1);
    }
}

/// `GET /_sim/stats`.
pub(super) async fn get_stats(State(shared): State<Arc<Shared>>) -> Json<SimStats> {
    Json(shared.stats.snapshot())
}
