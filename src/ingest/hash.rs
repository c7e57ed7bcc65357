//! The SHA-256 that names a file's content, so that content dropped again is stored once.

use std::path::Path;

use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use super::IngestError;

/// Returns the hex SHA-256 of a file's bytes as stored. The file is read on a blocking thread in
/// large chunks, because each read of an async file is a hand-off to such a thread anyway.
pub async fn hash_file(path: &Path) -> Result<String, IngestError> {
    joined(spawn_hash(path).await)
}

/// Starts hashing a file on a blocking thread.
fn spawn_hash(path: &Path) -> JoinHandle<Result<String, IngestError>> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || hash_blocking(&owned))
}

/// Unwraps the result of a hashing task.
fn joined(
    result: Result<Result<String, IngestError>, tokio::task::JoinError>,
) -> Result<String, IngestError> {
    result.map_err(|e| IngestError::Reader(e.to_string()))?
}

/// A file's hash, known or still being computed beside the reading of the file.
pub enum ContentHash {
    Known(String),
    Hashing(JoinHandle<Result<String, IngestError>>),
}

impl ContentHash {
    /// Starts hashing a file on a blocking thread.
    pub fn start(path: &Path) -> ContentHash {
        ContentHash::Hashing(spawn_hash(path))
    }

    /// Returns the hash the first time it is known: at once if the hashing is done, otherwise
    /// after waiting for it if `wait` is set. Returns `None` if it was known before or is not
    /// done and `wait` is not set.
    pub async fn learn(&mut self, wait: bool) -> Result<Option<String>, IngestError> {
        let ContentHash::Hashing(task) = self else {
            return Ok(None);
        };
        if !wait && !task.is_finished() {
            return Ok(None);
        }
        let sha256 = joined(task.await)?;
        *self = ContentHash::Known(sha256.clone());
        Ok(Some(sha256))
    }

    /// Returns the hash if it is known.
    pub fn known(&self) -> Option<&str> {
        match self {
            ContentHash::Known(sha256) => Some(sha256),
            ContentHash::Hashing(_) => None,
        }
    }
}

impl Drop for ContentHash {
    fn drop(&mut self) {
        if let ContentHash::Hashing(task) = self {
            // A blocking task runs to its end anyway; this only drops its result.
            task.abort();
        }
    }
}

fn hash_blocking(path: &Path) -> Result<String, IngestError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| IngestError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(IngestError::io("read", path, e)),
        };
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
