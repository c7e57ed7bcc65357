//! Ingesting one complete input file: hash it, skip it if its content was stored before, insert
//! its good lines as work items in one transaction, write the report, and move it out of the
//! inbox only after the commit.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use tokio::io::{AsyncBufRead, AsyncReadExt};

use super::IngestError;
use super::lines::{Line, LineReader, is_gzip, open_input};
use super::parse::parse_line;
use crate::config::PathsConfig;
use crate::models::{Catalogue, ModelCheck};
use crate::store::{Added, NewFile, NewItem, SeenIds, Store};

/// At most this many line errors are listed in a report; the count covers them all.
const MAX_REPORTED_ERRORS: usize = 1000;

/// One rejected line.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LineError {
    pub line: u64,
    pub reason: String,
    /// `path:line: reason`, as logged.
    pub message: String,
}

/// The `<name>.report.json` written beside every file that leaves the inbox.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub file: String,
    pub sha256: String,
    /// `processed`, `duplicate` or `rejected`.
    pub disposition: String,
    pub urgent: bool,
    /// Non-blank lines read.
    pub lines: u64,
    pub items: u64,
    /// Items stored already failed, such as those naming a model the provider does not serve.
    pub items_failed: u64,
    pub error_count: u64,
    pub errors: Vec<LineError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
    /// The reason the whole file was rejected, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Report {
    fn empty(file: String, sha256: String, disposition: &str, urgent: bool) -> Report {
        Report {
            file,
            sha256,
            disposition: disposition.to_string(),
            urgent,
            lines: 0,
            items: 0,
            items_failed: 0,
            error_count: 0,
            errors: Vec::new(),
            duplicate_of: None,
            reason: None,
        }
    }

    fn rejected_file(file: String, sha256: String, urgent: bool, reason: String) -> Report {
        let mut report = Report::empty(file, sha256, "rejected", urgent);
        report.reason = Some(reason);
        report
    }
}

/// Limits and policy applied to each input file.
#[derive(Debug, Clone, Copy)]
pub struct FileLimits {
    pub max_line_bytes: usize,
    pub max_file_bytes: u64,
    /// Reject the whole file when any line is bad, instead of ingesting the good lines.
    pub reject_file_on_error: bool,
}

/// Returns why a file is too large to read, if it is.
async fn too_big(path: &Path, max_file_bytes: u64) -> Result<Option<String>, IngestError> {
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| IngestError::io("read metadata of", path, e))?
        .len();
    Ok((size > max_file_bytes).then(|| {
        format!("file is {size} bytes, more than the maximum of {max_file_bytes} (`ingest.max_file_bytes`): split it into smaller files")
    }))
}

/// Returns why a checked file must be rejected as a whole, if it must.
fn rejection(report: &Report, reject_file_on_error: bool) -> Option<String> {
    if report.lines == 0 {
        return Some("file has no request lines: it is empty or blank".to_string());
    }
    if report.items == 0 {
        return Some(format!(
            "none of the file's {} lines is a valid request",
            report.lines
        ));
    }
    if reject_file_on_error && report.error_count > 0 {
        return Some(format!(
            "{} of {} lines are invalid and `ingest.reject_file_on_error` is set: fix them and drop the file again",
            report.error_count, report.lines
        ));
    }
    None
}

/// Checks the lines of one file in order, building its report and the items of its good lines.
/// Repeated `custom_id`s are found by the caller, which keeps the ids on disk, and reported
/// through [`LineChecker::stored`] or [`LineChecker::repeated`].
pub struct LineChecker<'a> {
    path: &'a Path,
    urgent: bool,
    max_line_bytes: usize,
    catalogue: Option<&'a Catalogue>,
    report: Report,
}

impl<'a> LineChecker<'a> {
    pub fn new(
        path: &'a Path,
        name: String,
        sha256: String,
        urgent: bool,
        max_line_bytes: usize,
        catalogue: Option<&'a Catalogue>,
    ) -> Self {
        LineChecker {
            path,
            urgent,
            max_line_bytes,
            catalogue,
            report: Report::empty(name, sha256, "processed", urgent),
        }
    }

    /// Checks one line. Returns the item of a good line, to be passed to
    /// [`LineChecker::stored`] once stored. A bad line is recorded in the report and logged.
    /// Blank lines are skipped.
    pub fn check(&mut self, line: &Line<'_>) -> Option<NewItem> {
        if line.bytes.iter().all(u8::is_ascii_whitespace) && !line.too_long {
            return None;
        }
        self.report.lines += 1;
        let checked = if line.too_long {
            Err(format!(
                "line is longer than the maximum of {} bytes (`ingest.max_line_bytes`)",
                self.max_line_bytes
            ))
        } else {
            parse_line(line.bytes)
        };
        let parsed = match checked {
            Ok(parsed) => parsed,
            Err(reason) => {
                self.record_error(line.number, reason);
                return None;
            }
        };
        let error = match self.catalogue.map(|c| c.check(&parsed.model)) {
            Some(ModelCheck::Unknown(message)) => Some(message),
            _ => None,
        };
        Some(NewItem {
            line_no: line.number,
            custom_id: parsed.custom_id,
            endpoint: parsed.endpoint,
            model: parsed.model,
            body: parsed.body,
            urgent: self.urgent || parsed.urgent,
            deadline: parsed.deadline,
            error,
        })
    }

    /// Counts an item that was stored.
    pub fn accepted(&mut self, item: &NewItem) {
        self.report.items += 1;
        if item.error.is_some() {
            self.report.items_failed += 1;
        }
    }

    /// Counts items as stored or reports them as repeats, as the store returned them.
    pub fn stored(&mut self, items: &[(NewItem, Added)]) {
        for (item, added) in items {
            match added {
                Added::New => self.accepted(item),
                Added::Repeat { first_line } => self.repeated(item, *first_line),
            }
        }
    }

    /// Records an item whose `custom_id` an earlier line of the file already had.
    pub fn repeated(&mut self, item: &NewItem, first_line: u64) {
        let reason = format!(
            "\"custom_id\" {:?} repeats the one on line {first_line}: ids must be unique within a file",
            item.custom_id
        );
        self.record_error(item.line_no, reason);
    }

    fn record_error(&mut self, line: u64, reason: String) {
        let message = format!("{}:{line}: {reason}", self.path.display());
        if self.report.error_count < 20 {
            tracing::warn!(target: "batchd::ingest", "{message}");
        }
        self.report.error_count += 1;
        if self.report.errors.len() < MAX_REPORTED_ERRORS {
            self.report.errors.push(LineError {
                line,
                reason,
                message,
            });
        }
    }

    pub fn into_report(mut self) -> Report {
        // Repeats are found when their group is inserted, after later lines were checked.
        self.report.errors.sort_by_key(|error| error.line);
        self.report
    }
}

/// The lines of an input file, with the checks that end reading early.
struct InputLines<'p> {
    path: &'p Path,
    lines: LineReader<Box<dyn AsyncBufRead + Unpin + Send>>,
    max_file_bytes: u64,
}

/// The reason reading a file stopped before its end.
enum Stop {
    /// The file must be rejected for this reason.
    Reject(String),
    /// Reading failed; the file is tried again at a later scan.
    Failed(IngestError),
}

impl<'p> InputLines<'p> {
    async fn open(path: &'p Path, limits: &FileLimits) -> Result<Self, IngestError> {
        let reader = open_input(path)
            .await
            .map_err(|e| IngestError::io("open", path, e))?;
        Ok(InputLines {
            path,
            lines: LineReader::new(reader, limits.max_line_bytes),
            max_file_bytes: limits.max_file_bytes,
        })
    }

    async fn next(&mut self) -> Result<Option<Line<'_>>, Stop> {
        // Checked before each read, so a compressed file that expands past the limit is
        // stopped within one line of it.
        if self.lines.bytes_read() > self.max_file_bytes {
            return Err(Stop::Reject(format!(
                "decompressed content is more than the maximum of {} bytes (`ingest.max_file_bytes`): split it into smaller files",
                self.max_file_bytes
            )));
        }
        match self.lines.next_line().await {
            Ok(line) => Ok(line),
            Err(e)
                if is_gzip(self.path)
                    && matches!(e.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof) =>
            {
                Err(Stop::Reject(format!(
                    "file is not valid gzip ({e}): compress it again with gzip, or drop it uncompressed as .jsonl"
                )))
            }
            Err(e) => Err(Stop::Failed(IngestError::io("read", self.path, e))),
        }
    }

    /// Returns the SHA-256 of the file as stored, which names its content for duplicate checks.
    async fn sha256(&mut self) -> Result<String, IngestError> {
        if is_gzip(self.path) {
            hash_file(self.path).await
        } else {
            Ok(self.lines.sha256())
        }
    }
}

/// Checks a file without storing anything, as `batchd check` does. Applies the same line
/// checks and file policy as ingest, without the model catalogue.
pub async fn check_file(path: &Path, limits: &FileLimits) -> Result<Report, IngestError> {
    let name = file_name(path);
    if let Some(reason) = too_big(path, limits.max_file_bytes).await? {
        return Ok(Report::rejected_file(name, String::new(), false, reason));
    }
    let mut input = InputLines::open(path, limits).await?;
    let mut checker = LineChecker::new(
        path,
        name.clone(),
        String::new(),
        false,
        limits.max_line_bytes,
        None,
    );
    let mut seen = SeenIds::open().await?;
    loop {
        let line = match input.next().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(Stop::Reject(reason)) => {
                return Ok(Report::rejected_file(name, String::new(), false, reason));
            }
            Err(Stop::Failed(error)) => return Err(error),
        };
        if let Some(item) = checker.check(&line) {
            match seen.first_line(&item.custom_id, item.line_no).await? {
                None => checker.accepted(&item),
                Some(first_line) => checker.repeated(&item, first_line),
            }
        }
    }
    seen.close().await?;
    let mut report = checker.into_report();
    report.sha256 = input.sha256().await?;
    if let Some(reason) = rejection(&report, limits.reject_file_on_error) {
        report.disposition = "rejected".into();
        report.reason = Some(reason);
    }
    Ok(report)
}

/// The outcome of ingesting a file: its report and where it was moved.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub report: Report,
    pub moved_to: PathBuf,
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Returns the hex SHA-256 of a file's bytes as stored, read in chunks.
async fn hash_file(path: &Path) -> Result<String, IngestError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| IngestError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut chunk)
            .await
            .map_err(|e| IngestError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Ingests one file that is complete and sits in the inbox (or its `urgent/` folder).
pub async fn ingest_file(
    store: &Store,
    path: &Path,
    urgent: bool,
    paths: &PathsConfig,
    limits: &FileLimits,
    catalogue: Option<&Catalogue>,
) -> Result<Ingested, IngestError> {
    let name = file_name(path);
    let sha256 = hash_file(path).await?;

    if let Some(existing) = store.file_by_hash(&sha256).await? {
        if existing.disposition == "pending" {
            // Stored by an earlier run that stopped before moving the file: finish the move.
            let report: Report = serde_json::from_str(&existing.report)?;
            let moved_to = move_with_report(path, &paths.processed, &report).await?;
            store
                .mark_file_moved(existing.id, "processed", &moved_to.display().to_string())
                .await?;
            return Ok(Ingested { report, moved_to });
        }
        let mut report = Report::empty(name, sha256, "duplicate", urgent);
        report.duplicate_of = Some(existing.name);
        let moved_to = move_with_report(path, &paths.processed, &report).await?;
        return Ok(Ingested { report, moved_to });
    }

    if let Some(reason) = too_big(path, limits.max_file_bytes).await? {
        return reject(
            path,
            paths,
            Report::rejected_file(name, sha256, urgent, reason),
        )
        .await;
    }

    let mut ingest = store
        .begin_file(&NewFile {
            name: name.clone(),
            sha256: sha256.clone(),
            urgent,
        })
        .await?;
    let mut input = InputLines::open(path, limits).await?;
    let mut checker = LineChecker::new(
        path,
        name.clone(),
        sha256.clone(),
        urgent,
        limits.max_line_bytes,
        catalogue,
    );
    loop {
        let line = match input.next().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(Stop::Reject(reason)) => {
                drop(ingest); // rolls back the file row and its items
                let report = Report::rejected_file(name, sha256, urgent, reason);
                return reject(path, paths, report).await;
            }
            Err(Stop::Failed(error)) => return Err(error),
        };
        if let Some(item) = checker.check(&line) {
            let stored = ingest.add(item).await?;
            checker.stored(&stored);
            crate::fault::point("mid-ingest");
            crate::watchdog::progress();
        }
    }
    let stored = ingest.flush().await?;
    checker.stored(&stored);
    let mut report = checker.into_report();
    if input.sha256().await? != sha256 {
        // The file changed while it was read: it was not complete after all.
        return Err(IngestError::Changed {
            path: path.to_path_buf(),
        });
    }

    if let Some(reason) = rejection(&report, limits.reject_file_on_error) {
        drop(ingest); // rolls back the file row and its items
        report.disposition = "rejected".into();
        report.items = 0;
        report.items_failed = 0;
        report.reason = Some(reason);
        return reject(path, paths, report).await;
    }
    let report_json = serde_json::to_string_pretty(&report)?;
    let file_id = ingest
        .commit(report.lines, report.items, report.error_count, &report_json)
        .await?;
    let moved_to = move_with_report(path, &paths.processed, &report).await?;
    store
        .mark_file_moved(file_id, "processed", &moved_to.display().to_string())
        .await?;
    Ok(Ingested { report, moved_to })
}

/// Moves a rejected file to `rejected/` with its report.
async fn reject(path: &Path, paths: &PathsConfig, report: Report) -> Result<Ingested, IngestError> {
    let moved_to = move_with_report(path, &paths.rejected, &report).await?;
    Ok(Ingested { report, moved_to })
}

/// Moves a file into `dir` under a name no other file there has, and writes its report
/// beside it. The report is written first, so a file in `dir` always has one.
async fn move_with_report(
    path: &Path,
    dir: &Path,
    report: &Report,
) -> Result<PathBuf, IngestError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| IngestError::io("create directory", dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let target = unique_target(dir, &name).await;
    let report_path = PathBuf::from(format!("{}.report.json", target.display()));
    let json = serde_json::to_vec_pretty(report)?;
    write_atomically(&report_path, &json).await?;
    tokio::fs::rename(path, &target)
        .await
        .map_err(|e| IngestError::io("move", path, e))?;
    Ok(target)
}

/// Returns `dir/name`, or `dir/name-N.jsonl` (`-N.jsonl.gz`) for the first N free, so nothing
/// is overwritten.
async fn unique_target(dir: &Path, name: &str) -> PathBuf {
    let candidate = dir.join(name);
    if !tokio::fs::try_exists(&candidate).await.unwrap_or(false) {
        return candidate;
    }
    let (stem, ext) = match name.find(".jsonl") {
        Some(at) => name.split_at(at),
        None => (name, ""),
    };
    for n in 1.. {
        let candidate = dir.join(format!("{stem}-{n}{ext}"));
        if !tokio::fs::try_exists(&candidate).await.unwrap_or(false) {
            return candidate;
        }
    }
    unreachable!("an unbounded counter always finds a free name")
}

/// Writes a file through a temporary name and a rename, so readers never see half of it.
pub async fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), IngestError> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(|e| IngestError::io("write", &tmp, e))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| IngestError::io("rename", &tmp, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str) -> String {
        format!(r#"{{"custom_id": "{id}", "body": {{"model": "m", "input": "text {id}"}}}}"#)
    }

    #[tokio::test]
    async fn repeats_are_found_within_and_across_insert_groups() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PathsConfig {
            inbox: dir.path().join("inbox"),
            database: dir.path().join("batchd.db"),
            processed: dir.path().join("processed"),
            rejected: dir.path().join("rejected"),
            outbox: dir.path().join("outbox"),
        };
        std::fs::create_dir_all(&paths.inbox).unwrap();
        // Line 300 repeats line 5 from an earlier group; line 420 repeats line 410 of its own.
        let lines: Vec<String> = (1..=450)
            .map(|n| match n {
                300 => line("id-5"),
                420 => line("id-410"),
                n => line(&format!("id-{n}")),
            })
            .collect();
        let path = paths.inbox.join("many.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let store = Store::open(&paths.database).await.unwrap();
        let limits = FileLimits {
            max_line_bytes: 1000,
            max_file_bytes: 1 << 20,
            reject_file_on_error: false,
        };

        let done = ingest_file(&store, &path, false, &paths, &limits, None)
            .await
            .unwrap();

        let report = done.report;
        assert_eq!(report.items, 448);
        let errors: Vec<(u64, &str)> = report
            .errors
            .iter()
            .map(|e| (e.line, e.reason.as_str()))
            .collect();
        assert_eq!(
            errors,
            [
                (
                    300,
                    "\"custom_id\" \"id-5\" repeats the one on line 5: ids must be unique within a file"
                ),
                (
                    420,
                    "\"custom_id\" \"id-410\" repeats the one on line 410: ids must be unique within a file"
                ),
            ]
        );
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM work_items")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(stored, 448);
    }
}
