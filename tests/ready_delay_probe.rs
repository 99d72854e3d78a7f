//! `ready = "delay"` and `ready = "probe"`, for apps that can neither call
//! `Ready` nor send `READY=1`; and what the broker does with what is left of an
//! instance's process group once its first process exited.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn sh(script: &str) -> String {
    format!("command = [\"sh\", \"-c\", {script:?}]\nstop_timeout = \"3s\"\n")
}

#[test]
fn delay_makes_an_instance_ready_once_it_ran_that_long() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("fail-next");
    let script = format!(
        "if [ -e {flag:?} ]; then sleep 0.1; exit 3; fi; exec sleep 1000",
        flag = flag
    );
    let broker = TestBroker::start(
        "delay",
        &format!(
            "{}ready = \"delay\"\nready_delay = \"400ms\"\n",
            sh(&script)
        ),
    );
    broker.wait_running(1);
    let i = &broker.status()["instances"][0];
    let waited = i["ready_usec"].as_u64().unwrap() - i["started_usec"].as_u64().unwrap();
    assert!(waited >= 400_000, "ready after {waited} µs");

    std::fs::write(&flag, "").unwrap();
    let out = broker.reload();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("exited with status 3 before it was ready"),
        "{stderr}"
    );
    assert_eq!(broker.generation(), 1);
}

#[test]
fn probe_makes_an_instance_ready_and_its_last_failure_explains_a_failed_reload() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // Generation 1 becomes healthy after a while; generation 2 never does.
    let script = format!(
        "if [ \"$ALLY_GENERATION\" = 1 ]; then sleep 0.5; echo $$ > {d}/healthy-1; fi; exec sleep 1000"
    );
    let config = format!(
        "{}ready = \"probe\"\nready_probe = [\"sh\", \"-c\", \"echo probing pid $ALLY_INSTANCE_PID; test \\\"$(cat {d}/healthy-$ALLY_GENERATION 2>/dev/null)\\\" = $ALLY_INSTANCE_PID\"]\nready_timeout = \"2s\"\n",
        sh(&script)
    );
    let broker = TestBroker::start("probe", &config);
    broker.wait_running(1);

    let out = broker.reload();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the last ready_probe exited with status 1: probing pid "),
        "{stderr}"
    );
    assert_eq!(broker.generation(), 1);
}

#[test]
fn a_probe_that_hangs_is_killed() {
    let config = format!(
        "{}ready = \"probe\"\nready_probe = [\"sleep\", \"31.5\"]\nready_timeout = \"2500ms\"\nrestart = \"never\"\n",
        sh("exec sleep 1000")
    );
    let started = std::time::Instant::now();
    let stderr = run_failing("hang", &config);
    assert!(
        stderr.contains("ready_probe did not finish within 1s and was killed"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let left = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 31.5$"])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "a probe outlived its broker");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").split_whitespace().next();
            state != Some("Z")
        })
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> u32 {
    wait_until("the app's pid file", Duration::from_secs(10), || {
        std::fs::read_to_string(path).is_ok_and(|s| s.ends_with('\n'))
    });
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_wrapped_app_is_stopped_with_its_wrapper() {
    // A shell that does not exec: the stop signal ends the shell; the app it
    // started must not be left serving.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let script = format!(
        "python3 -c 'import os, signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: (open(\"{d}/stopped-%s\" % os.environ[\"ALLY_GENERATION\"], \"w\").close(), sys.exit(0)))\nopen(\"{d}/app-%s\" % os.environ[\"ALLY_GENERATION\"], \"w\").write(\"%d\\n\" % os.getpid())\nwhile True: time.sleep(1)'; exit 0"
    );
    let broker = TestBroker::start(
        "wrapped",
        &format!(
            "{}ready = \"delay\"\nready_delay = \"300ms\"\n",
            sh(&script)
        ),
    );
    broker.wait_running(1);
    let app = read_pid(&dir.path().join("app-1"));
    assert!(broker.reload().status.success(), "{}", broker.logs());
    wait_until("the old app to stop", Duration::from_secs(10), || {
        !alive(app)
    });
    assert!(
        dir.path().join("stopped-1").exists(),
        "the app got the stop signal, not a SIGKILL"
    );
    assert!(
        broker
            .logs()
            .contains("asking the rest of its process group")
    );
}

#[test]
fn what_ignores_the_stop_signal_is_killed_after_stop_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("child");
    let script = format!(
        "sh -c 'trap \"\" TERM; echo $$ > {pid_file:?}; while :; do sleep 0.1; done' & sleep 1000"
    );
    let mut broker = TestBroker::start(
        "stubborn",
        &format!(
            "{}ready = \"delay\"\nready_delay = \"200ms\"\n",
            sh(&script).replace("3s", "1s")
        ),
    );
    broker.wait_running(1);
    let child = read_pid(&pid_file);
    assert!(alive(child));
    broker.stop();
    assert!(!alive(child), "the broker left {child} running");
    let logs = broker.logs();
    assert!(
        logs.contains("did not stop within 1s (stop_timeout); sending SIGKILL"),
        "{logs}"
    );
}
