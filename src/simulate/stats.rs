//! Counters that tests and benchmarks read to check how a client used the API: how many batches
//! it created and how large, how many it kept in flight, and how hard it pushed each real-time
//! endpoint. `GET /_sim/stats` serves the same [`SimStats`] as [`SimStatsHandle::snapshot`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::Shared;
use super::limits::Endpoint;

/// A copy of the simulator's counters. Maps are keyed by endpoint path, such as
/// `/v1/chat/completions`, and list every rate-limited endpoint, including unused ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Batches accepted by `POST /v1/batches`.
    pub batches_created: u64,
    /// Maximum line count of the input file of any created batch.
    pub max_batch_lines: u64,
    /// Maximum number of batches that were created but not yet terminal, measured at each create
    /// and counting the new batch.
    pub max_batches_in_flight: u64,
    /// Sum of the input line counts of all created batches.
    pub batch_lines_total: u64,
    /// Files whose content a client uploaded, by any of the upload routes.
    pub files_uploaded: u64,
    /// Requests received per real-time endpoint after authentication, rejected ones included.
    pub realtime_requests: BTreeMap<String, u64>,
    /// Maximum number of accepted requests inside any 60-second window, per real-time endpoint.
    pub realtime_max_per_minute: BTreeMap<String, u64>,
    /// Requests rejected with 429, over all endpoints.
    pub rate_limited: u64,
    /// Maximum number of inputs in one embeddings request; a single string counts as one.
    pub embedding_max_inputs: u64,
}

impl Default for SimStats {
    fn default() -> Self {
        let per_endpoint: BTreeMap<String, u64> = Endpoint::ALL
            .iter()
            .map(|endpoint| (endpoint.path().to_owned(), 0))
            .collect();
        Self {
            batches_created: 0,
            max_batch_lines: 0,
            max_batches_in_flight: 0,
            batch_lines_total: 0,
            files_uploaded: 0,
            realtime_requests: per_endpoint.clone(),
            realtime_max_per_minute: per_endpoint,
            rate_limited: 0,
            embedding_max_inputs: 0,
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
}

/// `GET /_sim/stats`.
pub(super) async fn get_stats(State(shared): State<Arc<Shared>>) -> Json<SimStats> {
    Json(shared.stats.snapshot())
}
