//! `batchd retry`: moves failed items back to the queue, for one input file or all of them.

use std::path::Path;

use serde::Serialize;

use super::{CliError, find_file};
use crate::store::{Scope, Store};

/// The outcome of `batchd retry`.
#[derive(Debug, Clone, Serialize)]
pub struct Retried {
    /// The input file, or `None` for `--all`.
    pub file: Option<String>,
    pub requeued: u64,
}

impl Retried {
    pub fn render(&self) -> String {
        let scope = match &self.file {
            Some(name) => format!(" of {name}"),
            None => String::new(),
        };
        if self.requeued == 0 {
            return format!("no failed items{scope} to retry\n");
        }
        format!(
            "requeued {} failed items{scope}; a running daemon sends them again\n",
            self.requeued
        )
    }
}

/// Requeues the failed items of `file`, or every failed item when `all` is set.
pub async fn run(
    store: &Store,
    database: &Path,
    file: Option<&str>,
    all: bool,
) -> Result<Retried, CliError> {
    let (scope, name) = match (file, all) {
        (Some(name), _) => {
            let found = find_file(store, database, name).await?;
            (Scope::File(found.id), Some(name.to_string()))
        }
        (None, true) => (Scope::All, None),
        (None, false) => {
            return Err(CliError::MissingScope {
                command: "`batchd retry`",
                needed: "--file NAME to retry the failed items of one input file, or --all to retry every failed item",
            });
        }
    };
    let requeued = store.retry_failed(scope).await?;
    Ok(Retried {
        file: name,
        requeued,
    })
}
