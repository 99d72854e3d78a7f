//! Bad input gets a clear error naming what was wrong, and the broker keeps
//! running and serving.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn bad_listen_requests_are_refused_and_the_app_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_port = held.local_addr().unwrap().port();
    let good_port = free_port();
    let mut command: Vec<String> = vec![
        probe().display().to_string(),
        "--report".into(),
        report.display().to_string(),
    ];
    let requests = [
        ("sctp", "127.0.0.1:80".to_string()),
        ("tcp", "127.0.0.1".to_string()),
        ("tcp", "127.0.0.1:99999".to_string()),
        ("tcp4", "[::1]:80".to_string()),
        ("unix", "relative/path.sock".to_string()),
        ("tcp", format!("127.0.0.1:{held_port}")),
        ("tcp", format!("127.0.0.1:{good_port}")),
    ];
    for (network, address) in &requests {
        command.extend(["--listen".into(), network.to_string(), address.clone()]);
    }
    command.push("--ready".into());
    let config = format!("command = {command:?}\n");
    let broker = TestBroker::start("bad", &config);
    broker.wait_running(1);
    let r = wait_for_report(&report, "waiting", 1);
    let expect = [
        ("InvalidArgument", "unknown network \"sctp\""),
        ("InvalidArgument", "missing port"),
        ("InvalidArgument", "port must be a number"),
        ("InvalidArgument", "not an address of tcp4"),
        ("InvalidArgument", "must be absolute"),
        (
            "AddressInUse",
            &format!("127.0.0.1:{held_port} is already in use"),
        ),
    ];
    for (i, (kind, text)) in expect.iter().enumerate() {
        assert_eq!(r[i]["ok"], false, "{}", r[i]);
        assert_eq!(r[i]["kind"], *kind, "{}", r[i]);
        assert!(
            r[i]["error"].as_str().unwrap().contains(text),
            "{} should say {text:?}",
            r[i]
        );
    }
    assert_eq!(r[6]["ok"], true, "{}", r[6]);
    assert_eq!(r[7]["op"], "ready");
    assert_eq!(r[7]["ok"], true);
    let status = broker.status();
    assert_eq!(status["state"], "running");
    assert_eq!(status["listeners"].as_array().unwrap().len(), 1, "{status}");
    std::net::TcpStream::connect(("127.0.0.1", good_port)).unwrap();
}

fn ally_run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(ALLY)
        .arg("run")
        .args(args)
        .args(["--bus", "none"])
        .output()
        .unwrap();
    (out.status.code(), stderr(&out))
}

fn broken_config(name: &str, text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    (dir, path)
}

#[test]
fn a_broken_config_is_one_line_naming_file_key_and_expectation() {
    let cases = [
        (
            "command = [\"/bin/true\"]\nready_timeot = \"5s\"\n",
            "unknown key `ready_timeot`",
        ),
        (
            "command = [\"/bin/true\"]\nready_timeout = \"5 parsecs\"\n",
            "key `ready_timeout`",
        ),
        (
            "command = [\"/bin/true\"]\nstop_signal = \"SIGNOPE\"\n",
            "key `stop_signal`",
        ),
        (
            "command = [\"/bin/true\"]\nrestart_delay = 5\n",
            "key `restart_delay`",
        ),
        (
            "command = [\"/bin/true\"]\n[[listen]]\nnetwork = \"tcp\"\naddress = \"nope\"\n",
            "key `listen[0].address`",
        ),
        (
            "command = [\"/bin/true\"]\nstate_busy_poll = \"1s\"\n",
            "key `state_busy_poll`: 1s is too long",
        ),
        (
            "command = [\"/bin/true\"]\nstart_priority = \"low\"\n",
            "key `start_priority`: invalid start priority \"low\"",
        ),
        ("stop_timeout = \"5s\"\n", "key `command` is missing"),
        ("command = [\"/bin/true\"\n", "TOML syntax error"),
    ];
    for (text, expected) in cases {
        let (dir, path) = broken_config("app.toml", text);
        let runtime = dir.path().join("run").display().to_string();
        let (code, err) = ally_run(&["app", "--config", &path, "--runtime-dir", &runtime]);
        assert_eq!(code, Some(1), "{text:?}: {err}");
        assert!(
            err.starts_with(&format!("ally: {path}")),
            "names the file: {err}"
        );
        assert!(
            err.contains(expected),
            "{text:?}: {err:?} should contain {expected:?}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    }
}

#[test]
fn a_missing_config_bad_app_name_and_second_broker_are_explained() {
    let (code, err) = ally_run(&["nosuchapp-config-test"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no configuration for nosuchapp-config-test"),
        "{err}"
    );
    let (code, err) = ally_run(&["bad/name", "--", "/bin/true"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim_end(),
        "ally: invalid app name \"bad/name\": '/' is not allowed: expected letters, digits, '_', '-' and '.'"
    );

    let port = free_port();
    let broker = TestBroker::start("twice", &hello_config(port, "1", ""));
    broker.wait_running(1);
    let runtime = broker.runtime_dir.display().to_string();
    let hello = hello().display().to_string();
    let (code, err) = ally_run(&["twice", "--runtime-dir", &runtime, "--", &hello]);
    assert_eq!(code, Some(1));
    assert!(err.contains("another broker serves this app"), "{err}");
    wait_until(
        "the first broker still serving",
        Duration::from_secs(2),
        || broker.status()["state"] == "running",
    );
}

#[test]
fn admin_commands_explain_a_missing_broker() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(ALLY)
        .args(["reload", "ghost", "--runtime-dir"])
        .arg(dir.path())
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("ally: no broker for ghost found (no socket at "),
        "{err}"
    );
    let out = Command::new(ALLY).args(["reload"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

/// `ally run` on `config`, killed if it has not exited within a few seconds (then
/// the code is `None`). Its address space is capped so that reading without end
/// fails the run instead of the machine.
fn ally_run_bounded(config: &std::path::Path, runtime: &std::path::Path) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut command = Command::new(ALLY);
    command
        .arg("run")
        .arg("app")
        .arg("--config")
        .arg(config)
        .arg("--runtime-dir")
        .arg(runtime)
        .args(["--bus", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let limit = libc::rlimit {
        rlim_cur: 2 << 30,
        rlim_max: 2 << 30,
    };
    // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    if status.is_none() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.and_then(|s| s.code()), err)
}

#[test]
fn a_config_that_is_no_small_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let fifo = dir.path().join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let large = dir.path().join("large.toml");
    let mut text = String::from("command = [\"/bin/true\"]\n");
    while text.len() <= 1 << 20 {
        text.push_str("# a comment to make the file larger than the limit\n");
    }
    std::fs::write(&large, text).unwrap();
    let cases = [
        (
            std::path::PathBuf::from("/dev/zero"),
            "it is a character device, not a regular file",
        ),
        (fifo, "it is a FIFO, not a regular file"),
        (
            dir.path().to_path_buf(),
            "it is a directory, not a regular file",
        ),
        (large, "larger than 1048576 bytes (1 MiB)"),
    ];
    for (path, expected) in cases {
        let (code, err) = ally_run_bounded(&path, &runtime);
        let path = path.display();
        assert_eq!(code, Some(1), "{path}: {err}");
        assert!(
            err.starts_with(&format!("ally: {path}: cannot read: ")),
            "names the file: {err}"
        );
        assert!(
            err.contains(expected),
            "{err:?} should contain {expected:?}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    }
}
