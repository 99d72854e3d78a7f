//! A connection's role belongs to the process that connected, never to a pid:
//! the pid-reuse attack, run for real in a pid namespace of its own.

mod common;

use std::process::Command;

use common::*;

/// Attempts in which the attacker's pid really went to an instance's child.
const REUSES: u64 = 10_000;

#[test]
fn a_connection_whose_pid_now_names_an_instance_child_is_not_that_instance() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to make a pid namespace and set ns_last_pid");
        return;
    }
    let reuses: u64 = std::env::var("ALLY_ATTACK_REUSES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(REUSES);
    let work = tempfile::tempdir().unwrap();
    let output = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(example("pidreuse"))
        .arg("attack")
        .arg(ALLY)
        .arg(work.path())
        .arg(reuses.to_string())
        .arg("300")
        .output()
        .expect("running unshare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let tally: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no tally ({e}): {stdout}\n{stderr}"));
    eprintln!("pid reuse attack: {tally}");
    assert_eq!(
        tally["broken"], 0,
        "the attack got a listening socket: {tally}\n{stderr}"
    );
    assert_eq!(tally["errors"], 0, "{tally}\n{stderr}");
    assert!(
        tally["reused"].as_u64().unwrap() >= reuses,
        "the attack was not tried {reuses} times: {tally}"
    );
}
