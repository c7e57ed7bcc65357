//! Named fault points: places where a crash test makes the process abort, to prove that a
//! restart loses and duplicates nothing. They exist only in builds with the `failpoints`
//! feature; elsewhere [`point`] compiles to nothing.
//!
//! `BATCHD_FAULT_POINT=NAME` aborts the first time the point is reached, `NAME:N` the N-th time.
//! The points are `after-upload`, `after-create`, `mid-results`, `mid-ingest`,
//! `after-realtime-answer`, `before-export-rename` and `after-export-rename`.
//! `BATCHD_FAULT_POINT=stall-submit` instead makes the submit stage hang, as on a call that
//! never returns.

/// Aborts the process here if `BATCHD_FAULT_POINT` names this point and its count is reached.
#[cfg(feature = "failpoints")]
pub fn point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);

    let Ok(spec) = std::env::var("BATCHD_FAULT_POINT") else {
        return;
    };
    let (wanted, nth) = match spec.split_once(':') {
        Some((wanted, nth)) => (wanted.to_string(), nth.parse().unwrap_or(1)),
        None => (spec, 1),
    };
    if wanted != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 >= nth {
        eprintln!("fault point {name} reached: aborting");
        std::process::abort();
    }
}

/// Waits forever here if `BATCHD_FAULT_POINT` is `stall-NAME`, as a hung call would, so tests
/// can show that the watchdog notices a stuck stage.
#[cfg(feature = "failpoints")]
pub async fn stall(name: &str) {
    if std::env::var("BATCHD_FAULT_POINT").is_ok_and(|spec| spec == format!("stall-{name}")) {
        eprintln!("fault point stall-{name} reached: waiting forever");
        std::future::pending::<()>().await;
    }
}

/// Does nothing: fault points are compiled in only with the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn stall(_name: &str) {}

/// Does nothing: fault points are compiled in only with the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn point(_name: &str) {}
