//! Ingesting one complete input file. Its good lines become work items while it is hashed, and
//! the transaction rolls back if the hash shows content stored before. The report is written,
//! and the file leaves the inbox only after the last commit. A large file is committed in parts;
//! a restart reads on after the last part.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::IngestError;
use super::hash::{ContentHash, hash_file};
use super::read::{Checked, CheckedLines, GROUP_ROWS, ReadPlan, Stop};
use crate::config::PathsConfig;
use crate::models::Catalogue;
use crate::store::{
    Added, BoundItems, FileIngest, FileTotals, ItemBinder, NewFile, NewItem, SeenIds, Store,
};
use crate::wake::Signal;

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
    /// Commit a file in parts of about this many lines; 0 commits each file at once. Files that
    /// `reject_file_on_error` may reject are committed at once, since a committed part may
    /// already have been sent.
    pub commit_lines: u64,
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

/// Builds the report of one file from its checked groups and from what the store did with
/// their items. Repeated `custom_id`s are found by the caller, which keeps the ids on disk, and
/// reported through [`ReportBuilder::stored`] or [`ReportBuilder::repeated`].
pub struct ReportBuilder<'a> {
    path: &'a Path,
    report: Report,
}

impl<'a> ReportBuilder<'a> {
    pub fn new(path: &'a Path, report: Report) -> Self {
        ReportBuilder { path, report }
    }

    /// Counts a group's lines and records its bad ones. Returns the items of its good ones.
    pub fn read(&mut self, group: Checked) -> Vec<NewItem> {
        self.report.lines += group.lines;
        for (line, reason) in group.errors {
            self.record_error(line, reason);
        }
        group.items
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

    /// Returns the report so far, as [`ReportBuilder::into_report`] would.
    pub fn snapshot(&self) -> Report {
        let mut report = self.report.clone();
        report.errors.sort_by_key(|error| error.line);
        report
    }

    pub fn into_report(mut self) -> Report {
        // Repeats are found when their group is inserted, after later lines were checked.
        self.report.errors.sort_by_key(|error| error.line);
        self.report
    }
}

/// Checks a file without storing anything, as `batchd check` does. Applies the same line
/// checks and file policy as ingest, without the model catalogue.
pub async fn check_file(path: &Path, limits: &FileLimits) -> Result<Report, IngestError> {
    let name = file_name(path);
    if let Some(reason) = too_big(path, limits.max_file_bytes).await? {
        return Ok(Report::rejected_file(name, String::new(), false, reason));
    }
    let mut lines = CheckedLines::start(ReadPlan {
        path: path.to_path_buf(),
        urgent: false,
        limits: *limits,
        catalogue: None,
        skip_through: 0,
        group_lines: GROUP_ROWS,
    });
    let mut builder = ReportBuilder::new(
        path,
        Report::empty(name.clone(), String::new(), "processed", false),
    );
    let mut seen = SeenIds::open().await?;
    while let Some(group) = lines.next().await {
        for item in &builder.read(group) {
            match seen.first_line(&item.custom_id, item.line_no).await? {
                None => builder.accepted(item),
                Some(first_line) => builder.repeated(item, first_line),
            }
        }
    }
    seen.close().await?;
    let sha256 = match lines.finish().await {
        Ok(sha256) => sha256,
        Err(Stop::Reject(reason)) => {
            return Ok(Report::rejected_file(name, String::new(), false, reason));
        }
        Err(Stop::Failed(error)) => return Err(error),
    };
    let mut report = builder.into_report();
    report.sha256 = sha256;
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

/// Ingests one file that is complete and sits in the inbox (or its `urgent/` folder).
/// `queued`, if given, is raised after each committed part that stored items.
pub async fn ingest_file(
    store: &Store,
    path: &Path,
    urgent: bool,
    paths: &PathsConfig,
    limits: &FileLimits,
    catalogue: Option<&Catalogue>,
    queued: Option<&Signal>,
) -> Result<Ingested, IngestError> {
    let name = file_name(path);
    let file = Ingest {
        store,
        path,
        name: &name,
        urgent,
        paths,
        limits,
        catalogue,
        queued,
    };
    if too_big(path, limits.max_file_bytes).await?.is_none() {
        // The file is read while it is hashed, and nothing of it is committed before the hash
        // shows whether its content was stored before. Usually it was not. If it was, or a
        // restart finds it stored in part, the transaction is rolled back and the file taken
        // as below.
        let hashing = ContentHash::start(path);
        let new = NewFile {
            name: name.clone(),
            sha256: UNHASHED.into(),
            urgent,
        };
        let report = Report::empty(name.clone(), String::new(), "processed", urgent);
        let stored = file
            .store(store.begin_file(&new).await?, report, 0, hashing)
            .await?;
        if let Some(ingested) = file.finish(stored).await? {
            return Ok(ingested);
        }
    }

    let sha256 = hash_file(path).await?;
    let mut resume = None;
    if let Some(existing) = store.file_by_hash(&sha256).await? {
        match (existing.disposition.as_str(), existing.resume_line) {
            ("pending", Some(line)) => resume = Some((existing, line)),
            ("pending", None) => {
                // Stored by an earlier run that stopped before moving the file: finish the move.
                let report: Report = serde_json::from_str(&existing.report)?;
                let moved_to = move_with_report(path, &paths.processed, &report).await?;
                store
                    .mark_file_moved(existing.id, "processed", &moved_to.display().to_string())
                    .await?;
                return Ok(Ingested { report, moved_to });
            }
            _ => {
                let mut report = Report::empty(name, sha256, "duplicate", urgent);
                report.duplicate_of = Some(existing.name);
                let moved_to = move_with_report(path, &paths.processed, &report).await?;
                return Ok(Ingested { report, moved_to });
            }
        }
    }

    if let Some(reason) = too_big(path, limits.max_file_bytes).await? {
        return reject(
            path,
            paths,
            Report::rejected_file(name, sha256, urgent, reason),
        )
        .await;
    }

    let (ingest, report, skip_through) = match resume {
        Some((existing, line)) => {
            let report: Report = serde_json::from_str(&existing.report)?;
            tracing::info!(file = %name, line, "reading on in a file stored in part before a restart");
            (store.resume_file(&existing).await?, report, line)
        }
        None => {
            let new = NewFile {
                name: name.clone(),
                sha256: sha256.clone(),
                urgent,
            };
            let report = Report::empty(name.clone(), sha256.clone(), "processed", urgent);
            (store.begin_file(&new).await?, report, 0)
        }
    };
    let stored = file
        .store(ingest, report, skip_through, ContentHash::Known(sha256))
        .await?;
    let ingested = file.finish(stored).await?;
    Ok(ingested.expect("a file hashed before reading is not found stored while read"))
}

/// The `sha256` of a file row whose content is still being hashed. It is replaced before the
/// row is committed, so no committed row has it.
const UNHASHED: &str = "unhashed";

/// One file to ingest, with what every step of it needs.
struct Ingest<'a> {
    store: &'a Store,
    path: &'a Path,
    name: &'a str,
    urgent: bool,
    paths: &'a PathsConfig,
    limits: &'a FileLimits,
    catalogue: Option<&'a Catalogue>,
    queued: Option<&'a Signal>,
}

impl Ingest<'_> {
    /// Reads the file after line `skip_through` into `ingest`.
    async fn store(
        &self,
        ingest: FileIngest,
        report: Report,
        skip_through: u64,
        content: ContentHash,
    ) -> Result<Stored, IngestError> {
        let in_parts = self.limits.commit_lines > 0 && !self.limits.reject_file_on_error;
        let parts = in_parts.then_some(Parts {
            lines: self.limits.commit_lines,
            last_committed: skip_through,
        });
        let group_lines = match &parts {
            Some(parts) => GROUP_ROWS.min(parts.lines as usize),
            None => GROUP_ROWS,
        };
        let lines = CheckedLines::start(ReadPlan {
            path: self.path.to_path_buf(),
            urgent: self.urgent,
            limits: *self.limits,
            catalogue: self.catalogue.cloned(),
            skip_through,
            group_lines,
        });
        let builder = ReportBuilder::new(self.path, report);
        store_lines(
            ingest,
            lines,
            builder,
            parts,
            content,
            self.limits,
            self.queued,
        )
        .await
    }

    /// Moves a stored or rejected file out of the inbox. Returns `None` for a file whose
    /// content turned out to be stored before, which nothing was done with.
    async fn finish(&self, stored: Stored) -> Result<Option<Ingested>, IngestError> {
        let (file_id, report) = match stored {
            Stored::Whole { file_id, report } => (file_id, report),
            Stored::Rejected(report) => {
                return reject(self.path, self.paths, report).await.map(Some);
            }
            Stored::Before => {
                tracing::debug!(file = %self.name, "content was stored before; rolled back");
                return Ok(None);
            }
        };
        let moved_to = move_with_report(self.path, &self.paths.processed, &report).await?;
        self.store
            .mark_file_moved(file_id, "processed", &moved_to.display().to_string())
            .await?;
        Ok(Some(Ingested { report, moved_to }))
    }
}

/// The part boundaries of a file stored in parts.
struct Parts {
    /// Lines in one part.
    lines: u64,
    /// The last line of the committed parts.
    last_committed: u64,
}

/// The outcome of storing a file's lines.
enum Stored {
    /// The whole file is stored and committed.
    Whole { file_id: i64, report: Report },
    /// The file was rejected, with this report.
    Rejected(Report),
    /// The file's content was stored before, as the hash learned while reading showed. Its
    /// transaction was rolled back.
    Before,
}

/// Stores the checked lines of a file, in parts if `parts` is set, then commits the whole file.
/// Returns [`IngestError::Changed`] if the file's content is not the one hashed.
async fn store_lines<'a>(
    mut ingest: FileIngest,
    mut lines: CheckedLines,
    mut builder: ReportBuilder<'a>,
    mut parts: Option<Parts>,
    mut content: ContentHash,
    limits: &FileLimits,
    queued: Option<&Signal>,
) -> Result<Stored, IngestError> {
    // The next group is bound while the current one is inserted, so that SQLite's thread,
    // which takes most of the time, does not wait for the binding.
    let binder = ingest.binder();
    let mut next = next_bound(&mut lines, &binder).await;
    while let Some((group, bound)) = next {
        let last_line = group.last_line;
        let (stored, following) = tokio::join!(ingest.run(bound), next_bound(&mut lines, &binder));
        next = following;
        let stored = stored?;
        // The items went to `bound`; this counts the group's lines and records its bad ones.
        builder.read(group);
        builder.stored(&stored);
        if !name_content(&mut ingest, &mut content, false).await? {
            ingest.roll_back().await?;
            return Ok(Stored::Before);
        }
        for _ in &stored {
            crate::fault::point("mid-ingest");
        }
        crate::watchdog::progress();
        if let Some(parts) = &mut parts
            && last_line - parts.last_committed >= parts.lines
        {
            // Nothing is committed before the content is known to be new.
            if !name_content(&mut ingest, &mut content, true).await? {
                ingest.roll_back().await?;
                return Ok(Stored::Before);
            }
            let mut report = builder.snapshot();
            report.sha256 = content.known().unwrap_or_default().to_string();
            let json = serde_json::to_string_pretty(&report)?;
            ingest
                .commit_part(last_line, totals(&report, &json))
                .await?;
            parts.last_committed = last_line;
            if let Some(queued) = queued
                && report.items > 0
            {
                queued.raise();
            }
        }
    }
    let path = builder.path;
    let read = lines.finish().await;
    if !name_content(&mut ingest, &mut content, true).await? {
        ingest.roll_back().await?;
        return Ok(Stored::Before);
    }
    let sha256 = content.known().unwrap_or_default();
    let mut report = builder.into_report();
    report.sha256 = sha256.to_string();
    let reason = match read {
        Ok(read_sha256) if read_sha256 == sha256 => rejection(&report, limits.reject_file_on_error),
        Ok(_) => {
            // The file changed while it was read: it was not complete after all.
            let message =
                "its input file changed while it was read; the new content is read as a new file";
            report.reason = Some("the file changed while it was read".into());
            abandon(ingest, &mut report, message).await?;
            return Err(IngestError::Changed {
                path: path.to_path_buf(),
            });
        }
        Err(Stop::Reject(reason)) => Some(reason),
        Err(Stop::Failed(error)) => return Err(error),
    };
    let Some(reason) = reason else {
        let json = serde_json::to_string_pretty(&report)?;
        let file_id = ingest.commit(totals(&report, &json)).await?;
        return Ok(Stored::Whole { file_id, report });
    };
    let message = format!("its input file was rejected after this line was stored: {reason}");
    report.disposition = "rejected".into();
    report.reason = Some(reason);
    abandon(ingest, &mut report, &message).await?;
    Ok(Stored::Rejected(report))
}

/// Takes the next group of checked lines and binds its items for the insert.
async fn next_bound(
    lines: &mut CheckedLines,
    binder: &ItemBinder,
) -> Option<(Checked, BoundItems)> {
    let mut group = lines.next().await?;
    let bound = binder.bind(std::mem::take(&mut group.items));
    Some((group, bound))
}

/// Gives the file row its hash once the hash computed beside the reading is known, waiting for
/// it if `wait` is set. Returns false if a stored file has that content already.
async fn name_content(
    ingest: &mut FileIngest,
    content: &mut ContentHash,
    wait: bool,
) -> Result<bool, IngestError> {
    match content.learn(wait).await? {
        Some(sha256) => Ok(ingest.name_content(&sha256).await?),
        None => Ok(true),
    }
}

/// Gives up on a file after reading began; see [`FileIngest::abandon`]. The report then counts
/// only the items of committed parts, which stay.
async fn abandon(
    ingest: FileIngest,
    report: &mut Report,
    message: &str,
) -> Result<(), IngestError> {
    let kept_items = ingest.committed_items();
    report.items = kept_items;
    report.items_failed = report.items_failed.min(kept_items);
    if kept_items > 0
        && let Some(reason) = report.reason.take()
    {
        report.reason = Some(format!(
            "{reason}; the {kept_items} items of the lines stored before stay: those not yet sent failed, the others run to their end"
        ));
    }
    let json = serde_json::to_string_pretty(report)?;
    ingest.abandon(message, &json).await?;
    Ok(())
}

fn totals<'a>(report: &Report, json: &'a str) -> FileTotals<'a> {
    FileTotals {
        lines: report.lines,
        items: report.items,
        errors: report.error_count,
        report: json,
    }
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

    /// Directories for a test ingest, inside `dir`.
    fn paths(dir: &tempfile::TempDir) -> PathsConfig {
        let paths = PathsConfig {
            inbox: dir.path().join("inbox"),
            database: dir.path().join("batchd.db"),
            processed: dir.path().join("processed"),
            rejected: dir.path().join("rejected"),
            outbox: dir.path().join("outbox"),
        };
        std::fs::create_dir_all(&paths.inbox).unwrap();
        paths
    }

    fn limits(commit_lines: u64) -> FileLimits {
        FileLimits {
            max_line_bytes: 1000,
            max_file_bytes: 1 << 20,
            reject_file_on_error: false,
            commit_lines,
        }
    }

    /// Writes `count` good lines into the inbox as `name`.
    fn write_lines(paths: &PathsConfig, name: &str, count: u64) -> PathBuf {
        let lines: Vec<String> = (1..=count).map(|n| line(&format!("id-{n}"))).collect();
        let path = paths.inbox.join(name);
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    }

    async fn count(store: &Store, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn repeats_are_found_within_and_across_insert_groups() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(&dir);
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

        let done = ingest_file(&store, &path, false, &paths, &limits(0), None, None)
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
        assert_eq!(count(&store, "SELECT COUNT(*) FROM work_items").await, 448);
    }

    #[tokio::test]
    async fn ingest_reports_renamed_copy_as_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(&dir);
        let store = Store::open(&paths.database).await.unwrap();
        let first = write_lines(&paths, "first.jsonl", 700);
        ingest_file(&store, &first, false, &paths, &limits(0), None, None)
            .await
            .unwrap();
        let again = write_lines(&paths, "again.jsonl", 700);

        let done = ingest_file(&store, &again, false, &paths, &limits(0), None, None)
            .await
            .unwrap();

        assert_eq!(done.report.disposition, "duplicate");
        assert_eq!(done.report.duplicate_of.as_deref(), Some("first.jsonl"));
        assert_eq!(done.report.sha256, hash_file(&done.moved_to).await.unwrap());
        assert_eq!(count(&store, "SELECT COUNT(*) FROM input_files").await, 1);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM work_items").await, 700);
    }

    #[tokio::test]
    async fn ingest_resumes_file_stored_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(&dir);
        let store = Store::open(&paths.database).await.unwrap();
        let path = write_lines(&paths, "parts.jsonl", 700);
        // What a run that stopped after the first part of 200 lines left behind.
        let sha256 = hash_file(&path).await.unwrap();
        let new = NewFile {
            name: "parts.jsonl".into(),
            sha256: sha256.clone(),
            urgent: false,
        };
        let mut ingest = store.begin_file(&new).await.unwrap();
        let mut lines = CheckedLines::start(ReadPlan {
            path: path.clone(),
            urgent: false,
            limits: limits(200),
            catalogue: None,
            skip_through: 0,
            group_lines: 200,
        });
        let group = lines.next().await.unwrap();
        ingest.insert(group.items).await.unwrap();
        let mut report = Report::empty("parts.jsonl".into(), sha256.clone(), "processed", false);
        (report.lines, report.items) = (200, 200);
        let json = serde_json::to_string(&report).unwrap();
        ingest
            .commit_part(200, totals(&report, &json))
            .await
            .unwrap();
        ingest.roll_back().await.unwrap();
        drop(lines);

        let done = ingest_file(&store, &path, false, &paths, &limits(200), None, None)
            .await
            .unwrap();

        assert_eq!(done.report.disposition, "processed");
        assert_eq!((done.report.lines, done.report.items), (700, 700));
        assert_eq!(done.report.sha256, sha256);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM input_files").await, 1);
        assert_eq!(
            count(&store, "SELECT COUNT(DISTINCT custom_id) FROM work_items").await,
            700
        );
        assert_eq!(count(&store, "SELECT COUNT(*) FROM work_items").await, 700);
    }
}
