//! batchd: JSONL files of LLM requests in, results in SQLite out, through Together AI's batch
//! jobs (cheaper, slower) and rate-limited real-time calls (urgent or unbatchable requests).
//!
//! The stages, in the order data moves through them:
//!
//! - [`config`]: settings from defaults, a TOML file and `BATCHD_*` variables, validated into
//!   one typed `Config`.
//! - [`store`]: the SQLite database, its migrations and typed queries.
//! - [`ingest`]: watch the inbox, check each line, store work items, move the file away.
//! - [`pack`]: group queued items into batches under the request, byte and in-flight caps.
//! - [`submit`]: upload a batch file and create the provider job, crash-safely.
//! - [`poll`]: follow jobs to the end and download their output and error files.
//! - [`realtime`]: send urgent and unbatchable items as rate-limited calls with retries.
//! - [`results`]: write outcomes and their state changes in one transaction.
//! - [`export`]: write each finished input file's results to the outbox, once.
//! - [`checkpoint`]: copy SQLite's write-ahead log into the database after writes.
//! - [`daemon`]: run the stages as named tasks under one cancellation token.
//!
//! Beside them: [`provider`] is the Together HTTP client, [`models`] its model catalogue, [`simulate`] a local Together API
//! simulator for tests and the demo, [`logging`] the log output, [`reload`] the SIGHUP reload,
//! and [`cli`] the commands that read the database.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod export;
pub mod fault;
pub mod ingest;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod pack;
pub mod poll;
pub mod provider;
pub mod realtime;
pub mod reload;
pub mod results;
pub mod schedule;
pub mod simulate;
pub mod store;
pub mod submit;
pub mod wake;
pub mod watchdog;
