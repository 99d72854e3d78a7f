//! Shared-state throughput: `cargo bench --bench state`.
//!
//! Starts a real broker (`ally run`), then measures Atomic.Add, Cache.Get and Cache.Set
//! through ally-client with one client calling sequentially and with 64 clients on
//! separate connections, next to the floor: a raw unix-socket round trip (64 bytes each
//! way, one thread per side) measured in the same run. Each figure is the median of
//! RUNS runs of SECS seconds (env ALLY_BENCH_RUNS, ALLY_BENCH_SECS).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ally_client::Ally;

const CLIENTS: usize = 64;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Broker {
    child: Child,
    _dir: tempfile::TempDir,
    address: String,
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("bench.toml");
        std::fs::write(
            &config,
            "command = [\"sleep\", \"1000000\"]\nready_timeout = \"1h\"\n",
        )
        .unwrap();
        let run = dir.path().join("run");
        let child = Command::new(env!("CARGO_BIN_EXE_ally"))
            .args(["run", "bench", "--bus", "none", "--config"])
            .arg(&config)
            .arg("--runtime-dir")
            .arg(&run)
            .env("ALLY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let socket = run.join("bus");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the broker did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Broker {
            child,
            address: format!("unix:path={}", socket.display()),
            _dir: dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Round trips per second of 64-byte messages over a unix socket pair.
fn raw_round_trips(secs: f64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut c = UnixStream::connect(&path).unwrap();
    let mut buf = [7u8; 64];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            c.write_all(&buf).unwrap();
            c.read_exact(&mut buf).unwrap();
        }
        n += 100;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(c);
    server.join().unwrap();
    rate
}

/// The D-Bus library's own floor: a peer-to-peer zbus method call that does
/// nothing, server and client in this process on the same runtime as the
/// measured clients. What the broker adds is the distance to this.
struct Nop;

#[zbus::interface(name = "org.ally.BenchNop1")]
impl Nop {
    fn nop(&self) {}
}

async fn zbus_floor(secs: f64) -> f64 {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let guid = zbus::Guid::generate();
    let server = zbus::connection::Builder::unix_stream(a.into_std().unwrap())
        .server(guid)
        .p2p()
        .serve_at("/nop", Nop);
    let client = zbus::connection::Builder::unix_stream(b.into_std().unwrap()).p2p();
    let (server, client) = tokio::join!(server.build(), client.build());
    let (_server, client) = (server.unwrap(), client.unwrap());
    let call = || client.call_method(None::<&str>, "/nop", Some("org.ally.BenchNop1"), "Nop", &());
    for _ in 0..200 {
        call().await.unwrap();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            call().await.unwrap();
        }
        n += 100;
    }
    n as f64 / start.elapsed().as_secs_f64()
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

    async fn once(self, ally: &Ally, i: u64) {
        match self {
            Op::Add => {
                ally.atomic("bench").add(1).await.unwrap();
            }
            Op::Get => {
                ally.cache("bench").get("key").await.unwrap();
            }
            Op::Set => {
                ally.cache("bench")
                    .set("key", i.to_le_bytes(), None)
                    .await
                    .unwrap();
            }
        }
    }
}

async fn sequential(ally: &Ally, op: Op, secs: f64) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            op.once(ally, n).await;
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn concurrent(clients: &[Ally], op: Op, secs: f64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|ally| {
            let (count, stop) = (count.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    op.once(&ally, i).await;
                    i += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Warm up, then count over the window.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (start, before) = (Instant::now(), count.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let done = count.load(Ordering::Relaxed) - before;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    done as f64 / elapsed
}

/// One blocking client (`ally_client::blocking`), calling from its own thread.
fn sequential_blocking(address: &str, op: Op, secs: f64, runs: usize) -> f64 {
    let ally = ally_client::blocking::Ally::connect(address).unwrap();
    let once = |i: u64| match op {
        Op::Add => drop(ally.atomic("bench").add(1).unwrap()),
        Op::Get => drop(ally.cache("bench").get("key").unwrap()),
        Op::Set => ally
            .cache("bench")
            .set("key", i.to_le_bytes(), None)
            .unwrap(),
    };
    let run = |secs: f64| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            for _ in 0..100 {
                once(n);
                n += 1;
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    run(secs.min(0.2));
    median((0..runs).map(|_| run(secs)).collect())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: keep that short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick {
        1
    } else {
        env_or("ALLY_BENCH_RUNS", 3)
    } as usize;
    let secs = if quick {
        0.05
    } else {
        env_or("ALLY_BENCH_SECS", 2) as f64
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let broker = Broker::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "ally state benchmark: median of {runs} runs of {secs} s, {threads} CPUs, {CLIENTS} concurrent clients"
    );
    let raw = median((0..runs).map(|_| raw_round_trips(secs)).collect());
    let raw_us = 1e6 / raw;
    println!("raw unix-socket round trip: {raw:>10.0} /s  {raw_us:>6.1} µs  (floor)");
    rt.block_on(async {
        let zbus = median({
            let mut v = Vec::new();
            for _ in 0..runs {
                v.push(zbus_floor(secs).await);
            }
            v
        });
        let zbus_us = 1e6 / zbus;
        println!(
            "zbus p2p no-op call:        {zbus:>7.0} /s  {zbus_us:>6.1} µs  = {:.2}× raw (the D-Bus library's floor)",
            zbus_us / raw_us
        );
        let one = Ally::connect(&broker.address).await.unwrap();
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(Ally::connect(&broker.address).await.unwrap());
        }
        ally_client::Ally::cache(&one, "bench")
            .set("key", b"value", None)
            .await
            .unwrap();
        for op in [Op::Add, Op::Get, Op::Set] {
            // On a worker, as an app's task would be, not on the thread that blocks on the runtime.
            let seq = tokio::spawn({
                let one = one.clone();
                async move {
                    sequential(&one, op, secs.min(0.2)).await;
                    let mut seq = Vec::new();
                    for _ in 0..runs {
                        seq.push(sequential(&one, op, secs).await);
                    }
                    median(seq)
                }
            })
            .await
            .unwrap();
            let us = 1e6 / seq;
            let ratio = us / raw_us;
            let mut conc = Vec::new();
            for _ in 0..runs {
                conc.push(concurrent(&clients, op, secs).await);
            }
            let conc = median(conc);
            let address = broker.address.clone();
            let blocking = tokio::task::spawn_blocking(move || {
                sequential_blocking(&address, op, secs, runs)
            })
            .await
            .unwrap();
            let blocking_us = 1e6 / blocking;
            println!(
                "{:<11} 1 blocking client: {blocking:>8.0} ops/s {} (≥ 50000)  latency {blocking_us:>6.1} µs = {:.2}× raw {} (≤ 1.5×)",
                op.name(),
                verdict(blocking >= 50_000.0),
                blocking_us / raw_us,
                verdict(blocking_us / raw_us <= 1.5),
            );
            println!(
                "{:<11} 1 client : {seq:>8.0} ops/s {} (≥ 50000)  latency {us:>6.1} µs = {ratio:.2}× raw {} (≤ 1.5×), {:.2}× the zbus floor",
                op.name(),
                verdict(seq >= 50_000.0),
                verdict(ratio <= 1.5),
                us / zbus_us,
            );
            println!(
                "{:<11} {CLIENTS} clients: {conc:>8.0} ops/s {} (≥ 100000)",
                op.name(),
                verdict(conc >= 100_000.0),
            );
        }
    });
    drop(broker);
}
