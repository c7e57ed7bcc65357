//! Queries behind the operator's commands: retrying failed items, cancelling queued ones, and
//! the recent rates that `batchd status` shows. They run while the daemon runs, so each change
//! is one statement or one immediate transaction guarded by the state it expects.

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection};

use super::{Store, StoreError, timestamp};

/// The items an operator's command applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    File(i64),
    All,
}

impl Scope {
    fn file_id(self) -> Option<i64> {
        match self {
            Scope::File(id) => Some(id),
            Scope::All => None,
        }
    }
}

/// The outcome of `cancel_queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Cancelled {
    /// Queued items now failed.
    pub cancelled: u64,
    /// Items left to the daemon because they are packed into a batch, in a submitted batch job
    /// or in a real-time call.
    pub left_running: u64,
}

/// Real-time items finished recently on one endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointRate {
    pub endpoint: String,
    pub succeeded: u64,
    pub failed: u64,
}

impl Store {
    /// Moves failed items back to `queued`, due now, with their outcome cleared. `attempts`
    /// stays for the record. The files they belong to lose their `exported_at`, so the daemon
    /// exports them again once the items are finished. Returns how many items were requeued.
    pub async fn retry_failed(&self, scope: Scope) -> Result<u64, StoreError> {
        let now = timestamp(Utc::now());
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "UPDATE input_files SET exported_at = NULL
             WHERE (?1 IS NULL OR id = ?1)
               AND id IN (SELECT file_id FROM item_counts WHERE state = 'failed' AND n > 0)",
        )
        .bind(scope.file_id())
        .execute(&mut *tx)
        .await?;
        let requeued = sqlx::query(
            "UPDATE work_items
             SET state = 'queued', last_error = COALESCE(error, last_error), error = NULL,
                 status_code = NULL, response = NULL, prompt_tokens = NULL,
                 completion_tokens = NULL, total_tokens = NULL, model_used = NULL,
                 batch_id = NULL, lease_expires_at = NULL, finished_at = NULL,
                 next_attempt_at = ?2, updated_at = ?2
             WHERE state = 'failed' AND (?1 IS NULL OR file_id = ?1)",
        )
        .bind(scope.file_id())
        .bind(&now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(requeued)
    }

    /// Fails every queued item of a file with `message`, and counts the items left to the
    /// daemon because they were already handed to a batch or a real-time call.
    pub async fn cancel_queued(
        &self,
        file_id: i64,
        message: &str,
    ) -> Result<Cancelled, StoreError> {
        let now = timestamp(Utc::now());
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let cancelled = fail_queued(&mut tx, file_id, message, &now).await?;
        let left_running: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(n), 0) FROM item_counts
             WHERE file_id = ?1 AND state IN ('packed', 'submitted', 'in_flight')",
        )
        .bind(file_id)
        .fetch_one(&mut *tx)
        .await?;
        bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(Cancelled {
            cancelled,
            left_running: left_running as u64,
        })
    }

    /// Returns the counter of operator changes, which grows with each `retry` and `cancel`.
    pub async fn operator_generation(&self) -> Result<i64, StoreError> {
        let generation = sqlx::query_scalar("SELECT generation FROM operator_changes WHERE id = 1")
            .fetch_one(self.pool())
            .await?;
        Ok(generation)
    }

    /// Counts items per endpoint that the real-time path finished at or after `since`.
    pub async fn realtime_rates(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<EndpointRate>, StoreError> {
        let rows = sqlx::query(REALTIME_RATES)
            .bind(timestamp(since))
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| EndpointRate {
                endpoint: row.get("endpoint"),
                succeeded: row.get::<i64, _>("succeeded") as u64,
                failed: row.get::<i64, _>("failed") as u64,
            })
            .collect())
    }
}

/// Counts recent real-time finishes per endpoint. Without `INDEXED BY`, SQLite reads every item
/// without a batch through `work_items_by_batch`, and these include every queued item.
const REALTIME_RATES: &str =
    "SELECT endpoint, SUM(state = 'succeeded') AS succeeded, SUM(state = 'failed') AS failed
     FROM work_items INDEXED BY work_items_by_finished_at
     WHERE finished_at >= ?1 AND batch_id IS NULL AND attempts > 0
     GROUP BY endpoint ORDER BY endpoint";

/// Raises the counter of operator changes inside the transaction that makes the change.
async fn bump_generation(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query("UPDATE operator_changes SET generation = generation + 1 WHERE id = 1")
        .execute(conn)
        .await?;
    Ok(())
}

/// Fails the queued items of one file with `message`. Returns how many there were.
pub(super) async fn fail_queued(
    conn: &mut SqliteConnection,
    file_id: i64,
    message: &str,
    now: &str,
) -> Result<u64, StoreError> {
    let failed = sqlx::query(
        "UPDATE work_items SET state = 'failed', error = ?2, finished_at = ?3, updated_at = ?3
         WHERE file_id = ?1 AND state = 'queued'",
    )
    .bind(file_id)
    .bind(message)
    .bind(now)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn realtime_rates_read_the_finished_at_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("batchd.db")).await.unwrap();
        let now = timestamp(Utc::now());
        let plan = crate::store::plan_tests::plan(&store, REALTIME_RATES, &[&now]).await;
        crate::store::plan_tests::assert_searches(&plan, "work_items_by_finished_at");
    }
}
