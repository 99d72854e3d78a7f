//! Processes: finding the built binaries, children whose output lines can be
//! waited for, and stopping a child with a deadline.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// `target/<profile>` of the running test, bench or binary: tests and benches
/// run from `target/<profile>/deps/`, examples from `target/<profile>/examples/`,
/// binaries from `target/<profile>/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running program's path");
    let dir = exe.parent().expect("the program's directory");
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Runs `cargo build --quiet ARGS` for this profile (`--release` when running
/// from a release directory); panics if it fails. Cargo runs tests and benches
/// with `CARGO` set to itself.
pub fn cargo_build(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet"]).args(args);
    if target_dir().ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo build {args:?}: {e}"));
    assert!(status.success(), "cargo build {args:?} failed");
}

/// The `ally` binary of this tree, as cargo builds it for the root package's
/// tests (`CARGO_BIN_EXE_ally`). Anything else calls [`build_ally`] first.
pub fn ally_bin() -> PathBuf {
    let path = target_dir().join("ally");
    assert!(
        path.exists(),
        "no ally binary at {}: cargo build --bin ally",
        path.display()
    );
    path
}

/// Builds the `ally` binary of this profile (a no-op when it is up to date), so
/// that a benchmark never measures a stale broker; returns its path.
pub fn build_ally() -> PathBuf {
    cargo_build(&["-p", "ally", "--bin", "ally"]);
    ally_bin()
}

/// Path of an example binary of the workspace, building the examples once
/// (when only one package's tests were asked for, cargo did not build the
/// others', and `cargo test --test NAME` does not rebuild even its own).
pub fn example(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| cargo_build(&["--examples", "--workspace"]));
    let path = target_dir().join("examples").join(name);
    assert!(path.exists(), "no example binary at {}", path.display());
    path
}

/// Whether `pid` is a live process. A zombie is gone for our purposes: it
/// serves nothing.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("");
            state != "Z"
        }
        Err(_) => false,
    }
}

/// Sends `signal` to `pid`; a process already gone is not an error.
pub fn signal(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
}

/// Waits up to `within` for `child` to exit.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM, then up to `within` for the child to exit; SIGKILL after that
/// (`Err` with the status of the killed child).
pub fn terminate(child: &mut Child, within: Duration) -> Result<ExitStatus, ExitStatus> {
    signal(child.id(), Signal::SIGTERM);
    wait_exit(child, within).ok_or_else(|| {
        let _ = child.kill();
        child.wait().expect("reaping a killed child")
    })
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Which output of a [`Spawned`] child arrives as lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    Stdout,
    Stderr,
}

/// A child process whose stdout or stderr lines arrive on a channel, killed on
/// drop if it is still running.
pub struct Spawned {
    pub child: Child,
    lines: Mutex<mpsc::Receiver<String>>,
}

impl Spawned {
    /// Spawns `cmd` with `pipe` read line by line; the other output and stdin
    /// are left as `cmd` has them.
    pub fn start(mut cmd: Command, pipe: Pipe) -> Spawned {
        match pipe {
            Pipe::Stdout => cmd.stdout(Stdio::piped()),
            Pipe::Stderr => cmd.stderr(Stdio::piped()),
        };
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let out: Box<dyn std::io::Read + Send> = match pipe {
            Pipe::Stdout => Box::new(child.stdout.take().expect("piped stdout")),
            Pipe::Stderr => Box::new(child.stderr.take().expect("piped stderr")),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Spawned {
            child,
            lines: Mutex::new(rx),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig`; panics if the process cannot be signalled.
    pub fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// The next line, waiting up to `within`.
    pub fn next_line(&self, within: Duration) -> Result<String, mpsc::RecvTimeoutError> {
        self.lines.lock().unwrap().recv_timeout(within)
    }

    /// Waits up to `within` for a line containing `want`; panics otherwise.
    pub fn expect_line(&self, want: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Ok(line) if line.contains(want) => return line,
                Ok(_) => {}
                Err(e) => panic!("the child never printed {want:?}: {e}"),
            }
        }
    }

    /// The lines that arrived so far and were not read yet.
    pub fn lines_so_far(&self) -> Vec<String> {
        self.lines.lock().unwrap().try_iter().collect()
    }

    /// Waits up to `within` for the process to exit; kills it and panics otherwise.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        wait_exit(&mut self.child, within).unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!("process did not exit within {within:?}");
        })
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
