//! The D-Bus face: the interface XML in dbus/ matches the live broker, signals
//! reach subscribers, busctl works on the private socket, and the broker takes
//! its name on a real bus daemon.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;

fn interface_block(xml: &str, interface: &str) -> Vec<String> {
    let start = xml
        .find(&format!("<interface name=\"{interface}\">"))
        .unwrap_or_else(|| panic!("no {interface} interface"));
    let end = start + xml[start..].find("</interface>").unwrap();
    xml[start..end]
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn busctl(address: &str, args: &[&str]) -> std::process::Output {
    Command::new("busctl")
        .arg(format!("--address={address}"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_interface_xml_matches_the_live_broker() {
    let broker = TestBroker::start("xml", &hello_config(free_port(), "1", ""));
    broker.wait_running(1);
    let out = busctl(
        &broker.address(),
        &[
            "call",
            "org.ally.xml",
            "/org/ally",
            "org.freedesktop.DBus.Introspectable",
            "Introspect",
            "--json=short",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let live = reply["data"][0].as_str().unwrap();
    for interface in [
        "org.ally.Broker1",
        "org.ally.Cache1",
        "org.ally.Atomic1",
        "org.ally.Locker1",
    ] {
        let kept = std::fs::read_to_string(format!(
            "{}/dbus/{interface}.xml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert_eq!(
            interface_block(&kept, interface),
            interface_block(live, interface),
            "dbus/{interface}.xml is out of date with the broker"
        );
    }
}

#[test]
fn busctl_reads_status_and_properties_on_the_private_socket() {
    let broker = TestBroker::start("bctl", &hello_config(free_port(), "1", ""));
    broker.wait_running(1);
    let out = busctl(
        &broker.address(),
        &[
            "get-property",
            "org.ally.bctl",
            "/org/ally",
            "org.ally.Broker1",
            "State",
        ],
    );
    assert_eq!(stdout(&out).trim(), "s \"running\"", "{}", stderr(&out));
    let out = busctl(
        &broker.address(),
        &[
            "call",
            "org.ally.bctl",
            "/org/ally",
            "org.ally.Broker1",
            "Reload",
        ],
    );
    assert_eq!(stdout(&out).trim(), "t 2", "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_results_are_signalled() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mode = dir.path().join("mode");
    std::fs::write(&mode, "good").unwrap();
    let launcher = write_script(
        dir.path(),
        "launch",
        &format!(
            "[ \"$(cat {})\" = good ] || exit 7\nexec {} --listen 127.0.0.1:{port}",
            mode.display(),
            hello().display()
        ),
    );
    let config = format!("command = [{:?}]\n", launcher.display().to_string());
    let broker = tokio::task::block_in_place(|| {
        let b = TestBroker::start("sig", &config);
        b.wait_running(1);
        b
    });
    let proxy = ally_core::proxy::connect(&broker.address(), Some("sig"))
        .await
        .unwrap();
    let mut finished = proxy.receive_reload_finished().await.unwrap();
    let mut states = proxy.receive_instance_state_changed().await.unwrap();

    assert_eq!(proxy.reload().await.unwrap(), 2);
    let signal = tokio::time::timeout(Duration::from_secs(5), finished.next())
        .await
        .unwrap()
        .unwrap();
    let args = signal.args().unwrap();
    assert_eq!((*args.generation(), *args.success()), (2, true));
    assert!(
        args.message().starts_with("reloaded to generation 2"),
        "{}",
        args.message()
    );

    std::fs::write(&mode, "bad").unwrap();
    let err = proxy.reload().await.unwrap_err();
    assert!(err.to_string().contains("exited with status 7"), "{err}");
    let signal = tokio::time::timeout(Duration::from_secs(5), finished.next())
        .await
        .unwrap()
        .unwrap();
    let args = signal.args().unwrap();
    assert!(!*args.success());
    assert!(
        args.message()
            .contains("exited with status 7 before it was ready"),
        "{}",
        args.message()
    );

    let mut seen = Vec::new();
    while let Ok(Some(s)) = tokio::time::timeout(Duration::from_millis(500), states.next()).await {
        let a = s.args().unwrap();
        seen.push(a.state().to_string());
    }
    for state in ["starting", "ready", "draining", "exited"] {
        assert!(seen.iter().any(|s| s == state), "no {state} in {seen:?}");
    }
    drop(broker);
}

struct SessionBus {
    daemon: std::process::Child,
    address: String,
}

impl SessionBus {
    fn start() -> SessionBus {
        let mut daemon = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon (package dbus-daemon) is needed for this test");
        let mut line = String::new();
        BufReader::new(daemon.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        SessionBus {
            daemon,
            address: line.trim().to_string(),
        }
    }
}

impl Drop for SessionBus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

#[test]
fn the_broker_takes_its_name_on_a_bus() {
    let bus = SessionBus::start();
    let port = free_port();
    let broker = TestBroker::start_env(
        "onbus",
        &hello_config(port, "1", ""),
        &["--bus", "session"],
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    broker.wait_running(1);
    let out = busctl(
        &bus.address,
        &[
            "call",
            "org.ally.onbus",
            "/org/ally",
            "org.ally.Broker1",
            "Reload",
        ],
    );
    assert_eq!(stdout(&out).trim(), "t 2", "{}", stderr(&out));
    let out = busctl(
        &bus.address,
        &[
            "get-property",
            "org.ally.onbus",
            "/org/ally",
            "org.ally.Broker1",
            "Generation",
        ],
    );
    assert_eq!(stdout(&out).trim(), "t 2", "{}", stderr(&out));
    // The CLI finds it on the bus when there is no private socket to use.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(ALLY)
        .args(["status", "onbus", "--json", "--runtime-dir"])
        .arg(elsewhere.path())
        .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["generation"], 2);
    let out = Command::new(ALLY)
        .args(["list"])
        .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("onbus\tsession bus"),
        "{}",
        stdout(&out)
    );
    // Listen over the bus is for instances only; this test process is an admin.
    let out = busctl(
        &bus.address,
        &[
            "call",
            "org.ally.onbus",
            "/org/ally",
            "org.ally.Broker1",
            "Listen",
            "ss",
            "tcp",
            ":0",
        ],
    );
    assert!(
        stderr(&out).contains("Listen is for instances of onbus"),
        "{}",
        stderr(&out)
    );
}
