//! Shared state with real instances run by a broker: CAS races between two
//! generations, a SIGKILLed instance's lock going to the next waiter, and state
//! outliving reloads and crashes.

mod common;

use std::path::Path;
use std::time::Duration;

use ally_client::blocking::Ally;
use common::*;
use serde_json::Value;

fn report(path: &Path) -> Vec<Value> {
    json_lines(path)
}

fn config(report: &Path, args: &[&str]) -> String {
    stateprobe_config(report, args, "30s")
}

#[test]
fn cas_races_between_two_instances_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report");
    let broker = TestBroker::start(
        "casrace",
        &config(
            &path,
            &[
                "--ready",
                "--wait-key",
                "t",
                "go",
                "--cas-incr",
                "t",
                "n",
                "300",
            ],
        ),
    );
    broker.wait_running(1);
    // Generation 2 starts; generation 1 is asked to stop but finishes its work first.
    assert!(broker.reload().status.success());
    let admin = Ally::connect(&broker.address()).unwrap();
    admin.cache("t").set("go", "", None).unwrap();
    wait_until("both instances done", Duration::from_secs(30), || {
        report(&path)
            .iter()
            .filter(|r| r["op"] == "cas-incr")
            .count()
            == 2
    });
    let done: Vec<Value> = report(&path)
        .into_iter()
        .filter(|r| r["op"] == "cas-incr")
        .collect();
    assert_ne!(done[0]["instance"], done[1]["instance"], "{done:?}");
    assert_eq!(
        admin.cache("t").get_string("n").unwrap().as_deref(),
        Some("600"),
        "two instances, 300 increments each: {done:?}"
    );
}

#[test]
fn a_sigkilled_instance_releases_its_lock_to_the_next_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report");
    let broker = TestBroker::start("killlock", &config(&path, &["--lock", "leader", "--ready"]));
    broker.wait_running(1);
    let first = report(&path);
    assert_eq!(first[0]["op"], "lock");
    assert_eq!(first[0]["ok"], true);
    let (instance, pid) = (
        first[0]["instance"].as_u64().unwrap(),
        first[0]["pid"].as_u64().unwrap(),
    );
    let address = broker.address();
    let admin = Ally::connect(&address).unwrap();
    let q = admin.locker().queues("leader").unwrap();
    assert_eq!(q.holders.len(), 1);
    assert_eq!(q.holders[0].owner, instance, "the instance owns its lock");

    let (tx, rx) = std::sync::mpsc::channel();
    let waiters: Vec<_> = (0..2)
        .map(|i| {
            let (address, tx) = (address.clone(), tx.clone());
            let t = std::thread::spawn(move || {
                let me = Ally::connect(&address).unwrap();
                let g = me
                    .locker()
                    .lock("leader", Some(Duration::from_secs(30)))
                    .unwrap();
                tx.send(i).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                drop(g);
            });
            // Queue the two waiters in a known order.
            wait_until("waiter queued", Duration::from_secs(5), || {
                admin.locker().queues("leader").unwrap().waiters.len() == i + 1
            });
            t
        })
        .collect();
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "nobody passed the holder"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        0,
        "the first waiter first"
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        1,
        "then the second"
    );
    for w in waiters {
        w.join().unwrap();
    }
    // The restarted instance queued behind them and has the lock now.
    wait_until(
        "the restarted instance locks",
        Duration::from_secs(10),
        || {
            report(&path)
                .iter()
                .any(|r| r["op"] == "lock" && r["ok"] == true && r["pid"].as_u64() != Some(pid))
        },
    );
    let q = admin.locker().queues("leader").unwrap();
    assert_eq!(q.holders.len(), 1);
    assert_ne!(q.holders[0].owner, instance);
}

#[test]
fn state_survives_reloads_and_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report");
    let broker = TestBroker::start(
        "survive",
        &config(
            &path,
            &[
                "--add", "boots", "1", "--get", "t", "greeting", "--set", "t", "greeting", "hello",
                "--ready",
            ],
        ),
    );
    broker.wait_running(1);
    assert!(broker.reload().status.success());
    broker.wait_running(2);
    let gen2 = broker.pids("ready")[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gen2 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    broker.wait_running(3);
    let r = report(&path);
    let boots: Vec<i64> = r
        .iter()
        .filter(|r| r["op"] == "add")
        .map(|r| r["value"].as_i64().unwrap())
        .collect();
    assert_eq!(
        boots,
        vec![1, 2, 3],
        "the counter outlives every generation"
    );
    let greetings: Vec<Value> = r
        .iter()
        .filter(|r| r["op"] == "get")
        .map(|r| r["value"].clone())
        .collect();
    assert_eq!(
        greetings,
        vec![Value::Null, Value::from("hello"), Value::from("hello")],
        "generation 1 finds nothing, 2 (after a reload) and 3 (after SIGKILL) find its value"
    );
}

#[test]
fn the_cli_inspects_and_changes_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report");
    let broker = TestBroker::start("cli", &config(&path, &["--lock", "leader", "--ready"]));
    broker.wait_running(1);
    let ok = |args: &[&str]| {
        let out = broker.ally(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    ok(&["cache", "set", "cli", "ns", "k", "hello", "--ttl", "1h"]);
    assert_eq!(ok(&["cache", "get", "cli", "ns", "k"]), "hello");
    assert_eq!(
        ok(&["cache", "get", "cli", "ns", "k", "--json"]).trim(),
        r#"{"found":true,"value":"hello"}"#
    );
    assert_eq!(ok(&["cache", "keys", "cli", "ns"]), "k\n");
    assert_eq!(ok(&["cache", "count", "cli", "ns"]), "1\n");
    ok(&["cache", "del", "cli", "ns", "k"]);
    let out = broker.ally(&["cache", "get", "cli", "ns", "k"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).trim(), "ally: ns/k: no such key");
    let out = broker.ally(&["cache", "set", "cli", "ns", &"k".repeat(2000), "v"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_key_bytes"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1);
    assert_eq!(ok(&["atomic", "add", "cli", "n", "-3"]), "-3\n");
    ok(&["atomic", "set", "cli", "n", "40"]);
    assert_eq!(ok(&["atomic", "get", "cli", "n"]), "40\n");
    assert_eq!(ok(&["atomic", "list", "cli"]), "n\t40\n");
    let status = ok(&["lock", "status", "cli", "leader"]);
    assert!(
        status.starts_with("leader:\n  held  write  by instance 1 for"),
        "{status}"
    );
    assert_eq!(
        ok(&["lock", "release", "cli", "leader"]),
        "leader: released 1 holder(s)\n"
    );
    assert_eq!(ok(&["lock", "status", "cli"]), "");
}
