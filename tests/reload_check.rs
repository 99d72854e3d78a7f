//! `check`: a command run before every reload, with the config the reload is
//! about to apply. A failing, killed, slow or missing check fails the reload
//! with its output, and nothing is started: the old generation serves on.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use ally_client::ErrorKind;
use common::*;

struct App {
    broker: TestBroker,
    port: u16,
    addr: SocketAddr,
}

fn app() -> App {
    let port = free_port();
    let broker = TestBroker::start("web", &hello_config(port, "v1", ""));
    broker.wait_running(1);
    App {
        broker,
        port,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
    }
}

impl App {
    /// Rewrites the config with `extra` lines: the next reload reads it.
    fn configure(&self, version: &str, extra: &str) {
        std::fs::write(
            self.broker.config_path(),
            hello_config(self.port, version, extra),
        )
        .unwrap();
    }
}

/// Reloads under load, expecting the check to refuse it with `reason`; checks
/// that nothing was started and the old instance served throughout.
fn assert_refused(app: &App, reason: &str) -> String {
    let old = app.broker.pids("ready");
    assert_eq!(old.len(), 1);
    let generation = app.broker.generation();
    let load = Load::start(app.addr, LoadMode::NewConnection, 2);
    wait_until("load", Duration::from_secs(10), || load.ok() > 20);

    let out = app.broker.reload();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the CLI must fail: {}",
        stdout(&out)
    );
    let message = stderr(&out);
    assert!(
        message.starts_with(
            "ally: reload of web failed: the check refused the reload, nothing was started: check "
        ),
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

    let before = load.ok();
    wait_until("more requests", Duration::from_secs(5), || {
        load.ok() > before + 20
    });
    let stats = load.finish();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert_eq!(stats.versions.keys().collect::<Vec<_>>(), vec!["v1"]);
    let status = app.broker.status();
    assert_eq!(
        app.broker.pids("ready"),
        old,
        "the old instance still serves"
    );
    assert_eq!(status["instances"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["generation"].as_u64(), Some(generation), "{status}");
    assert_eq!(status["state"], "running");
    assert!(
        status["last_reload"].as_str().unwrap().contains(reason),
        "{status}"
    );
    assert!(app.broker.logs().contains(reason));
    message
}

#[test]
fn a_failing_check_fails_the_reload_and_starts_nothing() {
    let app = app();
    // The check comes with the config the reload reads.
    app.configure("v2", "check = [\"false\"]");
    assert_refused(&app, "check [\"false\"] exited with status 1");
}

#[test]
fn the_refusal_quotes_the_end_of_the_check_output() {
    let app = app();
    let check = r#"check = ["sh", "-c", "seq 1 5000; echo 'web.conf:3: unknown key \"listn\"' >&2; echo 'configuration test failed'; exit 2"]"#;
    app.configure("v2", check);
    let message = assert_refused(&app, "exited with status 2: …");
    assert!(
        message
            .trim_end()
            .ends_with("4999; 5000; web.conf:3: unknown key \"listn\"; configuration test failed"),
        "{message}"
    );
    assert!(!message.contains("; 1; 2; 3;"), "{message}");
}

#[test]
fn a_slow_check_is_killed_at_its_timeout() {
    let app = app();
    // A duration no other process on the machine sleeps for, to look for it after.
    let seconds = format!("60.{}", std::process::id());
    app.configure(
        "v2",
        &format!("check = [\"sleep\", \"{seconds}\"]\ncheck_timeout = \"1s\""),
    );
    let started = Instant::now();
    assert_refused(
        &app,
        &format!(
            "check [\"sleep\", \"{seconds}\"] did not finish within 1s (check_timeout) and was killed"
        ),
    );
    // Two reloads, each about a second.
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        !std::process::Command::new("pgrep")
            .args(["-x", "-f", &format!("sleep {seconds}")])
            .status()
            .unwrap()
            .success(),
        "the check was left running"
    );
}

#[test]
fn a_check_that_cannot_start_fails_the_reload() {
    let app = app();
    app.configure("v2", "check = [\"/nonexistent/web-check\"]");
    assert_refused(&app, "cannot start: No such file or directory");
}

#[test]
fn a_passing_check_lets_the_reload_go() {
    let app = app();
    app.configure("v2", "check = [\"true\"]");
    let out = app.broker.reload();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "web: reloaded to generation 2");
    let body = http_get(app.addr).unwrap();
    assert!(body.contains("version=v2 "), "{body}");
    // And a check is not run at a crash restart: the check now fails, the
    // instance is killed, and the app restarts anyway.
    app.configure("v3", "check = [\"false\"]");
    let pid = app.broker.pids("ready")[0];
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    app.broker.wait_running(3);
    assert!(!app.broker.pids("ready").contains(&pid));
}

/// The check runs as the instances do: their user, working directory and
/// environment, stdin on /dev/null.
#[test]
fn the_check_runs_as_the_instances_run() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: running the check as another user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = dir.path().join("check.out");
    let config = |check: bool| {
        format!(
            "command = [\"/bin/sleep\", \"600\"]\nready = \"delay\"\nready_delay = \"100ms\"\n\
             user = \"nobody\"\nworking_directory = {dir:?}\nenvironment = {{ WEB_MARK = \"m1\" }}\n{}",
            if check {
                format!(
                    "check = [\"sh\", \"-c\", \"echo $(id -un) $(pwd) $WEB_MARK $ALLY_APP $(cat | wc -c) > {}\"]",
                    out.display()
                )
            } else {
                String::new()
            },
            dir = dir.path().display().to_string(),
        )
    };
    let broker = TestBroker::start("web", &config(false));
    broker.wait_running(1);
    std::fs::write(broker.config_path(), config(true)).unwrap();
    let reload = broker.reload();
    assert!(reload.status.success(), "{}", stderr(&reload));
    let got = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        got.trim(),
        format!("nobody {} m1 web 0", dir.path().display())
    );
}
