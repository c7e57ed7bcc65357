//! Writing outcomes: each real-time response, and each harvested batch job, is written with
//! the state changes it causes in one transaction. Writes are guarded by the state they expect, so
//! writing the same job's results twice changes nothing.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;

use crate::provider::{Answer, BatchJob, Failure, ProviderError, ResultLine};
use crate::store::items::outcome;
use crate::store::items::{ItemOutcome, Success, Usage};
use crate::store::{ItemState, Store, StoreError, mark_harvested, timestamp};

/// Prefix of the `custom_id` batchd gives each line it uploads.
pub const LINE_ID_PREFIX: &str = "bd-";

/// Returns the id batchd puts on the uploaded line of a work item.
pub fn line_id(item_id: i64) -> String {
    format!("{LINE_ID_PREFIX}{item_id}")
}

/// Reads a work item id back from an uploaded line's `custom_id`.
pub fn item_id_of(custom_id: &str) -> Option<i64> {
    custom_id.strip_prefix(LINE_ID_PREFIX)?.parse().ok()
}

/// Error-file codes that describe the provider's trouble rather than the request's.
const RETRYABLE_LINE_CODES: [&str; 5] = [
    "timeout",
    "request_timeout",
    "batch_expired",
    "batch_cancelled",
    "server_error",
];

/// Counts of what one harvest wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Harvest {
    pub succeeded: u64,
    pub failed: u64,
    pub requeued: u64,
    /// Lines that named no item of this batch (or one already written).
    pub ignored: u64,
    /// False when the batch had been harvested before; nothing was written.
    pub first: bool,
}

/// Writes a successful real-time response for one in-flight item. `model_used` names the
/// fallback model when the request was sent to one.
pub async fn record_answer(
    store: &Store,
    item_id: i64,
    answer: &Answer,
    model_used: Option<&str>,
) -> Result<bool, StoreError> {
    let now = timestamp(Utc::now());
    let body = answer.body.to_string();
    let mut conn = store.pool().acquire().await?;
    outcome::finish_in_flight(
        &mut conn,
        item_id,
        &ItemOutcome {
            state: ItemState::Succeeded,
            status_code: Some(answer.status),
            response: Some(&body),
            error: None,
            usage: Usage::from_body(&answer.body),
            model_used,
        },
        &now,
    )
    .await
}

/// Finds the item a failed job's error text blames: an uploaded `custom_id` such as `bd-42`,
/// or else a `line N` of the uploaded file, whose lines follow `item_ids` in order.
pub fn blamed_item(error: &str, item_ids: &[i64]) -> Option<i64> {
    let named = error.match_indices(LINE_ID_PREFIX).find_map(|(at, _)| {
        let rest = &error[at + LINE_ID_PREFIX.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits
            .parse::<i64>()
            .ok()
            .filter(|id| item_ids.contains(id))
    });
    if named.is_some() {
        return named;
    }
    let lower = error.to_ascii_lowercase();
    lower.match_indices("line ").find_map(|(at, _)| {
        let digits: String = lower[at + 5..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let line: usize = digits.parse().ok()?;
        item_ids.get(line.checked_sub(1)?).copied()
    })
}

/// Fails an in-flight item for a reason found before any call was made.
pub async fn record_local_failure(
    store: &Store,
    item_id: i64,
    message: &str,
) -> Result<bool, StoreError> {
    let now = timestamp(Utc::now());
    let mut conn = store.pool().acquire().await?;
    outcome::finish_in_flight(
        &mut conn,
        item_id,
        &ItemOutcome {
            state: ItemState::Failed,
            status_code: None,
            response: None,
            error: Some(message),
            usage: Usage::default(),
            model_used: None,
        },
        &now,
    )
    .await
}

/// The state of an item after a failed real-time call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    Requeued,
    Failed,
}

/// Writes a failed real-time call for one in-flight item: requeued after `delay` when the
/// failure is retryable and attempts remain, failed otherwise. A 429 (rate limit or missing
/// credit) does not use up an attempt, because the request itself was never judged.
pub async fn record_call_failure(
    store: &Store,
    item_id: i64,
    attempts_before: u32,
    max_attempts: u32,
    error: &ProviderError,
    delay: Duration,
) -> Result<AfterFailure, StoreError> {
    let now = Utc::now();
    let message = error.to_string();
    let mut conn = store.pool().acquire().await?;
    let exhausted = attempts_before + 1 >= max_attempts;
    let retry = match error.class() {
        Failure::RateLimited | Failure::OutOfCredit => true,
        Failure::Retryable => !exhausted,
        Failure::Fatal => false,
    };
    if retry {
        let next = timestamp(now + chrono::Duration::from_std(delay).unwrap_or_default());
        let count = error.class() == Failure::Retryable;
        outcome::requeue_in_flight(&mut conn, item_id, count, &next, &message, &timestamp(now))
            .await?;
        crate::metrics::global().retries("realtime", 1);
        return Ok(AfterFailure::Requeued);
    }
    let message = if error.class() == Failure::Retryable {
        format!("{message} (gave up after {max_attempts} attempts)")
    } else {
        message
    };
    outcome::finish_in_flight(
        &mut conn,
        item_id,
        &ItemOutcome {
            state: ItemState::Failed,
            status_code: error.status(),
            response: None,
            error: Some(&message),
            usage: Usage::default(),
            model_used: None,
        },
        &timestamp(now),
    )
    .await?;
    Ok(AfterFailure::Failed)
}

/// Splits a result file into lines, skipping blank ones. Lines that do not parse are counted.
pub fn parse_result_file(bytes: &[u8]) -> (Vec<ResultLine>, u64) {
    let mut lines = Vec::new();
    let mut bad = 0;
    for raw in bytes.split(|&b| b == b'\n') {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<ResultLine>(raw) {
            Ok(line) => lines.push(line),
            Err(_) => bad += 1,
        }
    }
    (lines, bad)
}

/// Writes a terminal batch job: every output and error line to its item, every item in
/// neither file requeued (or failed once its attempts are used up), and the batch marked
/// harvested, all in one transaction. A `culprit` is the one item a failed job named as the
/// reason it failed: that item fails, and the others are requeued without losing an attempt.
pub async fn harvest(
    store: &Store,
    batch_id: i64,
    job: &BatchJob,
    output: &[ResultLine],
    errors: &[ResultLine],
    max_attempts: u32,
    culprit: Option<i64>,
) -> Result<Harvest, StoreError> {
    let now = timestamp(Utc::now());
    let mut counts = Harvest::default();
    let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    let harvested = mark_harvested(
        &mut tx,
        batch_id,
        job.status.as_str(),
        job.output_file_id.as_deref(),
        job.error_file_id.as_deref(),
        job.error.as_deref(),
        &now,
    )
    .await?;
    let Some(item_count) = harvested else {
        tx.rollback().await?;
        return Ok(counts);
    };
    counts.first = true;
    let mut successes = Successes::default();
    for line in output.iter().chain(errors) {
        let Some(item_id) = item_id_of(&line.custom_id) else {
            counts.ignored += 1;
            continue;
        };
        if !successes.seen.insert(item_id) {
            // A second line for one item: the first one written wins.
            counts.ignored += 1;
            continue;
        }
        if let Some(success) = success_of(item_id, line) {
            successes.pending.push(success);
            continue;
        }
        // Written in line order, so successes held back go first.
        successes
            .write(&mut tx, batch_id, &now, &mut counts)
            .await?;
        let written = write_line(&mut tx, batch_id, item_id, line, &now, &mut counts).await?;
        crate::fault::point("mid-results");
        if !written {
            counts.ignored += 1;
        }
    }
    successes
        .write(&mut tx, batch_id, &now, &mut counts)
        .await?;
    let reason = match &job.error {
        Some(error) => format!(
            "batch job {} ended {} without a result for this item: {error}",
            job.id,
            job.status.as_str()
        ),
        None => format!(
            "batch job {} ended {} without a result for this item",
            job.id,
            job.status.as_str()
        ),
    };
    if let Some(item_id) = culprit {
        let message = format!(
            "batch job {} failed validation because of this request: {}",
            job.id,
            job.error.as_deref().unwrap_or("no reason given")
        );
        let failed = outcome::finish_submitted(
            &mut tx,
            batch_id,
            item_id,
            &ItemOutcome {
                state: ItemState::Failed,
                status_code: None,
                response: None,
                error: Some(&message),
                usage: Usage::default(),
                model_used: None,
            },
            &now,
        )
        .await?;
        counts.failed += u64::from(failed);
        counts.requeued += outcome::requeue_all_submitted(&mut tx, batch_id, &reason, &now).await?;
    } else if counts.succeeded + counts.failed + counts.requeued < item_count {
        // Each count is an item of this batch that left `submitted` above. When they add up to
        // the batch, none is missing, and the two updates that settle the missing are skipped.
        let (requeued, failed) =
            outcome::settle_missing(&mut tx, batch_id, max_attempts, &reason, &now).await?;
        counts.requeued += requeued;
        counts.failed += failed;
    }
    tx.commit().await?;
    Ok(counts)
}

/// The successful lines of a harvest not yet written, and every item id met so far.
#[derive(Default)]
struct Successes {
    pending: Vec<Success>,
    seen: HashSet<i64>,
}

impl Successes {
    /// Writes the pending successes in one statement and counts those written.
    async fn write(
        &mut self,
        conn: &mut sqlx::SqliteConnection,
        batch_id: i64,
        now: &str,
        counts: &mut Harvest,
    ) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let written =
            outcome::finish_submitted_successes(conn, batch_id, &self.pending, now).await?;
        crate::fault::point("mid-results");
        counts.succeeded += written;
        counts.ignored += self.pending.len() as u64 - written;
        self.pending.clear();
        Ok(())
    }
}

/// Returns the line as a success when it carries a 2xx response and no error.
fn success_of(item_id: i64, line: &ResultLine) -> Option<Success> {
    let response = line.response.as_ref()?;
    if line.error_message().is_some() || !(200..300).contains(&response.status_code) {
        return None;
    }
    Some(Success {
        item_id,
        status_code: response.status_code,
        response: response.body_text().to_string(),
        usage: Usage::from_body_text(response.body_text()),
    })
}

/// The effect of a line that is not a success on its item.
enum LineOutcome<'a> {
    /// Returned to the queue, with this as its last error.
    Requeue(String),
    /// Failed, with the provider's status and body when it sent a response.
    Fail {
        status_code: Option<u16>,
        response: Option<&'a str>,
        message: String,
    },
}

/// Decides what a line that is not a success does: a retryable response or error code
/// requeues its item, anything else fails it.
fn line_outcome(line: &ResultLine) -> LineOutcome<'_> {
    if let Some(response) = line
        .response
        .as_ref()
        .filter(|_| line.error_message().is_none())
    {
        let body = response.body_text();
        let status = response.status_code;
        let message = format!("provider returned HTTP {status}: {body}");
        if status == 429 || status == 408 || status >= 500 {
            return LineOutcome::Requeue(message);
        }
        return LineOutcome::Fail {
            status_code: Some(status),
            response: Some(body),
            message,
        };
    }
    let message = line
        .error_message()
        .unwrap_or_else(|| "result line has neither a response nor an error".to_string());
    let code = line
        .error
        .as_ref()
        .and_then(|e| e.get("code"))
        .and_then(|c| c.as_str());
    if code.is_some_and(|c| RETRYABLE_LINE_CODES.contains(&c)) {
        return LineOutcome::Requeue(message);
    }
    LineOutcome::Fail {
        status_code: None,
        response: None,
        message,
    }
}

/// Writes one line that is not a success: a failed or retryable response, or an error line.
/// Returns whether its item was still waiting for a result; only then is it counted.
async fn write_line(
    conn: &mut sqlx::SqliteConnection,
    batch_id: i64,
    item_id: i64,
    line: &ResultLine,
    now: &str,
    counts: &mut Harvest,
) -> Result<bool, StoreError> {
    match line_outcome(line) {
        LineOutcome::Requeue(message) => {
            let requeued =
                outcome::requeue_submitted(conn, batch_id, item_id, &message, now).await?;
            counts.requeued += u64::from(requeued);
            Ok(requeued)
        }
        LineOutcome::Fail {
            status_code,
            response,
            message,
        } => {
            let item = ItemOutcome {
                state: ItemState::Failed,
                status_code,
                response,
                error: Some(&message),
                usage: Usage::default(),
                model_used: None,
            };
            let failed = outcome::finish_submitted(conn, batch_id, item_id, &item, now).await?;
            counts.failed += u64::from(failed);
            Ok(failed)
        }
    }
}

/// Gives up on a batch that could not be created: its items go back to the queue with one
/// more attempt (or fail once attempts are used up) and the batch is closed with the reason.
pub async fn abandon_batch(
    store: &Store,
    batch_id: i64,
    reason: &str,
    max_attempts: u32,
) -> Result<(u64, u64), StoreError> {
    let now = timestamp(Utc::now());
    let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    // Items of a batch that never reached the provider are still `packed`. They are settled
    // the same way as items without a result line in a finished job.
    sqlx::query(
        "UPDATE work_items SET state = 'submitted' WHERE batch_id = ?1 AND state = 'packed'",
    )
    .bind(batch_id)
    .execute(&mut *tx)
    .await?;
    let settled = outcome::settle_missing(&mut tx, batch_id, max_attempts, reason, &now).await?;
    sqlx::query(
        "UPDATE batches SET state = 'harvested', error = ?2, finished_at = ?3, provider_status = COALESCE(provider_status, 'NOT_CREATED')
         WHERE id = ?1",
    )
    .bind(batch_id)
    .bind(reason)
    .bind(&now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(settled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BatchState, FileTotals, NewBatch, NewFile, NewItem};

    /// Stores `count` chat items of one file and submits them as one batch job. Returns the
    /// store, the batch's id and the items' ids.
    async fn submitted_batch(dir: &tempfile::TempDir, count: u64) -> (Store, i64, Vec<i64>) {
        let store = Store::open(&dir.path().join("batchd.db")).await.unwrap();
        let file = NewFile {
            name: "f.jsonl".into(),
            sha256: "f".into(),
            urgent: false,
        };

        let mut ingest = store.begin_file(&file).await.unwrap();
        let items = (1..=count)
            .map(|n| NewItem {
                line_no: n,
                custom_id: format!("c{n}"),
                endpoint: "/v1/chat/completions".into(),
                model: "m".into(),
                body: "{}".into(),
                urgent: false,
                deadline: None,
                error: None,
            })
            .collect();
        ingest.insert(items).await.unwrap();
        let totals = FileTotals {
            lines: count,
            items: count,
            errors: 0,
            report: "{}",
        };
        ingest.commit(totals).await.unwrap();
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM work_items ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap();

        let batch = NewBatch {
            endpoint: "/v1/chat/completions".into(),
            model: "m".into(),
            item_ids: ids.clone(),
            bytes: 0,
        };
        let batch = store.pack_batch(&batch).await.unwrap().unwrap();
        store
            .set_batch_state(batch.id, BatchState::Packed, BatchState::Creating)
            .await
            .unwrap();
        store
            .record_created(batch.id, "job-1", "VALIDATING", Utc::now())
            .await
            .unwrap();
        (store, batch.id, ids)
    }

    fn completed() -> BatchJob {
        serde_json::from_value(serde_json::json!({"id": "job-1", "status": "COMPLETED"})).unwrap()
    }

    fn success(item_id: i64) -> String {
        format!(
            r#"{{"custom_id":"{}","response":{{"status_code":200,"body":{{"choices":[]}}}}}}"#,
            line_id(item_id)
        )
    }

    fn server_error(item_id: i64) -> String {
        format!(
            r#"{{"custom_id":"{}","response":{{"status_code":500,"body":{{"error":"busy"}}}}}}"#,
            line_id(item_id)
        )
    }

    async fn states(store: &Store) -> Vec<(String, i64)> {
        sqlx::query_as("SELECT state, attempts FROM work_items ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap()
    }

    /// Harvests a completed job with these output and error files.
    async fn harvest_files(store: &Store, batch_id: i64, output: &str, errors: &str) -> Harvest {
        let (output, _) = parse_result_file(output.as_bytes());
        let (errors, _) = parse_result_file(errors.as_bytes());
        harvest(store, batch_id, &completed(), &output, &errors, 3, None)
            .await
            .unwrap()
    }

    /// Returns the counts in the order succeeded, requeued, failed, ignored.
    fn tally(counts: &Harvest) -> (u64, u64, u64, u64) {
        (
            counts.succeeded,
            counts.requeued,
            counts.failed,
            counts.ignored,
        )
    }

    #[tokio::test]
    async fn harvest_settles_every_answered_item() {
        let dir = tempfile::tempdir().unwrap();
        let (store, batch_id, ids) = submitted_batch(&dir, 3).await;
        let output = [success(ids[0]), server_error(ids[1])].join("\n");
        let errors = format!(
            r#"{{"custom_id":"{}","error":{{"message":"bad request","code":"invalid_request"}}}}"#,
            line_id(ids[2])
        );

        let counts = harvest_files(&store, batch_id, &output, &errors).await;

        assert_eq!(tally(&counts), (1, 1, 1, 0));
        assert_eq!(
            states(&store).await,
            [
                ("succeeded".to_string(), 1),
                ("queued".to_string(), 1),
                ("failed".to_string(), 1)
            ]
        );
    }

    #[tokio::test]
    async fn harvest_ignores_late_line_requeues_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, batch_id, ids) = submitted_batch(&dir, 3).await;
        // The second item left the job before its result came, as a cancel does.
        sqlx::query("UPDATE work_items SET state = 'failed' WHERE id = ?1")
            .bind(ids[1])
            .execute(store.pool())
            .await
            .unwrap();
        let output = [success(ids[0]), server_error(ids[1])].join("\n");

        let counts = harvest_files(&store, batch_id, &output, "").await;

        // The third item had no line, so it goes back to the queue with one more attempt.
        assert_eq!(tally(&counts), (1, 1, 0, 1));
        assert_eq!(
            states(&store).await,
            [
                ("succeeded".to_string(), 1),
                ("failed".to_string(), 0),
                ("queued".to_string(), 1)
            ]
        );
    }

    #[test]
    fn blamed_item_by_custom_id() {
        let ids = [40, 41, 42];
        assert_eq!(
            blamed_item(
                r#"line 3 (custom_id "bd-42"): max_tokens must be positive"#,
                &ids
            ),
            Some(42)
        );
    }

    #[test]
    fn blamed_item_by_line_number() {
        let ids = [40, 41, 42];
        assert_eq!(blamed_item("Line 2: body is not an object", &ids), Some(41));
        assert_eq!(blamed_item("line 9: out of range", &ids), None);
    }

    #[test]
    fn capacity_error_blames_no_item() {
        assert_eq!(
            blamed_item("The model is at capacity, please try again later", &[1, 2]),
            None
        );
    }

    #[test]
    fn line_ids_round_trip() {
        assert_eq!(line_id(42), "bd-42");
        assert_eq!(item_id_of("bd-42"), Some(42));
        assert_eq!(item_id_of("user-42"), None);
        assert_eq!(item_id_of("bd-x"), None);
    }

    #[test]
    fn result_file_skips_blank_and_counts_bad_lines() {
        let (lines, bad) = parse_result_file(b"{\"custom_id\":\"bd-1\",\"response\":{\"status_code\":200,\"body\":{}}}\n\nnot json\n");
        assert_eq!(lines.len(), 1);
        assert_eq!(bad, 1);
    }
}
