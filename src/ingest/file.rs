//! Ingesting one complete input file: hash it, skip it if its content was stored before, insert
//! its good lines as work items in one transaction, write the report, and move it out of the
//! inbox only after the commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, BufReader};

use super::IngestError;
use super::lines::LineReader;
use super::parse::parse_line;
use crate::config::PathsConfig;
use crate::models::{Catalogue, ModelCheck};
use crate::store::{NewFile, NewItem, Store};

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
}

/// The outcome of ingesting a file: its report and where it was moved.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub report: Report,
    pub moved_to: PathBuf,
}

/// Returns the hex SHA-256 of a file's content, read in chunks.
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
    max_line_bytes: usize,
    catalogue: Option<&Catalogue>,
) -> Result<Ingested, IngestError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
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
        let report = Report {
            file: name,
            sha256,
            disposition: "duplicate".into(),
            urgent,
            lines: 0,
            items: 0,
            items_failed: 0,
            error_count: 0,
            errors: Vec::new(),
            duplicate_of: Some(existing.name),
        };
        let moved_to = move_with_report(path, &paths.processed, &report).await?;
        return Ok(Ingested { report, moved_to });
    }

    let mut ingest = store
        .begin_file(&NewFile {
            name: name.clone(),
            sha256: sha256.clone(),
            urgent,
        })
        .await?;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| IngestError::io("open", path, e))?;
    let mut lines = LineReader::new(BufReader::with_capacity(64 * 1024, file), max_line_bytes);
    let mut report = Report {
        file: name,
        sha256: sha256.clone(),
        disposition: "processed".into(),
        urgent,
        lines: 0,
        items: 0,
        items_failed: 0,
        error_count: 0,
        errors: Vec::new(),
        duplicate_of: None,
    };
    let mut seen_ids: HashMap<String, u64> = HashMap::new();
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| IngestError::io("read", path, e))?
    {
        if line.bytes.iter().all(u8::is_ascii_whitespace) && !line.too_long {
            continue;
        }
        report.lines += 1;
        let checked = if line.too_long {
            Err(format!(
                "line is longer than the maximum of {max_line_bytes} bytes (`ingest.max_line_bytes`)"
            ))
        } else {
            parse_line(line.bytes).and_then(|parsed| match seen_ids.get(&parsed.custom_id) {
                Some(first) => Err(format!(
                    "\"custom_id\" {:?} repeats the one on line {first}: ids must be unique within a file",
                    parsed.custom_id
                )),
                None => Ok(parsed),
            })
        };
        match checked {
            Ok(parsed) => {
                seen_ids.insert(parsed.custom_id.clone(), line.number);
                let error = match catalogue.map(|c| c.check(&parsed.model)) {
                    Some(ModelCheck::Unknown(message)) => {
                        report.items_failed += 1;
                        Some(message)
                    }
                    _ => None,
                };
                ingest
                    .add(&NewItem {
                        line_no: line.number,
                        custom_id: parsed.custom_id,
                        endpoint: parsed.endpoint,
                        model: parsed.model,
                        body: parsed.body,
                        urgent: urgent || parsed.urgent,
                        deadline: parsed.deadline,
                        error,
                    })
                    .await?;
                report.items += 1;
                crate::fault::point("mid-ingest");
            }
            Err(reason) => {
                let message = format!("{}:{}: {reason}", path.display(), line.number);
                if report.error_count < 20 {
                    tracing::warn!(target: "batchd::ingest", "{message}");
                }
                report.error_count += 1;
                if report.errors.len() < MAX_REPORTED_ERRORS {
                    report.errors.push(LineError {
                        line: line.number,
                        reason,
                        message,
                    });
                }
            }
        }
    }
    if lines.sha256() != sha256 {
        // The file changed while it was read: it was not complete after all.
        return Err(IngestError::Changed {
            path: path.to_path_buf(),
        });
    }

    if report.items == 0 {
        drop(ingest); // rolls back the empty file row
        report.disposition = "rejected".into();
        let moved_to = move_with_report(path, &paths.rejected, &report).await?;
        return Ok(Ingested { report, moved_to });
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

/// Returns `dir/name`, or `dir/name-N.jsonl` for the first N free, so nothing is overwritten.
async fn unique_target(dir: &Path, name: &str) -> PathBuf {
    let candidate = dir.join(name);
    if !tokio::fs::try_exists(&candidate).await.unwrap_or(false) {
        return candidate;
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) => (stem.to_string(), format!(".{ext}")),
        None => (name.to_string(), String::new()),
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
