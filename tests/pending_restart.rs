//! Crash restarts keep their back-off, and `ally status` shows the one pending:
//! its attempt number and when it runs.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

#[test]
fn status_shows_a_pending_restart_and_its_attempt() {
    let port = free_port();
    // Ready, then a crash 200 ms later: never stable, so every restart backs off more.
    let config = format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\", \"--ready\", \"--crash-after\", \"200\"]\nrestart_delay = \"2s\"\n",
        example("serve").display().to_string()
    );
    let broker = TestBroker::start("crashy", &config);
    let mut seen = Vec::new();
    wait_until("a second restart pending", Duration::from_secs(30), || {
        let status = broker.status();
        let attempt = status["restart_attempt"].as_u64().unwrap_or(0);
        if attempt > 0 && seen.last() != Some(&attempt) {
            seen.push(attempt);
        }
        attempt >= 2
    });
    let status = broker.status();
    assert_eq!(status["state"], "restarting", "{status}");
    assert_eq!(status["restart_attempt"], 2, "{status}");
    assert_eq!(seen.first(), Some(&1), "attempts count up from 1: {seen:?}");
    // Attempt 2 waits twice restart_delay.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let at = Duration::from_micros(status["restart_usec"].as_u64().unwrap());
    assert!(
        at > now && at - now <= Duration::from_secs(4),
        "runs within 4s: {:?} from now",
        at.checked_sub(now)
    );
    let table = stdout(&broker.ally(&["status", "crashy"]));
    assert!(table.contains("restart: attempt 2, in "), "{table}");
    assert!(
        broker
            .logs()
            .contains("restarting the application in 4s (attempt 2)")
    );
}
