//! Apps on hyper-util and axum, integrated as the README says, lose no request over
//! 20 reloads under load generators that never retry: `ab` with a new connection
//! per request, `ab -k` and `wrk` with keep-alive connections that keep sending.

use std::sync::Mutex;

use ally_testkit::loadgen::{Tool, reloads_under};
use ally_testkit::{Broker, build_ally, example, free_port};

const RELOADS: u32 = 20;
const CONNECTIONS: u32 = 8;

/// One load at a time: the machine has few cores, and a starved generator measures
/// nothing.
static ONE_LOAD: Mutex<()> = Mutex::new(());

/// Runs the example `name` under a broker, reloads it under `tool`, and asserts nothing
/// failed.
fn reloads_lose_nothing(name: &str, tool: Tool) {
    let _one = ONE_LOAD.lock().unwrap_or_else(|e| e.into_inner());
    build_ally();
    let port = free_port();
    let config = format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\"]\nready_timeout = \"20s\"\nstop_timeout = \"20s\"\n",
        example(name).display().to_string()
    );
    let broker = Broker::start("web", &config);
    broker.wait_running(1);
    let url = format!("http://127.0.0.1:{port}/");
    let report = reloads_under(&broker, tool, &url, CONNECTIONS, RELOADS);
    eprintln!(
        "{name} under {tool}, {RELOADS} reloads: {} requests, {} failed",
        report.requests, report.failed
    );
    assert_eq!(
        report.failed,
        0,
        "{name} under {tool}: {} failed of {}:\n{}\n--- broker log:\n{}",
        report.failed,
        report.requests,
        report.detail,
        broker.logs()
    );
    assert!(
        report.requests >= 1000,
        "too little load to prove anything: {} requests",
        report.requests
    );
    assert_eq!(broker.generation(), u64::from(RELOADS) + 1);
}

#[test]
fn hyper_new_connection_per_request() {
    reloads_lose_nothing("hello", Tool::Ab);
}

#[test]
fn hyper_keep_alive_http10() {
    reloads_lose_nothing("hello", Tool::AbKeepAlive);
}

#[test]
fn hyper_keep_alive_http11() {
    reloads_lose_nothing("hello", Tool::Wrk);
}

#[test]
fn axum_new_connection_per_request() {
    reloads_lose_nothing("axum_server", Tool::Ab);
}

#[test]
fn axum_keep_alive_http10() {
    reloads_lose_nothing("axum_server", Tool::AbKeepAlive);
}

#[test]
fn axum_keep_alive_http11() {
    reloads_lose_nothing("axum_server", Tool::Wrk);
}
