//! The stop signal, delivered to a child process for real.
//!
//! The parent tests run this test binary again with `ALLY_CLIENT_TEST_CHILD` set, which
//! turns the `child` test into the program under test: it creates a client (in simulate
//! mode), says so on stdout, and only *later* starts waiting, so a signal sent at once must
//! not be lost.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

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

struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn start(mode: &str, stop_signal: Option<&str>) -> Running {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .env_remove("ALLY_ADDRESS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    match stop_signal {
        Some(sig) => cmd.env("ALLY_STOP_SIGNAL", sig),
        None => cmd.env_remove("ALLY_STOP_SIGNAL"),
    };
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let running = Running { child, lines };
    running.expect_line("CHILD READY");
    running
}

impl Running {
    fn expect_line(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(want) => return,
                Ok(_) => {}
                Err(e) => panic!("child never printed {want:?}: {e}"),
            }
        }
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    fn wait(mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("child did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
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
