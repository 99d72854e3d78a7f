//! Broker benchmark: `Listen` round trip, reload overhead, broker memory and fds
//! across reloads. A plain program that prints a table, then the same figures as
//! one JSON object on the last line:
//!
//! ```text
//! cargo bench -p ally-bench --bench broker
//! ```
//!
//! The broker only answers `Listen` for its instances (it knows them by the pid
//! ancestry of the caller), so this binary plays three parts, chosen by
//! `ALLY_BENCH_ROLE`:
//!
//! * unset: the driver. It starts real `ally run` brokers (`ally_testkit::Broker`,
//!   as the tests do) whose configured command is this very binary in one of the roles below,
//!   measures, and prints;
//! * `listen`: an instance that times `Listen` calls from the inside and writes
//!   every duration to `ALLY_BENCH_OUT`;
//! * `app`: an instance that is ready at once and writes, per generation, when it
//!   started, connected, listened and was ready (`start-<generation>`) and when
//!   its stop signal arrived (`stop-<generation>`), in CLOCK_MONOTONIC
//!   nanoseconds, which the driver compares with its own clock readings around
//!   `Reload()`.

mod floors;
mod roles;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ally_testkit::procfs::mono_ns;
use ally_testkit::stats::Distribution as Summary;
use ally_testkit::{Broker, Launch, free_port};
use serde_json::{Value, json};

use floors::{fd_pingpong_floor, pingpong_floor};

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
        Ok("listen") => roles::listen(),
        Ok("app") => roles::app(),
        Ok(other) => panic!("unknown {ROLE} {other:?}"),
        Err(_) => drive(),
    }
}

fn time_ns(mut f: impl FnMut()) -> u64 {
    let start = Instant::now();
    f();
    start.elapsed().as_nanos() as u64
}

/// A broker whose one app is this benchmark in `role`, on `port`, writing to `out`.
fn start_broker(ally: &Path, role: &str, port: u16, out: &Path) -> Broker {
    let exe = std::env::current_exe().expect("the benchmark's own path");
    Launch::new("bench")
        .ally(ally)
        .config(&format!(
            "command = [{exe:?}]\n\
             ready_timeout = \"60s\"\n\
             stop_timeout = \"10s\"\n\
             restart = \"never\"\n\
             environment = {{ {ROLE} = {role:?}, {OUT} = {out:?}, {PORT} = \"{port}\" }}\n",
            exe = exe.display().to_string(),
            out = out.display().to_string(),
        ))
        // The default level, as a broker runs in production.
        .log_level("info")
        .env_remove(ROLE)
        .start()
}

/// Waits for a result file of an instance; the broker must keep running.
fn wait_file(broker: &mut Broker, path: &Path) -> String {
    let what = format!("{}", path.display());
    broker.wait_for(&what, POLL, Duration::from_secs(60), || {
        std::fs::read_to_string(path).ok()
    })
}

/// How often the driver looks for results.
const POLL: Duration = Duration::from_micros(500);

/// p50/p90/p99/mean/max in `unit` (nanoseconds per unit), rounded.
fn summary_json(s: &Summary, unit: f64) -> Value {
    let r = |v: f64| (v / unit * 1000.0).round() / 1000.0;
    json!({
        "n": s.len(),
        "p50": r(s.p(50.0)),
        "p90": r(s.p(90.0)),
        "p99": r(s.p(99.0)),
        "mean": r(s.mean()),
        "max": r(s.max()),
    })
}

struct ListenResult {
    blocking: Summary,
    asynchronous: Summary,
}

fn bench_listen(ally: &Path) -> ListenResult {
    let out_dir = tempfile::tempdir().expect("a temporary directory");
    let out = out_dir.path().join("listen.json");
    let mut broker = start_broker(ally, "listen", free_port(), &out);
    let text = wait_file(&mut broker, &out);
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

fn bench_reloads(ally: &Path, reloads: usize) -> ReloadResult {
    let out_dir = tempfile::tempdir().expect("a temporary directory");
    let out = out_dir.path().to_path_buf();
    let mut broker = start_broker(ally, "app", free_port(), &out);
    let first = numbers(&wait_file(&mut broker, &out.join("start-1")));
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
        let start = numbers(&wait_file(
            &mut broker,
            &out.join(format!("start-{generation}")),
        ));
        let stop = numbers(&wait_file(
            &mut broker,
            &out.join(format!("stop-{}", generation - 1)),
        ));
        assert!(stop[0] > 0, "the stop signal was not seen by the handler");
        // Let the old instance be reaped before the next reload, so that each
        // reload is measured alone.
        let proc_dir = PathBuf::from(format!("/proc/{old_pid}"));
        broker.wait_for(
            "the old instance to be reaped",
            POLL,
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

/// One row of a table: p50, the `p`th percentile, mean and max in `unit`.
fn table_row(name: &str, s: &Summary, unit: f64, p: f64, decimals: usize, target: &str) {
    println!(
        "{name:<44} {:>10.decimals$} {:>10.decimals$} {:>10.decimals$} {:>10.decimals$}   {target}",
        s.p(50.0) / unit,
        s.p(p) / unit,
        s.mean() / unit,
        s.max() / unit
    );
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn drive() {
    let began = Instant::now();
    let ally = ally_testkit::build_ally();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!("broker bench: unix socket floors...");
    let floor = pingpong_floor();
    let fd_floor = fd_pingpong_floor();
    eprintln!("broker bench: {CALLS} Listen calls (after {WARMUP} warm-up), blocking and async...");
    let listen = bench_listen(&ally);
    let n_reloads = match std::env::var("ALLY_BENCH_RELOADS") {
        Ok(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 2)
            .expect("ALLY_BENCH_RELOADS: a number, at least 2"),
        Err(_) => RELOADS,
    };
    eprintln!("broker bench: {n_reloads} reloads...");
    let reloads = bench_reloads(&ally, n_reloads);

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
    let row = |name: &str, s: &Summary, target: &str| table_row(name, s, US, 99.0, 1, target);
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
    let row_ms = |name: &str, s: &Summary, target: &str| table_row(name, s, MS, 90.0, 2, target);
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
        "listen_us": summary_json(&listen.blocking, US),
        "listen_async_us": summary_json(&listen.asynchronous, US),
        "floor_unix_pingpong_us": summary_json(&floor, US),
        "floor_unix_fd_pingpong_us": summary_json(&fd_floor, US),
        "listen_over_floor": round2(ratio),
        "listen_over_fd_floor": round2(ratio_fd),
        "reloads": n_reloads,
        "reload_overhead_ms": summary_json(&overhead, MS),
        "reload_reply_ms": summary_json(&replied, MS),
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
