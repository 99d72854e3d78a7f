//! `ready = "notify"`: each instance's own `NOTIFY_SOCKET`. Whatever process of
//! the instance sends `READY=1` makes it ready; `STATUS=`, `ERRNO=`,
//! `EXTEND_TIMEOUT_USEC=`, `MAINPID=` and the watchdog are honoured; junk is
//! dropped with a log line and nothing else happens.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// Python that sends `sd_notify` datagrams as libsystemd does, without it.
const NOTIFY_PY: &str = r#"
import os, socket, sys, time
def notify(data, fds=()):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(os.environ["NOTIFY_SOCKET"])
    if fds:
        socket.send_fds(s, [data], list(fds))
    else:
        s.send(data)
    s.close()
def mark(name):
    open(os.path.join(os.environ["MARKS"], name), "w").close()
"#;

struct App {
    dir: tempfile::TempDir,
}

impl App {
    /// A Python app: [`NOTIFY_PY`] then `body`.
    fn new(body: &str) -> App {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.py"), format!("{NOTIFY_PY}\n{body}")).unwrap();
        std::fs::create_dir(dir.path().join("marks")).unwrap();
        App { dir }
    }

    fn script(&self) -> PathBuf {
        self.dir.path().join("app.py")
    }

    fn marks(&self) -> PathBuf {
        self.dir.path().join("marks")
    }

    fn config(&self, extra: &str) -> String {
        format!(
            "command = [\"python3\", {:?}]\nready = \"notify\"\nstop_timeout = \"3s\"\nready_timeout = \"10s\"\nenvironment = {{ MARKS = {:?} }}\n{extra}\n",
            self.script(),
            self.marks()
        )
    }

    fn marked(&self, name: &str) -> bool {
        self.marks().join(name).exists()
    }
}

fn wait_mark(app: &App, name: &str) {
    wait_until(&format!("mark {name}"), Duration::from_secs(10), || {
        app.marked(name)
    });
}

#[test]
fn ready_from_a_grandchild_counts_and_its_status_is_shown() {
    // The app's own process never notifies: a shell it starts runs
    // systemd-notify, whose parent is that shell, not the instance.
    let app = App::new(
        r#"
import subprocess
subprocess.run(["sh", "-c", "systemd-notify --status='warming caches'; sleep 0.3; systemd-notify --ready --status='serving 4 workers'"])
while True: time.sleep(1)
"#,
    );
    let broker = TestBroker::start("notify", &app.config(""));
    broker.wait_running(1);
    let status = broker.status();
    let report = &status["instance_reports"][0];
    assert_eq!(report["status"], "serving 4 workers", "{status}");
    let table = broker.ally(&["status", "notify"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("serving 4 workers"), "{table}");
    // A reload waits for the new generation's own READY=1.
    assert!(broker.reload().status.success(), "{}", broker.logs());
    assert_eq!(broker.generation(), 2);
}

#[test]
fn a_generation_that_never_says_ready_fails_the_reload_with_what_it_said() {
    let app = App::new(
        r#"
if os.environ["ALLY_GENERATION"] == "1":
    notify(b"READY=1")
else:
    notify(b"STATUS=cannot bind the cache port\nERRNO=98")
while True: time.sleep(1)
"#,
    );
    let broker = TestBroker::start(
        "never",
        &app.config("ready_timeout = \"1s\"")
            .replace("ready_timeout = \"10s\"\n", ""),
    );
    broker.wait_running(1);
    let out = broker.reload();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("was not ready within 1s (ready_timeout)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            r#"it said STATUS="cannot bind the cache port", ERRNO=98 (Address already in use)"#
        ),
        "{stderr}"
    );
    assert_eq!(broker.generation(), 1, "the old generation serves on");
}

#[test]
fn extend_timeout_lets_a_slow_start_finish() {
    let app = App::new(
        r#"
notify(b"EXTEND_TIMEOUT_USEC=4000000")
time.sleep(2)
notify(b"READY=1")
while True: time.sleep(1)
"#,
    );
    let config = app
        .config("")
        .replace("ready_timeout = \"10s\"", "ready_timeout = \"1s\"");
    let broker = TestBroker::start("slow", &config);
    broker.wait_running(1);
    assert!(
        broker.logs().contains("start time extended"),
        "{}",
        broker.logs()
    );
}

#[test]
fn junk_is_dropped_with_a_bounded_log_and_passed_fds_are_closed() {
    let app = App::new(
        r#"
notify(b"\xff\xfe not text")
for _ in range(500):
    notify(b"READY=1\nthis line is no assignment")
try:
    notify(b"STATUS=" + b"x" * 8000)
except OSError:
    pass
r, w = os.pipe()
notify(b"FDSTORE=1\nSTATUS=sent an fd", [w])
os.close(w)
# The broker keeps no fd: the pipe's last writer is gone once it closed its copy.
if os.read(r, 1) == b"":
    mark("fd-closed")
mark("junk-sent")
time.sleep(0.5)
notify(b"READY=1")
while True: time.sleep(1)
"#,
    );
    let mut broker = TestBroker::start("junk", &app.config(""));
    wait_mark(&app, "junk-sent");
    broker.wait_running(1);
    assert!(
        app.marked("fd-closed"),
        "the broker closed the fd it was sent"
    );
    let logs = broker.logs();
    assert!(
        logs.contains("notification dropped: not UTF-8 text without NUL"),
        "{logs}"
    );
    // A flood is logged once per interval, not once per datagram.
    let lines = logs.matches("notification dropped").count();
    assert!(lines <= 2, "{lines} lines for 501 datagrams:\n{logs}");
    // The datagram with a bad line was refused whole: READY=1 came later.
    let ready_after = broker.status()["instances"][0]["ready_usec"]
        .as_u64()
        .unwrap();
    let started = broker.status()["instances"][0]["started_usec"]
        .as_u64()
        .unwrap();
    assert!(
        ready_after - started >= 400_000,
        "ready only from the last datagram"
    );
    assert_eq!(
        broker.status()["instance_reports"][0]["status"],
        "sent an fd"
    );
    assert!(broker.try_wait().is_none());
}

#[test]
fn mainpid_outside_the_instance_is_refused_and_inside_gets_the_stop_signal() {
    // A forking daemon: the first process names its child MAINPID and exits.
    let app = App::new(
        r#"
import signal
broker = os.getppid()
notify(("MAINPID=%d" % broker).encode())
pid = os.fork()
if pid > 0:
    notify(("MAINPID=%d" % pid).encode())
    os._exit(0)
def stop(*_):
    mark("main-got-term")
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
time.sleep(0.3)
notify(b"READY=1")
while True: time.sleep(1)
"#,
    );
    let broker = TestBroker::start("daemon", &app.config(""));
    broker.wait_running(1);
    let logs = broker.logs();
    assert!(
        logs.contains("not a live process of the instance's process group"),
        "{logs}"
    );
    let main = broker.status()["instance_reports"][0]["main_pid"]
        .as_u64()
        .unwrap();
    assert!(main > 0, "{}", broker.status());
    assert!(
        Path::new(&format!("/proc/{main}")).exists(),
        "the daemon serves on after its first process exited"
    );
    assert_eq!(broker.status()["instances"][0]["state"], "ready");
    assert!(broker.reload().status.success(), "{}", broker.logs());
    wait_mark(&app, "main-got-term");
}

#[test]
fn an_instance_that_misses_its_watchdog_is_restarted() {
    let app = App::new(
        r#"
assert os.environ["WATCHDOG_PID"] == str(os.getpid()), os.environ.get("WATCHDOG_PID")
assert os.environ["WATCHDOG_USEC"] == "1000000"
notify(b"READY=1")
if os.environ["ALLY_GENERATION"] == "1":
    for _ in range(3):
        time.sleep(0.3)
        notify(b"WATCHDOG=1")
    mark("hung")
    while True: time.sleep(1)
while True:
    time.sleep(0.3)
    notify(b"WATCHDOG=1")
"#,
    );
    let broker = TestBroker::start("dog", &app.config("watchdog = \"1s\""));
    broker.wait_running(1);
    wait_mark(&app, "hung");
    broker.wait_running(2);
    let logs = broker.logs();
    assert!(
        logs.contains("missed its watchdog (1s): sending SIGABRT"),
        "{logs}"
    );
    assert!(logs.contains("was killed by SIGABRT"), "{logs}");
}

#[cfg(test)]
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn only_the_instances_user_may_notify() {
    if !is_root() {
        eprintln!("skipped: needs root to run the instance as another user");
        return;
    }
    let app = App::new(
        r#"
mark("socket=" + os.environ["NOTIFY_SOCKET"].replace("/", "|"))
notify(b"READY=1")
while True: time.sleep(1)
"#,
    );
    std::fs::set_permissions(
        app.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        app.marks(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let broker = TestBroker::start("owned", &app.config("user = \"nobody\""));
    broker.wait_running(1);
    let mark = std::fs::read_dir(app.marks())
        .unwrap()
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("socket=")
                .map(|p| p.replace('|', "/"))
        })
        .unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(&mark).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(meta.uid(), nobody.uid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    // Another user (daemon, uid 1) cannot send to it.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "1", "--regid", "1", "--clear-groups", "python3", "-c"])
        .arg(format!(
            "import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b'STATUS=forged', {mark:?})"
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
