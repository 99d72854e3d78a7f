//! A new generation that serves but never becomes ready shares the listening
//! socket, so it has accepted connections by the time its reload fails: it is
//! stopped as an old generation is (stop signal, then `stop_timeout`), and every
//! request it accepted is answered.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const FAILED_RELOADS: usize = 3;

#[test]
fn a_generation_that_serves_but_never_calls_ready_loses_no_request() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mode = dir.path().join("mode");
    std::fs::write(&mode, "good").unwrap();
    // Each request takes a while, so the failed generation always has some in
    // flight when it is told to stop.
    let launcher = write_script(
        dir.path(),
        "launch",
        &format!(
            r#"case "$(cat {mode})" in
  good) exec {serve} --listen 127.0.0.1:{port} --version good --delay 5 --ready ;;
  unready) exec {serve} --listen 127.0.0.1:{port} --version unready --delay 30 ;;
esac"#,
            mode = mode.display(),
            serve = example("serve").display()
        ),
    );
    let config = format!(
        "command = [{:?}]\nready_timeout = \"1s\"\nstop_timeout = \"10s\"\n",
        launcher.display().to_string()
    );
    let broker = TestBroker::start("web", &config);
    broker.wait_running(1);
    let old = broker.pids("ready");

    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // One request per connection, no retries: every failure counts.
    let load = Load::start(addr, LoadMode::NewConnection, 4);
    wait_until("the load to get going", Duration::from_secs(10), || {
        load.ok() > 50
    });
    std::fs::write(&mode, "unready").unwrap();
    for n in 1..=FAILED_RELOADS {
        let out = broker.reload();
        let message = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "reload {n}: {message}");
        assert!(
            message.contains(
                "was not ready within 1s (ready_timeout); it was killed, by its stop signal SIGTERM"
            ),
            "reload {n}: {message}"
        );
    }
    let before = load.ok();
    wait_until(
        "requests after the reloads",
        Duration::from_secs(10),
        || load.ok() > before + 50,
    );
    let stats = load.finish();
    eprintln!(
        "{} ok, {} failed, versions {:?}",
        stats.ok, stats.failed, stats.versions
    );
    assert!(
        stats.versions.get("unready").is_some_and(|n| *n > 0),
        "the failed generations must have served, or this proves nothing: {:?}",
        stats.versions
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert_eq!(broker.pids("ready"), old, "the old generation still serves");
    let status = broker.status();
    assert_eq!(status["instances"].as_array().unwrap().len(), 1, "{status}");
    let logs = broker.logs();
    assert!(
        !logs.contains("sending SIGKILL"),
        "the failed generations stopped on their stop signal:\n{logs}"
    );
}
