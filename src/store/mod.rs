//! SQLite storage: the pool (WAL, busy timeout, foreign keys), migrations from `migrations/`,
//! and typed queries per table.
//!
//! Timestamps are stored as RFC 3339 text in UTC with millisecond precision
//! (`2026-01-02T03:04:05.678Z`), so they sort as text and compare correctly in SQL.

mod batches;
mod counts;
mod exports;
mod files;
pub mod items;
mod models;
mod operator;
mod retention;
mod scratch;

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::SqlitePool;
use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};

pub(crate) use batches::mark_harvested;
pub use batches::{BatchRow, BatchState, NewBatch};
pub use exports::{ExportCandidate, ExportRow};
pub use files::{BoundItems, FileIngest, FileProgress, FileRow, FileTotals, ItemBinder, NewFile};
pub use items::{Added, ClaimedItem, ItemState, NewItem, PackCandidate, PackGroup};
pub use operator::{Cancelled, EndpointRate, Scope};
pub use retention::Purged;
pub use scratch::SeenIds;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("failed to apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "database {path} not found: check `paths.database`, or start the daemon once to create it"
    )]
    Missing { path: String },
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("database holds an unknown {kind} {value:?}: was it written by a newer batchd?")]
    UnknownValue { kind: &'static str, value: String },
    #[error("failed to decode {subject} read from the database as JSON: {source}")]
    Decode {
        subject: &'static str,
        source: serde_json::Error,
    },
}

/// Decodes the JSON array a query built with `json_group_array` to return many rows as one.
fn decode<T: serde::de::DeserializeOwned>(
    subject: &'static str,
    json: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::Decode { subject, source })
}

/// Bytes the WAL file is truncated to when the log starts over after a checkpoint.
const WAL_SIZE_LIMIT: u64 = 64 << 20;

/// Bytes per page of a new database. Ingest writes rows of about 700 bytes, and at 16 KiB a
/// million of them took 15% less time than at SQLite's default of 4 KiB, with fewer page
/// splits and WAL frames. The pipeline's small updates cost the same CPU either way.
const PAGE_SIZE: u32 = 16 * 1024;

/// The outcome of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpointed {
    /// True when the checkpoint could not run, for example because another connection was
    /// copying the log. The frame counts are then 0.
    pub blocked: bool,
    /// Frames in the write-ahead log.
    pub wal_frames: u64,
    /// Frames of the log now copied into the database. Frames past these are still needed
    /// by a reader and wait for the next checkpoint.
    pub copied_frames: u64,
}

/// The database handle shared by every stage.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

/// Formats a time the way every timestamp column stores it.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses a stored timestamp back.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    ///
    /// Commits never copy the write-ahead log back into the database themselves: a running
    /// daemon does that on its checkpoint stage through [`Store::checkpoint`], and SQLite does
    /// it when the last connection to the database closes.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A missing parent directory is the usual first-run mistake, so create it.
            let _ = std::fs::create_dir_all(dir);
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30))
            // A checkpoint leaves the WAL file at its largest size: over a gigabyte after a
            // million-line ingest. The next reset of the log truncates it to this.
            .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string())
            .pragma("wal_autocheckpoint", "0");
        // Auto-vacuum, which lets retention return freed pages, and the page size take effect
        // only when the database is created. On an existing database, setting auto-vacuum is a
        // write that runs before `wal_autocheckpoint = 0`, so every open would copy a large log.
        let is_new = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
        let options = if is_new {
            options
                .auto_vacuum(SqliteAutoVacuum::Incremental)
                .page_size(PAGE_SIZE)
        } else {
            options
        };
        // TODO: statement journals larger than SQLite's 64 KiB default go to a temporary file,
        // so every batch's state change in a transaction writes one. That measured about 15% of
        // the CPU time per item. `temp_store = MEMORY` removes that cost, but then a bulk
        // statement keeps its whole journal in memory. A 1 MiB spill limit
        // (`SQLITE_STMTJRNL_SPILL`) made a million-line ingest fail with SQLITE_FULL.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    /// Opens a database that must exist already, for commands that only read it.
    pub async fn open_existing(path: &Path) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.display().to_string(),
            });
        }
        Self::open(path).await
    }

    /// Copies the write-ahead log back into the database as far as no reader still needs it,
    /// without waiting for readers or blocking writers (a passive checkpoint).
    pub async fn checkpoint(&self) -> Result<Checkpointed, StoreError> {
        let (busy, wal_frames, copied_frames): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&self.pool)
                .await?;
        Ok(Checkpointed {
            blocked: busy != 0,
            wal_frames: wal_frames.max(0) as u64,
            copied_frames: copied_frames.max(0) as u64,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Query-plan checks shared by the store's tests.
#[cfg(test)]
pub(crate) mod plan_tests {
    use super::Store;
    use sqlx::Row;

    /// Returns the details of SQLite's plan for `sql`, with `params` bound in order.
    pub(crate) async fn plan(store: &Store, sql: &str, params: &[&str]) -> Vec<String> {
        let sql = format!("EXPLAIN QUERY PLAN {sql}");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for param in params {
            query = query.bind(*param);
        }
        let rows = query.fetch_all(store.pool()).await.unwrap();
        rows.iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect()
    }

    /// Asserts that a plan reads `index` and never scans the whole table.
    pub(crate) fn assert_searches(plan: &[String], index: &str) {
        assert!(
            plan.iter().all(|step| !step.starts_with("SCAN work_items")),
            "{plan:#?}"
        );
        let reads_index = |step: &String| {
            step.starts_with("SEARCH work_items USING")
                && step.contains(&format!("INDEX {index} ("))
        };
        assert!(plan.iter().any(reads_index), "{plan:#?}");
    }
}
