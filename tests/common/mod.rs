//! Shared test harness: the kit every test and benchmark uses (a real `ally
//! run` process in a temporary runtime directory, polling with deadlines, an
//! HTTP load generator that counts every failed request; see `testkit/`), and
//! what only the broker's own tests need.
#![allow(dead_code, unused_imports)]

use std::path::PathBuf;

pub use ally_testkit::http::{HttpConnection, Response, read_response};
pub use ally_testkit::process::{Pipe, signal, terminate, wait_exit};
pub use ally_testkit::*;

pub const ALLY: &str = env!("CARGO_BIN_EXE_ally");

/// The broker of these tests: the kit's [`Broker`] (every method and field of
/// it, through `Deref`), as a type of this module so that helpers only these
/// tests need can be added to it here.
pub struct TestBroker(pub Broker);

impl TestBroker {
    /// Runs `ally run APP --config <file with `config`>`.
    pub fn start(app: &str, config: &str) -> TestBroker {
        TestBroker(Broker::start(app, config))
    }

    pub fn start_with(app: &str, config: &str, extra: &[&str]) -> TestBroker {
        TestBroker(Broker::start_with(app, config, extra))
    }

    /// With extra `ally run` arguments and environment variables.
    pub fn start_env(app: &str, config: &str, extra: &[&str], env: &[(&str, &str)]) -> TestBroker {
        TestBroker(Broker::start_env(app, config, extra, env))
    }

    /// Runs `ally run APP -- COMMAND...` on the built-in defaults.
    pub fn start_command(app: &str, command: &[&str]) -> TestBroker {
        TestBroker(Broker::start_command(app, command))
    }
}

impl std::ops::Deref for TestBroker {
    type Target = Broker;

    fn deref(&self) -> &Broker {
        &self.0
    }
}

impl std::ops::DerefMut for TestBroker {
    fn deref_mut(&mut self) -> &mut Broker {
        &mut self.0
    }
}

/// Runs `ally run APP` on `config` until it exits, which it must do with a
/// failure; returns its stderr (the broker's one-line reason last).
pub fn run_failing(app: &str, config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{app}.toml"));
    std::fs::write(&file, config).unwrap();
    let out = std::process::Command::new(ALLY)
        .args(["run", app, "--bus", "none", "--runtime-dir"])
        .arg(dir.path().join("run"))
        .arg("--config")
        .arg(&file)
        .env("ALLY_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "ally run {app} did not fail:\n{stderr}"
    );
    stderr
}

pub fn hello() -> PathBuf {
    example("hello")
}

pub fn probe() -> PathBuf {
    example("probe")
}

/// A hello config on `port`; `extra` lines are appended.
pub fn hello_config(port: u16, version: &str, extra: &str) -> String {
    format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\", \"--version\", {version:?}]\nstop_timeout = \"10s\"\nready_timeout = \"10s\"\n{extra}\n",
        hello().display().to_string()
    )
}

/// A config running the `stateprobe` fixture with `args`, reporting to `report`.
pub fn stateprobe_config(report: &std::path::Path, args: &[&str], stop_timeout: &str) -> String {
    let mut command = vec![
        example("stateprobe").display().to_string(),
        "--report".into(),
        report.display().to_string(),
    ];
    command.extend(args.iter().map(|s| s.to_string()));
    format!(
        "command = {command:?}\nstop_timeout = {stop_timeout:?}\nready_timeout = \"10s\"\nrestart_delay = \"100ms\"\n"
    )
}
