//! The real-time path: urgent items, items due before a batch could finish, and endpoints the
//! provider cannot batch go out as individual rate-limited calls.
//!
//! One worker per endpoint claims due items (a lease marks them `in_flight`), waits for the
//! endpoint's limiter and a concurrency permit, and sends the call as its own task. Embedding
//! items of one model and one set of parameters are coalesced into a single request of up to
//! `embedding_inputs_per_request` inputs and mapped back by `index`.

pub mod limiter;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, LiveReceiver, RealtimeConfig, SUPPORTED_ENDPOINTS};
use crate::provider::wait::RetryPolicy;
use crate::provider::{Answer, Failure, Provider, ProviderError};
use crate::results::{self, AfterFailure};
use crate::store::{ClaimedItem, Store, StoreError};
use crate::wake::Signal;
pub use limiter::EndpointLimiter;

const EMBEDDINGS: &str = "/v1/embeddings";

/// Waits between claims that found nothing, doubling from the first to the second while the
/// endpoint stays idle. Stored items raise a wake-up, and the timer only catches items whose
/// retry backoff or deadline came due. So an idle daemon checks each endpoint every few seconds.
const IDLE_WAIT_MIN: Duration = Duration::from_secs(1);
const IDLE_WAIT_MAX: Duration = Duration::from_secs(8);
/// Shared state of the real-time workers.
pub struct Realtime {
    store: Store,
    provider: Provider,
    config: RealtimeConfig,
    /// JSON array of batchable endpoints, as the claim queries take it.
    batchable: String,
    deadline_margin: Duration,
    limiters: HashMap<&'static str, Arc<EndpointLimiter>>,
    /// The per-minute rates, which a reload can change; read before each call.
    live: LiveReceiver,
    permits: Arc<Semaphore>,
    /// Raised when items arrive or are requeued.
    work: Signal,
    /// Raised after a call's outcome was stored, so the exporter looks for finished files.
    stored: Signal,
    calls: TaskTracker,
}

impl Realtime {
    /// Creates the workers' state from the `[realtime]` settings and the batch path's
    /// batchable endpoints and deadline margin.
    pub fn new(
        store: Store,
        provider: Provider,
        settings: &Config,
        live: LiveReceiver,
        work: Signal,
        stored: Signal,
        calls: TaskTracker,
    ) -> Arc<Realtime> {
        let limiters = {
            let rates = live.borrow();
            SUPPORTED_ENDPOINTS
                .iter()
                .map(|&e| (e, Arc::new(EndpointLimiter::per_minute(rates.rate_for(e)))))
                .collect()
        };
        let (config, batch) = (settings.realtime.clone(), &settings.batch);
        Arc::new(Realtime {
            store,
            provider,
            permits: Arc::new(Semaphore::new(config.max_concurrency)),
            batchable: serde_json::to_string(&batch.batchable_endpoints)
                .expect("strings serialize"),
            deadline_margin: batch.deadline_margin,
            config,
            limiters,
            live,
            work,
            stored,
            calls,
        })
    }

    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial: self.config.backoff_initial,
            max_backoff: self.config.backoff_max,
            max_wait: self.config.max_retry_wait,
        }
    }

    /// Runs one worker per endpoint until cancelled. Calls already sent keep running in the
    /// `calls` tracker so that shutdown can wait for them.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let workers = TaskTracker::new();
        for endpoint in SUPPORTED_ENDPOINTS {
            let this = self.clone();
            let cancel = cancel.clone();
            let worker = async move { this.worker(endpoint, cancel).await };
            workers.spawn(
                crate::watchdog::scope_child(format!("realtime {endpoint}"), worker)
                    .instrument(tracing::info_span!("realtime", endpoint)),
            );
        }
        workers.close();
        workers.wait().await;
    }

    async fn claim(&self, endpoint: &'static str) -> Result<Vec<ClaimedItem>, StoreError> {
        let now = Utc::now();
        let cutoff = now + chrono::Duration::from_std(self.deadline_margin).unwrap_or_default();
        let lease_until = now + chrono::Duration::from_std(self.config.lease).unwrap_or_default();
        if endpoint == EMBEDDINGS {
            let claimed = self
                .store
                .claim_embeddings(
                    &self.batchable,
                    cutoff,
                    lease_until,
                    self.config.embedding_inputs_per_request,
                )
                .await?;
            self.fit_token_budget(claimed).await
        } else {
            self.store
                .claim_realtime(endpoint, &self.batchable, cutoff, lease_until, 1)
                .await
        }
    }

    async fn worker(self: Arc<Self>, endpoint: &'static str, cancel: CancellationToken) {
        let limiter = self.limiters[endpoint].clone();
        let mut work = self.work.listen();
        let mut idle_wait = IDLE_WAIT_MIN;
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                permit = self.permits.clone().acquire_owned() => permit.expect("semaphore never closes"),
            };
            // Nothing is claimed while the endpoint is paused, so no item waits out a pause
            // under a lease.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = limiter.wait_unpaused() => {}
            }
            let claimed = {
                let _busy = crate::watchdog::busy();
                self.claim(endpoint).await
            };
            let items = match claimed {
                Ok(items) => items,
                Err(error) => {
                    tracing::warn!(%error, "failed to claim items for real-time calls; retrying");
                    Vec::new()
                }
            };
            if items.is_empty() {
                drop(permit);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = work.wait() => idle_wait = IDLE_WAIT_MIN,
                    _ = tokio::time::sleep(idle_wait) => idle_wait = (idle_wait * 2).min(IDLE_WAIT_MAX),
                }
                continue;
            }
            idle_wait = IDLE_WAIT_MIN;
            limiter.set_rate(self.live.borrow().rate_for(endpoint));
            tokio::select! {
                _ = cancel.cancelled() => {
                    // Never sent, so return them now instead of waiting for the lease to expire.
                    self.release(&items).await;
                    return;
                }
                _ = limiter.acquire() => {}
            }
            let this = self.clone();
            let limiter = limiter.clone();
            self.calls.spawn(
                async move {
                    this.send(endpoint, &items, &limiter).await;
                    drop(permit);
                }
                .instrument(tracing::debug_span!("call", endpoint)),
            );
        }
    }

    /// Keeps the longest run of claimed embedding items whose estimated tokens fit one request,
    /// fails items whose input alone is over the per-input limit, and returns the rest to the
    /// queue.
    async fn fit_token_budget(
        &self,
        claimed: Vec<ClaimedItem>,
    ) -> Result<Vec<ClaimedItem>, StoreError> {
        let max_input = self.config.embedding_max_input_tokens;
        let mut kept = Vec::new();
        let mut tokens = 0;
        let mut full = false;
        for item in claimed {
            let estimate = estimate_input_tokens(&item.body);
            if estimate > max_input {
                let message = format!(
                    "input too long: about {estimate} tokens, more than the limit of {max_input} (`realtime.embedding_max_input_tokens`)"
                );
                results::record_local_failure(&self.store, item.id, &message).await?;
                continue;
            }
            if full
                || (!kept.is_empty()
                    && tokens + estimate > self.config.embedding_tokens_per_request)
            {
                full = true;
                self.store.release_claim(item.id).await?;
                continue;
            }
            tokens += estimate;
            kept.push(item);
        }
        Ok(kept)
    }

    /// Returns claimed items that were never sent to the queue.
    async fn release(&self, items: &[ClaimedItem]) {
        for item in items {
            if let Err(error) = self.store.release_claim(item.id).await {
                tracing::warn!(item = item.id, %error, "failed to release an unsent item; its lease will expire");
            }
        }
    }

    /// Sends one request for `items` (several only for coalesced embeddings) and records the
    /// outcome of each item.
    async fn send(&self, endpoint: &str, items: &[ClaimedItem], limiter: &EndpointLimiter) {
        let fallback = self.fallback_for(items);
        let built = build_request(items).map(|mut request| {
            if let Some(model) = fallback {
                request["model"] = Value::String(model.to_string());
            }
            request
        });
        let request = match built {
            Ok(request) => request,
            Err(error) => {
                tracing::error!(%error, "stored request body is not JSON; failing the items");
                for item in items {
                    let message = format!("stored request body is not valid JSON: {error}");
                    if let Err(error) =
                        results::record_local_failure(&self.store, item.id, &message).await
                    {
                        tracing::error!(item = item.id, %error, "failed to record a failed item");
                    }
                }
                return;
            }
        };
        let result = self.provider.call(endpoint, &request).await;
        let rate_limited = matches!(&result, Err(e) if e.class() == Failure::RateLimited);
        crate::metrics::global().realtime_request(endpoint, rate_limited);
        let started = std::time::Instant::now();
        let outcome = match result {
            Ok(answer) => {
                crate::fault::point("after-realtime-answer");
                self.record_answers(items, answer, fallback).await
            }
            Err(error) => self.record_failure(items, &error, limiter).await,
        };
        crate::metrics::global().write_took(started.elapsed());
        match outcome {
            Ok(()) => self.stored.raise(),
            Err(error) => {
                tracing::error!(%error, "failed to record a real-time result; the lease will return the items to the queue");
            }
        }
    }

    /// Returns the fallback model for a single item that failed often enough on its own.
    fn fallback_for(&self, items: &[ClaimedItem]) -> Option<&str> {
        let [item] = items else {
            return None;
        };
        if item.attempts < self.config.fallback_after_attempts {
            return None;
        }
        self.config
            .fallback_models
            .get(&item.model)
            .map(String::as_str)
    }

    async fn record_answers(
        &self,
        items: &[ClaimedItem],
        answer: Answer,
        fallback: Option<&str>,
    ) -> Result<(), StoreError> {
        if items.len() == 1 {
            results::record_answer(&self.store, items[0].id, &answer, fallback).await?;
            return Ok(());
        }
        for (item, body) in items
            .iter()
            .zip(split_embeddings(&answer.body, items.len()))
        {
            let single = Answer {
                status: answer.status,
                body,
            };
            results::record_answer(&self.store, item.id, &single, None).await?;
        }
        Ok(())
    }

    async fn record_failure(
        &self,
        items: &[ClaimedItem],
        error: &ProviderError,
        limiter: &EndpointLimiter,
    ) -> Result<(), StoreError> {
        let policy = self.policy();
        let attempts = items.iter().map(|i| i.attempts).max().unwrap_or(0);
        let delay = match error.class() {
            Failure::OutOfCredit => self.config.out_of_credit_pause,
            _ => policy.delay(error.server_wait(), attempts),
        };
        match error.class() {
            Failure::RateLimited => {
                limiter.pause(delay);
                tracing::warn!(%error, wait_ms = delay.as_millis() as u64, "rate limited; pausing the endpoint");
            }
            Failure::OutOfCredit => {
                limiter.pause(delay);
                tracing::error!(
                    %error,
                    pause_secs = delay.as_secs(),
                    "the provider account is out of credit: add credit, then restart batchd or wait for the pause to end"
                );
            }
            Failure::Retryable | Failure::Fatal => {}
        }
        let mut failed = 0;
        for item in items {
            let after = results::record_call_failure(
                &self.store,
                item.id,
                item.attempts,
                self.config.max_attempts,
                error,
                delay,
            )
            .await?;
            if after == AfterFailure::Failed {
                failed += 1;
            }
        }
        if failed > 0 {
            tracing::warn!(%error, items = failed, "real-time call failed; items marked failed");
        } else if error.class() == Failure::Retryable {
            tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "real-time call failed; retrying");
        }
        Ok(())
    }
}

/// Estimates the tokens of an embedding item's input from its length: about four characters
/// per token for English text. Array inputs count their longest element.
pub fn estimate_input_tokens(body: &str) -> u64 {
    let chars = |v: &Value| v.as_str().map_or(0, |s| s.chars().count() as u64);
    let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let longest = match &body["input"] {
        Value::Array(inputs) => inputs.iter().map(chars).max().unwrap_or(0),
        input => chars(input),
    };
    longest.div_ceil(4)
}

/// Builds the request body: the item's own body, or for coalesced embeddings the shared
/// parameters with every item's input in one array.
fn build_request(items: &[ClaimedItem]) -> Result<Value, serde_json::Error> {
    let mut first: Value = serde_json::from_str(&items[0].body)?;
    if items.len() == 1 {
        return Ok(first);
    }
    let mut inputs = Vec::with_capacity(items.len());
    for item in items {
        let body: Value = serde_json::from_str(&item.body)?;
        inputs.push(body["input"].clone());
    }
    first["input"] = Value::Array(inputs);
    Ok(first)
}

/// Splits a coalesced embeddings response into one response per input, in input order, by
/// the `index` of each vector. An input missing from the response gets an empty `data` list.
fn split_embeddings(body: &Value, count: usize) -> Vec<Value> {
    let mut per_input: Vec<Vec<Value>> = vec![Vec::new(); count];
    for entry in body["data"].as_array().into_iter().flatten() {
        if let Some(index) = entry["index"]
            .as_u64()
            .map(|i| i as usize)
            .filter(|i| *i < count)
        {
            let mut entry = entry.clone();
            entry["index"] = json!(0);
            per_input[index].push(entry);
        }
    }
    // NOTE: usage belongs to the whole coalesced request and cannot be split per input, so
    // each item's response carries none.
    per_input
        .into_iter()
        .map(|data| {
            json!({
                "object": body.get("object").cloned().unwrap_or(json!("list")),
                "model": body.get("model").cloned().unwrap_or(Value::Null),
                "data": data,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: i64, body: Value) -> ClaimedItem {
        ClaimedItem {
            id,
            endpoint: EMBEDDINGS.into(),
            model: "e".into(),
            body: body.to_string(),
            attempts: 0,
        }
    }

    #[test]
    fn coalesced_request_keeps_input_order() {
        let items = [
            item(1, json!({"model": "e", "input": "first"})),
            item(2, json!({"model": "e", "input": "second"})),
        ];
        let request = build_request(&items).unwrap();
        assert_eq!(request["input"], json!(["first", "second"]));
        assert_eq!(request["model"], "e");
    }

    #[test]
    fn answers_are_mapped_back_by_index() {
        let body = json!({"object": "list", "model": "e", "data": [
            {"object": "embedding", "embedding": [0.2], "index": 1},
            {"object": "embedding", "embedding": [0.1], "index": 0},
        ]});
        let split = split_embeddings(&body, 2);
        assert_eq!(split[0]["data"][0]["embedding"], json!([0.1]));
        assert_eq!(split[1]["data"][0]["embedding"], json!([0.2]));
        assert_eq!(split[1]["data"][0]["index"], json!(0));
    }
}
