//! Commands beside the daemon. `status`, `files`, `results`, `retry` and `cancel` read or change
//! the daemon's database, and are safe to run while the daemon runs. `demo` runs the simulator
//! and the daemon together on example input.

pub mod cancel;
pub mod demo;
pub mod files;
pub mod results;
pub mod retry;
pub mod status;

use std::path::{Path, PathBuf};

pub use status::Status;

use crate::export::ExportError;
use crate::provider::ProviderError;
use crate::store::{FileProgress, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("no input file named {name:?} in {}: run `batchd files` to list them", database.display())]
    NoSuchFile { name: String, database: PathBuf },
    #[error(
        "{} input files are named {name:?} in {}: give the name one got in processed/ instead ({})",
        stored_names.len(), database.display(), stored_names.join(", ")
    )]
    AmbiguousFile {
        name: String,
        database: PathBuf,
        stored_names: Vec<String>,
    },
    #[error(
        "the items of {name:?} were deleted by retention at {purged_at}: its results are in the export {export_path}"
    )]
    Purged {
        name: String,
        purged_at: String,
        export_path: String,
    },
    #[error("no batch job {id:?} in {}: run `batchd status` to list the jobs in flight", database.display())]
    NoSuchJob { id: String, database: PathBuf },
    #[error("batch job {id} already finished ({status}): there is nothing to cancel")]
    JobFinished { id: String, status: String },
    #[error("{command} needs {needed}")]
    MissingScope {
        command: &'static str,
        needed: &'static str,
    },
    #[error(
        "no API key to call the provider: set {} (any value works for `batchd simulate`)",
        crate::config::API_KEY_ENV
    )]
    NoApiKey,
}

/// Finds one input file by the name it was dropped under, or by the name it got in
/// `processed/`, which is unique even for files dropped under the same name.
pub async fn find_file(
    store: &Store,
    database: &Path,
    name: &str,
) -> Result<FileProgress, CliError> {
    let files = store.file_progress(chrono::Utc::now()).await?;
    if let Some(file) = files
        .iter()
        .find(|f| f.stored_name.as_deref() == Some(name))
    {
        return Ok(file.clone());
    }
    let mut named: Vec<FileProgress> = files.into_iter().filter(|f| f.name == name).collect();
    match named.len() {
        0 => Err(CliError::NoSuchFile {
            name: name.to_string(),
            database: database.to_path_buf(),
        }),
        1 => Ok(named.remove(0)),
        _ => Err(CliError::AmbiguousFile {
            name: name.to_string(),
            database: database.to_path_buf(),
            stored_names: named
                .iter()
                .rev()
                .map(|f| {
                    f.stored_name
                        .clone()
                        .unwrap_or_else(|| format!("id {}", f.id))
                })
                .collect(),
        }),
    }
}
