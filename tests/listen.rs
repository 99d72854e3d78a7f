//! `Listen` for every network: the first request binds, every later one — from
//! the same or another instance — gets the same kernel socket.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn config_for(command: &[String]) -> String {
    format!("command = {command:?}\nready_timeout = \"10s\"\nstop_timeout = \"5s\"\n")
}

#[test]
fn every_network_and_the_same_socket_across_generations() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let tcp_port = free_port();
    let abstract_name = format!("@ally-test-{}", std::process::id());
    let listeners: Vec<(&str, String)> = vec![
        ("tcp", format!("127.0.0.1:{tcp_port}")),
        ("tcp4", "127.0.0.1:0".into()),
        ("tcp6", "[::1]:0".into()),
        ("udp", "127.0.0.1:0".into()),
        ("udp4", "127.0.0.1:0".into()),
        ("udp6", "[::1]:0".into()),
        ("unix", dir.path().join("stream.sock").display().to_string()),
        (
            "unixgram",
            dir.path().join("dgram.sock").display().to_string(),
        ),
        (
            "unixpacket",
            dir.path().join("packet.sock").display().to_string(),
        ),
        ("unix", abstract_name.clone()),
    ];
    let mut command = vec![
        probe().display().to_string(),
        "--report".into(),
        report.display().to_string(),
    ];
    for (network, address) in &listeners {
        command.extend(["--listen".into(), network.to_string(), address.clone()]);
    }
    // The same TCP socket asked for under another spelling is the same key.
    command.extend([
        "--listen".into(),
        "tcp".into(),
        format!("localhost:{tcp_port}"),
    ]);
    command.push("--ready".into());
    let broker = TestBroker::start("nets", &config_for(&command));
    broker.wait_running(1);
    let first = wait_for_report(&report, "waiting", 1);
    let results: Vec<&Value> = first.iter().filter(|r| r["op"] == "listen").collect();
    assert_eq!(results.len(), listeners.len() + 1);
    for r in &results {
        assert_eq!(r["ok"], true, "{r}");
    }
    assert_eq!(
        results[0]["inode"],
        results[listeners.len()]["inode"],
        "localhost and 127.0.0.1 share a socket"
    );
    let bound = results[1]["local"].as_str().unwrap();
    assert!(
        bound.starts_with("127.0.0.1:") && !bound.ends_with(":0"),
        "{bound}"
    );
    assert_eq!(results[9]["local"], abstract_name.as_str());

    // The socket accepts for real: a TCP connection lands in its backlog.
    std::net::TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();

    assert!(broker.reload().status.success());
    let both = wait_for_report(&report, "waiting", 2);
    let listens: Vec<&Value> = both.iter().filter(|r| r["op"] == "listen").collect();
    let (gen1, gen2) = listens.split_at(listeners.len() + 1);
    for (a, b) in gen1.iter().zip(gen2) {
        assert_eq!(b["ok"], true, "{b}");
        assert_eq!(
            a["inode"], b["inode"],
            "generation 2 got another socket for {a} / {b}"
        );
        assert_eq!(a["local"], b["local"], "{a} / {b}");
    }

    let status = broker.status();
    let listed = status["listeners"].as_array().unwrap();
    assert_eq!(listed.len(), listeners.len(), "{status}");
    assert!(
        listed
            .iter()
            .any(|l| l["network"] == "tcp4" && l["address"] == bound)
    );
}

#[test]
fn a_child_of_an_instance_acts_as_the_instance() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let port = free_port();
    // `sh` is the instance; the probe is its child (not exec'd).
    let command = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        format!(
            "{} --report {} --listen tcp 127.0.0.1:{port} --ready; exit 0",
            probe().display(),
            report.display()
        ),
    ];
    let broker = TestBroker::start("child", &config_for(&command));
    broker.wait_running(1);
    let results = wait_for_report(&report, "waiting", 1);
    assert_eq!(results[0]["ok"], true, "{}", results[0]);
    assert_eq!(results[1]["op"], "ready");
    assert_eq!(results[1]["ok"], true, "{}", results[1]);
}

#[test]
fn listen_options_apply_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let sock = dir.path().join("mode.sock");
    let command: Vec<String> = vec![
        probe().display().to_string(),
        "--report".into(),
        report.display().to_string(),
        "--listen-option".into(),
        "unix".into(),
        sock.display().to_string(),
        "mode".into(),
        "u:416".into(),
        "--listen-option".into(),
        "tcp".into(),
        "127.0.0.1:0".into(),
        "reuse_port".into(),
        "b:true".into(),
        "--listen-option".into(),
        "tcp".into(),
        "127.0.0.1:0".into(),
        "colour".into(),
        "s:blue".into(),
        "--listen-option".into(),
        "tcp".into(),
        "127.0.0.1:0".into(),
        "backlog".into(),
        "s:many".into(),
        "--ready".into(),
    ];
    let broker = TestBroker::start("opts", &config_for(&command));
    broker.wait_running(1);
    let r = wait_for_report(&report, "waiting", 1);
    assert_eq!(r[0]["ok"], true, "{}", r[0]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(r[1]["ok"], true, "{}", r[1]);
    assert_eq!(r[2]["ok"], false);
    assert_eq!(r[2]["kind"], "InvalidArgument");
    assert!(
        r[2]["error"]
            .as_str()
            .unwrap()
            .contains("unknown option \"colour\""),
        "{}",
        r[2]
    );
    assert_eq!(r[3]["kind"], "InvalidArgument");
    assert!(
        r[3]["error"]
            .as_str()
            .unwrap()
            .contains("\"backlog\" must be of type u"),
        "{}",
        r[3]
    );
}

#[test]
fn unreferenced_listeners_close_after_the_linger() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let port = free_port();
    let command: Vec<String> = vec![
        probe().display().to_string(),
        "--report".into(),
        report.display().to_string(),
        "--listen".into(),
        "tcp".into(),
        format!("127.0.0.1:{port}"),
        "--close".into(),
        "tcp".into(),
        format!("127.0.0.1:{port}"),
        "--close".into(),
        "tcp".into(),
        format!("127.0.0.1:{port}"),
        "--ready".into(),
    ];
    let config = format!("{}listener_linger = \"1s\"\n", config_for(&command));
    let broker = TestBroker::start("linger", &config);
    broker.wait_running(1);
    let r = wait_for_report(&report, "waiting", 1);
    assert_eq!(r[1]["ok"], true, "{}", r[1]);
    assert_eq!(
        r[2]["ok"], false,
        "a second Close has nothing to drop: {}",
        r[2]
    );
    assert!(
        r[2]["error"]
            .as_str()
            .unwrap()
            .contains("holds no reference"),
        "{}",
        r[2]
    );
    wait_until("the listener to close", Duration::from_secs(5), || {
        broker.status()["listeners"].as_array().unwrap().is_empty()
    });
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the port must be free again"
    );
}
