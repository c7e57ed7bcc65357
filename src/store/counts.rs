//! Item counts per input file and state, kept in `item_counts` so that status, metrics and
//! exports read a few rows per file instead of counting `work_items`.
//!
//! Triggers on `work_items` (migration 0006) keep the counts exact on every state change and
//! deletion. Inserts fire no trigger, because one per row slows ingest down: the ingest insert
//! adds its rows with [`add_inserted`] in the same transaction, before it commits.

use std::collections::BTreeMap;

use sqlx::{Row, SqliteConnection};

use super::items::ItemState;
use super::{Store, StoreError};

/// Adds items just inserted into `work_items` for `file_id` to the counts, per state.
pub(crate) async fn add_inserted(
    conn: &mut SqliteConnection,
    file_id: i64,
    inserted: &BTreeMap<ItemState, u64>,
) -> Result<(), StoreError> {
    for (state, n) in inserted {
        sqlx::query(
            "INSERT INTO item_counts (file_id, state, n) VALUES (?1, ?2, ?3)
             ON CONFLICT (file_id, state) DO UPDATE SET n = n + excluded.n",
        )
        .bind(file_id)
        .bind(state.as_str())
        .bind(*n as i64)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

impl Store {
    /// Counts items per state, every state present (zero when none).
    pub async fn item_counts(&self) -> Result<BTreeMap<ItemState, u64>, StoreError> {
        let rows = sqlx::query("SELECT state, SUM(n) AS n FROM item_counts GROUP BY state")
            .fetch_all(self.pool())
            .await?;
        let mut counts: BTreeMap<ItemState, u64> =
            ItemState::ALL.into_iter().map(|s| (s, 0)).collect();
        for row in rows {
            let state: ItemState = row.get::<String, _>("state").parse()?;
            counts.insert(state, row.get::<i64, _>("n") as u64);
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};
    use proptest::prelude::*;

    use super::*;
    use crate::store::items::outcome;
    use crate::store::items::{ItemOutcome, Usage};
    use crate::store::{BatchState, FileTotals, NewBatch, NewFile, NewItem, Scope, timestamp};

    const CHAT: &str = "/v1/chat/completions";
    const EMBEDDINGS: &str = "/v1/embeddings";
    const BATCHABLE: &str = r#"["/v1/chat/completions"]"#;

    type Counts = BTreeMap<(i64, String), i64>;

    /// Runs `sql`, which selects `file_id`, `state` and `n`, and collects the counts.
    async fn counts_of(store: &Store, sql: &'static str) -> Counts {
        let rows = sqlx::query(sql).fetch_all(store.pool()).await.unwrap();
        rows.into_iter()
            .map(|row| ((row.get("file_id"), row.get("state")), row.get("n")))
            .collect()
    }

    /// Reads `item_counts`, leaving out zero counts.
    async fn kept_counts(store: &Store) -> Counts {
        counts_of(
            store,
            "SELECT file_id, state, n FROM item_counts WHERE n <> 0",
        )
        .await
    }

    /// Counts `work_items` per file and state with `GROUP BY`.
    async fn real_counts(store: &Store) -> Counts {
        counts_of(
            store,
            "SELECT file_id, state, COUNT(*) AS n FROM work_items GROUP BY file_id, state",
        )
        .await
    }

    async fn assert_exact(store: &Store, step: &str) {
        assert_eq!(
            kept_counts(store).await,
            real_counts(store).await,
            "after {step}"
        );
        let negative: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM item_counts WHERE n < 0")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(negative, 0, "negative counts after {step}");
    }

    /// Checks the per-state columns and `progress` of the `files` view against `work_items`.
    async fn assert_files_view_exact(store: &Store) {
        let real = real_counts(store).await;
        let rows = sqlx::query("SELECT * FROM files")
            .fetch_all(store.pool())
            .await
            .unwrap();
        for row in rows {
            let file: i64 = row.get("file_id");
            let count = |state: ItemState| {
                real.get(&(file, state.as_str().to_string()))
                    .copied()
                    .unwrap_or(0)
            };
            for state in ItemState::ALL {
                let in_view: i64 = row.get(state.as_str());
                assert_eq!(in_view, count(state), "files view, file {file}, {state}");
            }
            let items: i64 = ItemState::ALL.into_iter().map(count).sum();
            let finished = count(ItemState::Succeeded) + count(ItemState::Failed);
            let expected = if items == 0 {
                1.0
            } else {
                finished as f64 / items as f64
            };
            let progress: f64 = row.get("progress");
            assert!(
                (progress - expected).abs() < 1e-9,
                "files view, file {file}, progress"
            );
        }
    }

    /// Builds a chat or embedding item on `line_no`, stored failed at ingest when `failed` is set.
    fn item(line_no: u64, custom_id: &str, endpoint: &str, failed: bool) -> NewItem {
        let body = if endpoint == EMBEDDINGS {
            r#"{"model":"m","input":"text"}"#
        } else {
            r#"{"model":"m","messages":[]}"#
        };
        NewItem {
            line_no,
            custom_id: custom_id.to_string(),
            endpoint: endpoint.to_string(),
            model: "m".to_string(),
            body: body.to_string(),
            urgent: false,
            deadline: None,
            error: failed.then(|| "model not found".to_string()),
        }
    }

    /// Stores a file with `items` and returns its id.
    async fn ingest(store: &Store, name: &str, items: Vec<NewItem>) -> i64 {
        let mut file = store
            .begin_file(&NewFile {
                name: name.to_string(),
                sha256: format!("{name}-{}", rand::random::<u64>()),
                urgent: false,
            })
            .await
            .unwrap();
        // Committed in two parts, as a large file is.
        let total = items.len() as u64;
        let mut first = items;
        let second = first.split_off(first.len() / 2);
        let half = first.len() as u64;
        file.insert(first).await.unwrap();
        file.commit_part(half, totals(half)).await.unwrap();
        file.insert(second).await.unwrap();
        file.commit(totals(total)).await.unwrap()
    }

    fn totals(items: u64) -> FileTotals<'static> {
        FileTotals {
            lines: items,
            items,
            errors: 0,
            report: "{}",
        }
    }

    async fn ids_in_state(store: &Store, state: ItemState) -> Vec<i64> {
        sqlx::query_scalar("SELECT id FROM work_items WHERE state = ?1 ORDER BY id")
            .bind(state.as_str())
            .fetch_all(store.pool())
            .await
            .unwrap()
    }

    /// Packs up to `limit` queued chat items into a batch and returns its id.
    async fn pack(store: &Store, limit: usize) -> Option<i64> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM work_items WHERE state = 'queued' AND endpoint = ?1
             ORDER BY id LIMIT ?2",
        )
        .bind(CHAT)
        .bind(limit as i64)
        .fetch_all(store.pool())
        .await
        .unwrap();
        let batch = NewBatch {
            endpoint: CHAT.to_string(),
            model: "m".to_string(),
            item_ids: ids,
            bytes: 0,
        };
        store.pack_batch(&batch).await.unwrap().map(|b| b.id)
    }

    /// Creates the provider job of a packed batch, which marks its items submitted.
    async fn submit(store: &Store, batch_id: i64) {
        assert!(
            store
                .set_batch_state(batch_id, BatchState::Packed, BatchState::Creating)
                .await
                .unwrap()
        );
        store
            .record_created(
                batch_id,
                &format!("pb-{batch_id}"),
                "IN_PROGRESS",
                Utc::now(),
            )
            .await
            .unwrap();
    }

    fn answer(state: ItemState) -> ItemOutcome<'static> {
        ItemOutcome {
            state,
            status_code: Some(200),
            response: Some("{}"),
            error: None,
            usage: Usage::default(),
            model_used: None,
        }
    }

    fn now() -> String {
        timestamp(Utc::now())
    }

    /// Claims up to `limit` chat items for real-time calls, leased for `lease_secs` seconds. A
    /// negative value claims them with a lease that has expired already.
    async fn claim(store: &Store, limit: usize, lease_secs: i64) -> Vec<i64> {
        // With no batchable endpoint every queued chat item may go real-time.
        store
            .claim_realtime(
                CHAT,
                "[]",
                Utc::now(),
                Utc::now() + Duration::seconds(lease_secs),
                limit,
            )
            .await
            .unwrap()
            .into_iter()
            .map(|item| item.id)
            .collect()
    }

    #[tokio::test]
    async fn counts_match_items_through_every_transition() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("batchd.db")).await.unwrap();

        // Ingest: items failed at ingest are counted as failed and a repeated id not at all.
        let mut lines: Vec<NewItem> = (1..=30)
            .map(|i| item(i, &format!("c-{i}"), CHAT, i % 10 == 0))
            .collect();
        lines.push(item(31, "c-1", CHAT, false));
        let chat = ingest(&store, "chat.jsonl", lines).await;
        let embed_lines = (1..=6).map(|i| item(i, &format!("e-{i}"), EMBEDDINGS, false));
        let embed = ingest(&store, "embed.jsonl", embed_lines.collect()).await;
        assert_exact(&store, "ingest").await;
        assert_eq!(store.item_counts().await.unwrap()[&ItemState::Failed], 3);

        // An ingest that is rolled back leaves no count behind.
        let mut dropped = store
            .begin_file(&NewFile {
                name: "dropped.jsonl".into(),
                sha256: "dropped".into(),
                urgent: false,
            })
            .await
            .unwrap();
        dropped
            .insert(vec![item(1, "d-1", CHAT, false)])
            .await
            .unwrap();
        drop(dropped);
        assert_exact(&store, "rolled back ingest").await;

        // Packing and submission.
        let first = pack(&store, 8).await.unwrap();
        assert_exact(&store, "pack").await;
        submit(&store, first).await;
        assert_exact(&store, "submit").await;

        // Results of a job: a success, a failure, a retryable error, then the rest missing.
        let items = store.batch_item_ids(first).await.unwrap();
        let mut tx = store.pool().begin().await.unwrap();
        let done = [
            outcome::finish_submitted(
                &mut tx,
                first,
                items[0],
                &answer(ItemState::Succeeded),
                &now(),
            )
            .await
            .unwrap(),
            outcome::finish_submitted(&mut tx, first, items[1], &answer(ItemState::Failed), &now())
                .await
                .unwrap(),
            outcome::requeue_submitted(&mut tx, first, items[2], "overloaded", &now())
                .await
                .unwrap(),
        ];
        assert_eq!(done, [true; 3]);
        // A second write of the same result matches nothing and changes no count.
        assert!(
            !outcome::finish_submitted(
                &mut tx,
                first,
                items[0],
                &answer(ItemState::Failed),
                &now()
            )
            .await
            .unwrap()
        );
        // Successes written together; the item finished above is no longer submitted.
        let successes: Vec<_> = [items[3], items[4], items[0]]
            .into_iter()
            .map(|item_id| super::super::items::Success {
                item_id,
                status_code: 200,
                response: "{}".into(),
                usage: Default::default(),
            })
            .collect();
        assert_eq!(
            outcome::finish_submitted_successes(&mut tx, first, &successes, &now())
                .await
                .unwrap(),
            2
        );
        outcome::settle_missing(&mut tx, first, 3, "missing", &now())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_exact(&store, "batch results").await;

        // A job that failed as a whole, and a batch abandoned before it was created.
        let second = pack(&store, 5).await.unwrap();
        submit(&store, second).await;
        let mut tx = store.pool().begin().await.unwrap();
        outcome::requeue_all_submitted(&mut tx, second, "job failed", &now())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_exact(&store, "requeue of a failed job").await;
        let third = pack(&store, 5).await.unwrap();
        crate::results::abandon_batch(&store, third, "upload rejected", 1)
            .await
            .unwrap();
        assert_exact(&store, "abandoned batch").await;

        // Real-time claims, releases and results.
        let claimed = claim(&store, 4, 600).await;
        assert_eq!(claimed.len(), 4);
        assert_exact(&store, "real-time claim").await;
        assert!(store.release_claim(claimed[0]).await.unwrap());
        assert_exact(&store, "release of a claim").await;
        let mut tx = store.pool().begin().await.unwrap();
        outcome::finish_in_flight(&mut tx, claimed[1], &answer(ItemState::Succeeded), &now())
            .await
            .unwrap();
        outcome::requeue_in_flight(&mut tx, claimed[2], true, &now(), "503", &now())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_exact(&store, "real-time results").await;
        let embeddings = store
            .claim_embeddings(
                BATCHABLE,
                Utc::now(),
                Utc::now() + Duration::seconds(600),
                20,
            )
            .await
            .unwrap();
        assert_eq!(embeddings.len(), 6);
        assert_exact(&store, "embedding claim").await;

        // Crash recovery at start-up, which releases every lease.
        assert_eq!(claim(&store, 2, -60).await.len(), 2);
        assert!(store.release_all_leases().await.unwrap() > 0);
        assert_exact(&store, "crash recovery").await;

        // An item that can never be sent, then the operator's retry and cancel.
        let queued = ids_in_state(&store, ItemState::Queued).await;
        assert!(store.fail_queued(queued[0], "too large").await.unwrap());
        assert_exact(&store, "fail of a queued item").await;
        assert_eq!(store.retry_failed(Scope::File(embed)).await.unwrap(), 0);
        assert!(store.retry_failed(Scope::All).await.unwrap() > 0);
        assert_exact(&store, "retry").await;
        let running = pack(&store, 3).await.unwrap();
        let cancelled = store.cancel_queued(chat, "cancelled").await.unwrap();
        assert_eq!(cancelled.left_running, 3);
        assert_exact(&store, "cancel").await;
        assert_files_view_exact(&store).await;
        submit(&store, running).await;
        assert_exact(&store, "submit after cancel").await;

        // Retention deletes the items of an exported file.
        store.mark_exported(embed).await.unwrap();
        let purged = store
            .purge_exported(Utc::now() + Duration::seconds(60))
            .await
            .unwrap();
        assert_eq!(purged.items, 6);
        assert_exact(&store, "retention").await;
        assert!(
            kept_counts(&store)
                .await
                .keys()
                .all(|(file, _)| *file == chat)
        );
        assert_files_view_exact(&store).await;
    }

    #[tokio::test]
    async fn abandoned_file_keeps_committed_part() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("batchd.db")).await.unwrap();
        let new_file = |name: &str| NewFile {
            name: name.into(),
            sha256: name.into(),
            urgent: false,
        };

        let mut partial = store.begin_file(&new_file("kept.jsonl")).await.unwrap();
        let part = vec![item(1, "k-1", CHAT, false), item(2, "k-2", CHAT, false)];
        partial.insert(part).await.unwrap();
        partial.commit_part(2, totals(2)).await.unwrap();
        partial
            .insert(vec![item(3, "k-3", CHAT, false)])
            .await
            .unwrap();
        partial
            .abandon("its input file was rejected", "{}")
            .await
            .unwrap();
        assert_exact(&store, "abandoned after a part").await;
        let states: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT line_no, state, error FROM work_items ORDER BY line_no")
                .fetch_all(store.pool())
                .await
                .unwrap();
        let failed = "its input file was rejected".to_string();
        assert_eq!(
            states,
            [
                (1, "failed".into(), failed.clone()),
                (2, "failed".into(), failed)
            ],
            "the rolled-back part left no item"
        );
        let kept_file = store.file_by_hash("kept.jsonl").await.unwrap().unwrap();
        assert_eq!(kept_file.disposition, "rejected");
        assert_eq!(kept_file.resume_line, None);

        // A committed part without items leaves nothing behind.
        let mut empty = store.begin_file(&new_file("empty.jsonl")).await.unwrap();
        empty.commit_part(5, totals(0)).await.unwrap();
        empty
            .abandon("its input file was rejected", "{}")
            .await
            .unwrap();
        assert!(store.file_by_hash("empty.jsonl").await.unwrap().is_none());
        assert_exact(&store, "abandoned empty part").await;
    }

    #[tokio::test]
    async fn migration_counts_items_stored_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batchd.db");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        sqlx::migrate!("./migrations")
            .run_to(5, &pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO input_files (name, sha256, urgent, lines_total, items_total,
                                      errors_total, report, ingested_at)
             VALUES ('a.jsonl', 'a', 0, 3, 3, 0, '{}', 't'), ('b.jsonl', 'b', 0, 1, 1, 0, '{}', 't')",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO work_items (file_id, line_no, custom_id, endpoint, model, body, urgent,
                                     state, next_attempt_at, created_at, updated_at)
             VALUES (1, 1, 'x', 'e', 'm', '{}', 0, 'queued', 't', 't', 't'),
                    (1, 2, 'y', 'e', 'm', '{}', 0, 'queued', 't', 't', 't'),
                    (1, 3, 'z', 'e', 'm', '{}', 0, 'succeeded', 't', 't', 't'),
                    (2, 1, 'x', 'e', 'm', '{}', 0, 'failed', 't', 't', 't')",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = Store::open(&path).await.unwrap();
        let expected: Counts = [
            ((1, "queued".to_string()), 2),
            ((1, "succeeded".to_string()), 1),
            ((2, "failed".to_string()), 1),
        ]
        .into();
        assert_eq!(kept_counts(&store).await, expected);
    }

    /// One step of the property test. Each step applies to whatever items are in a fitting state.
    #[derive(Debug, Clone)]
    enum Op {
        Ingest {
            lines: u64,
            failed_every: u64,
            repeat: bool,
        },
        Pack(usize),
        Submit,
        Finish {
            success: bool,
        },
        RequeueOne,
        SettleMissing {
            max_attempts: u32,
        },
        RequeueAll,
        Abandon,
        Claim {
            count: usize,
            expired: bool,
        },
        ReleaseOne,
        FinishInFlight {
            success: bool,
        },
        RequeueInFlight,
        ReleaseAll,
        FailQueued,
        Retry {
            all: bool,
        },
        Cancel,
        Purge,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1..12_u64, 2..6_u64, any::<bool>()).prop_map(|(lines, failed_every, repeat)| {
                Op::Ingest {
                    lines,
                    failed_every,
                    repeat,
                }
            }),
            (1..6_usize).prop_map(Op::Pack),
            Just(Op::Submit),
            any::<bool>().prop_map(|success| Op::Finish { success }),
            Just(Op::RequeueOne),
            (1..3_u32).prop_map(|max_attempts| Op::SettleMissing { max_attempts }),
            Just(Op::RequeueAll),
            Just(Op::Abandon),
            (1..4_usize, any::<bool>()).prop_map(|(count, expired)| Op::Claim { count, expired }),
            Just(Op::ReleaseOne),
            any::<bool>().prop_map(|success| Op::FinishInFlight { success }),
            Just(Op::RequeueInFlight),
            Just(Op::ReleaseAll),
            Just(Op::FailQueued),
            any::<bool>().prop_map(|all| Op::Retry { all }),
            Just(Op::Cancel),
            Just(Op::Purge),
        ]
    }

    async fn first_batch(store: &Store, state: BatchState) -> Option<i64> {
        store
            .batches_in_state(state)
            .await
            .unwrap()
            .first()
            .map(|batch| batch.id)
    }

    /// Returns the first submitted item and its batch.
    async fn first_submitted(store: &Store) -> Option<(i64, i64)> {
        sqlx::query_as("SELECT id, batch_id FROM work_items WHERE state = 'submitted' LIMIT 1")
            .fetch_optional(store.pool())
            .await
            .unwrap()
    }

    async fn first_file(store: &Store) -> Option<i64> {
        sqlx::query_scalar("SELECT MIN(id) FROM input_files WHERE purged_at IS NULL")
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    async fn apply(store: &Store, op: &Op, files: &mut u64) {
        match *op {
            Op::Ingest {
                lines,
                failed_every,
                repeat,
            } => {
                *files += 1;
                let mut items: Vec<NewItem> = (1..=lines)
                    .map(|i| item(i, &format!("c-{i}"), CHAT, i % failed_every == 0))
                    .collect();
                if repeat {
                    items.push(item(lines + 1, "c-1", CHAT, false));
                }
                ingest(store, &format!("f{files}.jsonl"), items).await;
            }
            Op::Pack(limit) => {
                pack(store, limit).await;
            }
            Op::Submit => {
                if let Some(batch) = first_batch(store, BatchState::Packed).await {
                    submit(store, batch).await;
                }
            }
            Op::Finish { success } => {
                if let Some((item, batch)) = first_submitted(store).await {
                    let state = if success {
                        ItemState::Succeeded
                    } else {
                        ItemState::Failed
                    };
                    let mut conn = store.pool().acquire().await.unwrap();
                    outcome::finish_submitted(&mut conn, batch, item, &answer(state), &now())
                        .await
                        .unwrap();
                }
            }
            Op::RequeueOne => {
                if let Some((item, batch)) = first_submitted(store).await {
                    let mut conn = store.pool().acquire().await.unwrap();
                    outcome::requeue_submitted(&mut conn, batch, item, "overloaded", &now())
                        .await
                        .unwrap();
                }
            }
            Op::SettleMissing { max_attempts } => {
                if let Some((_, batch)) = first_submitted(store).await {
                    let mut conn = store.pool().acquire().await.unwrap();
                    outcome::settle_missing(&mut conn, batch, max_attempts, "missing", &now())
                        .await
                        .unwrap();
                }
            }
            Op::RequeueAll => {
                if let Some((_, batch)) = first_submitted(store).await {
                    let mut conn = store.pool().acquire().await.unwrap();
                    outcome::requeue_all_submitted(&mut conn, batch, "job failed", &now())
                        .await
                        .unwrap();
                }
            }
            Op::Abandon => {
                if let Some(batch) = first_batch(store, BatchState::Packed).await {
                    crate::results::abandon_batch(store, batch, "upload rejected", 2)
                        .await
                        .unwrap();
                }
            }
            Op::Claim { count, expired } => {
                claim(store, count, if expired { -60 } else { 600 }).await;
            }
            Op::ReleaseOne => {
                if let Some(&id) = ids_in_state(store, ItemState::InFlight).await.first() {
                    store.release_claim(id).await.unwrap();
                }
            }
            Op::FinishInFlight { success } => {
                if let Some(&id) = ids_in_state(store, ItemState::InFlight).await.first() {
                    let state = if success {
                        ItemState::Succeeded
                    } else {
                        ItemState::Failed
                    };
                    let mut conn = store.pool().acquire().await.unwrap();
                    outcome::finish_in_flight(&mut conn, id, &answer(state), &now())
                        .await
                        .unwrap();
                }
            }
            Op::RequeueInFlight => {
                if let Some(&id) = ids_in_state(store, ItemState::InFlight).await.first() {
                    let mut conn = store.pool().acquire().await.unwrap();
                    outcome::requeue_in_flight(&mut conn, id, true, &now(), "503", &now())
                        .await
                        .unwrap();
                }
            }
            Op::ReleaseAll => {
                store.release_all_leases().await.unwrap();
            }
            Op::FailQueued => {
                if let Some(&id) = ids_in_state(store, ItemState::Queued).await.first() {
                    store.fail_queued(id, "too large").await.unwrap();
                }
            }
            Op::Retry { all } => {
                let scope = match (all, first_file(store).await) {
                    (false, Some(file)) => Scope::File(file),
                    _ => Scope::All,
                };
                store.retry_failed(scope).await.unwrap();
            }
            Op::Cancel => {
                if let Some(file) = first_file(store).await {
                    store.cancel_queued(file, "cancelled").await.unwrap();
                }
            }
            Op::Purge => {
                if let Some(file) = first_file(store).await {
                    store.mark_exported(file).await.unwrap();
                    store
                        .purge_exported(Utc::now() + Duration::seconds(60))
                        .await
                        .unwrap();
                }
            }
        }
    }

    proptest! {
        // Each case opens a fresh database, so a few dozen cases keep the test quick.
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn counts_stay_exact_in_any_order(ops in proptest::collection::vec(op(), 1..40)) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open(&dir.path().join("batchd.db")).await.unwrap();
                let mut files = 0;
                for (step, op) in ops.iter().enumerate() {
                    apply(&store, op, &mut files).await;
                    assert_exact(&store, &format!("step {step}: {op:?}")).await;
                }
            });
        }
    }
}
