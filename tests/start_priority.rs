//! `start_priority = "idle"`: a reload's new generation starts under
//! `SCHED_IDLE`, with its threads and children, and is raised once it is ready.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ally::priority::{Policy, check_can_raise, threads_of_tree};
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

/// Whether this process may return a thread from `SCHED_IDLE`, as an idle start
/// needs (`CAP_SYS_NICE` or a permissive `RLIMIT_NICE`); without it the broker
/// refuses the option at start, which its own test checks.
fn may_raise() -> bool {
    let normal = Policy::of_this_thread().unwrap();
    match check_can_raise(normal) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipped: this process may not leave SCHED_IDLE ({e})");
            false
        }
    }
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

/// A broker on [`config`] whose generation 1 serves; generation 2 is held
/// before Ready until [`Probed::go`].
struct Probed {
    dir: tempfile::TempDir,
    broker: TestBroker,
    first_pid: u32,
}

impl Probed {
    fn start(extra: &str) -> Probed {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("go-1"), "").unwrap();
        let broker = TestBroker::start("prio", &config(dir.path(), extra));
        broker.wait_running(1);
        let first = wait_for_report(&dir.path().join("report-1"), "waiting", 1);
        let first_pid = first.last().unwrap()["pid"].as_u64().unwrap() as u32;
        Probed {
            dir,
            broker,
            first_pid,
        }
    }

    /// Generation 2's pid, once it has started its thread and its child.
    fn second_starting(&self) -> u32 {
        wait_for_report(&self.dir.path().join("report-2"), "child", 1);
        self.broker.pids("starting")[0]
    }

    /// Lets generation 2 call Ready.
    fn go(&self) {
        std::fs::write(self.dir.path().join("go-2"), "").unwrap();
    }
}

fn assert_reloaded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reloads while generation 2 is held before Ready; returns the policies of
/// generation 2's threads while it starts and once it is ready, and generation 1's.
fn reload_and_look(extra: &str) -> [Vec<(i32, i32)>; 3] {
    let probed = Probed::start(extra);
    std::thread::scope(|scope| {
        let reload = scope.spawn(|| probed.broker.reload());
        let pid = probed.second_starting();
        let starting = policies(pid);
        assert!(
            starting.len() >= 3,
            "main thread, its thread and its child: {starting:?}"
        );
        probed.go();
        assert_reloaded(&reload.join().unwrap());
        [starting, policies(pid), policies(probed.first_pid)]
    })
}

#[test]
fn an_idle_start_is_idle_until_ready_and_then_normal() {
    if !may_raise() {
        return;
    }
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
    if !may_raise() {
        return;
    }
    let probed = Probed::start("start_priority = \"idle\"\nready_timeout = \"1s\"");
    let out = probed.broker.reload();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "was not ready within 1s (ready_timeout); it was killed (it was still at idle CPU priority: start_priority = \"idle\")"
        ),
        "{stderr}"
    );
    assert_eq!(
        probed.broker.generation(),
        1,
        "the old generation serves on"
    );
}

/// With nothing left serving there is no one to spare: a generation still
/// starting is raised at once.
#[test]
fn an_idle_start_is_raised_when_the_serving_generation_dies() {
    if !may_raise() {
        return;
    }
    let probed = Probed::start(r#"start_priority = "idle""#);
    let broker = &probed.broker;
    std::thread::scope(|scope| {
        let reload = scope.spawn(|| broker.reload());
        let pid = probed.second_starting();
        assert!(policies(pid).iter().all(|&(_, p)| p == libc::SCHED_IDLE));

        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(probed.first_pid as i32),
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

        probed.go();
        assert_reloaded(&reload.join().unwrap());
    });
}
