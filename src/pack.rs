//! Packing: group queued batchable items by endpoint and model into batches that respect the
//! request cap, the byte cap and the in-flight cap.
//!
//! A group is packed when it has a full batch's worth of items, or when its oldest item has
//! waited `max_linger` (a partial batch is flushed then). An item whose uploaded line alone is
//! larger than the byte cap can never be sent in a batch and fails with the reason.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::{BatchConfig, LiveReceiver};
use crate::store::{NewBatch, PackCandidate, Store, StoreError};
use crate::submit::line_len;
use crate::wake::{Listener, Signal};

/// The packer stage.
pub struct Packer {
    store: Store,
    config: BatchConfig,
    /// The request, byte and in-flight caps, which a reload can change between passes.
    live: LiveReceiver,
    /// Raised after a batch was packed.
    packed: Signal,
}

/// The counts of one packing pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PackPass {
    pub batches: u64,
    pub items: u64,
    /// Time until the oldest waiting group reaches `max_linger`, if one is waiting.
    pub next_flush: Option<Duration>,
}

/// Takes the longest prefix of `candidates` that fits `max_bytes`, and returns it with its
/// size. Candidates too large to fit any batch are returned separately.
pub fn fit_batch(candidates: &[PackCandidate], max_bytes: u64) -> (Vec<i64>, u64, Vec<(i64, u64)>) {
    let mut chosen = Vec::new();
    let mut bytes = 0;
    let mut oversized = Vec::new();
    for candidate in candidates {
        let len = line_len(candidate.id, candidate.body_bytes);
        if len > max_bytes {
            oversized.push((candidate.id, len));
            continue;
        }
        if bytes + len > max_bytes {
            break;
        }
        bytes += len;
        chosen.push(candidate.id);
    }
    (chosen, bytes, oversized)
}

impl Packer {
    pub fn new(store: Store, config: BatchConfig, live: LiveReceiver, packed: Signal) -> Self {
        Packer {
            store,
            config,
            live,
            packed,
        }
    }

    /// Packs every batch that is due now, within the in-flight cap. With `flush`, partial
    /// batches are packed whatever their age.
    pub async fn pack_once(&self, flush: bool) -> Result<PackPass, StoreError> {
        let mut pass = PackPass::default();
        let cutoff = Utc::now()
            + chrono::Duration::from_std(self.config.deadline_margin).unwrap_or_default();
        loop {
            let caps = self.live.borrow().clone();
            let in_flight = self.store.count_unfinished_batches().await? as usize;
            if in_flight >= caps.max_in_flight {
                return Ok(pass);
            }
            let groups = self
                .store
                .pack_groups(&self.config.batchable_endpoints, cutoff, caps.max_requests)
                .await?;
            let now = Utc::now();
            let linger = chrono::Duration::from_std(self.config.max_linger).unwrap_or_default();
            let due = groups.iter().find(|g| {
                flush || g.count as usize >= caps.max_requests || g.oldest + linger <= now
            });
            pass.next_flush = groups
                .iter()
                .map(|g| (g.oldest + linger - now).to_std().unwrap_or_default())
                .min();
            let Some(group) = due else {
                return Ok(pass);
            };
            let candidates = self
                .store
                .pack_candidates(group, cutoff, caps.max_requests)
                .await?;
            if candidates.is_empty() {
                return Ok(pass);
            }
            let (ids, bytes, oversized) = fit_batch(&candidates, caps.max_bytes);
            for (id, len) in oversized {
                let reason = format!(
                    "request is {len} bytes as a batch line, more than the batch limit of {} bytes (`batch.max_bytes`)",
                    caps.max_bytes
                );
                self.store.fail_queued(id, &reason).await?;
                tracing::warn!(
                    item = id,
                    bytes = len,
                    "request too large for any batch; item failed"
                );
            }
            if ids.is_empty() {
                continue;
            }
            let batch = NewBatch {
                endpoint: group.endpoint.clone(),
                model: group.model.clone(),
                item_ids: ids,
                bytes,
            };
            if let Some(row) = self.store.pack_batch(&batch).await? {
                tracing::debug!(batch = row.id, items = row.item_count, model = %row.model, "batch packed");
                pass.batches += 1;
                pass.items += row.item_count;
                self.packed.raise();
            }
        }
    }

    /// Runs until cancelled. Packs when `queued` is raised (items arrived or were requeued) and
    /// when `freed` is raised (a finished batch freed a place under the in-flight cap). Packs
    /// partial batches at once when `flush` is raised, and each when it reaches its linger time.
    pub async fn run(
        self,
        [mut queued, mut freed]: [Listener; 2],
        mut flush: Listener,
        cancel: CancellationToken,
    ) {
        let mut force = false;
        loop {
            let packed = {
                let _busy = crate::watchdog::busy();
                self.pack_once(force).await
            };
            let wait = match packed {
                Ok(pass) => pass.next_flush.unwrap_or(Duration::from_secs(60)),
                Err(error) => {
                    tracing::warn!(%error, "packing failed; retrying");
                    Duration::from_secs(5)
                }
            };
            force = false;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = queued.wait() => {}
                _ = freed.wait() => {}
                _ = flush.wait() => force = true,
                _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: i64, body_bytes: u64) -> PackCandidate {
        PackCandidate { id, body_bytes }
    }

    #[test]
    fn batch_stops_at_byte_cap() {
        let candidates: Vec<_> = (1..=7)
            .map(|id| candidate(id, 150 - line_len(id, 0)))
            .collect();
        let (ids, bytes, oversized) = fit_batch(&candidates, 600);
        assert_eq!(ids, vec![1, 2, 3, 4]);
        assert_eq!(bytes, 600);
        assert!(oversized.is_empty());
    }

    #[test]
    fn oversized_item_is_set_aside() {
        let candidates = vec![candidate(1, 10), candidate(2, 10_000), candidate(3, 10)];
        let (ids, _, oversized) = fit_batch(&candidates, 1000);
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(oversized.len(), 1);
        assert_eq!(oversized[0].0, 2);
    }
}
