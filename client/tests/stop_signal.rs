//! The stop signal, delivered to a child process for real.
//!
//! The parent tests run this test binary again with `ALLY_CLIENT_TEST_CHILD` set, which
//! turns the `child` test into the program under test: it creates a client (in simulate
//! mode), says so on stdout, and only *later* starts waiting, so a signal sent at once must
//! not be lost.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use ally_testkit::process::{Pipe, Spawned};
use nix::sys::signal::Signal;

const CHILD_ENV: &str = "ALLY_CLIENT_TEST_CHILD";

#[test]
fn child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let code = match mode.as_str() {
        "async" => {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let ally = ally_client::Ally::from_env().await.unwrap();
                assert!(!ally.is_managed());
                println!("CHILD READY");
                tokio::time::sleep(Duration::from_millis(300)).await;
                match tokio::time::timeout(Duration::from_secs(10), ally.stopped()).await {
                    Ok(()) => {
                        println!("CHILD STOPPED");
                        0
                    }
                    Err(_) => 3,
                }
            })
        }
        "blocking" => {
            let ally = ally_client::blocking::Ally::from_env().unwrap();
            let stop = ally.stop_handle();
            println!("CHILD READY");
            std::thread::sleep(Duration::from_millis(300));
            if stop.wait_timeout(Duration::from_secs(10)) {
                println!("CHILD STOPPED");
                0
            } else {
                3
            }
        }
        other => panic!("unknown child mode {other}"),
    };
    std::process::exit(code);
}

/// The child under test; its stdout lines can be waited for.
struct Running(Spawned);

fn start(mode: &str, stop_signal: Option<&str>) -> Running {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .env_remove("ALLY_ADDRESS")
        .stderr(Stdio::null());
    match stop_signal {
        Some(sig) => cmd.env("ALLY_STOP_SIGNAL", sig),
        None => cmd.env_remove("ALLY_STOP_SIGNAL"),
    };
    let running = Running(Spawned::start(cmd, Pipe::Stdout));
    running.expect_line("CHILD READY");
    running
}

impl Running {
    fn expect_line(&self, want: &str) {
        self.0.expect_line(want, Duration::from_secs(20));
    }

    fn wait(mut self) -> ExitStatus {
        self.0.wait(Duration::from_secs(20))
    }
}

impl std::ops::Deref for Running {
    type Target = Spawned;

    fn deref(&self) -> &Spawned {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Spawned {
        &mut self.0
    }
}

#[test]
fn sigterm_resolves_stopped_even_when_sent_before_waiting() {
    let child = start("async", None);
    child.signal(Signal::SIGTERM);
    child.expect_line("CHILD STOPPED");
    let status = child.wait();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn sigint_stops_in_simulate_mode() {
    let child = start("async", None);
    child.signal(Signal::SIGINT);
    let status = child.wait();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn ally_stop_signal_picks_the_signal() {
    let child = start("async", Some("SIGUSR1"));
    child.signal(Signal::SIGUSR1);
    let status = child.wait();
    assert_eq!(status.code(), Some(0), "{status:?}");

    // With another stop signal configured, SIGTERM is not caught: it kills as usual.
    let child = start("async", Some("SIGUSR1"));
    child.signal(Signal::SIGTERM);
    let status = child.wait();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
}

#[test]
fn blocking_client_stop_handle_wakes_on_sigterm() {
    let child = start("blocking", None);
    child.signal(Signal::SIGTERM);
    child.expect_line("CHILD STOPPED");
    let status = child.wait();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn without_a_signal_the_child_keeps_waiting() {
    let child = start("blocking", None);
    std::thread::sleep(Duration::from_millis(600));
    let mut child = child;
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "stopped without a signal"
    );
    child.signal(Signal::SIGTERM);
    assert_eq!(child.wait().code(), Some(0));
}
