//! `ally reload` shows a reload's phases as they happen: on a terminal (a real
//! pseudo-terminal) a line each, in order, then the result line; `--json` one
//! object a line; `--quiet` nothing; not on a terminal, the result line only.

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// What `ally ARGS` printed on a pseudo-terminal (stdout and stderr both, as
/// a person sees them), and whether it succeeded.
fn on_terminal(broker: &TestBroker, args: &[&str]) -> (bool, Vec<String>) {
    let (mut master, slave) = openpty();
    let mut child = Command::new(ALLY)
        .args(args)
        .arg("--runtime-dir")
        .arg(&broker.runtime_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    // The terminal's output ends (EIO) once the last writer, the child, is gone.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = master.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    let status =
        wait_exit(&mut child, Duration::from_secs(60)).expect("ally reload to end within 60s");
    let out = reader.join().unwrap();
    let text = String::from_utf8_lossy(&out).replace("\r\n", "\n");
    (status.success(), text.lines().map(str::to_string).collect())
}

fn openpty() -> (std::fs::File, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Asserts that `lines` has a line matching each of `expected` in this order
/// (`*` stands for any text), and returns their indexes.
fn in_order(lines: &[String], expected: &[&str]) -> Vec<usize> {
    let mut at = Vec::new();
    let mut from = 0;
    for want in expected {
        let found = lines[from..]
            .iter()
            .position(|l| matches(l, want))
            .unwrap_or_else(|| {
                panic!(
                    "no line {want:?} after line {from} in:\n{}",
                    lines.join("\n")
                )
            });
        at.push(from + found);
        from += found + 1;
    }
    at
}

/// `pattern` with `*` for any text.
fn matches(line: &str, pattern: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = line;
    for (n, part) in parts.iter().enumerate() {
        if n == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if n == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(i) = rest.find(part) else {
                return false;
            };
            rest = &rest[i + part.len()..];
        }
    }
    rest.is_empty()
}

/// An unmodified app (python): takes its socket as fd 3, says STATUS= while
/// it warms up, then READY=1; exits at once while `fail_marker` exists.
fn notify_app(dir: &Path, port: u16, fail_marker: &Path) -> String {
    let script = dir.join("app.py");
    std::fs::write(
        &script,
        r#"import os, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if os.path.exists(sys.argv[1]):
    sys.exit(3)
listener = socket.socket(fileno=3)
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.connect(os.environ["NOTIFY_SOCKET"])
notify.send(b"STATUS=warming caches")
time.sleep(0.2)
notify.send(b"READY=1")
while True:
    time.sleep(1)
"#,
    )
    .unwrap();
    format!(
        "command = [\"python3\", {script:?}, {marker:?}]\nsockets = \"listen-fds\"\nready = \"notify\"\nready_timeout = \"10s\"\nstop_timeout = \"5s\"\n\n[[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n",
        script = script.display().to_string(),
        marker = fail_marker.display().to_string(),
    )
}

#[test]
fn a_terminal_sees_each_phase_of_a_hello_reload_in_order() {
    let port = free_port();
    let broker = TestBroker::start("web", &hello_config(port, "1", ""));
    broker.wait_running(1);
    let old = broker.pids("ready")[0];

    let (ok, lines) = on_terminal(&broker, &["reload", "web"]);
    assert!(ok, "{lines:?}");
    let new = broker.pids("ready")[0];
    in_order(
        &lines,
        &[
            &format!("generation 2 started (pid {new})"),
            &format!("  listening on tcp 127.0.0.1:{port}"),
            "  ready after *s",
            &format!("  generation 1 (pid {old}) draining"),
            "web: reloaded to generation 2",
        ],
    );
    assert_eq!(
        lines.last().unwrap(),
        "web: reloaded to generation 2",
        "the result line ends it: {lines:?}"
    );
}

#[test]
fn a_terminal_sees_the_status_a_notify_app_sends_before_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = notify_app(dir.path(), port, &dir.path().join("fail"));
    let broker = TestBroker::start("web", &config);
    broker.wait_running(1);
    let old = broker.pids("ready")[0];

    let (ok, lines) = on_terminal(&broker, &["reload", "web"]);
    assert!(ok, "{lines:?}");
    let new = broker.pids("ready")[0];
    in_order(
        &lines,
        &[
            &format!("generation 2 started (pid {new})"),
            &format!("  listening on tcp 127.0.0.1:{port}"),
            "  status: warming caches",
            "  ready after *s",
            &format!("  generation 1 (pid {old}) draining"),
            "web: reloaded to generation 2",
        ],
    );
    assert_eq!(lines.len(), 6, "one line a phase: {lines:?}");
}

/// An app (dbus-python) that reports 3 tasks, and once asked to stop
/// finishes them one by one, reporting each, then exits.
fn reporting_app(dir: &Path, port: u16) -> String {
    let script = dir.join("reporting.py");
    std::fs::write(
        &script,
        r#"import os, signal, socket, sys, time
import dbus
bus = dbus.connection.Connection(os.environ["ALLY_ADDRESS"])
def call(method, signature="", args=()):
    return bus.call_blocking(None, "/org/ally", "org.ally.Broker1", method, signature, list(args))
listener = socket.socket(fileno=call("Listen", "ss", ["tcp", sys.argv[1]]).take())
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
call("Report", "a{sv}", [{"tasks": dbus.UInt32(3)}])
call("Ready")
while not stopping:
    time.sleep(0.05)
for left in (2, 1, 0):
    time.sleep(0.3)
    call("Report", "a{sv}", [{"tasks": dbus.UInt32(left)}])
"#,
    )
    .unwrap();
    // Debian's python3, which has python3-dbus (a python3 earlier on PATH may not).
    format!(
        "command = [\"/usr/bin/python3\", {script:?}, \"127.0.0.1:{port}\"]\nready_timeout = \"10s\"\nstop_timeout = \"10s\"\n",
        script = script.display().to_string(),
    )
}

#[test]
fn a_terminal_sees_the_old_generations_tasks_count_down_until_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = TestBroker::start("web", &reporting_app(dir.path(), port));
    broker.wait_running(1);
    let old = broker.pids("ready")[0];

    let (ok, lines) = on_terminal(&broker, &["reload", "web"]);
    assert!(ok, "{lines:?}");
    let new = broker.pids("ready")[0];
    let draining = format!("  generation 1 (pid {old}) draining: ");
    in_order(
        &lines,
        &[
            &format!("generation 2 started (pid {new})"),
            &format!("  listening on tcp 127.0.0.1:{port}"),
            "  ready after *s",
            &format!("{draining}3 tasks left"),
            &format!("{draining}2 tasks left"),
            &format!("{draining}1 task left"),
            &format!("{draining}0 tasks left"),
            "web: reloaded to generation 2",
        ],
    );
    assert!(
        !pid_alive(old),
        "the result comes once generation 1 has exited"
    );
}

#[test]
fn json_gives_one_parseable_event_a_line_in_order_then_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = notify_app(dir.path(), port, &dir.path().join("fail"));
    let broker = TestBroker::start("web", &config);
    broker.wait_running(1);
    let old = broker.pids("ready")[0];

    // Not on a terminal: --json prints on any output.
    let out = broker.ally(&["reload", "web", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let phases: Vec<&str> = events
        .iter()
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "started",
            "listening",
            "status",
            "ready",
            "draining",
            "done",
            "result"
        ],
        "{events:#?}"
    );
    assert!(events.iter().all(|e| e["generation"] == 2), "{events:#?}");
    let times: Vec<f64> = events.iter().map(|e| e["time"].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(events[0]["pid"], broker.pids("ready")[0]);
    assert_eq!(events[0]["reason"], "reload");
    assert_eq!(events[1]["address"], format!("127.0.0.1:{port}"));
    assert_eq!(events[2]["text"], "warming caches");
    assert!(
        events[3]["seconds"].as_f64().unwrap() > 0.2,
        "{:?}",
        events[3]
    );
    assert_eq!(events[4]["draining_generation"], 1);
    assert_eq!(events[4]["pid"], old);
    assert_eq!(events[5]["success"], true);
    assert_eq!(events[6]["success"], true);
    assert_eq!(events[6]["message"], "web: reloaded to generation 2");
}

#[test]
fn not_on_a_terminal_only_the_result_line_is_printed() {
    let port = free_port();
    let broker = TestBroker::start("web", &hello_config(port, "1", ""));
    broker.wait_running(1);
    let out = broker.reload();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "web: reloaded to generation 2\n");
    assert_eq!(stderr(&out), "");
}

#[test]
fn quiet_prints_nothing_on_success() {
    let port = free_port();
    let broker = TestBroker::start("web", &hello_config(port, "1", ""));
    broker.wait_running(1);
    let (ok, lines) = on_terminal(&broker, &["reload", "web", "--quiet"]);
    assert!(ok, "{lines:?}");
    assert_eq!(lines, Vec::<String>::new());
    assert_eq!(broker.generation(), 2);
}

#[test]
fn a_failed_reload_ends_its_progress_with_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let marker = dir.path().join("fail");
    let config = notify_app(dir.path(), port, &marker);
    let broker = TestBroker::start("web", &config);
    broker.wait_running(1);
    std::fs::write(&marker, "").unwrap();

    let (ok, lines) = on_terminal(&broker, &["reload", "web"]);
    assert!(!ok, "{lines:?}");
    in_order(
        &lines,
        &[
            "generation 2 started (pid *)",
            &format!("  listening on tcp 127.0.0.1:{port}"),
            "ally: reload of web failed: generation 2 (pid *) exited *before it was ready*",
        ],
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("ally: reload of web failed: "),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("ready after")),
        "{lines:?}"
    );

    let out = broker.ally(&["reload", "web", "--json"]);
    assert!(!out.status.success());
    let events: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let [.., done, result] = &events[..] else {
        panic!("{events:#?}");
    };
    assert_eq!(done["phase"], "done", "{events:#?}");
    assert_eq!(done["generation"], 3);
    assert_eq!(done["success"], false);
    assert!(
        done["message"]
            .as_str()
            .unwrap()
            .starts_with("generation 3 (pid "),
        "{done}"
    );
    assert_eq!(result["phase"], "result");
    assert_eq!(result["success"], false);
    assert_eq!(
        result["message"],
        format!(
            "reload of web failed: {}",
            done["message"].as_str().unwrap()
        )
    );
    assert!(
        stderr(&out).contains("reload of web failed: generation 3"),
        "{}",
        stderr(&out)
    );
}
