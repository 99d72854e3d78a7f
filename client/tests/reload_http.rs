//! Apps on hyper-util and axum, integrated as the README says, lose no request over
//! 20 reloads under load generators that never retry: `ab` with a new connection
//! per request, `ab -k` and `wrk` with keep-alive connections that keep sending.

use ally_testkit::loadgen::{Tool, assert_reloads_lose_nothing};
use ally_testkit::{example, free_port};

fn reloads_lose_nothing(name: &str, tool: Tool) {
    let port = free_port();
    let command = [
        example(name).display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    assert_reloads_lose_nothing(name, &command, port, tool, 20);
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
