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

/// The broker of these tests: [`Broker`] under its old name.
pub type TestBroker = Broker;

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
