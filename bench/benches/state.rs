//! Shared-state throughput: `cargo bench -p ally-bench --bench state`.
//!
//! Starts a real broker (`ally run`), then measures Atomic.Add, Cache.Get and Cache.Set
//! through ally-client with one client calling sequentially (async, blocking, and async
//! with the state socket off so calls go through zbus) and with 64 clients on separate
//! connections, next to the floor: a raw unix-socket round trip (64 bytes each way, one
//! thread per side).
//!
//! A shared VM's round trip swings by 5× as its vCPUs idle or not, so every 1-client
//! figure is paired: a slice of raw round trips, then a slice of calls, RUNS times
//! alternately (env ALLY_BENCH_RUNS, default 9; ALLY_BENCH_SECS per slice, default
//! 0.5). Ratios are per pair; every figure printed is a median.
//!
//! Everything above runs with the defaults: busy polling off at both ends. Last, busy
//! polling on (`state_busy_poll = "50us"` and `ALLY_STATE_BUSY_POLL=50us`) against off,
//! slice after slice in the same run: ops/s of one blocking and one async client, and
//! CPU time per call of the broker and of a blocking client, calling back to back and
//! paced at 1000 calls/s.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ally_client::Ally;
use ally_testkit::procfs::thread_cpu_time;
use ally_testkit::{Broker, Launch, env_or, median};

const CLIENTS: usize = 64;

/// A broker of one app that sleeps; `extra_config` is added to its config. The
/// `ally` binary is built first (a no-op when up to date), so no stale broker is
/// measured.
fn start_broker(extra_config: &str) -> Broker {
    static ALLY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    Launch::new("bench")
        .ally(ALLY.get_or_init(ally_testkit::build_ally))
        .config(&format!(
            "command = [\"sleep\", \"1000000\"]\nready_timeout = \"1h\"\n{extra_config}"
        ))
        .log_level("warn")
        .start()
}

/// CPU µs per call of the broker and of the calling thread, for `calls` Atomic.Add
/// calls with `pause` after each.
fn cpu_per_call(
    broker: &Broker,
    ally: &ally_client::blocking::Ally,
    calls: u32,
    pause: Duration,
) -> (f64, f64) {
    let (broker_before, client_before) = (broker.cpu_time(), thread_cpu_time());
    for _ in 0..calls {
        ally.atomic("bench").add(1).unwrap();
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    let per_call = |d: Duration| d.as_secs_f64() * 1e6 / calls as f64;
    (
        per_call(broker.cpu_time() - broker_before),
        per_call(thread_cpu_time() - client_before),
    )
}

/// The two ends with busy polling on (the broker's `state_busy_poll` and the blocking
/// client's `ALLY_STATE_BUSY_POLL` at 50 µs) and off (the defaults).
struct PollingPair {
    on: Broker,
    off: Broker,
    /// Blocking clients of `on` and of `off`, polling as their end does.
    blocking: [ally_client::blocking::Ally; 2],
}

impl PollingPair {
    /// Before any other thread runs: the blocking client reads `ALLY_STATE_BUSY_POLL`
    /// when it connects, and the environment may only change while nothing else can
    /// read it.
    fn start() -> PollingPair {
        let on = start_broker("state_busy_poll = \"50us\"\n");
        let off = start_broker("");
        // SAFETY: no other thread of this process exists yet but the new blocking
        // client's runtime worker, which is idle between the calls below.
        unsafe { std::env::set_var(ally_core::busy_poll::CLIENT_BUDGET_ENV, "50us") };
        let polling = ally_client::blocking::Ally::connect(&on.address()).unwrap();
        unsafe { std::env::remove_var(ally_core::busy_poll::CLIENT_BUDGET_ENV) };
        let sleeping = ally_client::blocking::Ally::connect(&off.address()).unwrap();
        PollingPair {
            on,
            off,
            blocking: [polling, sleeping],
        }
    }
}

/// Busy polling on and off side by side, slice after slice (on first); medians.
fn busy_poll_cost(
    runs: usize,
    quick: bool,
    secs: f64,
    pair: &PollingPair,
    rt: &tokio::runtime::Runtime,
) {
    let brokers = [&pair.on, &pair.off];
    let asyncs = brokers.map(|b| rt.block_on(Ally::connect(&b.address())).unwrap());
    let mut rates = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for _ in 0..runs {
        for i in 0..2 {
            rates[i][0].push(sequential_blocking(&pair.blocking[i], Op::Add, secs));
            let ally = asyncs[i].clone();
            let rate = rt.block_on(rt.spawn(async move { sequential(&ally, Op::Add, secs).await }));
            rates[i][1].push(rate.unwrap());
        }
    }
    let [on, off] = rates.map(|[b, a]| (median(&b), median(&a)));
    println!("busy polling  on (50 µs, both ends) | off (the defaults), Atomic.Add:");
    println!(
        "1 blocking client    : {:>8.0} ops/s | {:>8.0} ops/s",
        on.0, off.0
    );
    println!(
        "1 async client       : {:>8.0} ops/s | {:>8.0} ops/s",
        on.1, off.1
    );
    let (back_to_back, paced) = if quick { (1_000, 20) } else { (50_000, 1_000) };
    for (what, calls, pause) in [
        ("back to back   ", back_to_back, Duration::ZERO),
        ("1000 calls/s   ", paced, Duration::from_millis(1)),
    ] {
        let mut figures = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
        for _ in 0..runs.min(5) {
            for (i, broker) in brokers.into_iter().enumerate() {
                let (b, c) = cpu_per_call(broker, &pair.blocking[i], calls, pause);
                figures[i][0].push(b);
                figures[i][1].push(c);
            }
        }
        let [on, off] = figures.map(|[b, c]| (median(&b), median(&c)));
        println!(
            "CPU per call, {what}: broker {:>5.1} µs on, {:>5.1} µs off; blocking client {:>5.1} µs on, {:>5.1} µs off",
            on.0, off.0, on.1, off.1
        );
    }
}

/// A raw unix-socket echo: the floor. One thread per side, 64 bytes each way.
struct RawEcho {
    client: UnixStream,
    _dir: tempfile::TempDir,
}

impl RawEcho {
    fn start() -> RawEcho {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        });
        RawEcho {
            client: UnixStream::connect(&path).unwrap(),
            _dir: dir,
        }
    }

    /// Round trips per second over `secs`.
    fn rate(&mut self, secs: f64) -> f64 {
        let mut buf = [7u8; 64];
        timed(secs, || {
            self.client.write_all(&buf).unwrap();
            self.client.read_exact(&mut buf).unwrap();
        })
    }
}

/// Calls of `once` per second over `secs` (checking the clock every 100 calls).
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

/// [`timed`] for an async call; `once` gets the call's number.
async fn timed_async<F: Future<Output = ()>>(secs: f64, mut once: impl FnMut(u64) -> F) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            once(n).await;
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Pairs of (raw round trips/s, measured/s), slice after slice.
fn paired(runs: usize, raw: &mut RawEcho, secs: f64, mut measure: impl FnMut(f64) -> f64) -> Pairs {
    measure(secs.min(0.2));
    Pairs((0..runs).map(|_| (raw.rate(secs), measure(secs))).collect())
}

struct Pairs(Vec<(f64, f64)>);

impl Pairs {
    fn rate(&self) -> f64 {
        median(&self.0.iter().map(|p| p.1).collect::<Vec<_>>())
    }

    fn raw_rate(&self) -> f64 {
        median(&self.0.iter().map(|p| p.0).collect::<Vec<_>>())
    }

    /// Median of (latency / raw latency) over the pairs.
    fn ratio(&self) -> f64 {
        median(
            &self
                .0
                .iter()
                .map(|(raw, rate)| raw / rate)
                .collect::<Vec<_>>(),
        )
    }

    /// Median latency over the fastest raw slice's: the harshest comparison, since
    /// raw slices after busy-polling slices tend to run slower on a shared VM.
    fn ratio_to_fastest_raw(&self) -> f64 {
        let fastest = self.0.iter().map(|p| p.0).fold(0.0, f64::max);
        fastest / self.rate()
    }
}

/// The D-Bus library's own floor: a peer-to-peer zbus method call that does
/// nothing, server and client in this process on the same runtime as the
/// measured clients. What the broker adds is the distance to this.
struct Nop;

#[zbus::interface(name = "org.ally.BenchNop1")]
impl Nop {
    fn nop(&self) {}
}

/// A connected zbus no-op pair; `zbus_nop_rate` measures it.
async fn zbus_nop() -> (zbus::Connection, zbus::Connection) {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let guid = zbus::Guid::generate();
    let server = zbus::connection::Builder::unix_stream(a.into_std().unwrap())
        .server(guid)
        .p2p()
        .serve_at("/nop", Nop);
    let client = zbus::connection::Builder::unix_stream(b.into_std().unwrap()).p2p();
    let (server, client) = tokio::join!(server.build(), client.build());
    (server.unwrap(), client.unwrap())
}

async fn zbus_nop_rate(client: &zbus::Connection, secs: f64) -> f64 {
    timed_async(secs, |_| {
        let call = client.call_method(None::<&str>, "/nop", Some("org.ally.BenchNop1"), "Nop", &());
        async move {
            call.await.unwrap();
        }
    })
    .await
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
    timed_async(secs, |i| op.once(ally, i)).await
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

/// One blocking client (`ally_client::blocking`) calling on this thread.
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

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: keep that short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick {
        1
    } else {
        env_or("ALLY_BENCH_RUNS", 9u64)
    } as usize;
    let secs = if quick {
        0.05
    } else {
        env_or("ALLY_BENCH_SECS", 0.5)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pair = PollingPair::start();
    let broker = start_broker("");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "ally state benchmark: {runs} pairs of {secs} s slices, {threads} CPUs, {CLIENTS} concurrent clients; medians"
    );
    let mut raw = RawEcho::start();
    let zbus = rt.block_on(zbus_nop());
    // On a worker, as an app's task would be, not on the thread that blocks on the runtime.
    let on_worker =
        |f: std::pin::Pin<Box<dyn Future<Output = f64> + Send>>| rt.block_on(rt.spawn(f)).unwrap();
    let floor = paired(runs, &mut raw, secs, |secs| {
        let client = zbus.1.clone();
        on_worker(Box::pin(async move { zbus_nop_rate(&client, secs).await }))
    });
    println!(
        "raw unix-socket round trip: {:>8.0} /s  {:>6.1} µs  (floor)",
        floor.raw_rate(),
        1e6 / floor.raw_rate()
    );
    println!(
        "zbus p2p no-op call:        {:>8.0} /s  {:>6.1} µs  = {:.2}× raw (the D-Bus library's own floor)",
        floor.rate(),
        1e6 / floor.rate(),
        floor.ratio()
    );
    let (one, over_dbus, clients) = rt.block_on(async {
        let one = Ally::connect(&broker.address()).await.unwrap();
        let over_dbus = Ally::connect_with(&broker.address(), ally_client::StateSocket::Off)
            .await
            .unwrap();
        one.cache("bench").set("key", b"value", None).await.unwrap();
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(Ally::connect(&broker.address()).await.unwrap());
        }
        (one, over_dbus, clients)
    });
    let blocking = ally_client::blocking::Ally::connect(&broker.address()).unwrap();
    for op in [Op::Add, Op::Get, Op::Set] {
        let seq = paired(runs, &mut raw, secs, |secs| {
            let one = one.clone();
            on_worker(Box::pin(async move { sequential(&one, op, secs).await }))
        });
        let seq_dbus = paired(runs, &mut raw, secs, |secs| {
            let ally = over_dbus.clone();
            on_worker(Box::pin(async move { sequential(&ally, op, secs).await }))
        });
        let seq_blocking = paired(runs, &mut raw, secs, |secs| {
            sequential_blocking(&blocking, op, secs)
        });
        let conc = median(
            &(0..runs.min(3))
                .map(|_| rt.block_on(concurrent(&clients, op, secs.max(1.0))))
                .collect::<Vec<_>>(),
        );
        for (who, pairs) in [
            ("1 client  ", &seq),
            ("1 blocking", &seq_blocking),
            ("1 via zbus", &seq_dbus),
        ] {
            let rate = pairs.rate();
            println!(
                "{:<11} {who}: {rate:>8.0} ops/s {} (≥ 50000)  {:>5.1} µs = {:.2}× raw {} (≤ 1.5×; raw {:.1} µs; {:.2}× the fastest raw slice)",
                op.name(),
                verdict(rate >= 50_000.0),
                1e6 / rate,
                pairs.ratio(),
                verdict(pairs.ratio() <= 1.5),
                1e6 / pairs.raw_rate(),
                pairs.ratio_to_fastest_raw(),
            );
        }
        println!(
            "{:<11} {CLIENTS} clients: {conc:>8.0} ops/s {} (≥ 100000)",
            op.name(),
            verdict(conc >= 100_000.0),
        );
    }
    drop((one, over_dbus, clients, blocking));
    drop(broker);
    busy_poll_cost(runs, quick, secs, &pair, &rt);
}
