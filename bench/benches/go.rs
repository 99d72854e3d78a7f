//! The Go package beside what a Go service would otherwise use, in the same run:
//!
//! ```text
//! cargo bench -p ally-bench --bench go
//! ```
//!
//! 1. One Go `net/http` handler (`bench/goserver`, built with `go/offline.sh`)
//!    upgraded under `ally reload` through the Go package, by cloudflare/tableflip
//!    (its example: `SIGHUP` → `Upgrade`, `Ready`, `Exit` → `Shutdown`) and by a
//!    plain stop-and-start restart. For each load — `ab` and `ab -k`, which never
//!    retry, then ours, which records every request's latency — the three
//!    mechanisms run back to back: failed requests, p99 latency outside and inside
//!    upgrade windows (ours only: `ab` gives no per-request times), and how long
//!    after the trigger the new version answered and the old one was gone.
//! 2. State calls: ops/s of one sequential caller (Atomic.Add, Cache.Get,
//!    Cache.Set) through the Go package and through ally-client's blocking API,
//!    against the same broker, slice after slice; medians and the ratio.
//!
//! Env: ALLY_BENCH_UPGRADES (default 10), ALLY_BENCH_CONNECTIONS (default 8),
//! ALLY_BENCH_GAP_MS (pause after each upgrade, default 500),
//! ALLY_BENCH_STEADY_MS (load before the first and after the last upgrade,
//! default 1500), ALLY_BENCH_RUNS (state slices per caller, default 9),
//! ALLY_BENCH_SECS (seconds per state slice, default 0.5), ALLY_BENCH_ONLY
//! (`upgrades` or `state`), ALLY_BENCH_ALLY (another `ally` binary to run).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use ally_bench::go::{self, Load, Mechanism, Settings};
use ally_testkit::loadgen::Tool;
use ally_testkit::{Broker, Launch, env_or, median};

fn main() {
    // `cargo test --benches` runs this too: only `cargo bench` passes --bench.
    let quick = !std::env::args().any(|a| a == "--bench");
    if let Some(why) = go::missing() {
        eprintln!("go: skipping: {why}");
        return;
    }
    let goserver = go::build_goserver();
    let ally =
        std::env::var_os("ALLY_BENCH_ALLY").map_or_else(ally_testkit::build_ally, PathBuf::from);
    let only = std::env::var("ALLY_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "upgrades" {
        upgrades(&ally, &goserver, quick);
    }
    if only.is_empty() || only == "state" {
        state_calls(&ally, &goserver, quick);
    }
}

fn upgrades(ally: &Path, goserver: &Path, quick: bool) {
    let settings = Settings {
        upgrades: if quick {
            2
        } else {
            env_or("ALLY_BENCH_UPGRADES", 10u32)
        },
        connections: env_or("ALLY_BENCH_CONNECTIONS", 8u32),
        gap: Duration::from_millis(env_or("ALLY_BENCH_GAP_MS", 500u64)),
        steady: Duration::from_millis(if quick {
            300
        } else {
            env_or("ALLY_BENCH_STEADY_MS", 1500u64)
        }),
        ally: ally.to_path_buf(),
        goserver: goserver.to_path_buf(),
    };
    eprintln!(
        "go: {} upgrades per mechanism and load, {} connections, {} ms between upgrades, ally {}",
        settings.upgrades,
        settings.connections,
        settings.gap.as_millis(),
        settings.ally.display()
    );
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut rows = Vec::new();
    for load in Load::ALL {
        if let Load::Tool(tool) = load
            && !tool.is_installed()
        {
            eprintln!(
                "go: skipping {load}: `{}` is not installed (apt install apache2-utils)",
                tool.program()
            );
            continue;
        }
        for mechanism in Mechanism::ALL {
            eprintln!("go: {} / {load} ...", mechanism.label());
            let row = go::run(mechanism, load, &settings, &runtime);
            eprintln!(
                "  {} requests, {} failed{}{}",
                row.requests,
                row.failed,
                row.retried
                    .map_or(String::new(), |n| format!(", {n} retried")),
                row.gave_up_after.map_or(String::new(), |n| format!(
                    ", {} gave up by upgrade {n}",
                    Tool::Ab
                )),
            );
            rows.push(row);
        }
    }
    println!("{}", go::table(&rows));
    let details = go::failure_details(&rows);
    if !details.is_empty() {
        println!("What each load said about its failures and retries:\n\n{details}");
    }
}

/// `goserver state` on the broker: one sequential caller through the Go package,
/// driven line by line (`OP SECONDS` in, ops/s out).
struct GoCaller {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl GoCaller {
    fn start(goserver: &Path, broker: &Broker, app: &str) -> GoCaller {
        let state = broker.socket().with_file_name("state");
        let mut child = Command::new(goserver)
            .arg("state")
            .env("ALLY_ADDRESS", broker.address())
            .env(
                "ALLY_STATE_ADDRESS",
                format!("unix:path={}", state.display()),
            )
            .env("ALLY_APP", app)
            .env_remove("ALLY_INSTANCE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting goserver state");
        let stdin = child.stdin.take().expect("its stdin");
        let stdout = BufReader::new(child.stdout.take().expect("its stdout"));
        GoCaller {
            child,
            stdin,
            stdout,
        }
    }

    fn rate(&mut self, op: Op, secs: f64) -> f64 {
        writeln!(self.stdin, "{} {secs}", op.go_name()).expect("writing to goserver state");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading goserver state");
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("goserver state answered {line:?}"))
    }
}

impl Drop for GoCaller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    Get,
    Set,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "Atomic.Add",
            Op::Get => "Cache.Get",
            Op::Set => "Cache.Set",
        }
    }

    fn go_name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Get => "get",
            Op::Set => "set",
        }
    }
}

/// Calls of `once` per second over `secs` (checking the clock every 100 calls),
/// as `--bench state` measures.
fn timed(secs: f64, mut once: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            once();
        }
        n += 100;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn sequential_blocking(ally: &ally_client::blocking::Ally, op: Op, secs: f64) -> f64 {
    let mut i = 0u64;
    timed(secs, || {
        match op {
            Op::Add => drop(ally.atomic("bench").add(1).unwrap()),
            Op::Get => drop(ally.cache("bench").get("key").unwrap()),
            Op::Set => ally
                .cache("bench")
                .set("key", i.to_le_bytes(), None)
                .unwrap(),
        }
        i += 1;
    })
}

fn state_calls(ally: &Path, goserver: &Path, quick: bool) {
    let runs = if quick {
        1
    } else {
        env_or("ALLY_BENCH_RUNS", 9usize)
    };
    let secs: f64 = if quick {
        0.05
    } else {
        env_or("ALLY_BENCH_SECS", 0.5)
    };
    let app = "gostate";
    let broker = Launch::new(app)
        .ally(ally)
        .config("command = [\"sleep\", \"1000000\"]\nready_timeout = \"1h\"\n")
        .log_level("warn")
        .start();
    let rust = ally_client::blocking::Ally::connect(&broker.address()).expect("the Rust client");
    rust.cache("bench")
        .set("key", b"value", None)
        .expect("setting the key");
    let mut go = GoCaller::start(goserver, &broker, app);
    println!(
        "One sequential caller against the same broker: {runs} slices of {secs} s each, Go and Rust alternately; medians"
    );
    println!();
    println!(
        "| call | Go package (godbus, state socket) ops/s | Rust blocking client ops/s | Go / Rust |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for op in [Op::Add, Op::Get, Op::Set] {
        // Warm both up.
        go.rate(op, secs.min(0.2));
        sequential_blocking(&rust, op, secs.min(0.2));
        let mut pairs = Vec::new();
        for i in 0..runs {
            // Alternate who goes first, so neither always follows the other.
            let (g, r) = if i % 2 == 0 {
                let g = go.rate(op, secs);
                (g, sequential_blocking(&rust, op, secs))
            } else {
                let r = sequential_blocking(&rust, op, secs);
                (go.rate(op, secs), r)
            };
            pairs.push((g, r));
        }
        let go_rate = median(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
        let rust_rate = median(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
        let ratio = median(&pairs.iter().map(|p| p.0 / p.1).collect::<Vec<_>>());
        println!(
            "| {} | {go_rate:.0} ({:.1} µs) | {rust_rate:.0} ({:.1} µs) | {ratio:.2} |",
            op.name(),
            1e6 / go_rate,
            1e6 / rust_rate
        );
    }
    drop(go);
    drop(rust);
    drop(broker);
}
