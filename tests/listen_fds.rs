//! `sockets = "listen-fds"`: every generation gets the `[[listen]]` sockets as
//! systemd's socket activation passes them — fds 3, 4, … in config order,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, and a `LISTEN_PID` that is the process's own
//! — and nothing else of the broker's.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Reports what it was given, then waits to be stopped.
const REPORTER: &str = r#"
import json, os, socket, sys, time
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
report = {
    "pid": os.getpid(),
    "listen_pid": os.environ.get("LISTEN_PID"),
    "listen_fds": os.environ.get("LISTEN_FDS"),
    "names": os.environ.get("LISTEN_FDNAMES"),
    "notify_socket": os.environ.get("NOTIFY_SOCKET"),
    "fds": fds,
    "sockets": [],
}
for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))):
    s = socket.socket(fileno=os.dup(fd))
    st = os.fstat(fd)
    report["sockets"].append({"fd": fd, "family": int(s.family), "name": str(s.getsockname()), "ino": st.st_ino,
                              "cloexec": bool(__import__("fcntl").fcntl(fd, __import__("fcntl").F_GETFD) & 1)})
    s.detach()
path = sys.argv[1] + "." + os.environ["ALLY_GENERATION"]
with open(path + ".tmp", "w") as f:
    json.dump(report, f)
os.rename(path + ".tmp", path)
while True:
    time.sleep(1)
"#;

fn read_report(base: &Path, generation: u64) -> Value {
    let path = base.with_extension(generation.to_string());
    wait_until(
        &format!("the report of generation {generation}"),
        Duration::from_secs(10),
        || path.exists(),
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_generation_gets_the_same_sockets_at_fds_3_and_4_with_its_own_pid() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("reporter.py");
    std::fs::write(&script, REPORTER).unwrap();
    let base = dir.path().join("report");
    let port = free_port();
    let unix = dir.path().join("web.sock");
    let config = format!(
        r#"command = ["python3", {script:?}, {base:?}]
sockets = "listen-fds"
ready = "delay"
ready_delay = "200ms"
stop_timeout = "2s"

[[listen]]
network = "tcp"
address = "127.0.0.1:{port}"
name = "http"

[[listen]]
network = "unix"
address = {unix:?}
"#
    );
    let broker = TestBroker::start("fds", &config);
    broker.wait_running(1);
    let first = read_report(&base, 1);
    assert!(broker.reload().status.success(), "{}", broker.logs());
    let second = read_report(&base, 2);

    for report in [&first, &second] {
        assert_eq!(
            report["listen_pid"].as_str().unwrap(),
            report["pid"].to_string(),
            "LISTEN_PID is the process's own pid: {report}"
        );
        assert_eq!(report["listen_fds"], "2");
        assert_eq!(
            report["names"],
            format!("http:unix {}", unix.display()),
            "names in config order, the unnamed one after its address"
        );
        assert_eq!(report["notify_socket"], Value::Null);
        let sockets = report["sockets"].as_array().unwrap();
        assert_eq!(sockets[0]["family"], libc::AF_INET);
        assert_eq!(sockets[0]["name"], format!("('127.0.0.1', {port})"));
        assert_eq!(sockets[1]["family"], libc::AF_UNIX);
        assert_eq!(sockets[1]["name"], unix.display().to_string());
        for s in sockets {
            assert_eq!(s["cloexec"], false, "a passed fd survives the exec: {s}");
        }
        // Nothing of the broker's leaks in: stdio, the two sockets, and the fd
        // listdir itself opened.
        let fds: Vec<i64> = report["fds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_i64().unwrap())
            .collect();
        assert_eq!(&fds[..5], &[0, 1, 2, 3, 4], "{report}");
        assert!(
            fds.len() <= 6,
            "only the listdir fd beyond the sockets: {report}"
        );
    }
    assert_eq!(
        first["sockets"], second["sockets"],
        "both generations hold the very same kernel sockets"
    );
}

#[test]
fn a_command_that_cannot_be_executed_fails_with_its_reason() {
    let port = free_port();
    let config = format!(
        "command = [\"/nonexistent/app\"]\nsockets = \"listen-fds\"\nready = \"delay\"\nready_delay = \"100ms\"\n[[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n"
    );
    let stderr = run_failing("bad", &config);
    assert!(
        stderr.contains("cannot start \"/nonexistent/app\": No such file or directory"),
        "{stderr}"
    );
}

#[test]
fn the_command_line_alone_runs_an_unmodified_app() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("reporter.py");
    std::fs::write(&script, REPORTER).unwrap();
    let base = dir.path().join("report");
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let broker = TestBroker(
        Launch::new("cli")
            .args(&[
                "--listen",
                &listen,
                "--sockets",
                "listen-fds",
                "--ready",
                "delay",
                "--ready-delay",
                "100ms",
            ])
            .command(&["python3", script.to_str().unwrap(), base.to_str().unwrap()])
            .start(),
    );
    broker.wait_running(1);
    let report = read_report(&base, 1);
    assert_eq!(report["listen_fds"], "1");
    assert_eq!(report["names"], format!("tcp 127.0.0.1_{port}"));

    for (args, expected) in [
        (
            vec!["--listen", "8080"],
            "--listen \"8080\": expected NET:ADDR",
        ),
        (
            vec!["--sockets", "listen-fds"],
            "give --listen NET:ADDR or a [[listen]] entry",
        ),
        (
            vec!["--ready", "delay"],
            "--ready delay needs --ready-delay DURATION",
        ),
        (
            vec!["--ready-probe", "true"],
            "--ready-probe is read only with --ready probe",
        ),
    ] {
        let out = std::process::Command::new(ALLY)
            .args(["run", "bad", "--bus", "none", "--runtime-dir"])
            .arg(dir.path().join("run-bad"))
            .args(&args)
            .args(["--", "true"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
