//! `batchd status`: items by state, batch jobs by status and progress per input file, read
//! from the database (safe while the daemon runs).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::{FileProgress, ItemState, Store, StoreError};

/// Everything `batchd status` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Count per item state, plus `total`.
    pub items: BTreeMap<String, u64>,
    /// Count per batch job status (the provider's, or batchd's own before submission).
    pub batches: BTreeMap<String, u64>,
    pub files: Vec<FileProgress>,
}

impl Status {
    pub async fn read(store: &Store) -> Result<Status, StoreError> {
        let counts = store.item_counts().await?;
        let mut items: BTreeMap<String, u64> = counts
            .iter()
            .map(|(state, n)| (state.as_str().to_string(), *n))
            .collect();
        items.insert("total".into(), counts.values().sum());
        let batches = store.batch_status_counts().await?.into_iter().collect();
        let files = store.file_progress().await?;
        Ok(Status {
            items,
            batches,
            files,
        })
    }

    /// Count of items not yet succeeded or failed.
    pub fn unfinished(&self) -> u64 {
        ItemState::ALL
            .iter()
            .filter(|s| !s.is_terminal())
            .map(|s| self.items.get(s.as_str()).copied().unwrap_or(0))
            .sum()
    }

    /// Renders the human-readable form.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let item = |state: ItemState| self.items.get(state.as_str()).copied().unwrap_or(0);
        out.push_str(&format!(
            "items: {} total\n",
            self.items.get("total").copied().unwrap_or(0)
        ));
        for state in ItemState::ALL {
            out.push_str(&format!("  {:<10} {:>8}\n", state.as_str(), item(state)));
        }
        out.push_str("batch jobs:\n");
        if self.batches.is_empty() {
            out.push_str("  none\n");
        }
        for (status, n) in &self.batches {
            out.push_str(&format!("  {status:<10} {n:>8}\n"));
        }
        out.push_str("input files:\n");
        if self.files.is_empty() {
            out.push_str("  none\n");
        }
        for f in &self.files {
            let done = f.succeeded + f.failed;
            let percent = if f.items == 0 {
                100.0
            } else {
                100.0 * done as f64 / f.items as f64
            };
            out.push_str(&format!(
                "  {}: {done}/{} done ({percent:.0}%), {} succeeded, {} failed, {} queued, {} in progress, {} bad lines\n",
                f.name, f.items, f.succeeded, f.failed, f.queued, f.in_progress, f.errors
            ));
        }
        out
    }
}
