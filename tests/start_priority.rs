//! `start_priority = "idle"`: a reload's new generation starts under
//! `SCHED_IDLE`, with its threads and children, and is raised once it is ready.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ally::priority::threads_of_tree;
use common::*;

fn policy(tid: i32) -> i32 {
    // SAFETY: a plain syscall.
    unsafe { libc::sched_getscheduler(tid) }
}

fn policies(pid: u32) -> Vec<(i32, i32)> {
    threads_of_tree(pid)
        .into_iter()
        .map(|tid| (tid, policy(tid)))
        .collect()
}

/// The probe starts a thread and a child, then waits for `go-<generation>`
/// before it calls Ready.
fn config(dir: &Path, extra: &str) -> String {
    let script = format!(
        "exec {} --report {dir}/report-$ALLY_GENERATION --thread --child --wait-for {dir}/go-$ALLY_GENERATION --ready",
        probe().display(),
        dir = dir.display()
    );
    format!("command = {:?}\n{extra}\n", ["sh", "-c", &script])
}

/// Reloads while generation 2 is held before Ready; returns the policies of
/// generation 2's threads while it starts and once it is ready, and generation 1's.
fn reload_and_look(extra: &str) -> [Vec<(i32, i32)>; 3] {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("go-1"), "").unwrap();
    let broker = TestBroker::start("prio", &config(dir.path(), extra));
    broker.wait_running(1);
    let first = wait_for_report(&dir.path().join("report-1"), "waiting", 1);
    let first_pid = first.last().unwrap()["pid"].as_u64().unwrap() as u32;
    std::thread::scope(|scope| {
        let reload = scope.spawn(|| broker.reload());
        let report = dir.path().join("report-2");
        wait_for_report(&report, "child", 1);
        let pid = broker.pids("starting")[0];
        let starting = policies(pid);
        assert!(
            starting.len() >= 3,
            "main thread, its thread and its child: {starting:?}"
        );
        std::fs::write(dir.path().join("go-2"), "").unwrap();
        let out = reload.join().unwrap();
        assert!(
            out.status.success(),
            "reload failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        [starting, policies(pid), policies(first_pid)]
    })
}

#[test]
fn an_idle_start_is_idle_until_ready_and_then_normal() {
    let [starting, ready, first] = reload_and_look(r#"start_priority = "idle""#);
    assert!(
        starting.iter().all(|&(_, p)| p == libc::SCHED_IDLE),
        "while starting: {starting:?}"
    );
    assert!(
        ready.iter().all(|&(_, p)| p == libc::SCHED_OTHER),
        "once ready: {ready:?}"
    );
    // The first generation had no one to spare; the old one is left alone.
    assert!(
        first.iter().all(|&(_, p)| p == libc::SCHED_OTHER),
        "generation 1: {first:?}"
    );
}

#[test]
fn a_normal_start_keeps_the_brokers_policy() {
    let [starting, ready, _] = reload_and_look("");
    assert!(
        starting
            .iter()
            .chain(&ready)
            .all(|&(_, p)| p == libc::SCHED_OTHER),
        "{starting:?} {ready:?}"
    );
}

/// Without `CAP_SYS_NICE` the broker could idle a generation but never raise
/// it again: it refuses the setting at start instead.
#[test]
fn an_idle_start_without_the_right_to_raise_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let start = |extra: &str| {
        let path = dir.path().join("prio.toml");
        std::fs::write(&path, format!("command = [\"sleep\", \"600\"]\n{extra}\n")).unwrap();
        Command::new("setpriv")
            .args(["--inh-caps=-sys_nice", "--bounding-set=-sys_nice", ALLY])
            .args(["run", "prio", "--bus", "none", "--config"])
            .arg(&path)
            .arg("--runtime-dir")
            .arg(dir.path().join("run"))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    let refused = start(r#"start_priority = "idle""#)
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(r#"start_priority = "idle""#) && stderr.contains("CAP_SYS_NICE"),
        "{stderr}"
    );

    let mut normal = start("");
    let socket = dir.path().join("run/bus");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            normal.try_wait().unwrap().is_none(),
            "without the setting the same broker starts"
        );
        assert!(Instant::now() < deadline, "the broker never served");
        std::thread::sleep(Duration::from_millis(10));
    }
    normal.kill().unwrap();
    normal.wait().unwrap();
}

#[test]
fn an_idle_start_that_times_out_says_it_was_idle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("go-1"), "").unwrap();
    let broker = TestBroker::start(
        "prio",
        &config(
            dir.path(),
            "start_priority = \"idle\"\nready_timeout = \"1s\"",
        ),
    );
    broker.wait_running(1);
    let out = broker.reload();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "was not ready within 1s (ready_timeout); it was killed (it was still at idle CPU priority: start_priority = \"idle\")"
        ),
        "{stderr}"
    );
    assert_eq!(broker.generation(), 1, "the old generation serves on");
}

/// With nothing left serving there is no one to spare: a generation still
/// starting is raised at once.
#[test]
fn an_idle_start_is_raised_when_the_serving_generation_dies() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("go-1"), "").unwrap();
    let broker = TestBroker::start("prio", &config(dir.path(), r#"start_priority = "idle""#));
    broker.wait_running(1);
    let first = wait_for_report(&dir.path().join("report-1"), "waiting", 1);
    let first_pid = first.last().unwrap()["pid"].as_u64().unwrap() as i32;
    std::thread::scope(|scope| {
        let reload = scope.spawn(|| broker.reload());
        wait_for_report(&dir.path().join("report-2"), "child", 1);
        let pid = broker.pids("starting")[0];
        assert!(policies(pid).iter().all(|&(_, p)| p == libc::SCHED_IDLE));

        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(first_pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_until(
            "the starting generation raised",
            Duration::from_secs(10),
            || policies(pid).iter().all(|&(_, p)| p == libc::SCHED_OTHER),
        );
        assert_eq!(broker.pids("starting"), vec![pid], "still not ready");
        assert!(broker.logs().contains("no generation serves any more"));

        std::fs::write(dir.path().join("go-2"), "").unwrap();
        let out = reload.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}
