//! Queries on `model_pauses`: models whose batch jobs failed for capacity, and until when no
//! job for them may be created.

use chrono::{DateTime, Utc};

use super::{Store, StoreError, parse_timestamp, timestamp};

impl Store {
    /// Pauses job creation for `model` until `until` (a later pause wins over an earlier one).
    pub async fn pause_model(
        &self,
        model: &str,
        until: DateTime<Utc>,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO model_pauses (model, paused_until, reason) VALUES (?1, ?2, ?3)
             ON CONFLICT (model) DO UPDATE SET
                 paused_until = max(paused_until, excluded.paused_until), reason = excluded.reason",
        )
        .bind(model)
        .bind(timestamp(until))
        .bind(reason)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Returns when job creation for `model` may resume, if the model had a capacity failure
    /// and no job of it has finished well since.
    pub async fn model_pause(&self, model: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let until: Option<String> =
            sqlx::query_scalar("SELECT paused_until FROM model_pauses WHERE model = ?1")
                .bind(model)
                .fetch_optional(self.pool())
                .await?;
        Ok(until.as_deref().and_then(parse_timestamp))
    }

    /// Forgets a model's capacity trouble once one of its jobs completed.
    pub async fn clear_model_pause(&self, model: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM model_pauses WHERE model = ?1")
            .bind(model)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
