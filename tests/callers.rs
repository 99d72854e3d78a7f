//! Callers are told apart by credentials: instances (and their children) may
//! do everything, admins may reload and read, anyone else is refused.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use ally_client::ErrorKind;
use common::*;

#[test]
fn an_admin_may_reload_and_read_but_not_listen_or_ready() {
    let port = free_port();
    let broker = TestBroker::start("adm", &hello_config(port, "1", ""));
    broker.wait_running(1);
    let admin = ally_client::blocking::Ally::connect(&broker.address()).unwrap();
    let err = admin
        .listen::<std::net::TcpListener>("127.0.0.1:0")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AccessDenied, "{err}");
    assert!(
        err.to_string().contains("Listen is for instances of adm"),
        "{err}"
    );
    let err = admin.ready().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AccessDenied, "{err}");
    assert_eq!(admin.reload().unwrap(), 2);
    let status = admin.status().unwrap();
    assert_eq!(status.generation, 2);
    assert_eq!(status.app, "adm");
}

#[test]
fn another_user_that_is_not_an_instance_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run processes as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let report = dir.path().join("report");
    let port = free_port();
    // The app runs as nobody, so the private socket lets nobody connect; a
    // nobody process outside the app must still be refused by the broker.
    let config = format!(
        "command = [{:?}, \"--report\", {:?}, \"--listen\", \"tcp\", \"127.0.0.1:{port}\", \"--ready\"]\nuser = \"nobody\"\n",
        probe().display().to_string(),
        report.display().to_string()
    );
    let broker = TestBroker::start("multi", &config);
    std::fs::set_permissions(broker.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    broker.wait_running(1);
    let reported = wait_for_report(&report, "waiting", 1);
    assert_eq!(
        reported[0]["ok"], true,
        "the nobody instance may Listen: {}",
        reported[0]
    );
    assert_eq!(reported[1]["op"], "ready");
    assert_eq!(
        reported[1]["ok"], true,
        "the nobody instance may be Ready: {}",
        reported[1]
    );
    let meta = std::fs::metadata(broker.socket()).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);

    for method in ["Status", "Reload", "Listen"] {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "busctl"])
            .arg(format!("--address=unix:path={}", broker.socket().display()))
            .args([
                "call",
                "org.ally.multi",
                "/org/ally",
                "org.ally.Broker1",
                method,
            ]);
        if method == "Listen" {
            cmd.args(["ss", "tcp", "127.0.0.1:0"]);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{method} must be refused");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("{method} denied: the caller is neither root, the broker's user, nor an instance of multi")),
            "{method}: {err}"
        );
    }
    // Root is still served.
    let out = Command::new("busctl")
        .arg(format!("--address=unix:path={}", broker.socket().display()))
        .args([
            "call",
            "org.ally.multi",
            "/org/ally",
            "org.ally.Broker1",
            "Status",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("still serving", Duration::from_secs(2), || {
        broker.status()["state"] == "running"
    });
}

/// An admin tool that uses `Ally::connect` (to call Reload, say) is not an
/// instance: it must keep SIGTERM's default action and die from it.
#[test]
fn an_admin_tool_keeps_its_sigterm() {
    if let Ok(address) = std::env::var("ALLY_TEST_ADMIN_ADDRESS") {
        let ally = ally_client::blocking::Ally::connect(&address).unwrap();
        assert!(ally.status().is_ok());
        println!("connected");
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    let broker = TestBroker::start("admintool", &hello_config(free_port(), "1", ""));
    broker.wait_running(1);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_admin_tool_keeps_its_sigterm",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ALLY_TEST_ADMIN_ADDRESS", broker.address())
        .env_remove("ALLY_INSTANCE")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("connected") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "the child exited early"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(15),
        "SIGTERM must end an admin tool: {status}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}
