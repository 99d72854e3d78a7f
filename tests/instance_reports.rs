//! What instances report with `Report`: shown per instance by `ally status`,
//! a draining generation's tasks counting down, refused to anyone but an
//! instance, bad keys and long strings named, and signalled on each change.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

fn long_requests_config(port: u16, version: &str, commit: &str) -> String {
    format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\", \"--version\", {version:?}, \"--commit\", {commit:?}]\nstop_timeout = \"30s\"\nready_timeout = \"10s\"\n",
        example("long_requests").display().to_string()
    )
}

/// Sends `GET /?ms=N` and returns the connection to read the answer from.
fn slow_request(port: u16, ms: u64) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET /?ms={ms} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    stream
}

fn answer(mut stream: TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let response = read_response(&mut stream).unwrap().expect("an answer");
    format!("{} {}", response.status, response.body)
}

/// What `ally status --json` says instance `id` reported.
fn app_report(status: &serde_json::Value, id: u64) -> Option<serde_json::Value> {
    status["instance_app_reports"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
}

fn instance_of(status: &serde_json::Value, generation: u64) -> Option<serde_json::Value> {
    status["instances"]
        .as_array()?
        .iter()
        .find(|i| i["generation"] == generation)
        .cloned()
}

#[test]
fn a_draining_generation_s_tasks_count_down_in_status() {
    let port = free_port();
    let broker = TestBroker::start(
        "drainer",
        &long_requests_config(port, "1.0.0", "0123456789abcdef0123"),
    );
    broker.wait_running(1);
    let old = instance_of(&broker.status(), 1).unwrap();
    let old_id = old["id"].as_u64().unwrap();
    let old_pid = old["pid"].as_u64().unwrap().to_string();
    wait_until("version 1.0.0 reported", Duration::from_secs(10), || {
        app_report(&broker.status(), old_id).is_some_and(|r| r["version"] == "1.0.0")
    });
    let table = stdout(&broker.ally(&["status", "drainer"]));
    let row = table
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(old_pid.as_str()))
        .unwrap_or_else(|| panic!("no row for pid {old_pid}:\n{table}"));
    assert!(
        table.contains("VERSION") && table.contains("TASKS"),
        "{table}"
    );
    assert!(row.contains("1.0.0 (0123456789ab)"), "{row}");
    assert!(row.contains("requests take 2000 ms"), "{row}");

    // Three requests that end 1.5 s apart.
    let requests: Vec<TcpStream> = [1500, 3000, 4500]
        .into_iter()
        .map(|ms| slow_request(port, ms))
        .collect();
    wait_until("3 tasks reported", Duration::from_secs(10), || {
        app_report(&broker.status(), old_id).is_some_and(|r| r["tasks"] == 3)
    });
    std::fs::write(
        broker.config_path(),
        long_requests_config(port, "2.0.0", "fedcba9876543210"),
    )
    .unwrap();
    let out = broker.reload();
    assert!(out.status.success(), "{}", stderr(&out));

    // While the old generation drains, its tasks count down in the table and
    // in --json, until it is gone.
    let mut in_table: Vec<String> = Vec::new();
    let mut in_json: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "the old generation did not finish draining: table saw {in_table:?}, json {in_json:?}"
        );
        let table = stdout(&broker.ally(&["status", "drainer"]));
        let status = broker.status();
        let Some(old) = instance_of(&status, 1) else {
            break;
        };
        if let Some(row) = table
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(old_pid.as_str()))
            && let Some(at) = row.find("draining (")
        {
            let shown = row[at..].split(')').next().unwrap().to_string() + ")";
            if in_table.last() != Some(&shown) {
                in_table.push(shown);
            }
        }
        if old["state"] == "draining"
            && let Some(tasks) = app_report(&status, old_id).and_then(|r| r["tasks"].as_u64())
            && in_json.last() != Some(&tasks)
        {
            in_json.push(tasks);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let in_table: Vec<&str> = in_table.iter().map(String::as_str).collect();
    let expected = [
        "draining (3 tasks left)",
        "draining (2 tasks left)",
        "draining (1 task left)",
    ];
    assert!(
        in_table == expected
            || in_table[..] == [&expected[..], &["draining (0 tasks left)"]].concat()[..],
        "table: {in_table:?}"
    );
    assert!(
        in_json == [3, 2, 1] || in_json == [3, 2, 1, 0],
        "json: {in_json:?}"
    );
    for request in requests {
        let answer = answer(request);
        assert!(answer.starts_with("200 done version=1.0.0"), "{answer}");
    }
    // The old instance's report went with it; the new one's is there.
    let status = broker.status();
    assert!(app_report(&status, old_id).is_none(), "{status}");
    let new_id = instance_of(&status, 2).unwrap()["id"].as_u64().unwrap();
    let new = app_report(&status, new_id).unwrap();
    assert_eq!(new["version"], "2.0.0");
    assert_eq!(new["commit"], "fedcba9876543210");
}

/// An instance (a shell, calling with busctl) whose reports the test drives:
/// it waits for `go`, makes the calls, and leaves each one's output in `dir`.
fn reporting_instance(dir: &Path, app: &str) -> String {
    let long = "c".repeat(257);
    let script = write_script(
        dir,
        "instance",
        &format!(
            r#"set -u
OUT={out}
b() {{ busctl --address="$ALLY_ADDRESS" call org.ally.{app} /org/ally org.ally.Broker1 "$@"; }}
r() {{ name=$1; shift; b Report 'a{{sv}}' "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"; echo $? >"$OUT/$name.rc"; }}
b Ready
while [ ! -e "$OUT/go" ]; do sleep 0.05; done
r unknown 1 verison s 1.0
r wrongtype 1 tasks s 3
r toolong 1 commit s {long}
r first 2 version s 1.0 commit s abc123
r same 1 version s 1.0
r second 1 tasks u 5
touch "$OUT/done"
exec sleep 1000
"#,
            out = dir.display()
        ),
    );
    format!("command = [{:?}]\n", script.display().to_string())
}

fn call_result(dir: &Path, name: &str) -> (String, String) {
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("{name}.{ext}"))).unwrap();
    (read("rc").trim().to_string(), read("err"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reports_are_named_and_changes_are_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let config = reporting_instance(dir.path(), "rep");
    let broker = tokio::task::block_in_place(|| {
        let b = TestBroker::start("rep", &config);
        b.wait_running(1);
        b
    });
    let proxy = ally_core::proxy::connect(&broker.address(), Some("rep"))
        .await
        .unwrap();
    let mut reported = proxy.receive_instance_reported().await.unwrap();
    std::fs::write(dir.path().join("go"), "").unwrap();
    let done = dir.path().join("done");
    tokio::task::block_in_place(|| {
        wait_until("the instance's calls", Duration::from_secs(10), || {
            done.exists()
        })
    });

    let (rc, err) = call_result(dir.path(), "unknown");
    assert_ne!(rc, "0");
    assert!(
        err.contains("unknown report key \"verison\": expected version (s), commit (s), tasks (u) or description (s)"),
        "{err}"
    );
    let (rc, err) = call_result(dir.path(), "wrongtype");
    assert_ne!(rc, "0");
    assert!(
        err.contains("report key \"tasks\" must be of type u, not s"),
        "{err}"
    );
    let (rc, err) = call_result(dir.path(), "toolong");
    assert_ne!(rc, "0");
    assert!(
        err.contains("report key \"commit\" is 257 bytes long: at most 256 bytes"),
        "{err}"
    );
    for ok in ["first", "same", "second"] {
        let (rc, err) = call_result(dir.path(), ok);
        assert_eq!(rc, "0", "{ok}: {err}");
    }

    // One signal per change, each with the whole report: the repeated version
    // sent none, and the refused calls none.
    let mut next = async || {
        let signal = tokio::time::timeout(Duration::from_secs(5), reported.next())
            .await
            .expect("an InstanceReported signal")
            .unwrap();
        let args = signal.args().unwrap();
        let report = ally_core::report::AppReport::from_broker(args.report()).unwrap();
        (*args.id(), *args.generation(), report)
    };
    let (id, generation, first) = next().await;
    assert_eq!(generation, 1);
    assert_eq!(
        first,
        ally_core::report::AppReport::new()
            .version("1.0")
            .commit("abc123")
    );
    let (second_id, _, second) = next().await;
    assert_eq!(second_id, id);
    assert_eq!(second, first.clone().tasks(5));

    // The property and the status show the same, and the broker still serves.
    let reports: HashMap<u64, HashMap<String, zbus::OwnedVariant>> = proxy.reports().await.unwrap();
    let by_property = ally_core::report::AppReport::from_broker(&reports[&id]).unwrap();
    assert_eq!(by_property, second);
    let status = tokio::task::block_in_place(|| broker.status());
    let json = app_report(&status, id).unwrap();
    assert_eq!(json["version"], "1.0");
    assert_eq!(json["tasks"], 5);
    assert!(json.get("description").is_none(), "{json}");
}

#[test]
fn only_instances_may_report() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run processes as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut config = reporting_instance(dir.path(), "strange");
    config.push_str("user = \"nobody\"\n");
    let broker = TestBroker::start("strange", &config);
    std::fs::set_permissions(broker.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    broker.wait_running(1);

    let report = |cmd: &mut Command| {
        cmd.arg(format!("--address=unix:path={}", broker.socket().display()))
            .args([
                "call",
                "org.ally.strange",
                "/org/ally",
                "org.ally.Broker1",
                "Report",
                "a{sv}",
                "1",
                "version",
                "s",
                "evil",
            ])
            .output()
            .unwrap()
    };
    // Another process of the app's user that is no instance of it.
    let out = report(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "busctl",
    ]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "Report denied: the caller is neither root, the broker's user, nor an instance of strange"
        ),
        "{}",
        stderr(&out)
    );
    // An admin.
    let out = report(&mut Command::new("busctl"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Report is for instances of strange: the caller is an admin"),
        "{}",
        stderr(&out)
    );
    // The nobody instance itself may.
    std::fs::write(dir.path().join("go"), "").unwrap();
    wait_until("the instance's calls", Duration::from_secs(10), || {
        dir.path().join("done").exists()
    });
    let (rc, err) = call_result(dir.path(), "first");
    assert_eq!(rc, "0", "{err}");
    let status = broker.status();
    let reports = status["instance_app_reports"].as_array().unwrap();
    assert_eq!(reports.len(), 1, "{status}");
    assert_eq!(reports[0]["version"], "1.0", "nothing of the refused calls");
}
