//! `batchd results`: writes the results of one input file to stdout, as export lines (the
//! format of the daemon's exports) or as a table to read. Rows are streamed from the database.

use std::io::IsTerminal;
use std::path::Path;

use futures::TryStreamExt;
use serde_json::Value;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

use super::{CliError, find_file};
use crate::export::{self, ExportError};
use crate::store::{ExportRow, Store};

/// Output formats of `batchd results`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One export line per finished item, as in the daemon's exports.
    Jsonl,
    /// One row per item with its state and a short response or error.
    Table,
}

/// Maximum length in characters of the response or error text in a table row.
const TABLE_TEXT_CHARS: usize = 60;

/// Writes the results of input file `name` to stdout. Returns the number of rows written.
pub async fn run(
    store: &Store,
    database: &Path,
    name: &str,
    format: Format,
) -> Result<u64, CliError> {
    let file = find_file(store, database, name).await?;
    if let Some(purged_at) = file.purged_at {
        return Err(CliError::Purged {
            name: name.to_string(),
            purged_at,
            export_path: file.export_path.unwrap_or_else(|| "-".to_string()),
        });
    }
    let mut out = BufWriter::new(tokio::io::stdout());
    let show_progress = std::io::stderr().is_terminal();
    let progress = |written: u64| {
        if show_progress {
            eprint!("\r{written} of {} items written", file.items);
        }
    };
    let (written, skipped) = match format {
        Format::Jsonl => export::write_results(store, file.id, &mut out, progress).await?,
        Format::Table => (write_table(store, file.id, &mut out, progress).await?, 0),
    };
    if show_progress && written >= 10_000 {
        // Ends the progress line, which each update rewrites after a carriage return.
        eprintln!();
    }
    if skipped > 0 {
        eprintln!(
            "{skipped} items of {name} are not finished yet and are not in the output; run `batchd status` to follow them"
        );
    }
    out.flush().await.map_err(ExportError::Write)?;
    Ok(written)
}

/// Writes every item of a file as a table row, in line order.
async fn write_table<W: AsyncWrite + Unpin>(
    store: &Store,
    file_id: i64,
    out: &mut W,
    mut progress: impl FnMut(u64),
) -> Result<u64, CliError> {
    let header = format!(
        "{:>6}  {:<24}  {:<10}  {:>6}  RESULT\n",
        "LINE", "CUSTOM_ID", "STATE", "STATUS"
    );
    out.write_all(header.as_bytes())
        .await
        .map_err(ExportError::Write)?;
    let mut rows = std::pin::pin!(store.export_rows(file_id));
    let mut written = 0;
    while let Some(row) = rows.try_next().await? {
        let status = row
            .status_code
            .map(|code| code.to_string())
            .unwrap_or_else(|| "-".to_string());
        let line = format!(
            "{:>6}  {:<24}  {:<10}  {:>6}  {}\n",
            row.line_no,
            row.custom_id,
            row.state.as_str(),
            status,
            summary(&row)
        );
        out.write_all(line.as_bytes())
            .await
            .map_err(ExportError::Write)?;
        written += 1;
        if written % 10_000 == 0 {
            progress(written);
        }
    }
    Ok(written)
}

/// Returns a one-line summary of an item's result: the error of a failed item, the response text
/// of a chat or completion, the size of an embedding, or the start of another response.
fn summary(row: &ExportRow) -> String {
    let text = if let Some(error) = &row.error {
        error.clone()
    } else if let Some(response) = &row.response {
        let body: Value = serde_json::from_str(response).unwrap_or(Value::Null);
        let choice = &body["choices"][0];
        if let Some(content) = choice["message"]["content"].as_str() {
            content.to_string()
        } else if let Some(text) = choice["text"].as_str() {
            text.to_string()
        } else if let Some(vector) = body["data"][0]["embedding"].as_array() {
            format!("embedding of {} dimensions", vector.len())
        } else {
            response.clone()
        }
    } else {
        "-".to_string()
    };
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > TABLE_TEXT_CHARS {
        let cut: String = flat.chars().take(TABLE_TEXT_CHARS - 3).collect();
        format!("{cut}...")
    } else {
        flat
    }
}
