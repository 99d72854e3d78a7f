//! The `actix_server` example under a real `ally run`: 20 reloads under load
//! generators that do not retry fail no request, with a new connection per request
//! (`ab`) and with keep-alive connections that keep sending (`ab -k`, `wrk`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use ally_testkit::loadgen::{Tool, reloads_under};
use ally_testkit::{Launch, build_ally, example, free_port, http_get};

const RELOADS: u32 = 20;
const CONNECTIONS: u32 = 8;

/// One load at a time: the machine's cores are the generator's and the server's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn reloads_fail_nothing(tool: Tool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        tool.is_installed(),
        "{tool} is not installed (apt install apache2-utils wrk)"
    );
    build_ally();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let app = example("actix_server");
    let broker = Launch::new("web")
        .log_level("info")
        .command(&[app.to_str().unwrap(), "--listen", &addr.to_string()])
        .start();
    broker.wait_running(1);

    // Which generations answer, from a client of its own (a new connection each time).
    let done = AtomicBool::new(false);
    let (report, (generations, probe_errors)) = thread::scope(|s| {
        let probe = s.spawn(|| {
            let (mut seen, mut errors) = (BTreeSet::new(), Vec::new());
            while !done.load(Ordering::Relaxed) {
                match http_get(addr) {
                    Ok(body) => {
                        seen.insert(generation_in(&body));
                    }
                    Err(e) => errors.push(e.to_string()),
                }
                thread::sleep(Duration::from_millis(20));
            }
            (seen, errors)
        });
        let url = format!("http://{addr}/");
        let report = {
            // Stops the probe however this ends: the scope waits for it before it
            // lets a panic out.
            let _stop_probe = SetOnDrop(&done);
            reloads_under(&broker, tool, &url, CONNECTIONS, RELOADS)
        };
        (report, probe.join().unwrap())
    });

    eprintln!(
        "{tool}: {} requests, {} failed, generations {generations:?}",
        report.requests, report.failed
    );
    assert_eq!(
        report.failed, 0,
        "{tool}: {} of {} requests failed over {RELOADS} reloads:\n{}",
        report.failed, report.requests, report.detail
    );
    assert!(report.requests > 1000, "{tool}: only {report:?}");
    assert!(
        probe_errors.is_empty(),
        "the probe failed: {probe_errors:?}"
    );
    assert!(
        generations.len() >= 5,
        "only generations {generations:?} answered over {RELOADS} reloads"
    );
    assert_eq!(broker.generation(), u64::from(RELOADS) + 1);
    let last = generation_in(&http_get(addr).unwrap());
    assert_eq!(last, u64::from(RELOADS) + 1);
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `N` of the example's `hello from actix pid=P generation=N`.
fn generation_in(body: &str) -> u64 {
    body.trim()
        .rsplit_once("generation=")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("not the example's answer: {body:?}"))
}

#[test]
fn ab_new_connection_per_request() {
    reloads_fail_nothing(Tool::Ab);
}

#[test]
fn ab_keep_alive() {
    reloads_fail_nothing(Tool::AbKeepAlive);
}

#[test]
fn wrk_keep_alive() {
    reloads_fail_nothing(Tool::Wrk);
}
