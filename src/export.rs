//! Result exports: once every item of an input file is succeeded or failed, its results are
//! written to `<paths.outbox>/<name>.results.jsonl`, one line per item in input line order.
//! Lines have the format of the provider's batch output files, keyed by the user's `custom_id`:
//!
//! ```text
//! {"custom_id": "q-1", "response": {"status_code": 200, "body": {...}}, "error": null}
//! {"custom_id": "q-2", "response": null, "error": {"message": "...", "code": null}}
//! ```
//!
//! A failed item that got an HTTP response (a 4xx, for example) keeps it under `response` beside its
//! `error`. `code` is always null: batchd stores the provider's error code at the start of the
//! message (`invalid_model: ...`), not apart from it.
//!
//! Each file is exported once. The export path is committed before the file is written, the
//! content goes to a temporary file in the outbox that is synced and renamed into place, and
//! only then is `exported_at` set. A crash before that leaves the file unexported, and the next
//! start writes the same path again, overwriting any temporary file. Rows are streamed from
//! SQLite, so memory does not grow with the size of the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::TryStreamExt;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio_util::sync::CancellationToken;

use crate::store::{ExportCandidate, ExportRow, ItemState, Store, StoreError};
use crate::wake::Listener;

/// The suffix of every export file name.
pub const EXPORT_SUFFIX: &str = ".results.jsonl";

/// Shortest time between two checks for complete files, so that a burst of stored results
/// costs one check rather than one per result.
const MIN_CHECK_GAP: Duration = Duration::from_secs(1);

/// Time between checks when no wake-up came, in case a change was not signalled.
const FALLBACK_CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write results: {0}")]
    Write(std::io::Error),
    #[error(
        "failed to export {name}: every free name up to {path} is taken in the outbox; move old exports out of it"
    )]
    NoFreeName { name: String, path: PathBuf },
}

impl ExportError {
    fn io(action: &'static str, path: &Path, source: std::io::Error) -> ExportError {
        ExportError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One export line. Fields serialize in the order of the provider's output lines, and absent
/// parts as `null`.
#[derive(Debug, Serialize)]
pub struct ExportLine<'a> {
    pub custom_id: &'a str,
    pub response: Option<ExportResponse>,
    pub error: Option<ExportLineError<'a>>,
}

/// The HTTP response stored for an item.
#[derive(Debug, Serialize)]
pub struct ExportResponse {
    pub status_code: u16,
    pub body: Box<RawValue>,
}

/// The reason an item failed.
#[derive(Debug, Serialize)]
pub struct ExportLineError<'a> {
    pub message: &'a str,
    pub code: Option<&'a str>,
}

/// Builds the export line of one item, in the provider's batch output line format.
pub fn export_line(row: &ExportRow) -> ExportLine<'_> {
    let body = row.response.as_deref().map(|text| {
        // Stored responses are JSON the provider sent, written out as they are. Anything else
        // is kept as a string.
        RawValue::from_string(text.to_string()).unwrap_or_else(|_| {
            let quoted = serde_json::to_string(text).expect("strings serialize");
            RawValue::from_string(quoted).expect("a JSON string is valid JSON")
        })
    });
    let response = match (row.status_code, body) {
        (Some(status_code), Some(body)) => Some(ExportResponse { status_code, body }),
        _ => None,
    };
    let error = match row.state {
        ItemState::Succeeded => None,
        _ => Some(ExportLineError {
            message: row.error.as_deref().unwrap_or("failed without a message"),
            code: None,
        }),
    };
    ExportLine {
        custom_id: &row.custom_id,
        response,
        error,
    }
}

/// Writes the export lines of a file's finished items to `out`, in line order, and calls
/// `progress` with the number of lines written after every 10,000. Unfinished items are
/// skipped. Returns (lines written, items skipped).
pub async fn write_results<W: AsyncWrite + Unpin>(
    store: &Store,
    file_id: i64,
    out: &mut W,
    mut progress: impl FnMut(u64),
) -> Result<(u64, u64), ExportError> {
    let mut rows = std::pin::pin!(store.export_rows(file_id));
    let mut written = 0;
    let mut skipped = 0;
    let mut line = Vec::new();
    while let Some(row) = rows.try_next().await? {
        if !row.state.is_terminal() {
            skipped += 1;
            continue;
        }
        line.clear();
        serde_json::to_writer(&mut line, &export_line(&row)).expect("export lines serialize");
        line.push(b'\n');
        out.write_all(&line).await.map_err(ExportError::Write)?;
        crate::watchdog::progress();
        written += 1;
        if written % 10_000 == 0 {
            progress(written);
        }
    }
    Ok((written, skipped))
}

/// Returns the base of an export name: the file's name without `.jsonl` or `.jsonl.gz`.
fn base_name(name: &str) -> &str {
    name.strip_suffix(".jsonl.gz")
        .or_else(|| name.strip_suffix(".jsonl"))
        .unwrap_or(name)
}

/// The exporter stage.
pub struct Exporter {
    store: Store,
    outbox: PathBuf,
}

impl Exporter {
    pub fn new(store: Store, outbox: PathBuf) -> Exporter {
        Exporter { store, outbox }
    }

    /// Exports every complete input file that has no export yet. Returns how many were written.
    /// A file that fails is logged and tried again at the next check.
    pub async fn export_once(&self) -> Result<u64, StoreError> {
        let mut exported = 0;
        for candidate in self.store.files_to_export().await? {
            match self.export_file(&candidate).await {
                Ok((path, lines)) => {
                    exported += 1;
                    tracing::info!(
                        file = %candidate.name,
                        export = %path.display(),
                        lines,
                        "results exported"
                    );
                }
                Err(ExportError::Store(error)) => return Err(error),
                Err(error) => {
                    tracing::error!(file = %candidate.name, %error, "failed to export results; retrying at the next check");
                }
            }
        }
        Ok(exported)
    }

    /// Writes one file's export and records it. Returns the path and the number of lines.
    async fn export_file(
        &self,
        candidate: &ExportCandidate,
    ) -> Result<(PathBuf, u64), ExportError> {
        tokio::fs::create_dir_all(&self.outbox)
            .await
            .map_err(|e| ExportError::io("create directory", &self.outbox, e))?;
        let path = match &candidate.export_path {
            Some(path) => PathBuf::from(path),
            None => self.claim_path(candidate).await?,
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = path.with_file_name(format!(".{file_name}.tmp"));

        let file = tokio::fs::File::create(&temp)
            .await
            .map_err(|e| ExportError::io("create", &temp, e))?;
        let mut out = BufWriter::new(file);
        let (lines, _) = write_results(&self.store, candidate.file_id, &mut out, |_| {})
            .await
            .map_err(|error| match error {
                ExportError::Write(source) => ExportError::io("write", &temp, source),
                error => error,
            })?;
        out.flush()
            .await
            .map_err(|e| ExportError::io("write", &temp, e))?;
        out.get_ref()
            .sync_all()
            .await
            .map_err(|e| ExportError::io("sync", &temp, e))?;
        drop(out);

        crate::fault::point("before-export-rename");
        tokio::fs::rename(&temp, &path)
            .await
            .map_err(|e| ExportError::io("rename into place", &path, e))?;
        // The rename is durable only once the directory entry is synced.
        let dir = self.outbox.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
            .await
            .expect("syncing a directory does not panic")
            .map_err(|e| ExportError::io("sync", &self.outbox, e))?;
        crate::fault::point("after-export-rename");

        self.store.mark_exported(candidate.file_id).await?;
        Ok((path, lines))
    }

    /// Chooses a free export path and commits it for the file. The name comes from the file's
    /// name in `processed/`, which is unique there. A suffix is added when the name is taken in
    /// the outbox or by another file's export, so no export is overwritten.
    async fn claim_path(&self, candidate: &ExportCandidate) -> Result<PathBuf, ExportError> {
        let base = base_name(candidate.stored_name.as_deref().unwrap_or(&candidate.name));
        let mut last = PathBuf::new();
        for n in 0..1000 {
            let name = match n {
                0 => format!("{base}{EXPORT_SUFFIX}"),
                n => format!("{base}-{n}{EXPORT_SUFFIX}"),
            };
            last = self.outbox.join(name);
            let exists = tokio::fs::try_exists(&last)
                .await
                .map_err(|e| ExportError::io("check", &last, e))?;
            if exists {
                continue;
            }
            let text = last.display().to_string();
            if self
                .store
                .claim_export_path(candidate.file_id, &text)
                .await?
            {
                return Ok(last);
            }
        }
        Err(ExportError::NoFreeName {
            name: candidate.name.clone(),
            path: last,
        })
    }

    /// Runs until cancelled: checks at start, after each wake-up from `stored`, and every few
    /// seconds.
    pub async fn run(self, mut stored: Listener, cancel: CancellationToken) {
        loop {
            let exported = {
                let _busy = crate::watchdog::busy();
                self.export_once().await
            };
            if let Err(error) = exported {
                tracing::warn!(%error, "checking for complete input files failed; retrying");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = stored.wait() => {}
                _ = tokio::time::sleep(FALLBACK_CHECK_INTERVAL) => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(MIN_CHECK_GAP) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn line_of(row: &ExportRow) -> Value {
        serde_json::to_value(export_line(row)).unwrap()
    }

    #[test]
    fn line_fields_follow_provider_order() {
        let row = row(ItemState::Succeeded, Some(200), Some("{}"), None);
        let text = serde_json::to_string(&export_line(&row)).unwrap();
        assert_eq!(
            text,
            r#"{"custom_id":"q-1","response":{"status_code":200,"body":{}},"error":null}"#
        );
    }

    fn row(
        state: ItemState,
        status: Option<u16>,
        response: Option<&str>,
        error: Option<&str>,
    ) -> ExportRow {
        ExportRow {
            line_no: 1,
            custom_id: "q-1".to_string(),
            state,
            status_code: status,
            response: response.map(str::to_string),
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn succeeded_item_has_response_and_null_error() {
        let line = line_of(&row(
            ItemState::Succeeded,
            Some(200),
            Some(r#"{"id":"x"}"#),
            None,
        ));
        assert_eq!(
            line,
            json!({"custom_id": "q-1", "response": {"status_code": 200, "body": {"id": "x"}}, "error": null})
        );
    }

    #[test]
    fn failed_item_without_answer_has_null_response() {
        let line = line_of(&row(
            ItemState::Failed,
            None,
            None,
            Some("cancelled by the operator"),
        ));
        assert_eq!(
            line,
            json!({"custom_id": "q-1", "response": null, "error": {"message": "cancelled by the operator", "code": null}})
        );
    }

    #[test]
    fn failed_item_keeps_its_http_answer() {
        let line = line_of(&row(
            ItemState::Failed,
            Some(400),
            Some(r#"{"error":"bad"}"#),
            Some("provider returned HTTP 400"),
        ));
        assert_eq!(line["response"]["status_code"], 400);
        assert_eq!(line["response"]["body"]["error"], "bad");
        assert_eq!(line["error"]["message"], "provider returned HTTP 400");
    }

    #[test]
    fn base_name_drops_jsonl_extensions() {
        assert_eq!(base_name("evals.jsonl"), "evals");
        assert_eq!(base_name("evals-1.jsonl.gz"), "evals-1");
        assert_eq!(base_name("notes"), "notes");
    }
}
