//! What Ally's tests and benchmarks share, so that each is written once:
//!
//! * [`Broker`]: a real `ally run` in a temporary runtime directory, waited for
//!   until its private socket answers, stopped with SIGTERM (its log printed
//!   when a test fails);
//! * [`wait_until`] / [`wait_for`]: polling with a deadline instead of sleeping
//!   and hoping; [`Spawned`]: a child whose output lines can be waited for;
//! * [`procfs`]: what a process holds and has used (RSS, fds, CPU time);
//! * [`http`] and [`Load`]: a blocking HTTP/1.1 client and a load of worker
//!   threads that counts every failed request;
//! * [`loadgen`]: `ab` and `wrk`, which never retry, run in the background;
//! * [`unmodified`]: gunicorn, puma, uvicorn, a Go program and a stdlib-only
//!   app that know nothing of Ally, on `sockets = "listen-fds"`;
//! * [`stats`]: nearest-rank percentiles and medians; [`env_or`]: a
//!   benchmark's knobs from the environment.
//!
//! Blocking and dependency-light on purpose: the client's tests and the bench
//! crate use it without pulling the broker in.

pub mod broker;
pub mod files;
pub mod go;
pub mod http;
pub mod load;
pub mod loadgen;
pub mod poll;
pub mod process;
pub mod procfs;
pub mod stats;
pub mod unmodified;

pub use broker::{Broker, Launch};
pub use files::{json_lines, publish, wait_for_report, write_script};
pub use http::{HttpConnection, http_get};
pub use load::{Load, LoadMode, LoadStats};
pub use poll::{wait_for, wait_until};
pub use process::{
    Spawned, ally_bin, build_ally, cargo_build, example, pid_alive, stderr, stdout, target_dir,
};
pub use stats::{median, percentile};

/// Environment variable `name` parsed as a `T`; `default` when it is unset or
/// does not parse. How a benchmark takes its knobs (`ALLY_BENCH_RUNS`, ...).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
