//! Intake: watch the inbox, decide when a file is complete, and ingest it.
//!
//! Filesystem events (inotify through `notify`) only wake the scanner, which then looks at the
//! directory itself. A missed or merged event therefore costs at most one rescan interval. A file is
//! complete once its size and modification time have stayed the same for the settle time. A
//! file renamed into the inbox after being written elsewhere keeps its old mtime, so it is taken
//! at once. Names starting with `.` or ending in `.part`, `.tmp` or `.swp` are never taken;
//! `*.jsonl.gz` files are decompressed as they are read.

pub mod file;
mod hash;
pub mod lines;
pub mod parse;
mod read;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::Watcher;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{IngestConfig, PathsConfig};
use crate::models::Catalogue;
use crate::store::{Store, StoreError};
use crate::wake::Signal;

pub use file::{FileLimits, Ingested, LineError, Report, check_file, ingest_file};

/// Folder inside the inbox whose files are all urgent.
pub const URGENT_DIR: &str = "urgent";

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} changed while it was read; it will be read again once it stops changing")]
    Changed { path: PathBuf },
    #[error("failed to store an input file: {0}")]
    Store(#[from] StoreError),
    #[error("failed to encode or decode a file report: {0}")]
    Report(#[from] serde_json::Error),
    #[error("the task reading an input file failed: {0}")]
    Reader(String),
    #[error("failed to watch the inbox {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

impl IngestError {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        IngestError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<&IngestConfig> for FileLimits {
    fn from(config: &IngestConfig) -> Self {
        FileLimits {
            max_line_bytes: config.max_line_bytes,
            max_file_bytes: config.max_file_bytes,
            reject_file_on_error: config.reject_file_on_error,
            commit_lines: config.commit_lines,
        }
    }
}

/// True for names the inbox ignores: hidden files and files still being written.
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || [".part", ".tmp", ".swp"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

/// True for files the inbox takes.
pub fn is_input_name(name: &str) -> bool {
    !is_ignored_name(name) && (name.ends_with(".jsonl") || name.ends_with(".jsonl.gz"))
}

/// Creates the inbox and the folders files are moved to.
pub fn create_dirs(paths: &PathsConfig) -> Result<(), IngestError> {
    for dir in [
        paths.inbox.clone(),
        paths.inbox.join(URGENT_DIR),
        paths.processed.clone(),
        paths.rejected.clone(),
        paths.outbox.clone(),
    ] {
        std::fs::create_dir_all(&dir).map_err(|e| IngestError::io("create directory", &dir, e))?;
    }
    Ok(())
}

/// The inbox watcher and scanner.
pub struct Intake {
    store: Store,
    paths: PathsConfig,
    config: IngestConfig,
    limits: FileLimits,
    /// Raised after items were stored, so the packer and real-time workers look at once.
    work: Signal,
    /// Known models, when items are checked against them.
    catalogue: Option<Catalogue>,
    /// Size and mtime last seen for files not yet complete.
    seen: HashMap<PathBuf, (u64, SystemTime, SystemTime)>,
    /// Skipped entries already logged, so each is reported once.
    reported: HashSet<PathBuf>,
}

impl Intake {
    /// Creates the intake. With a `catalogue`, items naming an unknown model are stored failed.
    pub fn new(
        store: Store,
        paths: PathsConfig,
        config: IngestConfig,
        work: Signal,
        catalogue: Option<Catalogue>,
    ) -> Self {
        let limits = FileLimits::from(&config);
        Intake {
            store,
            paths,
            config,
            limits,
            work,
            catalogue,
            seen: HashMap::new(),
            reported: HashSet::new(),
        }
    }

    /// Starts watching the inbox. Events only wake the scanner through the returned channel.
    pub fn watch(&self) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<()>), IngestError> {
        let (tx, rx) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Each scan opens the inbox, which inotify reports as an access; waking on those
                // would make the scanner wake itself every few milliseconds while idle. A file
                // closed after writing is the one access that matters.
                let written = notify::event::AccessKind::Close(notify::event::AccessMode::Write);
                if event.is_ok_and(|event| {
                    event.kind.is_access() && event.kind != notify::EventKind::Access(written)
                }) {
                    return;
                }
                // A full channel already contains a wake-up, so dropping this one loses nothing.
                let _ = tx.try_send(());
            })
            .map_err(|source| IngestError::Watch {
                path: self.paths.inbox.clone(),
                source,
            })?;
        for dir in [self.paths.inbox.clone(), self.paths.inbox.join(URGENT_DIR)] {
            watcher
                .watch(&dir, notify::RecursiveMode::NonRecursive)
                .map_err(|source| IngestError::Watch { path: dir, source })?;
        }
        Ok((watcher, rx))
    }

    /// Runs until cancelled: scans at start, on every filesystem event and every rescan
    /// interval, and re-checks files that are still settling.
    pub async fn run(mut self, mut events: mpsc::Receiver<()>, cancel: CancellationToken) {
        loop {
            let settling = {
                let _busy = crate::watchdog::busy();
                self.scan_once(&cancel).await
            };
            let wait = if settling {
                self.config.settle.min(self.config.rescan_interval) / 2
            } else {
                self.config.rescan_interval
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = events.recv() => {
                    // Let a burst of events for one copy settle into one scan.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Looks at the inbox once and ingests every complete file. Returns true if some file is
    /// still settling.
    pub async fn scan_once(&mut self, cancel: &CancellationToken) -> bool {
        let mut settling = false;
        let mut present = Vec::new();
        for (dir, urgent) in [
            (self.paths.inbox.clone(), false),
            (self.paths.inbox.join(URGENT_DIR), true),
        ] {
            let listing = match list_candidates(&dir, &self.paths.inbox).await {
                Ok(listing) => listing,
                Err(error) => {
                    tracing::warn!(%error, "failed to list inbox folder");
                    continue;
                }
            };
            for (path, reason) in listing.skipped {
                if self.reported.insert(path.clone()) {
                    tracing::warn!(path = %path.display(), "skipped in the inbox: {reason}");
                }
            }
            let mut candidates = listing.files;
            candidates.sort();
            for path in candidates {
                if cancel.is_cancelled() {
                    return settling;
                }
                present.push(path.clone());
                match self.is_complete(&path).await {
                    Some(true) => self.ingest(&path, urgent).await,
                    Some(false) => settling = true,
                    None => {}
                }
            }
        }
        self.seen.retain(|path, _| present.contains(path));
        settling
    }

    /// Decides whether a file has stopped changing. `None` if it vanished.
    async fn is_complete(&mut self, path: &Path) -> Option<bool> {
        let meta = tokio::fs::metadata(path).await.ok()?;
        let mtime = meta.modified().ok()?;
        let now = SystemTime::now();
        let size = meta.len();
        let old_enough = now.duration_since(mtime).unwrap_or_default() >= self.config.settle;
        match self.seen.get(path) {
            Some(&(s, m, since)) if s == size && m == mtime => Some(
                old_enough || now.duration_since(since).unwrap_or_default() >= self.config.settle,
            ),
            _ => {
                self.seen.insert(path.to_path_buf(), (size, mtime, now));
                Some(old_enough)
            }
        }
    }

    async fn ingest(&mut self, path: &Path, urgent: bool) {
        let started = std::time::Instant::now();
        let catalogue = self.catalogue.as_ref();
        match ingest_file(
            &self.store,
            path,
            urgent,
            &self.paths,
            &self.limits,
            catalogue,
            Some(&self.work),
        )
        .await
        {
            Ok(done) => {
                self.seen.remove(path);
                self.reported.remove(path);
                crate::metrics::global().ingest_took(started.elapsed());
                let r = &done.report;
                tracing::info!(
                    file = %r.file,
                    disposition = %r.disposition,
                    items = r.items,
                    errors = r.error_count,
                    unknown_model = r.items_failed,
                    urgent = r.urgent,
                    moved_to = %done.moved_to.display(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "input file ingested"
                );
                if r.items > 0 {
                    self.work.raise();
                }
            }
            Err(IngestError::Changed { path }) => {
                tracing::info!(path = %path.display(), "input file changed while read; waiting for it to settle");
                self.seen.remove(&path);
            }
            Err(error) => {
                // An unreadable file is tried at every scan, so the failure is logged only once.
                if self.reported.insert(path.to_path_buf()) {
                    tracing::warn!(path = %path.display(), %error, "failed to ingest input file; retrying at each scan until it can be read");
                } else {
                    tracing::debug!(path = %path.display(), %error, "failed to ingest input file again");
                }
            }
        }
    }
}

/// The contents of one inbox folder: files to take, and entries skipped with the reason.
#[derive(Debug, Default)]
struct Listing {
    files: Vec<PathBuf>,
    skipped: Vec<(PathBuf, String)>,
}

/// Lists the `*.jsonl` and `*.jsonl.gz` files directly inside `dir`. A symbolic link is followed only when it
/// leads to a file inside the inbox; such links and folders are skipped with a reason.
async fn list_candidates(dir: &Path, inbox: &Path) -> Result<Listing, IngestError> {
    let mut entries = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| IngestError::io("list", dir, e))?;
    let top_level = dir == inbox;
    let inbox = tokio::fs::canonicalize(inbox)
        .await
        .unwrap_or_else(|_| inbox.to_path_buf());
    let mut listing = Listing::default();
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| IngestError::io("list", dir, e))?
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let Ok(kind) = entry.file_type().await else {
            continue;
        };
        if kind.is_dir() {
            let is_urgent_dir = top_level && name == URGENT_DIR;
            if !is_urgent_dir && !name.starts_with('.') {
                let reason = "folders inside the inbox are not scanned: move its files into the inbox itself";
                listing.skipped.push((path, reason.to_string()));
            }
            continue;
        }
        if !is_input_name(&name) {
            continue;
        }
        if kind.is_symlink() {
            match tokio::fs::canonicalize(&path).await {
                Ok(target) if target.starts_with(&inbox) && target.is_file() => listing.files.push(path),
                Ok(target) => listing.skipped.push((
                    path,
                    format!(
                        "symbolic link to {} leads outside the inbox and is not followed: copy or move the file in instead",
                        target.display()
                    ),
                )),
                Err(error) => listing.skipped.push((path, format!("symbolic link cannot be resolved: {error}"))),
            }
            continue;
        }
        if kind.is_file() {
            listing.files.push(path);
        }
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_names() {
        assert!(is_input_name("evals.jsonl"));
        assert!(is_input_name("evals.jsonl.gz"));
        assert!(!is_input_name("evals.gz"));
        assert!(!is_input_name("evals.jsonl.gz.part"));
        assert!(!is_input_name(".evals.jsonl"));
        assert!(!is_input_name("evals.jsonl.part"));
        assert!(!is_input_name("evals.jsonl.tmp"));
        assert!(!is_input_name("evals.json"));
    }
}
