//! Queries on `input_files`: one row per distinct file content, inserted together with the
//! file's work items.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{Row, Sqlite, SqliteConnection, SqlitePool, Transaction};

use super::counts::add_inserted;
use super::items::{Added, BoundInserts, ItemState, NewItem, bind_items, run_inserts};
use super::{Store, StoreError, timestamp};

/// The header of a file being ingested.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub name: String,
    pub sha256: String,
    pub urgent: bool,
}

/// A stored input file.
#[derive(Debug, Clone)]
pub struct FileRow {
    pub id: i64,
    pub name: String,
    pub sha256: String,
    pub items_total: u64,
    pub report: String,
    pub disposition: String,
    pub moved_to: Option<String>,
    /// The last line of the committed parts of a file still being stored.
    pub resume_line: Option<u64>,
}

/// One input file with its items counted by state, for `batchd status` and `batchd files`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileProgress {
    pub id: i64,
    /// The name as dropped into the inbox.
    pub name: String,
    /// The name the file got in `processed/` or `rejected/` (a suffix when the name was taken).
    pub stored_name: Option<String>,
    pub disposition: String,
    pub items: u64,
    pub queued: u64,
    /// Items packed into a batch, submitted in a batch job or in a real-time call.
    pub in_progress: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Bad lines reported at ingest; they never became items.
    pub errors: u64,
    /// Items sent at least once that finished at or after the `since` time of the query.
    pub finished_recently: u64,
    pub ingested_at: String,
    pub exported_at: Option<String>,
    pub export_path: Option<String>,
    /// When retention deleted the file's items; its export stays.
    pub purged_at: Option<String>,
}

impl FileProgress {
    /// Counts items not yet succeeded or failed.
    pub fn pending(&self) -> u64 {
        self.queued + self.in_progress
    }

    /// Returns the share of items that are finished, from 0 to 1 (1 for a file without items
    /// or whose items retention deleted).
    pub fn progress(&self) -> f64 {
        if self.items == 0 || self.purged_at.is_some() {
            1.0
        } else {
            (self.succeeded + self.failed) as f64 / self.items as f64
        }
    }
}

// NOTE: ingest runs at about half the rate of `sqlite3 .import` on the same lines, bound by
// SQLite's thread. Each row goes to the WAL, to the database at the checkpoint and into four
// indexes, and SQLite copies every bound value.

/// An open ingest transaction. A file stored in one transaction becomes visible with its items
/// on [`FileIngest::commit`], or not at all. A large file may instead be committed in parts
/// with [`FileIngest::commit_part`]. Its items are then queued as each part commits, and a
/// restart reads on after `resume_line`.
pub struct FileIngest {
    pool: SqlitePool,
    tx: Transaction<'static, Sqlite>,
    file_id: i64,
    now: Arc<str>,
    /// True once any part of the file was committed, by this run or an earlier one.
    parts_committed: bool,
    /// Items in the committed parts.
    committed_items: u64,
    /// Items inserted since the last commit, by state, not yet in `item_counts`. Added once
    /// before each commit rather than with every insert, which saves a statement per group.
    uncounted: BTreeMap<ItemState, u64>,
}

/// Binds items to the insert statements of one file.
#[derive(Debug, Clone)]
pub struct ItemBinder {
    file_id: i64,
    now: Arc<str>,
}

impl ItemBinder {
    /// Binds items for [`FileIngest::run`]. Their bodies move into the statements.
    pub fn bind(&self, mut items: Vec<NewItem>) -> BoundItems {
        let inserts = bind_items(self.file_id, &mut items, &self.now);
        BoundItems { items, inserts }
    }
}

/// Items bound to their insert statements by [`ItemBinder::bind`].
pub struct BoundItems {
    items: Vec<NewItem>,
    inserts: BoundInserts,
}

/// A file's counts and report as of some line, recorded with each commit.
#[derive(Debug, Clone, Copy)]
pub struct FileTotals<'a> {
    pub lines: u64,
    pub items: u64,
    pub errors: u64,
    pub report: &'a str,
}

impl FileIngest {
    /// Returns how many items the committed parts contain. [`FileIngest::abandon`] keeps them.
    pub fn committed_items(&self) -> u64 {
        self.committed_items
    }

    /// Inserts a group of items and returns each with what happened to it: stored, or skipped
    /// because the file already has an item with its `custom_id`. The items come back without
    /// their bodies, which went into the database.
    pub async fn insert(
        &mut self,
        items: Vec<NewItem>,
    ) -> Result<Vec<(NewItem, Added)>, StoreError> {
        let bound = self.binder().bind(items);
        self.run(bound).await
    }

    /// Returns what binds items for [`FileIngest::run`], which can work while an insert runs.
    pub fn binder(&self) -> ItemBinder {
        ItemBinder {
            file_id: self.file_id,
            now: self.now.clone(),
        }
    }

    /// Inserts items bound by an [`ItemBinder`]; see [`FileIngest::insert`].
    pub async fn run(&mut self, bound: BoundItems) -> Result<Vec<(NewItem, Added)>, StoreError> {
        let BoundItems { items, inserts } = bound;
        let added = run_inserts(
            &mut self.tx,
            self.file_id,
            &items,
            inserts,
            &mut self.uncounted,
        )
        .await?;
        Ok(items.into_iter().zip(added).collect())
    }

    /// Commits the items inserted so far with the file's totals up to `last_line`, and opens
    /// the transaction of the next part.
    pub async fn commit_part(
        &mut self,
        last_line: u64,
        totals: FileTotals<'_>,
    ) -> Result<(), StoreError> {
        self.count_inserted().await?;
        record_totals(&mut self.tx, self.file_id, totals, Some(last_line)).await?;
        // Both statements run on this transaction's connection, so `self.tx` stays open. Other
        // writers get the lock between them.
        sqlx::query("COMMIT").execute(&mut *self.tx).await?;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *self.tx)
            .await?;
        self.parts_committed = true;
        self.committed_items = totals.items;
        Ok(())
    }

    /// Records the file's final totals and report, then commits. Returns the file's id.
    pub async fn commit(mut self, totals: FileTotals<'_>) -> Result<i64, StoreError> {
        self.count_inserted().await?;
        record_totals(&mut self.tx, self.file_id, totals, None).await?;
        self.tx.commit().await?;
        Ok(self.file_id)
    }

    async fn count_inserted(&mut self) -> Result<(), StoreError> {
        add_inserted(&mut self.tx, self.file_id, &self.uncounted).await?;
        self.uncounted.clear();
        Ok(())
    }

    /// Records the hash of the file's content, learned while the file was read. Returns false,
    /// and records nothing, if a committed file has that content.
    pub async fn name_content(&mut self, sha256: &str) -> Result<bool, StoreError> {
        let stored_before: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM input_files WHERE sha256 = ?2 AND id <> ?1)",
        )
        .bind(self.file_id)
        .bind(sha256)
        .fetch_one(&mut *self.tx)
        .await?;
        if stored_before {
            return Ok(false);
        }
        sqlx::query("UPDATE input_files SET sha256 = ?2 WHERE id = ?1")
            .bind(self.file_id)
            .bind(sha256)
            .execute(&mut *self.tx)
            .await?;
        Ok(true)
    }

    /// Drops everything of the file that is not committed.
    pub async fn roll_back(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }

    /// Rejects a file after reading began. Without committed parts, nothing of it stays.
    /// Otherwise the unsent items of the committed parts fail with `message`, and the sent ones
    /// run to their end. The row stays, marked rejected with `report`, unless the parts have no
    /// items.
    pub async fn abandon(self, message: &str, report: &str) -> Result<(), StoreError> {
        let FileIngest {
            pool,
            tx,
            file_id,
            parts_committed,
            committed_items,
            ..
        } = self;
        tx.rollback().await?;
        if !parts_committed {
            return Ok(());
        }
        let now = timestamp(Utc::now());
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        super::operator::fail_queued(&mut tx, file_id, message, &now).await?;
        if committed_items == 0 {
            sqlx::query("DELETE FROM item_counts WHERE file_id = ?1")
                .bind(file_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM input_files WHERE id = ?1")
                .bind(file_id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE input_files SET disposition = 'rejected', resume_line = NULL, report = ?2
                 WHERE id = ?1",
            )
            .bind(file_id)
            .bind(report)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

async fn record_totals(
    conn: &mut SqliteConnection,
    file_id: i64,
    totals: FileTotals<'_>,
    resume_line: Option<u64>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE input_files SET lines_total = ?2, items_total = ?3, errors_total = ?4, report = ?5,
                                resume_line = ?6
         WHERE id = ?1",
    )
    .bind(file_id)
    .bind(totals.lines as i64)
    .bind(totals.items as i64)
    .bind(totals.errors as i64)
    .bind(totals.report)
    .bind(resume_line.map(|line| line as i64))
    .execute(conn)
    .await?;
    Ok(())
}

/// Builds a file's progress from its row and the per-file counts of [`finished_since`].
fn file_progress_row(
    row: sqlx::sqlite::SqliteRow,
    finished_recently: &HashMap<i64, u64>,
) -> FileProgress {
    let id: i64 = row.get("id");
    let moved_to: Option<String> = row.get("moved_to");
    FileProgress {
        id,
        name: row.get("name"),
        stored_name: moved_to.as_deref().map(file_name_of),
        disposition: row.get("disposition"),
        items: row.get::<i64, _>("items_total") as u64,
        errors: row.get::<i64, _>("errors_total") as u64,
        queued: row.get::<i64, _>("queued") as u64,
        in_progress: row.get::<i64, _>("in_progress") as u64,
        succeeded: row.get::<i64, _>("succeeded") as u64,
        failed: row.get::<i64, _>("failed") as u64,
        finished_recently: finished_recently.get(&id).copied().unwrap_or(0),
        ingested_at: row.get("ingested_at"),
        exported_at: row.get("exported_at"),
        export_path: row.get("export_path"),
        purged_at: row.get("purged_at"),
    }
}

/// Returns the last component of a stored path.
pub(crate) fn file_name_of(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

fn file_row(row: sqlx::sqlite::SqliteRow) -> FileRow {
    FileRow {
        id: row.get("id"),
        name: row.get("name"),
        sha256: row.get("sha256"),
        items_total: row.get::<i64, _>("items_total") as u64,
        report: row.get("report"),
        disposition: row.get("disposition"),
        moved_to: row.get("moved_to"),
        resume_line: row.get::<Option<i64>, _>("resume_line").map(|n| n as u64),
    }
}

impl Store {
    /// Starts the transaction that stores one input file and its items.
    pub async fn begin_file(&self, file: &NewFile) -> Result<FileIngest, StoreError> {
        let now = timestamp(chrono::Utc::now());
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let file_id: i64 = sqlx::query_scalar(
            "INSERT INTO input_files (name, sha256, urgent, lines_total, items_total, errors_total,
                                      report, ingested_at)
             VALUES (?1, ?2, ?3, 0, 0, 0, '{}', ?4) RETURNING id",
        )
        .bind(&file.name)
        .bind(&file.sha256)
        .bind(file.urgent)
        .bind(&now)
        .fetch_one(&mut *tx)
        .await?;
        Ok(FileIngest {
            pool: self.pool().clone(),
            tx,
            file_id,
            now: now.into(),
            parts_committed: false,
            committed_items: 0,
            uncounted: BTreeMap::new(),
        })
    }

    /// Opens the next part of a file whose earlier parts were committed by a run that stopped.
    pub async fn resume_file(&self, file: &FileRow) -> Result<FileIngest, StoreError> {
        let tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        Ok(FileIngest {
            pool: self.pool().clone(),
            tx,
            file_id: file.id,
            now: timestamp(chrono::Utc::now()).into(),
            parts_committed: true,
            committed_items: file.items_total,
            uncounted: BTreeMap::new(),
        })
    }

    pub async fn file_by_hash(&self, sha256: &str) -> Result<Option<FileRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM input_files WHERE sha256 = ?1")
            .bind(sha256)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(file_row))
    }

    /// Records where a stored file was moved once it left the inbox.
    pub async fn mark_file_moved(
        &self,
        file_id: i64,
        disposition: &str,
        moved_to: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE input_files SET disposition = ?2, moved_to = ?3 WHERE id = ?1")
            .bind(file_id)
            .bind(disposition)
            .bind(moved_to)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Lists every input file with its items counted by state, newest first.
    /// `finished_recently` counts items sent at least once that finished at or after `since`:
    /// items failed at ingest or cancelled by the operator did no work and would inflate rates.
    pub async fn file_progress(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<FileProgress>, StoreError> {
        // Both queries read one snapshot, so the counts and the recent finishes agree.
        let mut tx = self.pool().begin().await?;
        let recent = finished_since(&mut tx, since).await?;
        let rows = sqlx::query(
            "SELECT f.id, f.name, f.moved_to, f.disposition, f.items_total, f.errors_total,
                    f.ingested_at, f.exported_at, f.export_path, f.purged_at,
                    COALESCE(SUM(CASE WHEN c.state = 'queued' THEN c.n END), 0) AS queued,
                    COALESCE(SUM(CASE WHEN c.state IN ('packed', 'submitted', 'in_flight')
                                      THEN c.n END), 0) AS in_progress,
                    COALESCE(SUM(CASE WHEN c.state = 'succeeded' THEN c.n END), 0) AS succeeded,
                    COALESCE(SUM(CASE WHEN c.state = 'failed' THEN c.n END), 0) AS failed
             FROM input_files f LEFT JOIN item_counts c ON c.file_id = f.id
             GROUP BY f.id ORDER BY f.id DESC",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|row| file_progress_row(row, &recent))
            .collect())
    }
}

/// Counts per file the items sent at least once that finished at or after `since`. The
/// `finished_at` index limits the read to those items, however many the table holds.
/// NOTE: the read still grows with the items finished in the window. With 100,000 of them it
/// took about 35 ms (release build, 2-core development VM).
async fn finished_since(
    conn: &mut SqliteConnection,
    since: DateTime<Utc>,
) -> Result<HashMap<i64, u64>, StoreError> {
    let rows = sqlx::query(FINISHED_SINCE)
        .bind(timestamp(since))
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.get("file_id"), row.get::<i64, _>("n") as u64))
        .collect())
}

const FINISHED_SINCE: &str =
    "SELECT file_id, COUNT(*) AS n FROM work_items INDEXED BY work_items_by_finished_at
     WHERE finished_at >= ?1 AND attempts > 0
     GROUP BY file_id";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recent_finishes_read_the_finished_at_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("batchd.db")).await.unwrap();
        let now = timestamp(Utc::now());
        let plan = crate::store::plan_tests::plan(&store, FINISHED_SINCE, &[&now]).await;
        crate::store::plan_tests::assert_searches(&plan, "work_items_by_finished_at");
    }
}
