//! Reading and checking the lines of an input file on a task of its own, which hands over the
//! good lines in groups. Parsing a group then runs while the previous one is inserted, so the
//! two can use two cores at once.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use tokio::io::AsyncBufRead;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::IngestError;
use super::file::FileLimits;
use super::hash::hash_file;
use super::lines::{Line, LineReader, is_gzip, open_input};
use super::parse::parse_line;
use crate::models::{Catalogue, ModelCheck};
use crate::store::NewItem;

/// At most this many items are handed over in one group, which is inserted with one statement.
/// SQLite's thread idles while each statement is bound, so groups of 500 ingest a million
/// lines faster than groups of 200 (6.7 s against 7.5 s). Groups of 1,000 were no faster and
/// used 10 MiB more.
pub const GROUP_ROWS: usize = 500;

/// Body bytes in one group regardless of the row count, which bounds the memory of a group to
/// this plus one line.
const GROUP_BYTES: usize = 1 << 20;

/// Groups read ahead of the inserts. Each has at most `GROUP_BYTES` of bodies.
const GROUPS_AHEAD: usize = 4;

/// The checked lines of one stretch of the file.
#[derive(Debug, Default)]
pub struct Checked {
    /// The items of the good lines.
    pub items: Vec<NewItem>,
    /// The bad lines, each with the reason.
    pub errors: Vec<(u64, String)>,
    /// Non-blank lines read.
    pub lines: u64,
    /// The number of the last line read.
    pub last_line: u64,
}

/// The reason reading a file stopped before its end.
#[derive(Debug)]
pub enum Stop {
    /// The file must be rejected for this reason.
    Reject(String),
    /// Reading failed, so the file is tried again at a later scan.
    Failed(IngestError),
}

/// How to read one file.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    pub path: PathBuf,
    pub urgent: bool,
    pub limits: FileLimits,
    /// Models to check the lines against, or `None` to check none.
    pub catalogue: Option<Catalogue>,
    /// The last line already stored. Lines up to it are read for the hash but not checked.
    pub skip_through: u64,
    /// At most this many lines in one group, so that a part can end after any of them.
    pub group_lines: usize,
}

/// The groups of checked lines of a file being read.
pub struct CheckedLines {
    groups: mpsc::Receiver<Checked>,
    reader: JoinHandle<Result<String, Stop>>,
}

impl CheckedLines {
    /// Starts reading a file.
    pub fn start(plan: ReadPlan) -> Self {
        let (sender, groups) = mpsc::channel(GROUPS_AHEAD);
        let reader = tokio::spawn(read_groups(plan, sender));
        CheckedLines { groups, reader }
    }

    /// Returns the next group, or `None` once the file was read or reading stopped.
    pub async fn next(&mut self) -> Option<Checked> {
        self.groups.recv().await
    }

    /// Returns the SHA-256 of the file's content as stored once every group was taken, or why
    /// reading stopped early.
    pub async fn finish(mut self) -> Result<String, Stop> {
        self.groups.close();
        match (&mut self.reader).await {
            Ok(result) => result,
            Err(e) => Err(Stop::Failed(IngestError::Reader(e.to_string()))),
        }
    }
}

impl Drop for CheckedLines {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_groups(plan: ReadPlan, sender: mpsc::Sender<Checked>) -> Result<String, Stop> {
    let mut input = InputLines::open(&plan.path, &plan.limits)
        .await
        .map_err(Stop::Failed)?;
    let mut group = Checked::default();
    let mut group_bytes = 0;
    while let Some(line) = input.next().await? {
        group.last_line = line.number;
        if line.number <= plan.skip_through {
            continue;
        }
        match check_line(&line, &plan) {
            None => continue,
            Some(Ok(item)) => {
                group_bytes += item.body.len();
                group.items.push(item);
            }
            Some(Err(reason)) => group.errors.push((line.number, reason)),
        }
        group.lines += 1;
        let full = group.items.len() + group.errors.len() >= plan.group_lines
            || group_bytes >= GROUP_BYTES;
        if full {
            group_bytes = 0;
            if sender.send(std::mem::take(&mut group)).await.is_err() {
                // Nothing takes the groups any more, because the ingest failed or was abandoned.
                return Err(Stop::Failed(IngestError::Reader(
                    "failed to hand over checked lines: the ingest of the file stopped".into(),
                )));
            }
        }
    }
    if group.lines > 0 {
        // A closed receiver means the ingest stopped, and then it does not need the last group.
        let _ = sender.send(group).await;
    }
    input.sha256().await.map_err(Stop::Failed)
}

/// Checks one line. Returns `None` for a blank line, the item of a good line, or the reason a
/// bad line is rejected.
fn check_line(line: &Line<'_>, plan: &ReadPlan) -> Option<Result<NewItem, String>> {
    if line.bytes.iter().all(u8::is_ascii_whitespace) && !line.too_long {
        return None;
    }
    let checked = if line.too_long {
        Err(format!(
            "line is longer than the maximum of {} bytes (`ingest.max_line_bytes`)",
            plan.limits.max_line_bytes
        ))
    } else {
        parse_line(line.bytes)
    };
    let parsed = match checked {
        Ok(parsed) => parsed,
        Err(reason) => return Some(Err(reason)),
    };
    let error = match plan.catalogue.as_ref().map(|c| c.check(&parsed.model)) {
        Some(ModelCheck::Unknown(message)) => Some(message),
        _ => None,
    };
    Some(Ok(NewItem {
        line_no: line.number,
        custom_id: parsed.custom_id,
        endpoint: parsed.endpoint,
        model: parsed.model,
        body: parsed.body,
        urgent: plan.urgent || parsed.urgent,
        deadline: parsed.deadline,
        error,
    }))
}

/// The lines of an input file, with the checks that end reading early.
struct InputLines<'p> {
    path: &'p Path,
    lines: LineReader<Box<dyn AsyncBufRead + Unpin + Send>>,
    max_file_bytes: u64,
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
