//! `batchd files`: every ingested input file with its items counted, its disposition, when it
//! was ingested and where its results were exported.

use std::fmt::Write;

use chrono::Utc;

use super::status::{FileStatus, RATE_WINDOW_SECS};
use crate::store::{Store, StoreError};

/// Reads every input file, newest first.
pub async fn read(store: &Store) -> Result<Vec<FileStatus>, StoreError> {
    let now = Utc::now();
    let since = now - chrono::Duration::seconds(RATE_WINDOW_SECS);
    Ok(store
        .file_progress(since)
        .await?
        .into_iter()
        .map(|file| FileStatus::new(file, now))
        .collect())
}

/// Renders the files as an aligned table.
pub fn render(files: &[FileStatus]) -> String {
    if files.is_empty() {
        return "no input files yet\n".to_string();
    }
    let width = files
        .iter()
        .map(|f| f.file.name.chars().count())
        .max()
        .unwrap_or(0)
        .max("NAME".len());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>8}  {:>9}  {:>8}  {:>8}  {:>9}  {:<11}  {:<24}  {:<24}  STORED AS",
        "NAME",
        "ITEMS",
        "SUCCEEDED",
        "FAILED",
        "PENDING",
        "BAD LINES",
        "DISPOSITION",
        "INGESTED",
        "EXPORTED"
    );
    for status in files {
        let f = &status.file;
        let _ = writeln!(
            out,
            "{:<width$}  {:>8}  {:>9}  {:>8}  {:>8}  {:>9}  {:<11}  {:<24}  {:<24}  {}",
            f.name,
            f.items,
            f.succeeded,
            f.failed,
            status.pending,
            f.errors,
            // Retention deleted the items: the counts above are of what is left, none.
            if f.purged_at.is_some() {
                "purged"
            } else {
                f.disposition.as_str()
            },
            f.ingested_at,
            f.exported_at.as_deref().unwrap_or("-"),
            f.stored_name.as_deref().unwrap_or("-"),
        );
    }
    out
}
