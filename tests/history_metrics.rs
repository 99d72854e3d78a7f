//! `ally history` lists the reloads and crash restarts as they happened, and
//! `ally metrics` (and `metrics_address`) counts the same ones, in a text that
//! a Prometheus/OpenMetrics parser reads.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn history(broker: &TestBroker) -> Vec<Value> {
    let out = broker.ally(&["history", &broker.app, "--json"]);
    assert!(
        out.status.success(),
        "ally history failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("ally history --json parses")
        .as_array()
        .expect("an array")
        .clone()
}

/// The OpenMetrics text as the Python client's parser reads it: every sample
/// as `[name, labels, value]`. Panics, with the parser's error, if it does not parse.
fn parse_openmetrics(text: &str) -> Vec<(String, serde_json::Map<String, Value>, f64)> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    samples
        .into_iter()
        .map(|s| {
            (
                s[0].as_str().unwrap().to_string(),
                s[1].as_object().unwrap().clone(),
                s[2].as_f64().unwrap(),
            )
        })
        .collect()
}

fn sample(
    samples: &[(String, serde_json::Map<String, Value>, f64)],
    name: &str,
    label: Option<(&str, &str)>,
) -> f64 {
    samples
        .iter()
        .find(|(n, labels, _)| {
            n == name && label.is_none_or(|(k, v)| labels.get(k).and_then(Value::as_str) == Some(v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?} in {samples:?}"))
        .2
}

fn count(entries: &[Value], kind: &str, result: &str) -> f64 {
    entries
        .iter()
        .filter(|e| e["kind"] == kind && e["result"] == result)
        .count() as f64
}

/// One raw HTTP request; the status line, the head and the body.
fn http(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a full response");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, head.to_string(), body.to_string())
}

#[test]
fn history_lists_reloads_and_a_restart_and_metrics_count_the_same() {
    let port = free_port();
    let metrics_port = free_port();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let good = hello_config(
        port,
        "v1",
        &format!("restart_delay = \"100ms\"\nmetrics_address = \"127.0.0.1:{metrics_port}\""),
    );
    let broker = TestBroker::start("observed", &good);
    broker.wait_running(1);

    assert!(broker.reload().status.success());
    std::fs::write(
        broker.config_path(),
        format!("{good}stop_signal = \"SIGFOO\"\n"),
    )
    .unwrap();
    let failed = broker.reload();
    assert!(!failed.status.success());
    std::fs::write(broker.config_path(), &good).unwrap();
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(
        "the SIGHUP reload recorded",
        Duration::from_secs(20),
        || (history(&broker).len() == 4).then_some(()),
    );
    let serving = broker.pids("ready");
    assert_eq!(serving.len(), 1, "{}", broker.status());
    signal(serving[0], nix::sys::signal::Signal::SIGKILL);
    let entries = wait_for(
        "the crash restart recorded",
        Duration::from_secs(20),
        || {
            let entries = history(&broker);
            (entries.len() == 5 && entries[4]["result"] == "success").then_some(entries)
        },
    );

    let kinds: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("first start", "success"),
            ("reload", "success"),
            ("reload", "failure"),
            ("reload", "success"),
            ("restart", "success"),
        ],
        "{entries:#?}"
    );
    let sequences: Vec<u64> = entries
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, [1, 2, 3, 4, 5]);
    let generations: Vec<u64> = entries
        .iter()
        .map(|e| e["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(generations, [1, 2, 0, 3, 4], "{entries:#?}");
    let reason = |i: usize| entries[i]["reason"].as_str().unwrap();
    assert!(
        reason(1).starts_with("reloaded to generation 2 ("),
        "{}",
        reason(1)
    );
    assert!(
        reason(2).contains("key `stop_signal`: unknown signal \"SIGFOO\""),
        "{}",
        reason(2)
    );
    assert!(reason(4).starts_with("restarted as generation 4"));
    let by = |i: usize| entries[i]["requested_by"].as_str().unwrap();
    let admin = format!("D-Bus: admin, uid {} pid ", nix::unistd::getuid());
    assert!(by(1).starts_with(&admin), "{}", by(1));
    assert_eq!(by(3), "SIGHUP");
    assert_eq!(by(4), "crash (attempt 1)");
    let started: Vec<u64> = entries
        .iter()
        .map(|e| e["started_usec"].as_u64().unwrap())
        .collect();
    assert!(started.is_sorted(), "{started:?}");
    assert!(
        entries
            .iter()
            .all(|e| e["duration_usec"].as_u64() > Some(0))
    );

    let table = stdout(&broker.ally(&["history", "observed"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 6, "{table}");
    assert!(lines[0].starts_with("TIME") && lines[0].contains("RESULT"));
    assert!(lines[3].contains("reload") && lines[3].contains("failure"));
    assert!(lines[3].contains("unknown signal"), "{table}");
    assert!(lines[5].contains("restart") && lines[5].contains("success"));

    // The metrics parse, and count what the history lists.
    let out = broker.ally(&["metrics", "observed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    let samples = parse_openmetrics(&text);
    for result in ["success", "failure"] {
        assert_eq!(
            sample(&samples, "ally_reloads_total", Some(("result", result))),
            count(&entries, "reload", result),
            "{text}"
        );
        assert_eq!(
            sample(&samples, "ally_restarts_total", Some(("result", result))),
            count(&entries, "restart", result),
            "{text}"
        );
    }
    assert_eq!(
        sample(&samples, "ally_reload_duration_seconds_count", None),
        3.0
    );
    assert_eq!(
        sample(&samples, "ally_instances", Some(("state", "ready"))),
        1.0
    );
    assert_eq!(sample(&samples, "ally_listeners", None), 1.0);

    // metrics_address serves the same text, and refuses anything else.
    let (status, head, body) = http(metrics_addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert_eq!(body, text);
    let (status, _, _) = http(metrics_addr, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http(metrics_addr, b"POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, _, _) = http(metrics_addr, b"\x16\x03\x01 hello\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(20_000));
    let (status, _, _) = http(metrics_addr, huge.as_bytes());
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
    // Clients that send nothing hold every slot, but only for the read
    // timeout (5 s): then the next one is served.
    let _idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(metrics_addr).unwrap())
        .collect();
    let (status, _, body) = http(metrics_addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    parse_openmetrics(&body);
    assert_eq!(broker.status()["state"], "running");
}

#[test]
fn history_keeps_only_the_last_n() {
    let port = free_port();
    let config = hello_config(port, "v1", "history = 3");
    let broker = TestBroker::start("brief", &config);
    broker.wait_running(1);
    for _ in 0..4 {
        assert!(broker.reload().status.success());
    }
    let entries = history(&broker);
    let kept: Vec<(u64, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["sequence"].as_u64().unwrap(),
                e["generation"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(kept, [(3, 3), (4, 4), (5, 5)], "{entries:#?}");
    // The counters count them all.
    let samples = parse_openmetrics(&stdout(&broker.ally(&["metrics", "brief"])));
    assert_eq!(
        sample(&samples, "ally_reloads_total", Some(("result", "success"))),
        4.0
    );
    // A reload that lowers `history` keeps the newest that fit.
    std::fs::write(
        broker.config_path(),
        hello_config(port, "v1", "history = 1"),
    )
    .unwrap();
    assert!(broker.reload().status.success());
    let entries = history(&broker);
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0]["generation"], 6);
}

#[test]
fn history_shows_a_pending_crash_restart_last() {
    let port = free_port();
    let config = format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\", \"--ready\", \"--crash-after\", \"200\"]\nrestart_delay = \"3s\"\n",
        example("serve").display().to_string()
    );
    let broker = TestBroker::start("pending", &config);
    let entries = {
        let mut found = Vec::new();
        wait_until(
            "a pending restart in the history",
            Duration::from_secs(20),
            || {
                found = history(&broker);
                found.last().is_some_and(|e| e["result"] == "pending")
            },
        );
        found
    };
    let last = entries.last().unwrap();
    assert_eq!(last["kind"], "restart");
    assert!(last["attempt"].as_u64() >= Some(1), "{last}");
    assert_eq!(entries[0]["kind"], "first start");
    // Between two back-offs the line is gone a moment: wait for one that shows it.
    wait_until(
        "a pending line in the table",
        Duration::from_secs(20),
        || {
            let table = stdout(&broker.ally(&["history", "pending"]));
            let pending = table.lines().last().unwrap_or_default();
            pending.contains("pending")
                && pending.contains("crash restart attempt")
                && pending.contains("(in ")
        },
    );
}

#[test]
fn state_calls_are_counted_by_interface_on_both_sockets() {
    let broker = TestBroker::start("counted", "command = [\"sleep\", \"1000\"]\n");
    // The private socket, through the CLI: one call each.
    broker.ally(&["cache", "set", "counted", "ns", "k", "v"]);
    broker.ally(&["atomic", "add", "counted", "n", "5"]);
    broker.ally(&["lock", "release", "counted", "l"]);
    // The state socket, with another client.
    let state = broker.socket().with_file_name("state");
    for call in [
        &["org.ally.Atomic1", "Load", "s", "n"][..],
        &["org.ally.Cache1", "Get", "ss", "ns", "k"][..],
    ] {
        let out = Command::new("busctl")
            .arg(format!("--address=unix:path={}", state.display()))
            .args(["call", "org.ally.counted", "/org/ally"])
            .args(call)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{call:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let samples = parse_openmetrics(&stdout(&broker.ally(&["metrics", "counted"])));
    let calls = |interface| {
        sample(
            &samples,
            "ally_state_calls_total",
            Some(("interface", interface)),
        )
    };
    assert_eq!(calls("org.ally.Cache1"), 2.0);
    assert_eq!(calls("org.ally.Atomic1"), 2.0);
    assert_eq!(calls("org.ally.Locker1"), 1.0);
}

#[test]
fn draining_tasks_are_what_the_draining_generation_reports() {
    let port = free_port();
    let config = |version: &str| {
        format!(
            "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\", \"--version\", {version:?}]\nstop_timeout = \"30s\"\nready_timeout = \"10s\"\n",
            example("long_requests").display().to_string()
        )
    };
    let broker = TestBroker::start("drainmetrics", &config("1"));
    broker.wait_running(1);
    let metrics = || parse_openmetrics(&stdout(&broker.ally(&["metrics", "drainmetrics"])));
    let reported_tasks = || {
        broker.status()["instance_app_reports"]
            .as_array()
            .and_then(|r| r.first().cloned())
            .and_then(|r| r["tasks"].as_u64())
    };
    // Two requests, ending 2 s apart.
    let _requests: Vec<TcpStream> = [2000, 4000]
        .into_iter()
        .map(|ms| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(stream, "GET /?ms={ms} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            stream
        })
        .collect();
    wait_until("2 tasks reported", Duration::from_secs(10), || {
        reported_tasks() == Some(2)
    });
    assert_eq!(sample(&metrics(), "ally_draining_tasks", None), 0.0);
    std::fs::write(broker.config_path(), config("2")).unwrap();
    assert!(broker.reload().status.success());
    let mut seen = Vec::new();
    wait_until(
        "the old generation drained",
        Duration::from_secs(20),
        || {
            let samples = metrics();
            let tasks = sample(&samples, "ally_draining_tasks", None);
            if seen.last() != Some(&tasks) {
                seen.push(tasks);
            }
            sample(&samples, "ally_instances", Some(("state", "draining"))) == 0.0
        },
    );
    assert!(seen.contains(&2.0) && seen.contains(&1.0), "{seen:?}");
    assert_eq!(seen.last(), Some(&0.0), "{seen:?}");
}
