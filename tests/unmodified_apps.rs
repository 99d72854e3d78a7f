//! Real servers that were never written for Ally (gunicorn, puma, uvicorn, a Go
//! program on go-systemd, and an app of Python's standard library that only
//! reads `LISTEN_FDS` and runs `systemd-notify --ready`), each under a real
//! `ally run` with `sockets = "listen-fds"`: 20 reloads under `ab`, `ab -k` and
//! `wrk` (which never retry) lose not one request and switch the answers to each
//! new version; a new version that cannot become ready fails `ally reload` with
//! the reason while the old one goes on serving, again losing nothing.
//!
//! The servers come from Debian's packages (`.ci/run`); a test whose server is
//! not installed says so and passes.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ally_testkit::loadgen::{self, Generator, Tool};
use ally_testkit::unmodified::{Build, Server};
use common::*;

const RELOADS: u32 = 20;

fn skip(server: Server) -> bool {
    match server.missing() {
        Some(why) => {
            eprintln!("skipping {}: {why}", server.label());
            true
        }
        None => false,
    }
}

/// What the server answers now, if it answers.
fn answer(addr: SocketAddr) -> String {
    http_get(addr).unwrap_or_default()
}

fn wait_for_version(addr: SocketAddr, version: &str) {
    let want = format!("hello {version} ");
    wait_until(
        &format!("answers from version {version} on {addr}"),
        Duration::from_secs(20),
        || answer(addr).starts_with(&want),
    );
}

fn reloads_lose_nothing(server: Server, tool: Tool) {
    if skip(server) {
        return;
    }
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = tempfile::tempdir().unwrap();
    let version_file = dir.path().join("version");
    std::fs::write(&version_file, "v0").unwrap();
    let config = server.config(port, &version_file, Build::Good);
    let mut versions_seen = Vec::new();
    loadgen::assert_config_reloads_lose_nothing(
        server.label(),
        &config,
        port,
        tool,
        RELOADS,
        &mut |n| {
            // The generation reload n-1 started answers before reload n writes
            // the next version (and after the last reload, n = RELOADS + 1).
            let previous = format!("v{}", n - 1);
            wait_for_version(addr, &previous);
            versions_seen.push(previous);
            std::fs::write(&version_file, format!("v{n}")).unwrap();
        },
    );
    assert_eq!(versions_seen.len(), RELOADS as usize + 1);
}

/// A broken new version: `ally reload` fails and says why, the old version
/// goes on answering, and a fixed version reloads after it, all under `ab`.
fn broken_version_fails_reload(server: Server, reason: &str) {
    if skip(server) {
        return;
    }
    let _one = loadgen::one_load();
    build_ally();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = tempfile::tempdir().unwrap();
    let version_file = dir.path().join("version");
    std::fs::write(&version_file, "v0").unwrap();
    let broker = TestBroker::start("web", &server.config(port, &version_file, Build::Good));
    broker.wait_running(1);
    wait_for_version(addr, "v0");

    let load = Generator::start(Tool::Ab, &format!("http://{addr}/"), 8);
    std::thread::sleep(Duration::from_millis(300));
    write_config(&broker, server, port, &version_file, Build::Broken, "v1");
    let out = broker.reload();
    let said = format!("{}{}", stdout(&out), stderr(&out));
    eprintln!(
        "{}: the broken version's reload said: {said}",
        server.label()
    );
    assert!(
        !out.status.success(),
        "{}: the broken version reloaded:\n{said}",
        server.label()
    );
    assert!(
        said.contains(reason),
        "{}: the failed reload does not say {reason:?}:\n{said}\n--- broker log:\n{}",
        server.label(),
        broker.logs()
    );
    assert_eq!(broker.status()["state"], "running", "{said}");
    wait_for_version(addr, "v0");

    write_config(&broker, server, port, &version_file, Build::Good, "v2");
    let out = broker.reload();
    assert!(
        out.status.success(),
        "{}: the fixed version did not reload: {}{}",
        server.label(),
        stdout(&out),
        stderr(&out)
    );
    wait_for_version(addr, "v2");
    wait_until(
        "the old generation to finish draining",
        Duration::from_secs(30),
        || broker.pids("draining").is_empty(),
    );
    let report = load.finish();
    eprintln!(
        "{} with a broken version under ab: {} requests, {} failed",
        server.label(),
        report.requests,
        report.failed
    );
    assert_eq!(
        report.failed,
        0,
        "{}: {}\n--- broker log:\n{}",
        server.label(),
        report.detail,
        broker.logs()
    );
    assert!(report.requests >= 200, "too little load: {report:?}");
}

fn write_config(
    broker: &TestBroker,
    server: Server,
    port: u16,
    version_file: &Path,
    build: Build,
    version: &str,
) {
    std::fs::write(version_file, version).unwrap();
    std::fs::write(
        broker.config_path(),
        server.config(port, version_file, build),
    )
    .unwrap();
}

macro_rules! under_load {
    ($($name:ident: $server:expr, $tool:expr;)*) => {$(
        #[test]
        fn $name() {
            reloads_lose_nothing($server, $tool);
        }
    )*};
}

under_load! {
    gunicorn_ab: Server::Gunicorn, Tool::Ab;
    gunicorn_ab_keep_alive: Server::Gunicorn, Tool::AbKeepAlive;
    gunicorn_wrk: Server::Gunicorn, Tool::Wrk;
    gunicorn_gthread_ab: Server::GunicornThreads, Tool::Ab;
    gunicorn_gthread_ab_keep_alive: Server::GunicornThreads, Tool::AbKeepAlive;
    gunicorn_gthread_wrk: Server::GunicornThreads, Tool::Wrk;
    puma_ab: Server::Puma, Tool::Ab;
    puma_ab_keep_alive: Server::Puma, Tool::AbKeepAlive;
    puma_wrk: Server::Puma, Tool::Wrk;
    uvicorn_ab: Server::Uvicorn, Tool::Ab;
    uvicorn_ab_keep_alive: Server::Uvicorn, Tool::AbKeepAlive;
    uvicorn_wrk: Server::Uvicorn, Tool::Wrk;
    go_ab: Server::Go, Tool::Ab;
    go_ab_keep_alive: Server::Go, Tool::AbKeepAlive;
    go_wrk: Server::Go, Tool::Wrk;
    go_close_on_stop_ab: Server::GoCloseOnStop, Tool::Ab;
    go_close_on_stop_ab_keep_alive: Server::GoCloseOnStop, Tool::AbKeepAlive;
    go_close_on_stop_wrk: Server::GoCloseOnStop, Tool::Wrk;
    stdlib_ab: Server::Stdlib, Tool::Ab;
    stdlib_ab_keep_alive: Server::Stdlib, Tool::AbKeepAlive;
    stdlib_wrk: Server::Stdlib, Tool::Wrk;
}

#[test]
fn gunicorn_bad_module_fails_the_reload() {
    broken_version_fails_reload(Server::Gunicorn, "exit");
}

#[test]
fn puma_bad_rackup_fails_the_reload() {
    broken_version_fails_reload(Server::Puma, "exit");
}

#[test]
fn uvicorn_bad_module_fails_the_reload() {
    broken_version_fails_reload(Server::Uvicorn, "exit");
}

#[test]
fn go_crashing_binary_fails_the_reload() {
    broken_version_fails_reload(Server::Go, "exit");
}

#[test]
fn stdlib_app_never_ready_fails_the_reload() {
    broken_version_fails_reload(Server::Stdlib, "ready");
}
