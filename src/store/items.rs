//! Queries on `work_items`: claims for the real-time path, candidates for packing, outcomes.
//!
//! Every state change is a single statement guarded by the state it expects, so a change that
//! was already made (by a restart, a second harvest of the same job) matches no row and is a
//! no-op.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::query::Query;
use sqlx::sqlite::SqliteArguments;
use sqlx::{Row, Sqlite, SqliteConnection};

use super::{Store, StoreError, timestamp};

/// Lifecycle of a work item; mirrors the `CHECK` on `work_items.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemState {
    Queued,
    Packed,
    Submitted,
    InFlight,
    Succeeded,
    Failed,
}

impl ItemState {
    pub const ALL: [ItemState; 6] = [
        ItemState::Queued,
        ItemState::Packed,
        ItemState::Submitted,
        ItemState::InFlight,
        ItemState::Succeeded,
        ItemState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ItemState::Queued => "queued",
            ItemState::Packed => "packed",
            ItemState::Submitted => "submitted",
            ItemState::InFlight => "in_flight",
            ItemState::Succeeded => "succeeded",
            ItemState::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, ItemState::Succeeded | ItemState::Failed)
    }
}

impl fmt::Display for ItemState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ItemState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ItemState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| StoreError::UnknownValue {
                kind: "item state",
                value: s.to_string(),
            })
    }
}

/// One accepted input line, ready to insert.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub line_no: u64,
    pub custom_id: String,
    pub endpoint: String,
    pub model: String,
    pub body: String,
    pub urgent: bool,
    pub deadline: Option<DateTime<Utc>>,
    /// Set when the item is stored already failed, for a reason found at ingest.
    pub error: Option<String>,
}

/// An item claimed for a real-time call.
#[derive(Debug, Clone)]
pub struct ClaimedItem {
    pub id: i64,
    pub endpoint: String,
    pub model: String,
    pub body: String,
    pub attempts: u32,
}

/// An item the packer may put into a batch.
#[derive(Debug, Clone)]
pub struct PackCandidate {
    pub id: i64,
    pub body_bytes: u64,
}

/// A group of queued batchable items sharing an endpoint and a model.
#[derive(Debug, Clone)]
pub struct PackGroup {
    pub endpoint: String,
    pub model: String,
    pub count: u64,
    pub oldest: DateTime<Utc>,
}

/// A successful result line of a batch job, for [`outcome::finish_submitted_successes`].
#[derive(Debug, Clone)]
pub struct Success {
    pub item_id: i64,
    pub status_code: u16,
    /// The response body as JSON text.
    pub response: String,
    pub usage: Usage,
}

/// Token usage reported with a response.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
}

impl Usage {
    /// Reads the OpenAI-style `usage` object of a response body.
    pub fn from_body(body: &serde_json::Value) -> Usage {
        Usage::from_usage(&body["usage"])
    }

    /// Reads the `usage` object of a response body given as JSON text, without building the
    /// rest of the body.
    pub fn from_body_text(body: &str) -> Usage {
        #[derive(serde::Deserialize)]
        struct WithUsage {
            #[serde(default)]
            usage: serde_json::Value,
        }
        serde_json::from_str::<WithUsage>(body)
            .map(|body| Usage::from_usage(&body.usage))
            .unwrap_or_default()
    }

    fn from_usage(usage: &serde_json::Value) -> Usage {
        Usage {
            prompt_tokens: usage["prompt_tokens"].as_i64(),
            completion_tokens: usage["completion_tokens"].as_i64(),
            total_tokens: usage["total_tokens"].as_i64(),
        }
    }
}

/// The outcome of an item, as written to its row.
#[derive(Debug, Clone, Copy)]
pub struct ItemOutcome<'a> {
    pub state: ItemState,
    pub status_code: Option<u16>,
    pub response: Option<&'a str>,
    pub error: Option<&'a str>,
    pub usage: Usage,
    /// The model that produced the response, when it differs from the requested one (a fallback).
    pub model_used: Option<&'a str>,
}

const EMBEDDINGS: &str = "/v1/embeddings";

/// SQL returning the first endpoint and model after (`?1`, `?2`) that has queued batch items:
/// one seek of the pack index per group instead of a scan of the queue. It takes two range
/// seeks, because SQLite reads a row-value range `(endpoint, model) > (?1, ?2)` through the
/// endpoint alone and so passes over every queued item of that endpoint.
const PACK_NEXT_GROUP: &str = "SELECT endpoint, model FROM (
         SELECT endpoint, model FROM work_items INDEXED BY work_items_pack
         WHERE state = 'queued' AND urgent = 0 AND endpoint = ?1 AND model > ?2
         ORDER BY model LIMIT 1)
     UNION ALL
     SELECT endpoint, model FROM (
         SELECT endpoint, model FROM work_items INDEXED BY work_items_pack
         WHERE state = 'queued' AND urgent = 0 AND endpoint > ?1
         ORDER BY endpoint, model LIMIT 1)
     LIMIT 1";

/// SQL returning the oldest `?5` due items of one pack group (endpoint `?2`, model `?3`, due by
/// `?1`, no deadline before `?4`) with the size of their request bodies.
const PACK_CANDIDATES: &str = "SELECT id, length(CAST(body AS BLOB)) AS body_bytes
     FROM work_items INDEXED BY work_items_pack
     WHERE state = 'queued' AND next_attempt_at <= ?1 AND urgent = 0
       AND endpoint = ?2 AND model = ?3
       AND (deadline IS NULL OR deadline >= ?4)
     ORDER BY id LIMIT ?5";

/// SQL counting the first `?5` due items of one pack group (endpoint `?1`, model `?2`) in id
/// order, with the time the oldest of them was queued. Reading at most `?5` entries keeps a pass
/// short however long the queue is. When the count reaches `?5` the group is due anyway, so an
/// item past them that was queued earlier (they were requeued after a retry) cannot change the packer's decision.
const PACK_GROUP_HEAD: &str = "SELECT COUNT(*) AS n, MIN(updated_at) AS oldest FROM (
         SELECT updated_at FROM work_items INDEXED BY work_items_pack
         WHERE state = 'queued' AND urgent = 0 AND endpoint = ?1 AND model = ?2
           AND next_attempt_at <= ?3 AND (deadline IS NULL OR deadline >= ?4)
         ORDER BY id LIMIT ?5)";

/// The SQL condition for items the real-time path may take: queued, due, and urgent, not
/// batchable (`?batchable` is a JSON array of endpoints) or due before the batch path could
/// finish (`?cutoff`).
const REALTIME_ELIGIBLE: &str = "state = 'queued' AND next_attempt_at <= ?1
     AND (urgent = 1
          OR endpoint NOT IN (SELECT value FROM json_each(?2))
          OR (deadline IS NOT NULL AND deadline < ?3))";

/// Returns SQL selecting the ids of items the real-time path may take from endpoint `?5`: at most
/// `?6`, due by `?1`, most urgent first. These are urgent items, then the other items of an
/// endpoint the batch path does not serve, or the items of one it serves whose deadline is before
/// `?3`. Each branch reads an index in order and stops at the limit, so the real-time path does
/// not scan a queue of a million batch items to find its few.
fn realtime_candidates(endpoint_batchable: bool) -> String {
    let rest = if endpoint_batchable {
        "SELECT id, 0 AS urgent FROM work_items INDEXED BY work_items_deadlines
         WHERE state = 'queued' AND endpoint = ?5 AND deadline IS NOT NULL AND deadline < ?3
           AND urgent = 0 AND next_attempt_at <= ?1
         ORDER BY deadline LIMIT ?6"
    } else {
        "SELECT id, 0 AS urgent FROM work_items INDEXED BY work_items_queue
         WHERE state = 'queued' AND endpoint = ?5 AND urgent = 0 AND next_attempt_at <= ?1
         ORDER BY id LIMIT ?6"
    };
    format!(
        "SELECT id FROM (
             SELECT * FROM (SELECT id, 1 AS urgent FROM work_items INDEXED BY work_items_queue
                            WHERE state = 'queued' AND endpoint = ?5 AND urgent = 1
                              AND next_attempt_at <= ?1
                            ORDER BY id LIMIT ?6)
             UNION ALL
             SELECT * FROM ({rest}))
         ORDER BY urgent DESC, id LIMIT ?6"
    )
}

/// True when `endpoint` is in `batchable`, a JSON array of endpoints.
fn is_batchable(batchable: &str, endpoint: &str) -> bool {
    serde_json::from_str::<Vec<String>>(batchable)
        .is_ok_and(|endpoints| endpoints.iter().any(|e| e == endpoint))
}

/// The outcome of an item offered for insertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    New,
    /// The file already has an item with this `custom_id`, from line `first_line`.
    Repeat {
        first_line: u64,
    },
}

/// Returns the state an item is stored in: failed when ingest found a reason, else queued.
fn stored_state(item: &NewItem) -> ItemState {
    if item.error.is_some() {
        ItemState::Failed
    } else {
        ItemState::Queued
    }
}

/// Columns bound per item by [`bind_items`].
const INSERT_COLUMNS: usize = 14;

/// At most this many items go into one statement of [`bind_items`], within SQLite's limit of
/// 32,766 parameters.
const MAX_INSERT_ITEMS: usize = 2000;

/// Insert statements for items of one file with their values bound, from [`bind_items`].
pub(crate) struct BoundInserts {
    /// Each statement with the number of items it inserts, in item order.
    statements: Vec<(Query<'static, Sqlite, SqliteArguments>, usize)>,
}

/// Binds `items` of one file to insert statements of up to [`MAX_INSERT_ITEMS`] each, for
/// [`run_inserts`]. Binding is separate so that it can happen while an earlier insert runs.
///
/// The bodies are moved into the statements, so the items are left with empty bodies.
pub(crate) fn bind_items(file_id: i64, items: &mut [NewItem], now: &Arc<str>) -> BoundInserts {
    let mut shared = SharedText::new(now);
    let statements = items
        .chunks_mut(MAX_INSERT_ITEMS)
        .map(|chunk| (bind_chunk(file_id, chunk, &mut shared), chunk.len()))
        .collect();
    BoundInserts { statements }
}

/// Runs the inserts [`bind_items`] bound for `items`, skipping items whose `custom_id` the file
/// already has, and adds the stored rows to `counts` by state, for the caller to add to
/// `item_counts` before it commits. Returns what happened to each item, in order. Items
/// repeating an earlier item of the same call are repeats too, because SQLite inserts the rows
/// in order.
pub(crate) async fn run_inserts(
    conn: &mut SqliteConnection,
    file_id: i64,
    items: &[NewItem],
    bound: BoundInserts,
    counts: &mut BTreeMap<ItemState, u64>,
) -> Result<Vec<Added>, StoreError> {
    let mut added = Vec::with_capacity(items.len());
    for (query, len) in bound.statements {
        let chunk = &items[added.len()..added.len() + len];
        let inserted = query.execute(&mut *conn).await?.rows_affected();
        // No RETURNING clause, because each returned row is a hand-off between the SQLite
        // thread and the caller. When every row was inserted, the row count shows it.
        if inserted == len as u64 {
            added.extend(std::iter::repeat_n(Added::New, len));
        } else {
            added.extend(find_repeats(conn, file_id, chunk).await?);
        }
    }
    for (item, added) in items.iter().zip(&added) {
        if *added == Added::New {
            *counts.entry(stored_state(item)).or_default() += 1;
        }
    }
    Ok(added)
}

/// Text bound to many rows of an insert. sqlx copies a string bound by reference into an
/// allocation of its own, and most rows repeat these, so they are bound as shared strings.
struct SharedText {
    now: Arc<str>,
    queued: Arc<str>,
    failed: Arc<str>,
    endpoint: Arc<str>,
    model: Arc<str>,
}

impl SharedText {
    fn new(now: &Arc<str>) -> Self {
        SharedText {
            now: now.clone(),
            queued: ItemState::Queued.as_str().into(),
            failed: ItemState::Failed.as_str().into(),
            endpoint: "".into(),
            model: "".into(),
        }
    }

    fn state(&self, item: &NewItem) -> Arc<str> {
        match stored_state(item) {
            ItemState::Failed => self.failed.clone(),
            _ => self.queued.clone(),
        }
    }
}

/// Returns `value` shared, reusing `last` when it has the same text.
fn reuse(last: &mut Arc<str>, value: &str) -> Arc<str> {
    if **last != *value {
        *last = value.into();
    }
    last.clone()
}

fn bind_chunk(
    file_id: i64,
    items: &mut [NewItem],
    shared: &mut SharedText,
) -> Query<'static, Sqlite, SqliteArguments> {
    let row = format!("({})", vec!["?"; INSERT_COLUMNS].join(", "));
    let sql = format!(
        "INSERT INTO work_items
             (file_id, line_no, custom_id, endpoint, model, body, urgent, deadline,
              next_attempt_at, created_at, updated_at, state, error, finished_at)
         VALUES {}
         ON CONFLICT (file_id, custom_id) DO NOTHING",
        vec![row; items.len()].join(", ")
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for item in items.iter_mut() {
        let failed = item.error.is_some();
        let now = &shared.now;
        query = query
            .bind(file_id)
            .bind(item.line_no as i64)
            .bind(item.custom_id.clone())
            .bind(reuse(&mut shared.endpoint, &item.endpoint))
            .bind(reuse(&mut shared.model, &item.model))
            .bind(std::mem::take(&mut item.body))
            .bind(item.urgent)
            .bind(item.deadline.map(timestamp))
            .bind(now.clone())
            .bind(now.clone())
            .bind(now.clone())
            .bind(shared.state(item))
            .bind(item.error.clone())
            .bind(failed.then(|| now.clone()));
    }
    query
}

/// Finds which of `items` an insert that skipped some of them stored. An item was stored when
/// the row found by its `custom_id` has the item's own line number.
async fn find_repeats(
    conn: &mut SqliteConnection,
    file_id: i64,
    items: &[NewItem],
) -> Result<Vec<Added>, StoreError> {
    let mut added = Vec::with_capacity(items.len());
    for item in items {
        let first: i64 = sqlx::query_scalar(
            "SELECT line_no FROM work_items WHERE file_id = ?1 AND custom_id = ?2",
        )
        .bind(file_id)
        .bind(&item.custom_id)
        .fetch_one(&mut *conn)
        .await?;
        added.push(if first as u64 == item.line_no {
            Added::New
        } else {
            Added::Repeat {
                first_line: first as u64,
            }
        });
    }
    Ok(added)
}

fn claimed(row: sqlx::sqlite::SqliteRow) -> ClaimedItem {
    ClaimedItem {
        id: row.get("id"),
        endpoint: row.get("endpoint"),
        model: row.get("model"),
        body: row.get("body"),
        attempts: row.get::<i64, _>("attempts") as u32,
    }
}

impl Store {
    /// Claims up to `limit` due items of one non-embedding endpoint for real-time calls.
    pub async fn claim_realtime(
        &self,
        endpoint: &str,
        batchable: &str,
        cutoff: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ClaimedItem>, StoreError> {
        let now = timestamp(Utc::now());
        let sql = format!(
            "UPDATE work_items SET state = 'in_flight', lease_expires_at = ?4, updated_at = ?1
             WHERE id IN ({})
             RETURNING id, endpoint, model, body, attempts",
            realtime_candidates(is_batchable(batchable, endpoint))
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&now)
            .bind(batchable)
            .bind(timestamp(cutoff))
            .bind(timestamp(lease_until))
            .bind(endpoint)
            .bind(limit as i64)
            .fetch_all(self.pool())
            .await?;
        let mut items: Vec<ClaimedItem> = rows.into_iter().map(claimed).collect();
        items.sort_by_key(|item| item.id);
        Ok(items)
    }

    /// Claims embedding items that can share one request: the oldest due item, and when its
    /// `input` is a single string, up to `max_inputs - 1` more with a string input, the same
    /// model and the same other parameters.
    pub async fn claim_embeddings(
        &self,
        batchable: &str,
        cutoff: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        max_inputs: usize,
    ) -> Result<Vec<ClaimedItem>, StoreError> {
        let now = timestamp(Utc::now());
        // IMMEDIATE takes the write lock up front: a read that later writes could otherwise
        // fail with SQLITE_BUSY instead of waiting for the busy timeout.
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let first_sql = format!(
            "SELECT id, json_type(body, '$.input') = 'text' AS single,
                    model, json_remove(body, '$.input') AS params
             FROM work_items WHERE id IN ({}) ORDER BY urgent DESC, id",
            realtime_candidates(is_batchable(batchable, EMBEDDINGS))
        );
        // Bound by number: `?2` and `?4` are not used by this query.
        let first = sqlx::query(sqlx::AssertSqlSafe(first_sql))
            .bind(&now)
            .bind(batchable)
            .bind(timestamp(cutoff))
            .bind(timestamp(lease_until))
            .bind(EMBEDDINGS)
            .bind(1_i64)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(first) = first else {
            return Ok(Vec::new());
        };
        let first_id: i64 = first.get("id");
        let single: bool = first.get::<Option<bool>, _>("single").unwrap_or(false);
        let limit = if single { max_inputs } else { 1 };
        let sql = format!(
            "UPDATE work_items SET state = 'in_flight', lease_expires_at = ?4, updated_at = ?1
             WHERE id IN (SELECT id FROM work_items
                          WHERE id = ?5
                             OR ({REALTIME_ELIGIBLE} AND ?8 AND endpoint = '/v1/embeddings'
                                 AND json_type(body, '$.input') = 'text'
                                 AND model = ?6 AND json_remove(body, '$.input') = ?7)
                          ORDER BY id = ?5 DESC, urgent DESC, id LIMIT ?9)
             RETURNING id, endpoint, model, body, attempts"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&now)
            .bind(batchable)
            .bind(timestamp(cutoff))
            .bind(timestamp(lease_until))
            .bind(first_id)
            .bind(first.get::<String, _>("model"))
            .bind(first.get::<Option<String>, _>("params"))
            .bind(single)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut items: Vec<ClaimedItem> = rows.into_iter().map(claimed).collect();
        items.sort_by_key(|item| item.id);
        Ok(items)
    }

    /// Returns one claimed but unsent item to the queue.
    pub async fn release_claim(&self, item_id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE work_items SET state = 'queued', lease_expires_at = NULL, updated_at = ?2
             WHERE id = ?1 AND state = 'in_flight'",
        )
        .bind(item_id)
        .bind(timestamp(Utc::now()))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Returns every in-flight item to the queue; only safe while no call can be under way.
    pub async fn release_all_leases(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE work_items SET state = 'queued', lease_expires_at = NULL, updated_at = ?1
             WHERE state = 'in_flight'",
        )
        .bind(timestamp(Utc::now()))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Lists groups of due, batchable items by endpoint and model, oldest first. A group's count
    /// stops at `cap`, because the packer only needs to know whether a group fills a batch.
    pub async fn pack_groups(
        &self,
        batchable: &[String],
        cutoff: DateTime<Utc>,
        cap: usize,
    ) -> Result<Vec<PackGroup>, StoreError> {
        let now = timestamp(Utc::now());
        let mut groups = Vec::new();
        let mut after = (String::new(), String::new());
        while let Some((endpoint, model)) = self.next_queued_group(&after).await? {
            if batchable.contains(&endpoint) {
                let row = sqlx::query(PACK_GROUP_HEAD)
                    .bind(&endpoint)
                    .bind(&model)
                    .bind(&now)
                    .bind(timestamp(cutoff))
                    .bind(cap as i64)
                    .fetch_one(self.pool())
                    .await?;
                let count = row.get::<i64, _>("n") as u64;
                let oldest: Option<String> = row.get("oldest");
                if let Some(oldest) = oldest.filter(|_| count > 0) {
                    groups.push(PackGroup {
                        endpoint: endpoint.clone(),
                        model: model.clone(),
                        count,
                        oldest: super::parse_timestamp(&oldest).unwrap_or_else(Utc::now),
                    });
                }
            }
            after = (endpoint, model);
        }
        groups.sort_by_key(|group| group.oldest);
        Ok(groups)
    }

    /// Returns the endpoint and model after `after` that has queued batch items.
    async fn next_queued_group(
        &self,
        after: &(String, String),
    ) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query(PACK_NEXT_GROUP)
            .bind(&after.0)
            .bind(&after.1)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|row| (row.get("endpoint"), row.get("model"))))
    }

    /// Lists the oldest due items of one pack group, with the size of their request bodies.
    pub async fn pack_candidates(
        &self,
        group: &PackGroup,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PackCandidate>, StoreError> {
        // All candidates come back in one row, instead of one hand-off from the SQLite thread
        // per item.
        let sql = format!(
            "SELECT json_group_array(json_array(id, body_bytes) ORDER BY id)
             FROM ({PACK_CANDIDATES})"
        );
        let found: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(timestamp(Utc::now()))
            .bind(&group.endpoint)
            .bind(&group.model)
            .bind(timestamp(cutoff))
            .bind(limit as i64)
            .fetch_one(self.pool())
            .await?;
        let pairs: Vec<(i64, u64)> = super::decode("pack candidates", &found)?;
        Ok(pairs
            .into_iter()
            .map(|(id, body_bytes)| PackCandidate { id, body_bytes })
            .collect())
    }

    /// Fails one queued item that can never be sent (for example larger than any batch).
    pub async fn fail_queued(&self, item_id: i64, error: &str) -> Result<bool, StoreError> {
        let now = timestamp(Utc::now());
        let done = sqlx::query(
            "UPDATE work_items SET state = 'failed', error = ?2, finished_at = ?3, updated_at = ?3
             WHERE id = ?1 AND state = 'queued'",
        )
        .bind(item_id)
        .bind(error)
        .bind(&now)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Lists the ids of a batch's items in upload order.
    pub async fn batch_item_ids(&self, batch_id: i64) -> Result<Vec<i64>, StoreError> {
        let ids = sqlx::query_scalar("SELECT id FROM work_items WHERE batch_id = ?1 ORDER BY id")
            .bind(batch_id)
            .fetch_all(self.pool())
            .await?;
        Ok(ids)
    }

    /// Lists the user-visible request of every item in a batch, in item order.
    pub async fn batch_requests(&self, batch_id: i64) -> Result<Vec<(i64, String)>, StoreError> {
        // One row for the whole batch: the ids as a JSON array and the bodies one to a line
        // (a stored body is compact JSON, so it contains no newline).
        let row = sqlx::query(
            "SELECT json_group_array(id ORDER BY id) AS ids,
                    group_concat(body, char(10) ORDER BY id) AS bodies
             FROM work_items WHERE batch_id = ?1",
        )
        .bind(batch_id)
        .fetch_one(self.pool())
        .await?;
        let ids: Vec<i64> = super::decode("batch item ids", row.get("ids"))?;
        let bodies: String = row.get::<Option<String>, _>("bodies").unwrap_or_default();
        Ok(ids
            .into_iter()
            .zip(bodies.split('\n').map(str::to_string))
            .collect())
    }
}

/// Outcome writes, used inside the transactions of the `results` stage.
pub(crate) mod outcome {
    use super::*;

    /// Marks a real-time item finished. Matches only while the item is still in flight.
    pub async fn finish_in_flight(
        conn: &mut SqliteConnection,
        item_id: i64,
        outcome: &ItemOutcome<'_>,
        now: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE work_items
             SET state = ?2, status_code = ?3, response = ?4, error = ?5,
                 prompt_tokens = ?6, completion_tokens = ?7, total_tokens = ?8,
                 attempts = attempts + 1, lease_expires_at = NULL,
                 finished_at = ?9, updated_at = ?9, model_used = ?10
             WHERE id = ?1 AND state = 'in_flight'",
        )
        .bind(item_id)
        .bind(outcome.state.as_str())
        .bind(outcome.status_code.map(i64::from))
        .bind(outcome.response)
        .bind(outcome.error)
        .bind(outcome.usage.prompt_tokens)
        .bind(outcome.usage.completion_tokens)
        .bind(outcome.usage.total_tokens)
        .bind(now)
        .bind(outcome.model_used)
        .execute(conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Returns an in-flight item to the queue, due at `next_attempt_at`.
    pub async fn requeue_in_flight(
        conn: &mut SqliteConnection,
        item_id: i64,
        count_attempt: bool,
        next_attempt_at: &str,
        last_error: &str,
        now: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE work_items
             SET state = 'queued', attempts = attempts + ?2, next_attempt_at = ?3,
                 last_error = ?4, lease_expires_at = NULL, updated_at = ?5
             WHERE id = ?1 AND state = 'in_flight'",
        )
        .bind(item_id)
        .bind(i64::from(count_attempt))
        .bind(next_attempt_at)
        .bind(last_error)
        .bind(now)
        .execute(conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a submitted item of `batch_id` finished. Matches nothing once already written.
    pub async fn finish_submitted(
        conn: &mut SqliteConnection,
        batch_id: i64,
        item_id: i64,
        outcome: &ItemOutcome<'_>,
        now: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE work_items
             SET state = ?3, status_code = ?4, response = ?5, error = ?6,
                 prompt_tokens = ?7, completion_tokens = ?8, total_tokens = ?9,
                 attempts = attempts + 1, finished_at = ?10, updated_at = ?10
             WHERE id = ?2 AND batch_id = ?1 AND state = 'submitted'",
        )
        .bind(batch_id)
        .bind(item_id)
        .bind(outcome.state.as_str())
        .bind(outcome.status_code.map(i64::from))
        .bind(outcome.response)
        .bind(outcome.error)
        .bind(outcome.usage.prompt_tokens)
        .bind(outcome.usage.completion_tokens)
        .bind(outcome.usage.total_tokens)
        .bind(now)
        .execute(conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks the submitted items of `batch_id` in `successes` succeeded, in one statement: the
    /// results of a job arrive together, and one statement per item would spend far more on
    /// hand-offs to the database thread than on the writes. Returns how many were written; an
    /// item no longer submitted (cancelled, say) is left as it is.
    pub async fn finish_submitted_successes(
        conn: &mut SqliteConnection,
        batch_id: i64,
        successes: &[Success],
        now: &str,
    ) -> Result<u64, StoreError> {
        if successes.is_empty() {
            return Ok(0);
        }
        let rows: Vec<_> = successes
            .iter()
            .map(|s| {
                serde_json::json!([
                    s.item_id,
                    s.status_code,
                    s.response,
                    s.usage.prompt_tokens,
                    s.usage.completion_tokens,
                    s.usage.total_tokens,
                ])
            })
            .collect();
        // Materialized, the JSON is parsed once and each row is found by its key. As a plain
        // subquery, SQLite parsed it again for every item of the batch.
        let done = sqlx::query(
            "WITH r AS MATERIALIZED (
                 SELECT value ->> 0 AS id, value ->> 1 AS status_code, value ->> 2 AS response,
                        value ->> 3 AS prompt_tokens, value ->> 4 AS completion_tokens,
                        value ->> 5 AS total_tokens
                 FROM json_each(?3))
             UPDATE work_items
             SET state = 'succeeded', status_code = r.status_code, response = r.response,
                 error = NULL, prompt_tokens = r.prompt_tokens,
                 completion_tokens = r.completion_tokens, total_tokens = r.total_tokens,
                 attempts = attempts + 1, finished_at = ?2, updated_at = ?2
             FROM r
             WHERE work_items.id = r.id AND work_items.batch_id = ?1
               AND work_items.state = 'submitted'",
        )
        .bind(batch_id)
        .bind(now)
        .bind(serde_json::Value::Array(rows).to_string())
        .execute(conn)
        .await?;
        Ok(done.rows_affected())
    }

    /// Requeues one submitted item of `batch_id` after a retryable per-line error.
    pub async fn requeue_submitted(
        conn: &mut SqliteConnection,
        batch_id: i64,
        item_id: i64,
        last_error: &str,
        now: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE work_items
             SET state = 'queued', batch_id = NULL, attempts = attempts + 1,
                 next_attempt_at = ?4, last_error = ?3, updated_at = ?4
             WHERE id = ?2 AND batch_id = ?1 AND state = 'submitted'",
        )
        .bind(batch_id)
        .bind(item_id)
        .bind(last_error)
        .bind(now)
        .execute(conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Requeues every item of `batch_id` still waiting for a result, without counting an
    /// attempt, because the job failed for a reason that was not theirs.
    pub async fn requeue_all_submitted(
        conn: &mut SqliteConnection,
        batch_id: i64,
        last_error: &str,
        now: &str,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE work_items
             SET state = 'queued', batch_id = NULL, last_error = ?2, next_attempt_at = ?3,
                 updated_at = ?3
             WHERE batch_id = ?1 AND state = 'submitted'",
        )
        .bind(batch_id)
        .bind(last_error)
        .bind(now)
        .execute(conn)
        .await?;
        Ok(done.rows_affected())
    }

    /// Handles the items of a harvested batch that had no line in either result file: they
    /// are requeued with one more attempt, or failed once `max_attempts` is used up.
    /// Returns (requeued, failed).
    pub async fn settle_missing(
        conn: &mut SqliteConnection,
        batch_id: i64,
        max_attempts: u32,
        reason: &str,
        now: &str,
    ) -> Result<(u64, u64), StoreError> {
        let failed = sqlx::query(
            "UPDATE work_items
             SET state = 'failed', attempts = attempts + 1, error = ?3,
                 finished_at = ?4, updated_at = ?4
             WHERE batch_id = ?1 AND state = 'submitted' AND attempts + 1 >= ?2",
        )
        .bind(batch_id)
        .bind(i64::from(max_attempts))
        .bind(reason)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let requeued = sqlx::query(
            "UPDATE work_items
             SET state = 'queued', batch_id = NULL, attempts = attempts + 1,
                 last_error = ?2, next_attempt_at = ?3, updated_at = ?3
             WHERE batch_id = ?1 AND state = 'submitted'",
        )
        .bind(batch_id)
        .bind(reason)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok((requeued, failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileTotals;
    use crate::store::plan_tests::{assert_searches, plan};
    use futures::TryStreamExt;

    const CHAT: &str = "/v1/chat/completions";

    async fn open_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("batchd.db")).await.unwrap();
        (dir, store)
    }

    /// Stores one file whose items have the given (endpoint, model, urgent) each.
    async fn add_items(store: &Store, items: &[(&str, &str, bool)]) {
        let file = super::super::NewFile {
            name: "in.jsonl".into(),
            sha256: format!("{:x}", items.len()),
            urgent: false,
        };
        let mut ingest = store.begin_file(&file).await.unwrap();
        let items = items
            .iter()
            .enumerate()
            .map(|(n, (endpoint, model, urgent))| NewItem {
                line_no: n as u64 + 1,
                custom_id: format!("r{n}"),
                endpoint: endpoint.to_string(),
                model: model.to_string(),
                body: "{}".into(),
                urgent: *urgent,
                deadline: None,
                error: None,
            })
            .collect::<Vec<_>>();
        ingest.insert(items).await.unwrap();
        let totals = FileTotals {
            lines: 0,
            items: 0,
            errors: 0,
            report: "{}",
        };
        ingest.commit(totals).await.unwrap();
    }

    const TIMES: [&str; 3] = ["2026-01-01T00:00:00.000Z", "[]", "2026-01-02T00:00:00.000Z"];

    /// Starts storing a file named `in.jsonl` whose content hashes to `sha256`.
    async fn begin_file(store: &Store, sha256: &str) -> super::super::FileIngest {
        let file = super::super::NewFile {
            name: "in.jsonl".into(),
            sha256: sha256.into(),
            urgent: false,
        };
        store.begin_file(&file).await.unwrap()
    }

    /// Returns the outcome of each item an insert was given.
    fn outcomes(added: Vec<(NewItem, Added)>) -> Vec<Added> {
        added.into_iter().map(|(_, added)| added).collect()
    }

    fn item_with_id(line_no: u64, custom_id: &str) -> NewItem {
        NewItem {
            line_no,
            custom_id: custom_id.into(),
            endpoint: CHAT.into(),
            model: "m".into(),
            body: "{}".into(),
            urgent: false,
            deadline: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn insert_finds_repeated_custom_ids() {
        let (_dir, store) = open_store().await;
        let mut ingest = begin_file(&store, "repeats").await;
        let first = ingest
            .insert(vec![
                item_with_id(1, "a"),
                item_with_id(2, "b"),
                item_with_id(3, "a"),
            ])
            .await
            .unwrap();
        assert_eq!(
            outcomes(first),
            [Added::New, Added::New, Added::Repeat { first_line: 1 }]
        );
        let second = ingest
            .insert(vec![item_with_id(4, "b"), item_with_id(5, "c")])
            .await
            .unwrap();
        assert_eq!(
            outcomes(second),
            [Added::Repeat { first_line: 2 }, Added::New]
        );
        let clean = ingest
            .insert(vec![item_with_id(6, "d"), item_with_id(7, "e")])
            .await
            .unwrap();
        assert_eq!(outcomes(clean), [Added::New, Added::New]);
    }

    #[tokio::test]
    async fn insert_larger_than_one_statement_keeps_every_outcome() {
        let (_dir, store) = open_store().await;
        let mut ingest = begin_file(&store, "large").await;
        let count = MAX_INSERT_ITEMS + 10;
        let mut items: Vec<NewItem> = (1..=count as u64)
            .map(|line| item_with_id(line, &format!("id{line}")))
            .collect();
        // The last line repeats the first, so the repeat is found across two statements.
        items.push(item_with_id(count as u64 + 1, "id1"));
        let added = outcomes(ingest.insert(items).await.unwrap());
        assert_eq!(added.len(), count + 1);
        assert!(added[..count].iter().all(|a| *a == Added::New));
        assert_eq!(added[count], Added::Repeat { first_line: 1 });
    }

    #[tokio::test]
    async fn export_rows_span_pages_in_line_order() {
        let (_dir, store) = open_store().await;
        add_items(&store, &vec![(CHAT, "m", false); 2345]).await;
        let rows: Vec<_> = store.export_rows(1).try_collect().await.unwrap();
        let lines: Vec<u64> = rows.iter().map(|row| row.line_no).collect();
        assert_eq!(lines, (1..=2345).collect::<Vec<u64>>());
        assert_eq!(rows[2344].custom_id, "r2344");
        assert!(rows.iter().all(|row| row.state == ItemState::Queued));
    }

    #[tokio::test]
    async fn realtime_candidates_search_indexes_without_scanning_the_queue() {
        let (_dir, store) = open_store().await;
        for batchable in [true, false] {
            let sql = realtime_candidates(batchable);
            let params = [TIMES[0], TIMES[1], TIMES[2], TIMES[2], CHAT, "1"];
            assert_searches(&plan(&store, &sql, &params).await, "work_items_queue");
        }
    }

    #[tokio::test]
    async fn pack_queries_seek_pack_index() {
        let (_dir, store) = open_store().await;
        let next_group = plan(&store, PACK_NEXT_GROUP, &[CHAT, "m"]).await;
        assert_searches(&next_group, "work_items_pack");
        let head = plan(
            &store,
            PACK_GROUP_HEAD,
            &[CHAT, "m", TIMES[0], TIMES[2], "100"],
        )
        .await;
        assert_searches(&head, "work_items_pack");
        let candidates = plan(
            &store,
            PACK_CANDIDATES,
            &[TIMES[0], CHAT, "m", TIMES[2], "100"],
        )
        .await;
        assert_searches(&candidates, "work_items_pack");
    }

    #[tokio::test]
    async fn pack_groups_cap_counts_per_model() {
        let (_dir, store) = open_store().await;
        let mut items = vec![(CHAT, "big", false); 7];
        items.extend([(CHAT, "small", false), (CHAT, "small", true)]);
        items.extend([(EMBEDDINGS, "embed", false), (CHAT, "urgent-only", true)]);
        add_items(&store, &items).await;
        let batchable = vec![CHAT.to_string()];
        let later = Utc::now() + chrono::Duration::hours(1);
        let groups = store.pack_groups(&batchable, later, 5).await.unwrap();
        let found: Vec<_> = groups.iter().map(|g| (g.model.as_str(), g.count)).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.contains(&("big", 5)), "{found:?}");
        assert!(found.contains(&("small", 1)), "{found:?}");
    }

    #[test]
    fn batchable_endpoints_are_read_from_json() {
        let batchable = r#"["/v1/chat/completions"]"#;
        assert!(is_batchable(batchable, "/v1/chat/completions"));
        assert!(!is_batchable(batchable, "/v1/embeddings"));
    }
}
