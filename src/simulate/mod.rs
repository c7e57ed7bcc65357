//! A local simulator of the parts of Together AI's HTTP API that batchd uses: files, batch jobs,
//! the real-time chat, completion, embedding and image endpoints, and the model list. Tests,
//! benchmarks and the demo run the daemon against it instead of the real service.
//!
//! It binds loopback addresses only. Responses are deterministic functions of the request
//! ([`chat_answer_text`], [`embedding_vector`]), so a test can check every result it gets back.
//! Batch jobs need no background task. A job's status is computed from the time since its
//! creation on every request that reads it, and its output and error files are written the first
//! time it is found terminal. Everything lives in memory and is lost when the simulator stops.
//!
//! [`SimConfig::faults`] injects the failures the real service shows: rate limits, overload,
//! server errors, dropped connections, latency, failed, expired and stalled jobs, error lines and
//! odd status spellings. Each decision is a deterministic function of the seed and the request.
//! [`SimConfig::realtime_latency`] gives real-time responses a log-normal latency.
//!
//! Routes outside Together's API: `PUT /_sim/uploads/{file_id}` is the presigned upload URL of
//! the two-step file upload, `GET /_sim/stats` returns [`SimStats`], and `GET /_sim/requests`
//! returns every API request as a [`RequestRecord`], in arrival order.

mod answers;
mod batch_input;
mod batch_lines;
mod batch_store;
mod batches;
mod cli;
mod connection;
mod dice;
mod error;
mod faults;
mod files;
mod ids;
mod jobs;
mod latency;
mod limits;
mod models;
mod models_v2;
mod realtime;
mod realtime_faults;
mod request_log;
mod stats;
mod uploads;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use answers::{EMBEDDING_DIMENSION, chat_answer_text, embedding_vector};
pub use cli::{SimulateArgs, run_cli};
pub use error::SimulateError;
pub use faults::{
    DEFAULT_EXPIRE_COMPLETED_FRACTION, DEFAULT_JOB_DEADLINE_SECS, DEFAULT_RETRY_AFTER_SECS, Faults,
    FaultsError, RateLimitKind, RetryAfterStyle, StatusCase, Window,
};
pub use latency::{LatencyError, LogNormalLatency};
pub use models::add_model;
pub use request_log::RequestRecord;
pub use stats::{SimStats, SimStatsHandle};

use connection::{Connection, SeverableListener};
use error::ApiError;

/// Default time from batch creation to `COMPLETED`.
pub const DEFAULT_TURNAROUND: Duration = Duration::from_secs(3);
/// Default chat requests per minute: Together's former tier-1 limit for chat models.
pub const DEFAULT_CHAT_PER_MINUTE: u32 = 600;
/// Default text-completion requests per minute.
pub const DEFAULT_COMPLETIONS_PER_MINUTE: u32 = 600;
/// Default embedding requests per minute.
pub const DEFAULT_EMBEDDINGS_PER_MINUTE: u32 = 300;
/// Default image requests per minute.
pub const DEFAULT_IMAGES_PER_MINUTE: u32 = 60;

/// Settings of one simulator.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Time from batch creation to `COMPLETED`. The first tenth of it is spent `VALIDATING`.
    pub turnaround: Duration,
    /// Seed of the order in which batch output lines are written and of every fault decision.
    pub seed: u64,
    /// Requests per minute accepted by each real-time endpoint.
    pub limits: RateLimits,
    /// Extra latency before each real-time response, so that tests can hold calls in flight.
    pub realtime_delay: Duration,
    /// Latency distribution of accepted real-time requests, drawn per request on top of
    /// `realtime_delay`; `None` adds nothing.
    pub realtime_latency: Option<LogNormalLatency>,
    /// Faults to inject; the default injects none.
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            turnaround: DEFAULT_TURNAROUND,
            seed: 0,
            limits: RateLimits::default(),
            realtime_delay: Duration::ZERO,
            realtime_latency: None,
            faults: Faults::default(),
        }
    }
}

/// Requests per minute that each real-time endpoint accepts over a sliding 60-second window.
/// A limit of 0 rejects every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub chat_per_minute: u32,
    pub completions_per_minute: u32,
    pub embeddings_per_minute: u32,
    pub images_per_minute: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            chat_per_minute: DEFAULT_CHAT_PER_MINUTE,
            completions_per_minute: DEFAULT_COMPLETIONS_PER_MINUTE,
            embeddings_per_minute: DEFAULT_EMBEDDINGS_PER_MINUTE,
            images_per_minute: DEFAULT_IMAGES_PER_MINUTE,
        }
    }
}

/// State shared by all request handlers of one simulator.
struct Shared {
    config: SimConfig,
    /// The job timeline and status spelling, derived from `config`.
    job_settings: jobs::JobSettings,
    /// Scheme, host and port, such as `http://127.0.0.1:41234`, for absolute URLs.
    origin: String,
    /// When the simulator was bound, the origin of overload windows and request times.
    started: Instant,
    stats: SimStatsHandle,
    limiters: limits::Limiters,
    /// Draws the latency of each accepted real-time request when a distribution is set.
    latency: Option<latency::LatencySampler>,
    dice: dice::Dice,
    request_log: request_log::RequestLog,
    store: Mutex<Store>,
}

/// Files and batches, behind one lock because a batch writes its result files when it ends.
#[derive(Default)]
struct Store {
    files: files::FileStore,
    batches: batch_store::BatchStore,
}

impl Shared {
    /// Locks the store after bringing every batch up to date with the current time, so that a
    /// handler reads the files and statuses that exist now.
    fn current_store(&self) -> MutexGuard<'_, Store> {
        let mut store = self.store.lock().expect("store lock poisoned");
        let Store { files, batches } = &mut *store;
        let line_errors = batches.refresh_all(Instant::now(), &self.job_settings, files);
        self.stats
            .record_faults(faults::FaultKind::LineError, line_errors);
        store
    }
}

/// A bound simulator, ready to [`run`](Simulator::run).
pub struct Simulator {
    listener: SeverableListener,
    shared: Arc<Shared>,
}

impl Simulator {
    /// Binds the listener. Rejects any address that is not loopback (127.0.0.0/8 or ::1) with a
    /// clear error naming the address, and rejects invalid faults. Port 0 picks a free port.
    pub async fn bind(addr: SocketAddr, config: SimConfig) -> Result<Simulator, SimulateError> {
        if !addr.ip().is_loopback() {
            return Err(SimulateError::NotLoopback { addr });
        }
        config.faults.validate()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SimulateError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(SimulateError::LocalAddr)?;

        let shared = Shared {
            job_settings: jobs::JobSettings::new(&config),
            origin: format!("http://{local_addr}"),
            started: Instant::now(),
            stats: SimStatsHandle::default(),
            limiters: limits::Limiters::new(&config.limits, config.faults.token_limit_per_minute),
            latency: config
                .realtime_latency
                .map(|distribution| latency::LatencySampler::new(distribution, config.seed)),
            dice: dice::Dice::new(config.seed),
            request_log: request_log::RequestLog::default(),
            store: Mutex::new(Store::default()),
            config,
        };
        Ok(Simulator {
            listener: SeverableListener::new(listener),
            shared: Arc::new(shared),
        })
    }

    /// Returns the API base URL that clients use, such as `http://127.0.0.1:41234/v1`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.shared.origin)
    }

    /// Returns a handle on the live counters, the same data as `GET /_sim/stats`.
    pub fn stats(&self) -> SimStatsHandle {
        self.shared.stats.clone()
    }

    /// Serves requests until `cancel` is cancelled, then lets the requests under way finish.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), SimulateError> {
        let base_url = self.base_url();
        tracing::info!(base_url, "simulator listening");
        let app = router(self.shared).into_make_service_with_connect_info::<Connection>();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
            .map_err(SimulateError::Serve)?;
        tracing::info!(base_url, "simulator stopped");
        Ok(())
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route(
            "/v1/files",
            get(files::list_files).post(uploads::create_file),
        )
        .route("/v1/files/upload", post(uploads::upload_file))
        .route(
            "/v1/files/{file_id}",
            get(files::get_file).delete(files::delete_file),
        )
        .route("/v1/files/{file_id}/content", get(files::get_content))
        .route("/v1/files/{file_id}/preprocess", post(uploads::preprocess))
        .route(
            "/v1/batches",
            get(batches::list_batches).post(batches::create_batch),
        )
        .route("/v1/batches/{batch_id}", get(batches::get_batch))
        .route("/v1/batches/{batch_id}/cancel", post(batches::cancel_batch))
        .route("/v1/chat/completions", post(realtime::chat_completions))
        .route("/v1/completions", post(realtime::completions))
        .route("/v1/embeddings", post(realtime::embeddings))
        .route("/v1/images/generations", post(realtime::image_generations))
        .route("/v1/models", get(models::list_models))
        .route(
            "/v2/supported-models",
            get(models_v2::list_supported_models),
        )
        .route(
            "/v2/projects/{project_id}/models",
            get(models_v2::list_project_models),
        )
        .route_layer(middleware::from_fn(require_api_key));

    Router::new()
        .merge(api)
        .route("/_sim/uploads/{file_id}", put(uploads::put_upload))
        .route("/_sim/stats", get(stats::get_stats))
        .route("/_sim/requests", get(request_log::get_requests))
        .fallback(unknown_route)
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            request_log::track_request,
        ))
        .layer(DefaultBodyLimit::max(files::MAX_REQUEST_BYTES))
        .with_state(shared)
}

/// Rejects a request without `Authorization: Bearer <key>`. Any non-empty key is accepted.
async fn require_api_key(request: Request, next: Next) -> Response {
    let has_key = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .is_some_and(|(scheme, key)| {
            scheme.eq_ignore_ascii_case("bearer") && !key.trim().is_empty()
        });
    if has_key {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

async fn unknown_route(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}; the simulator serves the files, batches, chat, completions, \
         embeddings, images and models endpoints under /v1, and the model lists of /v2",
        request.method(),
        request.uri().path()
    ))
}
