//! A private scratch database for `batchd check`, which validates files without a daemon's
//! database but must still find repeated ids without holding them all in memory.

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};

use super::StoreError;

/// The `custom_id`s seen so far in one file, kept in a temporary on-disk SQLite database that
/// SQLite deletes when it is closed. Memory stays within SQLite's page cache.
pub struct SeenIds {
    conn: SqliteConnection,
}

impl SeenIds {
    pub async fn open() -> Result<SeenIds, StoreError> {
        // With an empty file name, SQLite creates a private temporary database on disk.
        let mut conn = SqliteConnectOptions::new()
            .filename("")
            .connect()
            .await
            .map_err(|source| StoreError::Open {
                path: "a temporary database".to_string(),
                source,
            })?;
        sqlx::query("CREATE TABLE seen (custom_id TEXT PRIMARY KEY, line_no INTEGER NOT NULL) WITHOUT ROWID")
            .execute(&mut conn)
            .await?;
        // One transaction that is never committed: nothing is synced, and closing discards it.
        sqlx::query("BEGIN").execute(&mut conn).await?;
        Ok(SeenIds { conn })
    }

    /// Records `custom_id` at `line_no`. Returns the line that had it first, if one did.
    pub async fn first_line(
        &mut self,
        custom_id: &str,
        line_no: u64,
    ) -> Result<Option<u64>, StoreError> {
        let inserted = sqlx::query("INSERT INTO seen VALUES (?1, ?2) ON CONFLICT DO NOTHING")
            .bind(custom_id)
            .bind(line_no as i64)
            .execute(&mut self.conn)
            .await?;
        if inserted.rows_affected() == 1 {
            return Ok(None);
        }
        let first: i64 = sqlx::query_scalar("SELECT line_no FROM seen WHERE custom_id = ?1")
            .bind(custom_id)
            .fetch_one(&mut self.conn)
            .await?;
        Ok(Some(first as u64))
    }

    pub async fn close(self) -> Result<(), StoreError> {
        Ok(self.conn.close().await?)
    }
}
