//! Queries on `batches`: a provider batch job from packing to harvest.
//!
//! The state records each remote call's intent before the call and its result after:
//! `packed` → `uploading` → `uploaded` → `creating` → `submitted` → `harvested`. A batch found
//! in `uploading` or `creating` at start-up may exist at the provider already and is reconciled
//! before anything is sent again.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection};

use super::{Store, StoreError, timestamp};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    Packed,
    Uploading,
    Uploaded,
    Creating,
    Submitted,
    Harvested,
}

impl BatchState {
    pub const ALL: [BatchState; 6] = [
        BatchState::Packed,
        BatchState::Uploading,
        BatchState::Uploaded,
        BatchState::Creating,
        BatchState::Submitted,
        BatchState::Harvested,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Packed => "packed",
            BatchState::Uploading => "uploading",
            BatchState::Uploaded => "uploaded",
            BatchState::Creating => "creating",
            BatchState::Submitted => "submitted",
            BatchState::Harvested => "harvested",
        }
    }
}

impl fmt::Display for BatchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BatchState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BatchState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| StoreError::UnknownValue {
                kind: "batch state",
                value: s.to_string(),
            })
    }
}

/// A batch about to be created from queued items.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub endpoint: String,
    pub model: String,
    pub item_ids: Vec<i64>,
    pub bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchRow {
    pub id: i64,
    pub endpoint: String,
    pub model: String,
    #[serde(serialize_with = "serialize_display")]
    pub state: BatchState,
    pub item_count: u64,
    pub upload_name: String,
    pub input_file_id: Option<String>,
    pub provider_batch_id: Option<String>,
    pub provider_status: Option<String>,
    pub progress: Option<f64>,
    pub error: Option<String>,
    pub created_at: String,
    pub submitted_at: Option<String>,
}

fn serialize_display<S: serde::Serializer>(state: &BatchState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

fn batch_row(row: sqlx::sqlite::SqliteRow) -> Result<BatchRow, StoreError> {
    Ok(BatchRow {
        id: row.get("id"),
        endpoint: row.get("endpoint"),
        model: row.get("model"),
        state: row.get::<String, _>("state").parse()?,
        item_count: row.get::<i64, _>("item_count") as u64,
        upload_name: row.get("upload_name"),
        input_file_id: row.get("input_file_id"),
        provider_batch_id: row.get("provider_batch_id"),
        provider_status: row.get("provider_status"),
        progress: row.get("progress"),
        error: row.get("error"),
        created_at: row.get("created_at"),
        submitted_at: row.get("submitted_at"),
    })
}

impl Store {
    /// Creates a batch and moves its items from `queued` to `packed` in one transaction.
    /// Items that left `queued` meanwhile are skipped; returns `None` if none was left.
    pub async fn pack_batch(&self, batch: &NewBatch) -> Result<Option<BatchRow>, StoreError> {
        let now = timestamp(Utc::now());
        let upload_name = format!("batchd-{:016x}.jsonl", rand::random::<u64>());
        let ids = serde_json::to_string(&batch.item_ids).expect("ids serialize");
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        // The new row comes back whole, so the caller gets it without another query.
        let row = sqlx::query(
            "INSERT INTO batches (endpoint, model, state, item_count, bytes, upload_name, created_at)
             VALUES (?1, ?2, 'packed', ?3, ?4, ?5, ?6) RETURNING *",
        )
        .bind(&batch.endpoint)
        .bind(&batch.model)
        .bind(batch.item_ids.len() as i64)
        .bind(batch.bytes as i64)
        .bind(&upload_name)
        .bind(&now)
        .fetch_one(&mut *tx)
        .await?;
        let mut created = batch_row(row)?;
        let packed = sqlx::query(
            "UPDATE work_items SET state = 'packed', batch_id = ?1, updated_at = ?2
             WHERE id IN (SELECT value FROM json_each(?3)) AND state = 'queued'",
        )
        .bind(created.id)
        .bind(&now)
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if packed == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        if packed != created.item_count {
            sqlx::query("UPDATE batches SET item_count = ?2 WHERE id = ?1")
                .bind(created.id)
                .bind(packed as i64)
                .execute(&mut *tx)
                .await?;
            created.item_count = packed;
        }
        tx.commit().await?;
        Ok(Some(created))
    }

    pub async fn batch(&self, batch_id: i64) -> Result<Option<BatchRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM batches WHERE id = ?1")
            .bind(batch_id)
            .fetch_optional(self.pool())
            .await?;
        row.map(batch_row).transpose()
    }

    /// Finds a batch by the id the provider gave its job.
    pub async fn batch_by_provider_id(
        &self,
        provider_batch_id: &str,
    ) -> Result<Option<BatchRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM batches WHERE provider_batch_id = ?1")
            .bind(provider_batch_id)
            .fetch_optional(self.pool())
            .await?;
        row.map(batch_row).transpose()
    }

    pub async fn batches_in_state(&self, state: BatchState) -> Result<Vec<BatchRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM batches WHERE state = ?1 ORDER BY id")
            .bind(state.as_str())
            .fetch_all(self.pool())
            .await?;
        rows.into_iter().map(batch_row).collect()
    }

    /// Lists batches not yet harvested, oldest first.
    pub async fn unfinished_batches(&self) -> Result<Vec<BatchRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM batches WHERE state <> 'harvested' ORDER BY id")
            .fetch_all(self.pool())
            .await?;
        rows.into_iter().map(batch_row).collect()
    }

    /// Counts batches that hold a place against the in-flight cap: every one not yet harvested.
    pub async fn count_unfinished_batches(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM batches WHERE state <> 'harvested'")
            .fetch_one(self.pool())
            .await?;
        Ok(n as u64)
    }

    /// Moves a batch from one state to the next; returns false if it was not in `from`.
    pub async fn set_batch_state(
        &self,
        batch_id: i64,
        from: BatchState,
        to: BatchState,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE batches SET state = ?3 WHERE id = ?1 AND state = ?2")
            .bind(batch_id)
            .bind(from.as_str())
            .bind(to.as_str())
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the provider's id of the uploaded input file.
    pub async fn record_upload(
        &self,
        batch_id: i64,
        input_file_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batches SET state = 'uploaded', input_file_id = ?2
             WHERE id = ?1 AND state = 'uploading'",
        )
        .bind(batch_id)
        .bind(input_file_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records the created provider job and marks its items submitted, in one transaction.
    pub async fn record_created(
        &self,
        batch_id: i64,
        provider_batch_id: &str,
        provider_status: &str,
        next_poll_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let now = timestamp(Utc::now());
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "UPDATE batches SET state = 'submitted', provider_batch_id = ?2, provider_status = ?3,
                    submitted_at = ?4, next_poll_at = ?5
             WHERE id = ?1 AND state = 'creating'",
        )
        .bind(batch_id)
        .bind(provider_batch_id)
        .bind(provider_status)
        .bind(&now)
        .bind(timestamp(next_poll_at))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE work_items SET state = 'submitted', updated_at = ?2
             WHERE batch_id = ?1 AND state = 'packed'",
        )
        .bind(batch_id)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Lists submitted batches whose next poll is due.
    pub async fn due_polls(&self, now: DateTime<Utc>) -> Result<Vec<BatchRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM batches WHERE state = 'submitted' AND next_poll_at <= ?1 ORDER BY next_poll_at",
        )
        .bind(timestamp(now))
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(batch_row).collect()
    }

    /// Stores the latest status of a running job and when to look again.
    pub async fn record_poll(
        &self,
        batch_id: i64,
        provider_status: &str,
        progress: Option<f64>,
        next_poll_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batches SET provider_status = ?2, progress = ?3, next_poll_at = ?4
             WHERE id = ?1 AND state = 'submitted'",
        )
        .bind(batch_id)
        .bind(provider_status)
        .bind(progress)
        .bind(timestamp(next_poll_at))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Counts batches by provider status (or local state before submission).
    pub async fn batch_status_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT CASE WHEN state IN ('submitted', 'harvested') THEN COALESCE(provider_status, state)
                         ELSE state END AS status,
                    COUNT(*) AS n
             FROM batches GROUP BY status ORDER BY status",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get("status"), row.get::<i64, _>("n") as u64))
            .collect())
    }
}

/// Marks a submitted batch harvested with its final provider fields and returns its item count.
/// Matches nothing, and returns `None`, when the batch was already harvested, which makes a
/// second harvest a no-op.
pub(crate) async fn mark_harvested(
    conn: &mut SqliteConnection,
    batch_id: i64,
    provider_status: &str,
    output_file_id: Option<&str>,
    error_file_id: Option<&str>,
    error: Option<&str>,
    now: &str,
) -> Result<Option<u64>, StoreError> {
    let item_count: Option<i64> = sqlx::query_scalar(
        "UPDATE batches SET state = 'harvested', provider_status = ?2, output_file_id = ?3,
                error_file_id = ?4, error = ?5, finished_at = ?6, progress = 100.0
         WHERE id = ?1 AND state = 'submitted'
         RETURNING item_count",
    )
    .bind(batch_id)
    .bind(provider_status)
    .bind(output_file_id)
    .bind(error_file_id)
    .bind(error)
    .bind(now)
    .fetch_optional(conn)
    .await?;
    Ok(item_count.map(|n| n.max(0) as u64))
}
