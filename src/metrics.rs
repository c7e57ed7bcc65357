//! Counters and latencies for `STATUS=` and the optional Prometheus endpoint.
//!
//! The counters are process-wide, as Prometheus clients usually keep them, so the stages that
//! count need no handle passed in. Items by state and jobs by status are read from SQLite at
//! each scrape instead, because the database, not this process, is their source of truth.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "failed to listen for metrics on {addr}: {source}; choose a free port in `metrics.listen`"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

/// The process-wide counters.
pub struct Metrics {
    realtime_requests: Family<EndpointLabel, Counter>,
    realtime_rate_limited: Family<EndpointLabel, Counter>,
    retries: Family<PathLabel, Counter>,
    ingest_seconds: Histogram,
    write_seconds: Histogram,
}

/// Returns the process-wide counters.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = Metrics {
            realtime_requests: Family::default(),
            realtime_rate_limited: Family::default(),
            retries: Family::default(),
            // 1 ms to about 30 minutes for a file; 0.1 ms to about 3 s for a write.
            ingest_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 21)),
            write_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
        };
        // Every series exists from the start at 0, so a rate over it reads 0, not "no data".
        for endpoint in crate::config::SUPPORTED_ENDPOINTS {
            let label = EndpointLabel {
                endpoint: endpoint.to_string(),
            };
            let _ = metrics.realtime_requests.get_or_create(&label);
            let _ = metrics.realtime_rate_limited.get_or_create(&label);
        }
        for path in ["batch", "realtime"] {
            let _ = metrics.retries.get_or_create(&PathLabel { path });
        }
        metrics
    })
}

impl Metrics {
    /// Counts one real-time request sent to `endpoint`, and whether it was rate limited.
    pub fn realtime_request(&self, endpoint: &str, rate_limited: bool) {
        let label = EndpointLabel {
            endpoint: endpoint.to_string(),
        };
        self.realtime_requests.get_or_create(&label).inc();
        if rate_limited {
            self.realtime_rate_limited.get_or_create(&label).inc();
        }
    }

    /// Returns the real-time requests sent so far to `endpoint`.
    pub fn realtime_requests(&self, endpoint: &str) -> u64 {
        let label = EndpointLabel {
            endpoint: endpoint.to_string(),
        };
        self.realtime_requests.get_or_create(&label).get()
    }

    /// Counts items put back in the queue after a failure; `path` is `batch` or `realtime`.
    pub fn retries(&self, path: &'static str, count: u64) {
        self.retries
            .get_or_create(&PathLabel { path })
            .inc_by(count);
    }

    pub fn ingest_took(&self, elapsed: Duration) {
        self.ingest_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn write_took(&self, elapsed: Duration) {
        self.write_seconds.observe(elapsed.as_secs_f64());
    }
}

/// Renders every metric in the Prometheus text format, reading item and job counts from `store`.
pub async fn render(store: &Store) -> Result<String, StoreError> {
    let items: Family<StateLabel, Gauge> = Family::default();
    for (state, count) in store.item_counts().await? {
        let label = StateLabel {
            state: state.as_str().to_string(),
        };
        items.get_or_create(&label).set(count as i64);
    }
    let jobs: Family<StatusLabel, Gauge> = Family::default();
    for (status, count) in store.batch_status_counts().await? {
        jobs.get_or_create(&StatusLabel { status })
            .set(count as i64);
    }

    let metrics = global();
    let mut registry = Registry::with_prefix("batchd");
    registry.register("items", "Work items by state", items);
    registry.register("jobs", "Provider batch jobs by status", jobs);
    registry.register(
        "realtime_requests",
        "Real-time requests sent, by endpoint",
        metrics.realtime_requests.clone(),
    );
    registry.register(
        "realtime_rate_limited",
        "Real-time requests answered with 429, by endpoint",
        metrics.realtime_rate_limited.clone(),
    );
    registry.register(
        "retries",
        "Items returned to the queue after a failure, by path",
        metrics.retries.clone(),
    );
    registry.register(
        "ingest_seconds",
        "Time to ingest one input file",
        metrics.ingest_seconds.clone(),
    );
    registry.register(
        "write_seconds",
        "Time to store the results of one real-time answer or one batch result file",
        metrics.write_seconds.clone(),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    Ok(text)
}

/// Binds the metrics listener. The address must be loopback; config validation checks it.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` on `listener` until cancelled.
pub async fn serve(listener: tokio::net::TcpListener, store: Store, cancel: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(url = %format!("http://{addr}/metrics"), "serving Prometheus metrics");
    }
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(store);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "failed to serve metrics; the endpoint stays down until batchd restarts");
    }
}

async fn scrape(axum::extract::State(store): axum::extract::State<Store>) -> impl IntoResponse {
    match render(&store).await {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(error) => {
            tracing::warn!(%error, "failed to read counts for a metrics scrape");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("failed to read counts from the database: {error}\n"),
            )
        }
    }
}
