//! A new version that cannot serve fails the reload with the reason, and the
//! old version keeps serving as if nothing happened.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use ally_client::ErrorKind;
use common::*;

struct App {
    _dir: tempfile::TempDir,
    mode: PathBuf,
    launcher: PathBuf,
    broker: TestBroker,
    addr: SocketAddr,
}

/// A launcher that does what the `mode` file says: `good` runs hello.
fn app() -> App {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mode = dir.path().join("mode");
    std::fs::write(&mode, "good").unwrap();
    let launcher = write_script(
        dir.path(),
        "launch",
        &format!(
            r#"case "$(cat {mode})" in
  good) exec {hello} --listen 127.0.0.1:{port} --version good ;;
  exit) echo "broken build" >&2; exit 3 ;;
  never-ready) exec {hello} --listen 127.0.0.1:{port} --version never --ready-delay 600000 ;;
esac"#,
            mode = mode.display(),
            hello = hello().display()
        ),
    );
    let config = format!(
        "command = [{:?}]\nready_timeout = \"2s\"\nstop_timeout = \"5s\"\n",
        launcher.display().to_string()
    );
    let broker = TestBroker::start("web", &config);
    broker.wait_running(1);
    App {
        _dir: dir,
        mode,
        launcher,
        broker,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
    }
}

/// Runs a failing reload under load: checks the CLI, then D-Bus, and that the
/// old instance served throughout and the broken ones are gone.
fn assert_reload_fails(app: &App, reason: &str) {
    let old = app.broker.pids("ready");
    assert_eq!(old.len(), 1);
    let load = Load::start(app.addr, LoadMode::NewConnection, 2);
    wait_until("load", Duration::from_secs(10), || load.ok() > 20);

    let broken = std::sync::Mutex::new(BTreeSet::new());
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            for _ in 0..200 {
                broken.lock().unwrap().extend(app.broker.pids("starting"));
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let out = app.broker.reload();
        assert_eq!(
            out.status.code(),
            Some(1),
            "the CLI must fail: {}",
            stdout(&out)
        );
        let message = stderr(&out);
        assert!(
            message.starts_with("ally: reload of web failed: generation "),
            "{message}"
        );
        assert!(
            message.contains(reason),
            "expected {reason:?} in {message:?}"
        );
        assert_eq!(message.lines().count(), 1, "one line: {message:?}");

        let ally = ally_client::blocking::Ally::connect(&app.broker.address()).unwrap();
        let err = ally.reload().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ReloadFailed, "{err}");
        assert!(err.to_string().contains(reason), "{err}");
        watcher.join().unwrap();
    });

    let before = load.ok();
    wait_until("more requests", Duration::from_secs(5), || {
        load.ok() > before + 20
    });
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert_eq!(stats.versions.keys().collect::<Vec<_>>(), vec!["good"]);
    assert_eq!(
        app.broker.pids("ready"),
        old,
        "the old instance still serves"
    );
    let status = app.broker.status();
    assert_eq!(status["instances"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["state"], "running");
    for pid in broken.lock().unwrap().iter() {
        assert!(!pid_alive(*pid), "broken instance {pid} is still alive");
    }
}

#[test]
fn a_version_that_exits_at_once() {
    let app = app();
    std::fs::write(&app.mode, "exit").unwrap();
    assert_reload_fails(&app, "exited with status 3 before it was ready");
    // And the next good version reloads fine.
    std::fs::write(&app.mode, "good").unwrap();
    assert!(app.broker.reload().status.success());
}

#[test]
fn a_version_that_never_calls_ready() {
    let app = app();
    std::fs::write(&app.mode, "never-ready").unwrap();
    assert_reload_fails(
        &app,
        "was not ready within 2s (ready_timeout); it was killed",
    );
    assert!(app.broker.logs().contains("was not ready within 2s"));
}

#[test]
fn a_version_that_is_not_executable() {
    let app = app();
    std::fs::set_permissions(&app.launcher, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_reload_fails(&app, "could not start: cannot start");
    let out = app.broker.reload();
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
}
