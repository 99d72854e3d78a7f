//! `ally reexec`: the broker runs its binary again in place — same pid, the
//! instances its children still — and carries its listeners, instances,
//! history and shared state across the exec.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn stateprobe(report: &Path, args: &[&str]) -> String {
    stateprobe_config(report, args, "10s")
}

fn reexec(broker: &TestBroker) -> String {
    let out = broker.ally(&["reexec", &broker.app]);
    assert!(
        out.status.success(),
        "ally reexec failed: {}{}\n{}",
        stdout(&out),
        stderr(&out),
        broker.logs()
    );
    stdout(&out)
}

fn instances(status: &Value) -> Vec<(u64, u64, u64, String)> {
    status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_u64().unwrap(),
                i["generation"].as_u64().unwrap(),
                i["pid"].as_u64().unwrap(),
                i["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A broker of the hello app run from a copy of `ally` in `dir`, which a test
/// may replace; returns the copy's path.
fn broker_on_a_copy(app: &str, dir: &Path, port: u16) -> (TestBroker, std::path::PathBuf) {
    let copy = dir.join("ally");
    std::fs::copy(ally_bin(), &copy).unwrap();
    let broker = TestBroker(
        Launch::new(app)
            .ally(&copy)
            .config(&hello_config(port, "1", ""))
            .start(),
    );
    broker.wait_running(1);
    (broker, copy)
}

/// Puts a new executable file with `bytes` at `path`, as an upgrade does
/// (a new inode: the running binary's stays as it was).
fn install_binary(path: &Path, bytes: &[u8]) {
    std::fs::remove_file(path).unwrap();
    std::fs::write(path, bytes).unwrap();
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(path, perms).unwrap();
}

fn lock_holders(broker: &TestBroker, name: &str) -> String {
    stdout(&broker.ally(&["lock", "status", &broker.app, name]))
}

#[test]
fn a_reexec_carries_instances_state_locks_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let broker = TestBroker::start(
        "carry",
        &stateprobe(
            &report,
            &[
                "--ready", "--add", "hits", "5", "--set", "c", "k", "v", "--lock", "leader",
            ],
        ),
    );
    broker.wait_running(1);
    wait_until(
        "the instance holds its lock",
        Duration::from_secs(10),
        || json_lines(&report).iter().any(|r| r["op"] == "lock"),
    );
    let out = broker.ally(&["cache", "set", "carry", "c", "ttl", "soon", "--ttl", "1h"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = broker.status();
    let holders = lock_holders(&broker, "leader");
    assert!(holders.contains("instance 1"), "{holders}");

    let said = reexec(&broker);
    assert!(said.contains("re-executed the broker for carry"), "{said}");
    assert!(said.contains("1 instances"), "{said}");

    let after = broker.status();
    assert_eq!(after["pid"], before["pid"], "same broker process");
    assert_eq!(after["pid"].as_u64().unwrap(), u64::from(broker.pid()));
    assert_eq!(after["reexecs"], 1, "{after}");
    assert_eq!(instances(&after), instances(&before), "same instances");
    assert_eq!(after["generation"], 1);
    let get = |name: &str| stdout(&broker.ally(&["atomic", "get", "carry", name]));
    assert_eq!(get("hits").trim(), "5");
    let cached = broker.ally(&["cache", "get", "carry", "c", "k"]);
    assert_eq!(stdout(&cached), "v");
    let cached = broker.ally(&["cache", "get", "carry", "c", "ttl"]);
    assert_eq!(stdout(&cached), "soon");
    let holders = lock_holders(&broker, "leader");
    assert!(
        holders.contains("instance 1"),
        "the lock is still held: {holders}"
    );
    let history = stdout(&broker.ally(&["history", "carry", "--json"]));
    assert!(history.contains("first start"), "{history}");
    assert!(
        broker.logs().contains("re-executed (#1"),
        "{}",
        broker.logs()
    );

    // The carried broker serves on: state calls, a reload, and the old
    // generation's exit reaped by pid, its lock released.
    let out = broker.ally(&["atomic", "add", "carry", "hits", "2"]);
    assert_eq!(stdout(&out).trim(), "7", "{}", stderr(&out));
    let reloaded = broker.reload();
    assert!(
        reloaded.status.success(),
        "{}{}",
        stderr(&reloaded),
        broker.logs()
    );
    broker.wait_running(2);
    wait_until("generation 1 reaped", Duration::from_secs(20), || {
        instances(&broker.status()).iter().all(|i| i.1 != 1)
    });
    wait_until(
        "generation 2 takes the lock",
        Duration::from_secs(20),
        || lock_holders(&broker, "leader").contains("instance 2"),
    );
    assert!(
        broker.logs().contains("instance exited"),
        "the carried instance's exit was seen: {}",
        broker.logs()
    );
    let history = stdout(&broker.ally(&["history", "carry", "--json"]));
    assert!(history.contains("reload"), "{history}");
}

#[test]
fn a_binary_that_cannot_run_leaves_the_broker_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (broker, copy) = broker_on_a_copy("broken", dir.path(), port);
    let before = broker.status();
    // What a half-written upgrade could leave at the path.
    install_binary(&copy, b"\x7fELF not really");
    let out = broker.ally(&["reexec", "broken"]);
    assert!(!out.status.success());
    let error = stderr(&out);
    assert!(error.contains("cannot re-execute"), "{error}");
    assert!(
        error.contains("format"),
        "the exec's error is named: {error}"
    );
    let after = broker.status();
    assert_eq!(instances(&after), instances(&before));
    assert_eq!(after["reexecs"], 0);
    assert!(
        after["reexec_error"]
            .as_str()
            .unwrap()
            .contains("cannot re-execute")
    );
    let answer = http_get(([127, 0, 0, 1], port).into()).unwrap();
    assert!(answer.contains("version=1"), "{answer}");
    // The broker still does all it did: a reload, and a re-exec once the
    // binary is whole again.
    assert!(broker.reload().status.success(), "{}", broker.logs());
    broker.wait_running(2);
    install_binary(&copy, &std::fs::read(ally_bin()).unwrap());
    reexec(&broker);
    assert_eq!(broker.status()["reexecs"], 1);
}

#[test]
fn a_hundred_reexecs_under_load_lose_nothing_and_leak_nothing() {
    let Some(tool) = [loadgen::Tool::Wrk, loadgen::Tool::AbKeepAlive]
        .into_iter()
        .find(|t| t.is_installed())
    else {
        eprintln!("skipped: neither wrk nor ab is installed");
        return;
    };
    let _one = loadgen::one_load();
    let port = free_port();
    let broker = TestBroker::start("hundred", &hello_config(port, "1", ""));
    broker.wait_running(1);
    let pids = instances(&broker.status());
    let url = format!("http://127.0.0.1:{port}/");
    let generator = loadgen::Generator::start(tool, &url, 8);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        reexec(&broker);
    }
    let (rss_10, fds_10) = broker.footprint();
    let mut times = Vec::new();
    for _ in 10..100 {
        let began = std::time::Instant::now();
        reexec(&broker);
        times.push(began.elapsed());
    }
    let (rss_100, fds_100) = broker.footprint();
    let mut generator = generator;
    assert!(generator.is_running(), "{tool} stopped early");
    let report = generator.finish_losing_nothing("100 re-execs");
    times.sort();
    eprintln!(
        "100 re-execs: ally reexec took p50 {:?} max {:?}; broker RSS {rss_10} KiB / {fds_10} fds after 10, {rss_100} KiB / {fds_100} fds after 100",
        times[times.len() / 2],
        times.last().unwrap()
    );
    assert!(report.requests > 0);
    assert_eq!(broker.status()["reexecs"], 100);
    assert_eq!(
        instances(&broker.status()),
        pids,
        "the same instance serves"
    );
    // A connection closing as it is counted is no leak: the count must come back.
    let mut fds_now = fds_100;
    wait_until(
        "the broker's fds back to their count after 10",
        Duration::from_secs(10),
        || {
            fds_now = broker.footprint().1;
            fds_now <= fds_10
        },
    );
    assert!(
        rss_100 < rss_10 + 4096,
        "RSS stays flat: {rss_10} KiB after 10, {rss_100} KiB after 100"
    );
}

#[test]
fn an_instance_calls_on_across_a_reexec() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    // It polls the cache every 5 ms through the re-exec, then adds again.
    let broker = TestBroker::start(
        "calls",
        &stateprobe(
            &report,
            &[
                "--ready",
                "--add",
                "hits",
                "1",
                "--wait-key",
                "t",
                "go",
                "--add",
                "hits",
                "1",
            ],
        ),
    );
    broker.wait_running(1);
    wait_until("the first add", Duration::from_secs(10), || {
        json_lines(&report).iter().any(|r| r["op"] == "add")
    });
    let pid = instances(&broker.status())[0].2;
    for _ in 0..3 {
        reexec(&broker);
    }
    let out = broker.ally(&["cache", "set", "calls", "t", "go", ""]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the second add", Duration::from_secs(10), || {
        json_lines(&report)
            .iter()
            .filter(|r| r["op"] == "add")
            .count()
            == 2
    });
    let adds: Vec<Value> = json_lines(&report)
        .into_iter()
        .filter(|r| r["op"] == "add")
        .collect();
    assert_eq!(adds[1]["value"], 2, "the counter was carried: {adds:?}");
    let after = instances(&broker.status());
    assert_eq!(
        after[0].2, pid,
        "the same instance, which never failed a call"
    );
    assert_eq!(after[0].3, "ready");
}

#[test]
fn an_instance_may_not_reexecute_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = format!(
        "busctl --address=\"$ALLY_ADDRESS\" call org.ally.deny /org/ally org.ally.Broker1 Reexecute > {out} 2>&1; echo done >> {out}; exec sleep 600",
        out = out.display()
    );
    let config = format!(
        "command = [\"/bin/sh\", \"-c\", {script:?}]\nready = \"delay\"\nready_delay = \"100ms\"\nstop_timeout = \"2s\"\n"
    );
    let broker = TestBroker::start("deny", &config);
    broker.wait_running(1);
    wait_until(
        "the instance's call answered",
        Duration::from_secs(10),
        || std::fs::read_to_string(&out).is_ok_and(|s| s.contains("done")),
    );
    let said = std::fs::read_to_string(&out).unwrap();
    assert!(
        said.contains("Reexecute is for admins (root or the broker's user), not instances"),
        "{said}"
    );
    assert_eq!(broker.status()["reexecs"], 0);
}

#[test]
fn a_pending_crash_restart_keeps_its_attempt_across_a_reexec() {
    let port = free_port();
    // Ready, then a crash 200 ms later: every restart backs off more.
    let config = format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\", \"--ready\", \"--crash-after\", \"200\"]\nrestart_delay = \"2s\"\n",
        example("serve").display().to_string()
    );
    let broker = TestBroker::start("crashy", &config);
    wait_until("restart attempt 2 pending", Duration::from_secs(30), || {
        broker.status()["restart_attempt"] == 2
    });
    reexec(&broker);
    let mut status = broker.status();
    wait_until("the restart pending again", Duration::from_secs(10), || {
        status = broker.status();
        status["restart_attempt"] != 0
    });
    assert_eq!(status["reexecs"], 1);
    assert_eq!(status["restart_attempt"], 2, "the same attempt: {status}");
    wait_until("restart attempt 3 pending", Duration::from_secs(30), || {
        broker.status()["restart_attempt"] == 3
    });
    let history = stdout(&broker.ally(&["history", "crashy", "--json"]));
    assert!(history.contains("crash (attempt 2)"), "{history}");
}

/// A re-exec carries on as the broker was: a config file edited (here, broken)
/// since the last reload is read at the next reload, not at the re-exec.
#[test]
fn a_reexec_keeps_the_config_in_use_when_the_file_was_edited_since() {
    let port = free_port();
    let broker = TestBroker::start("edited", &hello_config(port, "1", ""));
    broker.wait_running(1);
    let before = broker.status();
    std::fs::write(broker.config_path(), "command = [\"/bin/true\"\n").unwrap();

    reexec(&broker);
    let after = broker.status();
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(instances(&after), instances(&before));
    assert_eq!(after["config_revision"], before["config_revision"]);
    assert_eq!(after["config_digest"], before["config_digest"]);
    let answer = http_get(([127, 0, 0, 1], port).into()).unwrap();
    assert!(answer.contains("version=1"), "{answer}");

    // The broken file fails the next reload, naming where, and nothing else.
    let out = broker.reload();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("edited.toml"), "{}", stderr(&out));
    assert_eq!(instances(&broker.status()), instances(&before));
    std::fs::write(broker.config_path(), hello_config(port, "2", "")).unwrap();
    assert!(broker.reload().status.success(), "{}", broker.logs());
    broker.wait_running(2);
    // The old generation may accept a few more until its stop signal arrives.
    wait_until("version 2 serving", Duration::from_secs(10), || {
        http_get(([127, 0, 0, 1], port).into()).is_ok_and(|a| a.contains("version=2"))
    });
}

/// A new binary that starts but cannot read the image — here a build whose
/// image names one field otherwise, as a release that renamed it would — runs
/// the old binary again (kept open across the exec) with the same image.
#[test]
fn a_new_binary_that_cannot_read_the_image_runs_the_old_one_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (broker, copy) = broker_on_a_copy("fallback", dir.path(), port);
    let before = broker.status();

    // The image's field names are in the binary once, shared by its writer and
    // its reader: the patched binary writes and expects `notified_readz`.
    let (field, renamed) = (&b"notified_ready"[..], &b"notified_readz"[..]);
    let mut other = std::fs::read(ally_bin()).unwrap();
    let at: Vec<usize> = other
        .windows(field.len())
        .enumerate()
        .filter(|(_, w)| *w == field)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "the image's field name should be in ally once");
    other[at[0]..at[0] + field.len()].copy_from_slice(renamed);
    install_binary(&copy, &other);

    let out = broker.ally(&["reexec", "fallback"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let error = stderr(&out);
    eprintln!("$ ally reexec fallback\n{error}");
    assert!(
        error.contains("the new binary could not take over")
            && error.contains("notified_readz")
            && error.contains("the old one runs again"),
        "{error}"
    );
    let after = broker.status();
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(instances(&after), instances(&before));
    assert!(
        broker
            .logs()
            .contains("running the binary that wrote the image again"),
        "{}",
        broker.logs()
    );
    let answer = http_get(([127, 0, 0, 1], port).into()).unwrap();
    assert!(answer.contains("version=1"), "{answer}");
    // The old binary serves on: a reload, and a re-exec to a binary that reads
    // its image.
    assert!(broker.reload().status.success(), "{}", broker.logs());
    broker.wait_running(2);
    install_binary(&copy, &std::fs::read(ally_bin()).unwrap());
    let said = reexec(&broker);
    assert!(
        said.contains("re-executed the broker for fallback"),
        "{said}"
    );
    assert_eq!(broker.status()["pid"], before["pid"]);
}
