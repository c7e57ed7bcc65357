//! WAL checkpoints on a stage of their own.
//!
//! By default SQLite copies the write-ahead log back into the database at the end of any commit
//! that grew the log past 1,000 pages, on the connection that made the commit. The commit of a
//! large input file then waits for a copy of everything it wrote (seconds for a million lines),
//! and whichever stage commits next after a burst of writes stalls the same way. The store turns
//! those automatic checkpoints off, and the daemon runs them here instead, a short while after
//! other stages report writes, so that the copy overlaps their work instead of delaying it.

use std::time::Duration;

use futures::future::select_all;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::wake::Listener;

/// How long after a write the checkpoint waits, so that a burst of commits is copied at once.
pub const GATHER: Duration = Duration::from_secs(1);

/// Interval of the checkpoint when no stage reports writes, for writes that raise no signal.
pub const FALLBACK_INTERVAL: Duration = Duration::from_secs(60);

/// Runs a checkpoint `GATHER` after any of `writes` is raised, and at least every
/// `FALLBACK_INTERVAL`, until cancelled.
pub async fn run(store: Store, mut writes: Vec<Listener>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = any(&mut writes) => {}
            _ = tokio::time::sleep(FALLBACK_INTERVAL) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(GATHER) => {}
        }
        let _busy = crate::watchdog::busy();
        match store.checkpoint().await {
            Ok(done) => tracing::debug!(
                wal_frames = done.wal_frames,
                copied_frames = done.copied_frames,
                blocked = done.blocked,
                "checkpoint finished"
            ),
            Err(error) => tracing::warn!(
                %error,
                "failed to copy the write-ahead log into the database (check the free space beside it); trying again after the next write"
            ),
        }
    }
}

/// Waits until any of `listeners` was raised.
async fn any(listeners: &mut [Listener]) {
    if listeners.is_empty() {
        return std::future::pending().await;
    }
    select_all(listeners.iter_mut().map(|l| Box::pin(l.wait()))).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wake::Signal;

    /// Returns the size of the database file itself, which in WAL mode grows only when a
    /// checkpoint copies the log into it.
    fn main_file_bytes(dir: &tempfile::TempDir) -> u64 {
        std::fs::metadata(dir.path().join("batchd.db"))
            .unwrap()
            .len()
    }

    async fn open_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("batchd.db")).await.unwrap();
        (dir, store)
    }

    async fn write_rows(store: &Store, rows: usize) {
        sqlx::query("CREATE TABLE IF NOT EXISTS filler (text TEXT NOT NULL)")
            .execute(store.pool())
            .await
            .unwrap();
        for _ in 0..rows {
            sqlx::query("INSERT INTO filler (text) VALUES (?1)")
                .bind("x".repeat(4000))
                .execute(store.pool())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn commits_leave_the_log_to_the_checkpoint() {
        let (dir, store) = open_store().await;
        let before = main_file_bytes(&dir);
        // 1,500 pages, past the 1,000 at which SQLite would checkpoint by itself.
        write_rows(&store, 1500).await;
        assert_eq!(main_file_bytes(&dir), before, "no commit copied the log");

        let done = store.checkpoint().await.unwrap();
        assert!(!done.blocked);
        assert!(done.wal_frames >= 1500, "{done:?}");
        assert_eq!(done.copied_frames, done.wal_frames);
        assert!(main_file_bytes(&dir) > before + 1500 * 4000);
    }

    #[tokio::test]
    async fn closing_the_last_connection_copies_the_log() {
        let (dir, store) = open_store().await;
        let before = main_file_bytes(&dir);
        write_rows(&store, 1500).await;
        store.close().await;
        assert!(main_file_bytes(&dir) > before + 1500 * 4000);
        assert!(!dir.path().join("batchd.db-wal").exists());
    }

    #[tokio::test]
    async fn checkpoint_runs_the_gather_time_after_a_signal() {
        let (dir, store) = open_store().await;
        write_rows(&store, 200).await;
        let before = main_file_bytes(&dir);
        // Paused only now, so that opening the pool ran on the real clock.
        tokio::time::pause();
        let written = Signal::new();
        let cancel = CancellationToken::new();
        let stage = tokio::spawn(run(store.clone(), vec![written.listen()], cancel.clone()));

        written.raise();
        tokio::time::sleep(GATHER - Duration::from_millis(10)).await;
        assert_eq!(
            main_file_bytes(&dir),
            before,
            "checkpointed before the gather time"
        );
        // The checkpoint runs on SQLite's own thread, which paused time does not wait for, so
        // its effect is awaited on the real clock.
        let started = std::time::Instant::now();
        while main_file_bytes(&dir) <= before {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no checkpoint after the signal"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        stage.await.unwrap();
    }
}
