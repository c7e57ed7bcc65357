//! Retention: deleting the work items of input files that were exported long enough ago, and
//! returning the freed pages to the file system.

use chrono::{DateTime, Utc};

use super::{Store, StoreError, timestamp};

/// The counts of one retention pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub files: u64,
    pub items: u64,
    /// Pages returned to the file system by `PRAGMA incremental_vacuum`.
    pub freed_pages: u64,
}

impl Store {
    /// Deletes the items of every input file exported before `cutoff`. The file rows stay,
    /// marked `purged_at`, so the same content dropped again is still recognised as a
    /// duplicate, and the batch rows stay as the history of jobs.
    pub async fn purge_exported(&self, cutoff: DateTime<Utc>) -> Result<Purged, StoreError> {
        let now = timestamp(Utc::now());
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let files = sqlx::query(
            "UPDATE input_files SET purged_at = ?2
             WHERE exported_at IS NOT NULL AND exported_at < ?1 AND purged_at IS NULL",
        )
        .bind(timestamp(cutoff))
        .bind(&now)
        .execute(&mut *tx)
        .await?
        .rows_affected();

        let items = sqlx::query(
            "DELETE FROM work_items
             WHERE file_id IN (SELECT id FROM input_files WHERE purged_at = ?1)",
        )
        .bind(&now)
        .execute(&mut *tx)
        .await?
        .rows_affected();

        tx.commit().await?;

        let freed_pages = if items > 0 {
            self.incremental_vacuum().await?
        } else {
            0
        };
        Ok(Purged {
            files,
            items,
            freed_pages,
        })
    }

    /// Returns free pages to the file system when the database allows it, and how many.
    async fn incremental_vacuum(&self) -> Result<u64, StoreError> {
        let mut conn = self.pool().acquire().await?;
        let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum")
            .fetch_one(&mut *conn)
            .await?;
        if mode != 2 {
            // NOTE: databases created before auto_vacuum was set reuse freed pages but never
            // shrink; `sqlite3 batchd.db 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM'` while
            // batchd is stopped converts one.
            return Ok(0);
        }
        let before: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query("PRAGMA incremental_vacuum")
            .execute(&mut *conn)
            .await?;
        let after: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(&mut *conn)
            .await?;
        Ok((before - after).max(0) as u64)
    }
}
