//! Liveness for systemd's watchdog. Each stage marks itself busy while it works and idle while
//! it waits for work. `WATCHDOG=1` is sent only while no stage has been busy with one piece of
//! work for longer than the watchdog period, so a stage stuck on a hung call or a lock stops the
//! pings, and systemd restarts the daemon.
//!
//! Stages find their entry through a task-local set by [`Watchdog::scope`], so stage code only
//! calls [`busy`] and [`progress`] and needs no handle passed in.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A watched stage. `busy_since` is milliseconds since `epoch` plus one, or 0 while idle.
struct Stage {
    name: String,
    epoch: Instant,
    busy_since: AtomicU64,
}

impl Stage {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Returns how long the stage has been busy, or `None` while it is idle.
    fn busy_for(&self) -> Option<Duration> {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(self.now().saturating_sub(since))),
        }
    }
}

/// A task-local handle: the registry, so sub-tasks can register, and the task's own stage.
#[derive(Clone)]
struct Scope {
    registry: Watchdog,
    stage: Arc<Stage>,
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// The registry of watched stages.
#[derive(Clone, Default)]
pub struct Watchdog {
    stages: Arc<Mutex<Vec<Arc<Stage>>>>,
}

impl Watchdog {
    pub fn new() -> Self {
        Watchdog::default()
    }

    fn register(&self, name: String) -> Arc<Stage> {
        let stage = Arc::new(Stage {
            name,
            epoch: Instant::now(),
            busy_since: AtomicU64::new(0),
        });
        self.stages
            .lock()
            .expect("the stage list is never left poisoned")
            .push(stage.clone());
        stage
    }

    /// Runs `future` as the watched stage `name`.
    pub fn scope<F: Future>(
        &self,
        name: &str,
        future: F,
    ) -> impl Future<Output = F::Output> + use<F> {
        let scope = Scope {
            registry: self.clone(),
            stage: self.register(name.to_string()),
        };
        SCOPE.scope(scope, future)
    }

    /// Returns the stage busy the longest, if one has been busy for more than `limit`.
    pub fn stuck(&self, limit: Duration) -> Option<(String, Duration)> {
        let stages = self
            .stages
            .lock()
            .expect("the stage list is never left poisoned");
        stages
            .iter()
            .filter_map(|stage| stage.busy_for().map(|busy| (stage, busy)))
            .filter(|(_, busy)| *busy > limit)
            .max_by_key(|(_, busy)| *busy)
            .map(|(stage, busy)| (stage.name.clone(), busy))
    }

    /// Sends `WATCHDOG=1` every half `period` while no stage is stuck, until cancelled. A stuck
    /// stage is logged once; pings resume if it recovers before systemd acts.
    pub async fn run(self, period: Duration, cancel: CancellationToken) {
        let mut reported = false;
        let mut ticks = tokio::time::interval(period / 2);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.stuck(period) {
                None => {
                    reported = false;
                    crate::daemon::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                Some((stage, busy)) if !reported => {
                    reported = true;
                    tracing::error!(
                        stage,
                        busy_secs = busy.as_secs_f64(),
                        "stage made no progress for longer than the watchdog period; withholding the watchdog ping so systemd restarts batchd"
                    );
                }
                Some(_) => {}
            }
        }
    }
}

/// Runs `future` as a further watched stage registered in the current stage's watchdog, for
/// sub-tasks such as per-endpoint workers. Outside a watched stage it runs unwatched.
pub fn scope_child<F: Future>(
    name: impl Into<String>,
    future: F,
) -> impl Future<Output = F::Output> {
    let scope = SCOPE
        .try_with(|scope| scope.registry.clone())
        .ok()
        .map(|registry| Scope {
            stage: registry.register(name.into()),
            registry,
        });
    async move {
        match scope {
            Some(scope) => SCOPE.scope(scope, future).await,
            None => future.await,
        }
    }
}

/// Marks the current stage busy until the returned guard is dropped.
#[must_use = "the stage is busy only while the guard lives"]
pub fn busy() -> Busy {
    let stage = SCOPE.try_with(|scope| scope.stage.clone()).ok();
    if let Some(stage) = &stage {
        stage.busy_since.store(stage.now(), Ordering::Relaxed);
    }
    Busy { stage }
}

/// Records progress within a long piece of work, such as each line of a large file, so that
/// only time without progress counts against the stage.
pub fn progress() {
    let _ = SCOPE.try_with(|scope| {
        let stage = &scope.stage;
        if stage.busy_since.load(Ordering::Relaxed) != 0 {
            stage.busy_since.store(stage.now(), Ordering::Relaxed);
        }
    });
}

/// Keeps a stage busy while alive; see [`busy`].
pub struct Busy {
    stage: Option<Arc<Stage>>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(stage) = &self.stage {
            stage.busy_since.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn idle_stage_is_never_stuck() {
        let watchdog = Watchdog::new();
        watchdog
            .scope("pack", async {
                drop(busy());
                tokio::time::advance(LIMIT * 3).await;
            })
            .await;
        assert_eq!(watchdog.stuck(LIMIT), None);
    }

    #[tokio::test(start_paused = true)]
    async fn busy_stage_is_stuck_after_the_limit() {
        let watchdog = Watchdog::new();
        let stuck = watchdog.clone();
        watchdog
            .scope("submit", async move {
                let _busy = busy();
                tokio::time::advance(LIMIT / 2).await;
                assert_eq!(stuck.stuck(LIMIT), None, "busy for less than the limit");
                tokio::time::advance(LIMIT).await;
                let (stage, busy_for) = stuck.stuck(LIMIT).expect("busy past the limit");
                assert_eq!(stage, "submit");
                assert!(busy_for > LIMIT);
            })
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn progress_restarts_the_busy_clock() {
        let watchdog = Watchdog::new();
        let stuck = watchdog.clone();
        watchdog
            .scope("ingest", async move {
                let _busy = busy();
                for _ in 0..5 {
                    tokio::time::advance(LIMIT / 2).await;
                    progress();
                }
                assert_eq!(stuck.stuck(LIMIT), None);
            })
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn child_stage_is_watched_under_its_own_name() {
        let watchdog = Watchdog::new();
        let stuck = watchdog.clone();
        watchdog
            .scope("realtime", async move {
                scope_child("realtime /v1/embeddings", async move {
                    let _busy = busy();
                    tokio::time::advance(LIMIT * 2).await;
                    let (stage, _) = stuck.stuck(LIMIT).expect("the child is stuck");
                    assert_eq!(stage, "realtime /v1/embeddings");
                })
                .await;
            })
            .await;
    }
}
