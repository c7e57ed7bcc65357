//! Queries behind result exports: which input files are complete and not yet exported, the
//! export path chosen for each, and their items streamed in line order.
//!
//! The path is committed before the file is written and `exported_at` after it was renamed
//! into place, so a restart between the two writes the same path again.

use futures::{Stream, TryStreamExt};
use sqlx::Row;

use super::files::file_name_of;
use super::items::ItemState;
use super::{Store, StoreError, timestamp};

/// A processed input file whose items are all succeeded or failed and that has no export yet.
#[derive(Debug, Clone)]
pub struct ExportCandidate {
    pub file_id: i64,
    pub name: String,
    /// The name the file got in `processed/`, which is unique there.
    pub stored_name: Option<String>,
    /// Set when an earlier export of this file was started or done.
    pub export_path: Option<String>,
}

/// One item as the export writes it.
#[derive(Debug, Clone)]
pub struct ExportRow {
    pub line_no: u64,
    pub custom_id: String,
    pub state: ItemState,
    pub status_code: Option<u16>,
    pub response: Option<String>,
    pub error: Option<String>,
}

/// Items read per query by [`Store::export_rows`].
const EXPORT_PAGE: usize = 200;

impl Store {
    /// Lists processed files that have items, none of them unfinished, and no completed export.
    /// Reads the counts in `item_counts`, because a file's items can number millions.
    pub async fn files_to_export(&self) -> Result<Vec<ExportCandidate>, StoreError> {
        let rows = sqlx::query(
            "SELECT f.id, f.name, f.moved_to, f.export_path FROM input_files f
             WHERE f.disposition = 'processed' AND f.exported_at IS NULL AND f.items_total > 0
               AND NOT EXISTS (SELECT 1 FROM item_counts c
                               WHERE c.file_id = f.id AND c.n > 0
                                 AND c.state NOT IN ('succeeded', 'failed'))
             ORDER BY f.id",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| ExportCandidate {
                file_id: row.get("id"),
                name: row.get("name"),
                stored_name: row
                    .get::<Option<String>, _>("moved_to")
                    .as_deref()
                    .map(file_name_of),
                export_path: row.get("export_path"),
            })
            .collect())
    }

    /// Counts processed files with items whose export is not written yet.
    pub async fn count_unexported(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM input_files
             WHERE disposition = 'processed' AND exported_at IS NULL AND items_total > 0",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(n as u64)
    }

    /// Records `path` as the export file of `file_id`. Returns false when another input file
    /// already has that path, so the caller tries another name.
    pub async fn claim_export_path(&self, file_id: i64, path: &str) -> Result<bool, StoreError> {
        let claimed = sqlx::query(
            "UPDATE input_files SET export_path = ?2 WHERE id = ?1 AND export_path IS NULL",
        )
        .bind(file_id)
        .bind(path)
        .execute(self.pool())
        .await;
        match claimed {
            Ok(done) => Ok(done.rows_affected() == 1),
            Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Records that the export of `file_id` is in place.
    pub async fn mark_exported(&self, file_id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE input_files SET exported_at = ?2 WHERE id = ?1")
            .bind(file_id)
            .bind(timestamp(chrono::Utc::now()))
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Streams the items of one input file in input line order, without loading them all.
    pub fn export_rows(
        &self,
        file_id: i64,
    ) -> impl Stream<Item = Result<ExportRow, StoreError>> + Send + '_ {
        futures::stream::try_unfold(Some(0), move |after| async move {
            let Some(after) = after else {
                return Ok::<_, StoreError>(None);
            };
            let page = self.export_page(file_id, after).await?;
            let next = match page.last() {
                Some(last) if page.len() == EXPORT_PAGE => Some(last.line_no),
                _ => None,
            };
            Ok(Some((
                futures::stream::iter(page.into_iter().map(Ok)),
                next,
            )))
        })
        .try_flatten()
    }

    /// Reads the items of a file after line `after`, at most [`EXPORT_PAGE`]. They arrive as
    /// one JSON array, because each row read separately is a hand-off between the SQLite thread
    /// and this task. Each page is its own read, so no snapshot is held for the whole export.
    async fn export_page(&self, file_id: i64, after: u64) -> Result<Vec<ExportRow>, StoreError> {
        let page: String = sqlx::query_scalar(
            "SELECT json_group_array(
                        json_array(line_no, custom_id, state, status_code, response, error)
                        ORDER BY line_no)
             FROM (SELECT line_no, custom_id, state, status_code, response, error
                   FROM work_items WHERE file_id = ?1 AND line_no > ?2
                   ORDER BY line_no LIMIT ?3)",
        )
        .bind(file_id)
        .bind(after as i64)
        .bind(EXPORT_PAGE as i64)
        .fetch_one(self.pool())
        .await?;
        type Fields = (
            u64,
            String,
            String,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Fields> = super::decode("export page", &page)?;
        rows.into_iter()
            .map(
                |(line_no, custom_id, state, status_code, response, error)| {
                    Ok(ExportRow {
                        line_no,
                        custom_id,
                        state: state.parse()?,
                        status_code: status_code.and_then(|code| u16::try_from(code).ok()),
                        response,
                        error,
                    })
                },
            )
            .collect()
    }
}
