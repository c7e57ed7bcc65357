//! The systemd notification protocol, received on a datagram socket given as `NOTIFY_SOCKET`:
//! READY=1 once running, WATCHDOG=1 every half `WATCHDOG_USEC` while the stages make
//! progress, STATUS= lines, and STOPPING=1 on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Sim};

/// The watchdog period the tests give the daemon; pings are due every half period.
const PERIOD: Duration = Duration::from_millis(600);

/// Messages received on the socket, with the time each arrived.
type Received = Arc<Mutex<Vec<(Instant, String)>>>;

/// Binds a notify socket in the daemon's folder and records every datagram on a thread.
fn listen(daemon: &Daemon) -> (String, Received) {
    let path = daemon.path("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let received: Received = Arc::default();
    let sink = received.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.lock().unwrap().push((Instant::now(), text));
        }
    });
    (path.display().to_string(), received)
}

fn pings(received: &Received) -> Vec<Instant> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, text)| text.contains("WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect()
}

fn watchdog_env(socket: &str) -> [(&str, String); 2] {
    [
        ("NOTIFY_SOCKET", socket.to_string()),
        ("WATCHDOG_USEC", PERIOD.as_micros().to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_and_stopping_arrive_in_order() {
    let sim = Sim::fast().await;
    let mut daemon = Daemon::prepare(&sim.base_url, common::FAST_PIPELINE);
    let (socket, received) = listen(&daemon);
    let env = watchdog_env(&socket);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    daemon.spawn_with_env(&env);
    daemon.drop_file("work.jsonl", &common::chat_lines("q", 30, false));

    let db = daemon.db().await;
    daemon.wait_all_terminal(&db, 30).await;
    common::wait_for(|| pings(&received).len() >= 6, "six watchdog pings");
    assert!(daemon.stop().success());
    common::wait_for(
        || {
            received
                .lock()
                .unwrap()
                .iter()
                .any(|(_, text)| text.contains("STOPPING=1"))
        },
        "STOPPING=1",
    );

    let received = received.lock().unwrap().clone();
    let kinds: Vec<&str> = received
        .iter()
        .filter_map(|(_, text)| {
            ["READY=1", "WATCHDOG=1", "STOPPING=1"]
                .into_iter()
                .find(|kind| text.contains(kind))
        })
        .collect();
    assert_eq!(kinds.first(), Some(&"READY=1"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"STOPPING=1"), "{kinds:?}");
    assert!(
        kinds[1..kinds.len() - 1].iter().all(|k| *k == "WATCHDOG=1"),
        "only pings between READY and STOPPING: {kinds:?}"
    );

    // Pings are never closer than half the period; most arrive within the period, which is
    // what systemd requires.
    let times: Vec<Instant> = received
        .iter()
        .filter(|(_, text)| text.contains("WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    let mut gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    assert!(
        gaps[0] >= PERIOD / 2 - Duration::from_millis(50),
        "{gaps:?}"
    );
    assert!(gaps[gaps.len() / 2] < PERIOD, "{gaps:?}");

    let status = received
        .iter()
        .rev()
        .find(|(_, text)| text.starts_with("STATUS="))
        .map(|(_, text)| text.clone())
        .expect("a STATUS line");
    assert!(status.contains("queued "), "{status}");
    assert!(status.contains("batch jobs in flight "), "{status}");
    assert!(status.contains("requests/min"), "{status}");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_stage_stops_the_watchdog_pings() {
    let sim = Sim::start(batchd::simulate::SimConfig::default()).await;
    let mut daemon = Daemon::prepare(&sim.base_url, "[ingest]\nsettle_secs = 0.1\n");
    let (socket, received) = listen(&daemon);
    let mut env = watchdog_env(&socket).to_vec();
    env.push(("BATCHD_FAULT_POINT", "stall-submit".to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    daemon.spawn_with_env(&env);

    common::wait_for(
        || daemon.log().contains("stage made no progress"),
        "the stuck stage to be logged",
    );
    let log = daemon.log();
    assert!(log.contains("stage=\"submit\""), "{log}");
    let before = pings(&received).len();
    assert!(
        before >= 1,
        "pings were sent before the stage had been stuck for a period"
    );
    // Three periods without a ping is three times what systemd waits before acting.
    tokio::time::sleep(PERIOD * 3).await;
    assert_eq!(
        pings(&received).len(),
        before,
        "no ping while a stage is stuck"
    );
    daemon.kill();
}
