//! Broker benchmark: `Listen` round trip, reload overhead, broker memory and fds
//! across reloads. A plain program that prints a table, then the same figures as
//! one JSON object on the last line:
//!
//! ```text
//! cargo bench --bench broker
//! ```
//!
//! The broker only answers `Listen` for its instances (it knows them by the pid
//! ancestry of the caller), so this binary plays three parts, chosen by
//! `ALLY_BENCH_ROLE`:
//!
//! * unset: the driver. It starts real `ally run` brokers (as `tests/common`
//!   does) whose configured command is this very binary in one of the roles below,
//!   measures, and prints;
//! * `listen`: an instance that times `Listen` calls from the inside and writes
//!   every duration to `ALLY_BENCH_OUT`;
//! * `app`: an instance that is ready at once and writes, per generation, when it
//!   started, connected, listened and was ready (`start-<generation>`) and when
//!   its stop signal arrived (`stop-<generation>`), in CLOCK_MONOTONIC
//!   nanoseconds, which the driver compares with its own clock readings around
//!   `Reload()`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ALLY: &str = env!("CARGO_BIN_EXE_ally");

const ROLE: &str = "ALLY_BENCH_ROLE";
const OUT: &str = "ALLY_BENCH_OUT";
const PORT: &str = "ALLY_BENCH_PORT";

const WARMUP: usize = 500;
const CALLS: usize = 5000;
/// Reloads, unless `ALLY_BENCH_RELOADS` says otherwise (at least 2).
const RELOADS: usize = 200;

const LISTEN_P50_TARGET_US: f64 = 200.0;
const RELOAD_P50_TARGET_MS: f64 = 5.0;
const RSS_TARGET_KIB: u64 = 10 * 1024;

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("listen") => role_listen(),
        Ok("app") => role_app(),
        Ok(other) => panic!("unknown {ROLE} {other:?}"),
        Err(_) => drive(),
    }
}

// ---------------------------------------------------------------------------
// Shared helpers

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine.
fn mono_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; the call is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

/// Writes `text` to `path` in one step, so a reader polling for the file never
/// sees it half written.
fn publish(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("writing a result file");
    std::fs::rename(&tmp, path).expect("publishing a result file");
}

fn time_ns(mut f: impl FnMut()) -> u64 {
    let start = Instant::now();
    f();
    start.elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------
// Role `listen`: Listen round trips from inside an instance

fn role_listen() {
    let out = PathBuf::from(env(OUT));
    let address = format!("127.0.0.1:{}", env(PORT));
    // A raw socket: the broker's round trip, without the client's checks of the type.
    let tcp = ally_client::ListenOptions::network("tcp");
    let ally = ally_client::blocking::Ally::from_env().expect("connecting to the broker");
    assert!(ally.is_managed(), "ALLY_ADDRESS is not set");
    // Bind once and report ready, as an app does; then time the steady state.
    drop(
        ally.listen_with::<OwnedFd>(&address, &tcp)
            .expect("first Listen"),
    );
    ally.ready().expect("Ready");
    let listen = || drop(ally.listen_with::<OwnedFd>(&address, &tcp).expect("Listen"));
    for _ in 0..WARMUP {
        listen();
    }
    let blocking: Vec<u64> = (0..CALLS).map(|_| time_ns(listen)).collect();

    // The async client on a current-thread runtime: no hop between threads on
    // the client's side.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let asynchronous: Vec<u64> = runtime.block_on(async {
        let ally = ally_client::Ally::from_env()
            .await
            .expect("connecting to the broker (async)");
        for _ in 0..WARMUP {
            drop(
                ally.listen_with::<OwnedFd>(&address, &tcp)
                    .await
                    .expect("Listen"),
            );
        }
        let mut durations = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let start = Instant::now();
            drop(
                ally.listen_with::<OwnedFd>(&address, &tcp)
                    .await
                    .expect("Listen"),
            );
            durations.push(start.elapsed().as_nanos() as u64);
        }
        durations
    });
    drop(runtime);
    publish(
        &out,
        &json!({"blocking": blocking, "async": asynchronous}).to_string(),
    );
    ally.wait_stopped();
}

// ---------------------------------------------------------------------------
// Role `app`: ready at once; records when the stop signal arrives

/// When SIGTERM arrived, from a handler of ours that the client's handler
/// (signal-hook-registry, via Tokio) chains to.
static SIGNALLED_NS: AtomicI64 = AtomicI64::new(0);

extern "C" fn on_stop_signal(_: libc::c_int) {
    SIGNALLED_NS.store(mono_ns(), Ordering::SeqCst);
}

fn role_app() {
    let main_ns = mono_ns();
    let dir = PathBuf::from(env(OUT));
    let address = format!("127.0.0.1:{}", env(PORT));
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only reads the clock and stores to an atomic.
    unsafe { sigaction(Signal::SIGTERM, &action) }.expect("installing the SIGTERM handler");

    let tcp = ally_client::ListenOptions::network("tcp");
    let ally = ally_client::blocking::Ally::from_env().expect("connecting to the broker");
    let connected_ns = mono_ns();
    let _socket = ally.listen_with::<OwnedFd>(&address, &tcp).expect("Listen");
    let listened_ns = mono_ns();
    ally.ready().expect("Ready");
    let ready_ns = mono_ns();
    let generation = ally.generation();
    publish(
        &dir.join(format!("start-{generation}")),
        &format!(
            "{} {main_ns} {connected_ns} {listened_ns} {ready_ns}",
            std::process::id()
        ),
    );
    ally.wait_stopped();
    let woke_ns = mono_ns();
    let signalled = SIGNALLED_NS.load(Ordering::SeqCst);
    publish(
        &dir.join(format!("stop-{generation}")),
        &format!("{signalled} {woke_ns}"),
    );
}

// ---------------------------------------------------------------------------
// The driver

/// A broker run as its own process, as users run it.
struct Broker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Broker {
    fn start(role: &str, port: u16, out: &Path) -> Broker {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let exe = std::env::current_exe().expect("the benchmark's own path");
        let config = dir.path().join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "command = [{exe:?}]\n\
                 ready_timeout = \"60s\"\n\
                 stop_timeout = \"10s\"\n\
                 restart = \"never\"\n\
                 environment = {{ {ROLE} = {role:?}, {OUT} = {out:?}, {PORT} = \"{port}\" }}\n",
                exe = exe.display().to_string(),
                out = out.display().to_string(),
            ),
        )
        .expect("writing the config");
        let log = dir.path().join("broker.log");
        let log_file = std::fs::File::create(&log).expect("creating the broker log");
        let child = Command::new(ALLY)
            .arg("run")
            .arg("bench")
            .arg("--config")
            .arg(&config)
            .arg("--runtime-dir")
            .arg(dir.path().join("run"))
            .args(["--bus", "none"])
            // The default level, as a broker runs in production.
            .env("ALLY_LOG", "info")
            .env_remove(ROLE)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("spawning ally run");
        let mut broker = Broker {
            child: Some(child),
            dir,
            log,
        };
        let socket = broker.socket();
        broker.wait(
            "the broker's private socket",
            Duration::from_secs(10),
            || UnixStream::connect(&socket).is_ok().then_some(()),
        );
        broker
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("bus")
    }

    fn address(&self) -> String {
        format!("unix:path={}", self.socket().display())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Polls `check` until it gives a value; panics (with the broker's log) on
    /// timeout or if the broker exits.
    fn wait<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check() {
                return value;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("the broker exited ({status}) while waiting for {what}");
            }
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn wait_file(&mut self, path: &Path) -> String {
        let what = format!("{}", path.display());
        self.wait(&what, Duration::from_secs(60), || {
            std::fs::read_to_string(path).ok()
        })
    }

    /// VmRSS in KiB and the number of open file descriptors.
    fn footprint(&self) -> (u64, usize) {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd directory")
            .count();
        (rss, fds)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- broker log (last lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Summary of durations in nanoseconds.
struct Summary {
    sorted: Vec<f64>,
    mean: f64,
}

impl Summary {
    fn new(values: impl IntoIterator<Item = f64>) -> Summary {
        let mut sorted: Vec<f64> = values.into_iter().collect();
        assert!(!sorted.is_empty());
        sorted.sort_by(f64::total_cmp);
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        Summary { sorted, mean }
    }

    /// Nearest-rank percentile.
    fn p(&self, percent: f64) -> f64 {
        let rank = ((percent / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    fn max(&self) -> f64 {
        *self.sorted.last().unwrap()
    }

    /// p50/p90/p99/mean/max in `unit` (nanoseconds per unit), rounded.
    fn json(&self, unit: f64) -> Value {
        let r = |v: f64| (v / unit * 1000.0).round() / 1000.0;
        json!({
            "n": self.sorted.len(),
            "p50": r(self.p(50.0)),
            "p90": r(self.p(90.0)),
            "p99": r(self.p(99.0)),
            "mean": r(self.mean),
            "max": r(self.max()),
        })
    }
}

/// Request/response of 16 bytes over a unix stream socket between two threads.
fn pingpong_floor() -> Summary {
    let (mut client, mut server) = UnixStream::pair().expect("socketpair");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        while server.read_exact(&mut buf).is_ok() {
            if server.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut round_trip = || {
        let mut buf = [7u8; 16];
        client.write_all(&buf).expect("ping");
        client.read_exact(&mut buf).expect("pong");
    };
    for _ in 0..WARMUP {
        round_trip();
    }
    let durations: Vec<f64> = (0..CALLS)
        .map(|_| time_ns(&mut round_trip) as f64)
        .collect();
    drop(client);
    echo.join().expect("echo thread");
    Summary::new(durations)
}

/// Sends `data` with a duplicate of `fd` (SCM_RIGHTS).
fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> std::io::Result<()> {
    // u64 words: aligned for `cmsghdr`, and room for one header and one fd.
    let mut control = [0u64; 4];
    // SAFETY: plain C structs and macros, on buffers that outlive the call; the
    // control buffer is large enough for CMSG_SPACE(sizeof(int)) and aligned.
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize;
        assert!(space <= size_of_val(&control));
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives into `buf` and the descriptor that came with it.
fn recv_with_fd(sock: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    let mut control = [0u64; 4];
    // SAFETY: as in `send_with_fd`; a descriptor the kernel hands over is ours.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control) as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut fd = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, fd))
    }
}

/// The same, but each answer carries a duplicate of a listening socket
/// (SCM_RIGHTS), which the asker closes: the kernel's share of a `Listen`.
fn fd_pingpong_floor() -> Summary {
    let (mut client, mut server) = UnixStream::pair().expect("socketpair");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let server_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        while server.read_exact(&mut buf).is_ok() {
            if send_with_fd(server.as_raw_fd(), &buf, listener.as_raw_fd()).is_err() {
                break;
            }
        }
    });
    let mut round_trip = || {
        client.write_all(&[7u8; 16]).expect("ask");
        let mut buf = [0u8; 16];
        let (n, fd) = recv_with_fd(client.as_raw_fd(), &mut buf).expect("answer");
        assert_eq!(n, 16, "short answer");
        drop(fd.expect("no descriptor in the answer"));
    };
    for _ in 0..WARMUP {
        round_trip();
    }
    let durations: Vec<f64> = (0..CALLS)
        .map(|_| time_ns(&mut round_trip) as f64)
        .collect();
    drop(client);
    server_thread.join().expect("server thread");
    Summary::new(durations)
}

struct ListenResult {
    blocking: Summary,
    asynchronous: Summary,
}

fn bench_listen() -> ListenResult {
    let out_dir = tempfile::tempdir().expect("a temporary directory");
    let out = out_dir.path().join("listen.json");
    let mut broker = Broker::start("listen", free_port(), &out);
    let text = broker.wait_file(&out);
    let report: Value = serde_json::from_str(&text).expect("the listen report");
    let durations = |key: &str| {
        Summary::new(
            report[key]
                .as_array()
                .expect("durations")
                .iter()
                .map(|v| v.as_f64().expect("a duration")),
        )
    };
    ListenResult {
        blocking: durations("blocking"),
        asynchronous: durations("async"),
    }
}

/// One reload, in nanoseconds from the `Reload()` call.
struct ReloadSample {
    new_main: f64,
    new_connected: f64,
    new_listened: f64,
    new_ready: f64,
    old_signalled: f64,
    old_woke: f64,
    replied: f64,
}

struct ReloadResult {
    samples: Vec<ReloadSample>,
    /// (VmRSS KiB, open fds) after reload 1, after half of them, after the last.
    footprint: [(u64, usize); 3],
    initial: (u64, usize),
}

fn numbers(text: &str) -> Vec<i64> {
    text.split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect()
}

fn bench_reloads(reloads: usize) -> ReloadResult {
    let out_dir = tempfile::tempdir().expect("a temporary directory");
    let out = out_dir.path().to_path_buf();
    let mut broker = Broker::start("app", free_port(), &out);
    let first = numbers(&broker.wait_file(&out.join("start-1")));
    let admin =
        ally_client::blocking::Ally::connect(&broker.address()).expect("connecting as admin");
    let settle = |broker: &Broker| {
        std::thread::sleep(Duration::from_millis(500));
        broker.footprint()
    };
    let initial = settle(&broker);
    let mut old_pid = first[0];
    let mut samples = Vec::with_capacity(reloads);
    let mut footprint = [(0, 0); 3];
    for i in 1..=reloads {
        let called = mono_ns();
        let generation = admin.reload().expect("Reload");
        let replied = mono_ns();
        let start = numbers(&broker.wait_file(&out.join(format!("start-{generation}"))));
        let stop = numbers(&broker.wait_file(&out.join(format!("stop-{}", generation - 1))));
        assert!(stop[0] > 0, "the stop signal was not seen by the handler");
        // Let the old instance be reaped before the next reload, so that each
        // reload is measured alone.
        let proc_dir = PathBuf::from(format!("/proc/{old_pid}"));
        broker.wait(
            "the old instance to be reaped",
            Duration::from_secs(30),
            || (!proc_dir.exists()).then_some(()),
        );
        old_pid = start[0];
        let since = |t: i64| (t - called) as f64;
        samples.push(ReloadSample {
            new_main: since(start[1]),
            new_connected: since(start[2]),
            new_listened: since(start[3]),
            new_ready: since(start[4]),
            old_signalled: since(stop[0]),
            old_woke: since(stop[1]),
            replied: since(replied),
        });
        let at = [1, reloads / 2, reloads];
        if at.contains(&i) {
            let sample = settle(&broker);
            for (slot, when) in footprint.iter_mut().zip(at) {
                if when == i {
                    *slot = sample;
                }
            }
        }
    }
    drop(admin);
    ReloadResult {
        samples,
        footprint,
        initial,
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn drive() {
    let began = Instant::now();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!("broker bench: unix socket floors...");
    let floor = pingpong_floor();
    let fd_floor = fd_pingpong_floor();
    eprintln!("broker bench: {CALLS} Listen calls (after {WARMUP} warm-up), blocking and async...");
    let listen = bench_listen();
    let n_reloads = match std::env::var("ALLY_BENCH_RELOADS") {
        Ok(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 2)
            .expect("ALLY_BENCH_RELOADS: a number, at least 2"),
        Err(_) => RELOADS,
    };
    eprintln!("broker bench: {n_reloads} reloads...");
    let reloads = bench_reloads(n_reloads);

    const US: f64 = 1e3;
    const MS: f64 = 1e6;
    let stage = |f: fn(&ReloadSample) -> f64| Summary::new(reloads.samples.iter().map(f));
    let overhead = stage(|s| s.old_signalled);
    let replied = stage(|s| s.replied);
    let timeline: BTreeMap<&str, Summary> = [
        ("1_new_main", stage(|s| s.new_main)),
        ("2_new_connected", stage(|s| s.new_connected)),
        ("3_new_listen_returned", stage(|s| s.new_listened)),
        ("4_new_ready_returned", stage(|s| s.new_ready)),
        ("5_old_sigterm", stage(|s| s.old_signalled)),
        ("6_old_woke", stage(|s| s.old_woke)),
        ("7_reload_reply", stage(|s| s.replied)),
    ]
    .into_iter()
    .collect();

    let listen_p50 = listen.blocking.p(50.0) / US;
    let ratio = listen.blocking.p(50.0) / floor.p(50.0);
    let ratio_fd = listen.blocking.p(50.0) / fd_floor.p(50.0);
    let [(rss1, fds1), (rss_half, fds_half), (rss_n, fds_n)] = reloads.footprint;
    let rss_flat = rss_n as f64 <= 1.1 * rss1 as f64 + 512.0;
    let pass_listen = listen_p50 < LISTEN_P50_TARGET_US;
    let pass_reload = overhead.p(50.0) / MS < RELOAD_P50_TARGET_MS;
    let pass_rss = rss1.max(rss_n) < RSS_TARGET_KIB && rss_flat;
    let pass_fds = fds1 == fds_n;

    println!();
    println!("ally broker benchmark ({cpus} CPUs; shared machine: read the medians)");
    println!();
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>10}   target",
        "round trip (µs)", "p50", "p99", "mean", "max"
    );
    let row = |name: &str, s: &Summary, target: &str| {
        println!(
            "{name:<44} {:>10.1} {:>10.1} {:>10.1} {:>10.1}   {target}",
            s.p(50.0) / US,
            s.p(99.0) / US,
            s.mean / US,
            s.max() / US
        );
    };
    row(
        &format!("Listen, blocking client (n={CALLS})"),
        &listen.blocking,
        &format!("p50 < {LISTEN_P50_TARGET_US} µs: {}", verdict(pass_listen)),
    );
    row(
        "Listen, async client, current-thread",
        &listen.asynchronous,
        "",
    );
    row("floor: unix socket ping-pong, 16 B", &floor, "");
    row("floor: same + SCM_RIGHTS fd in the answer", &fd_floor, "");
    println!("Listen p50 / floor p50: {ratio:.1}x (plain), {ratio_fd:.1}x (with fd passing)");
    println!();
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>10}   target",
        "reload, ms from the Reload() call", "p50", "p90", "mean", "max"
    );
    let row_ms = |name: &str, s: &Summary, target: &str| {
        println!(
            "{name:<44} {:>10.2} {:>10.2} {:>10.2} {:>10.2}   {target}",
            s.p(50.0) / MS,
            s.p(90.0) / MS,
            s.mean / MS,
            s.max() / MS
        );
    };
    row_ms(
        &format!("overhead: old instance gets SIGTERM (n={n_reloads})"),
        &overhead,
        &format!("p50 < {RELOAD_P50_TARGET_MS} ms: {}", verdict(pass_reload)),
    );
    let labels = [
        ("1_new_main", "  new instance enters main()"),
        ("2_new_connected", "  new instance connected to the broker"),
        ("3_new_listen_returned", "  new instance's Listen returned"),
        ("4_new_ready_returned", "  new instance's Ready returned"),
        ("5_old_sigterm", "  old instance's SIGTERM handler ran"),
        ("6_old_woke", "  old instance's wait_stopped() returned"),
        ("7_reload_reply", "  Reload() reply received"),
    ];
    for (key, label) in labels {
        row_ms(label, &timeline[key], "");
    }
    println!();
    let half = n_reloads / 2;
    println!(
        "{:<33} {:>10} {:>10} {:>10} {:>10} {:>10}   target",
        "broker footprint after reload",
        "0 (start)",
        "1",
        half,
        n_reloads,
        format!("{n_reloads}/1")
    );
    println!(
        "{:<33} {:>10} {:>10} {:>10} {:>10} {:>10.3}   < {} MiB and flat: {}",
        "VmRSS (KiB)",
        reloads.initial.0,
        rss1,
        rss_half,
        rss_n,
        rss_n as f64 / rss1 as f64,
        RSS_TARGET_KIB / 1024,
        verdict(pass_rss)
    );
    println!(
        "{:<33} {:>10} {:>10} {:>10} {:>10} {:>10.3}   equal: {}",
        "open fds",
        reloads.initial.1,
        fds1,
        fds_half,
        fds_n,
        fds_n as f64 / fds1 as f64,
        verdict(pass_fds)
    );
    let elapsed = began.elapsed().as_secs_f64();
    println!();
    println!("total run time {elapsed:.1} s");

    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    let summary = json!({
        "bench": "broker",
        "cpus": cpus,
        "listen_us": listen.blocking.json(US),
        "listen_async_us": listen.asynchronous.json(US),
        "floor_unix_pingpong_us": floor.json(US),
        "floor_unix_fd_pingpong_us": fd_floor.json(US),
        "listen_over_floor": round2(ratio),
        "listen_over_fd_floor": round2(ratio_fd),
        "reloads": n_reloads,
        "reload_overhead_ms": overhead.json(MS),
        "reload_reply_ms": replied.json(MS),
        "reload_timeline_p50_ms": timeline
            .iter()
            .map(|(k, s)| (k.to_string(), json!((s.p(50.0) / MS * 1000.0).round() / 1000.0)))
            .collect::<serde_json::Map<_, _>>(),
        "rss_kib": {"start": reloads.initial.0, "after_1": rss1,
                    format!("after_{half}"): rss_half, format!("after_{n_reloads}"): rss_n,
                    "ratio": (rss_n as f64 / rss1 as f64 * 1000.0).round() / 1000.0},
        "fds": {"start": reloads.initial.1, "after_1": fds1,
                format!("after_{half}"): fds_half, format!("after_{n_reloads}"): fds_n},
        "targets": {
            "listen_p50_lt_200us": verdict(pass_listen),
            "reload_overhead_p50_lt_5ms": verdict(pass_reload),
            "rss_lt_10mib_and_flat": verdict(pass_rss),
            "fds_flat": verdict(pass_fds),
        },
        "elapsed_s": round2(elapsed),
    });
    println!("{summary}");
}
