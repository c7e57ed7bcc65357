//! batchd: JSONL files of LLM requests in, results in SQLite out.
pub mod simulate;
