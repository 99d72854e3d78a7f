//! A first start whose command cannot be executed ends `ally run` at once with
//! one line that names the command and why, so `systemctl start` fails fast
//! instead of retrying until its timeout.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `ally run web -- command`; returns its exit code and stderr, failing
/// if it has not exited within `within`.
fn run_until_exit(command: &str, within: Duration) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = Command::new(ALLY)
        .args(["run", "web", "--bus", "none", "--runtime-dir"])
        .arg(dir.path().join("run"))
        .args(["--", command])
        .env_remove("ALLY_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ally run still running after {within:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(&log).unwrap())
}

fn assert_one_line(stderr: &str, command: &str, reason: &str) {
    let naming: Vec<&str> = stderr.lines().filter(|l| l.contains(command)).collect();
    assert_eq!(naming.len(), 1, "one line names the command:\n{stderr}");
    let line = naming[0];
    assert!(line.starts_with("ally: web: "), "{line}");
    assert!(line.contains(reason), "expected {reason:?} in {line:?}");
    assert_eq!(
        stderr.lines().last(),
        Some(line),
        "it is the last word:\n{stderr}"
    );
}

#[test]
fn a_missing_command_fails_the_start_at_once() {
    let (code, stderr) = run_until_exit("/nonexistent/ally-app", Duration::from_secs(10));
    assert_eq!(code, Some(1), "{stderr}");
    assert_one_line(
        &stderr,
        "/nonexistent/ally-app",
        "No such file or directory",
    );
}

#[test]
fn a_command_that_is_not_executable_fails_the_start_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = write_script(dir.path(), "app", "exit 0");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).unwrap();
    let app = app.display().to_string();
    let (code, stderr) = run_until_exit(&app, Duration::from_secs(10));
    assert_eq!(code, Some(1), "{stderr}");
    assert_one_line(&stderr, &app, "Permission denied");
}
