//! State calls of the serving generation during a reload, on a saturated host:
//! `cargo bench -p ally-bench --bench state_during_reload`.
//!
//! A real broker (`ally run`, `start_priority = "idle"`) runs this very program
//! as its app. Each generation, once ready, calls `Atomic1.Add` over the state
//! socket back to back and timestamps every call until it is asked to stop. The
//! driver spins one busy loop per CPU, then RUNS times: lets the serving
//! generation call for a steady window, and reloads. The figures compare the
//! serving generation's p99 while the next one is spawned, starts at idle
//! priority and becomes ready with its p99 in the steady window just before.
//! Every figure printed is the median over the runs.
//!
//! Env: ALLY_BENCH_RUNS (default 7), ALLY_BENCH_STEADY_MS (default 1000),
//! ALLY_BENCH_ALLY (another `ally` binary to run, e.g. an older build, to compare).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ally_testkit::{Launch, env_or, median as median_of, procfs, stats, wait_until};

/// The target: p99 during a reload within this factor of the steady p99.
const TARGET: f64 = 1.5;

/// CLOCK_MONOTONIC in ns, the same clock in every process, as the samples keep it.
fn now_ns() -> u64 {
    procfs::mono_ns() as u64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--app") {
        Some(i) => app(Path::new(&args[i + 1])),
        None => driver(),
    }
}

/// One generation: ready at once, then timed calls until the stop signal; the
/// samples (start ns, latency ns) go to `samples-<generation>` on the way out.
fn app(dir: &Path) {
    let ally = ally_client::blocking::Ally::from_env().expect("connecting to the broker");
    ally.ready().expect("Ready");
    let counter = ally.atomic("bench");
    let mut samples: Vec<(u64, u64)> = Vec::with_capacity(1 << 20);
    while !ally.is_stopping() {
        let start = now_ns();
        counter.add(1).expect("Atomic1.Add");
        samples.push((start, now_ns() - start));
    }
    let mut bytes = Vec::with_capacity(samples.len() * 16);
    for (start, latency) in samples {
        bytes.extend_from_slice(&start.to_le_bytes());
        bytes.extend_from_slice(&latency.to_le_bytes());
    }
    let path = dir.join(format!("samples-{}", ally.generation()));
    std::fs::write(&path, bytes).expect("writing the samples");
}

fn read_samples(path: &Path) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_le_bytes(c[..8].try_into().unwrap()),
                u64::from_le_bytes(c[8..].try_into().unwrap()),
            )
        })
        .collect()
}

/// The p-th percentile of `v` (nearest rank), NaN when empty.
fn percentile(mut v: Vec<u64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    stats::percentile(&v, p) as f64
}

/// A broker running this program as its app, and where the app writes its samples.
struct Broker {
    broker: ally_testkit::Broker,
    samples: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let samples = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            samples.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let me = std::env::current_exe().unwrap();
        let command = [
            me.display().to_string(),
            "--app".into(),
            samples.path().display().to_string(),
        ];
        let ally = std::env::var_os("ALLY_BENCH_ALLY")
            .map_or_else(ally_testkit::build_ally, std::path::PathBuf::from);
        let broker = Launch::new("bench")
            .ally(ally)
            .config(&format!(
                "command = {command:?}\nstart_priority = \"idle\"\nready_timeout = \"10m\"\nstop_timeout = \"30s\"\nstate_busy_poll = \"0s\"\n"
            ))
            .log_level("warn")
            .start();
        Broker { broker, samples }
    }

    fn address(&self) -> String {
        self.broker.address()
    }

    fn samples(&self, generation: u64) -> Vec<(u64, u64)> {
        read_samples(&self.samples.path().join(format!("samples-{generation}")))
    }

    fn stop(&mut self) {
        self.broker.stop();
    }
}

/// One busy loop per CPU, at normal priority, until dropped.
struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    fn start() -> Spinners {
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Spinners { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Run {
    generation: u64,
    steady: (u64, u64),
    reload: (u64, u64),
}

fn driver() {
    let runs = env_or("ALLY_BENCH_RUNS", 7u64) as usize;
    let steady = Duration::from_millis(env_or("ALLY_BENCH_STEADY_MS", 1000u64));
    let mut broker = Broker::start();
    let admin = ally_client::blocking::Ally::connect(&broker.address()).expect("admin connection");
    wait_until(
        "generation 1 to become ready",
        Duration::from_secs(30),
        || admin.status().map(|s| s.generation).unwrap_or(0) >= 1,
    );
    let spinners = Spinners::start();
    std::thread::sleep(Duration::from_millis(500));
    let mut done = Vec::new();
    for n in 1..=runs {
        let serving = admin.status().expect("Status").generation;
        let t0 = now_ns();
        std::thread::sleep(steady);
        let t1 = now_ns();
        let started = Instant::now();
        let generation = admin.reload().expect("Reload");
        let t2 = now_ns();
        eprintln!(
            "run {n}/{runs}: generation {generation} ready after {:.0} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
        done.push(Run {
            generation: serving,
            steady: (t0, t1),
            reload: (t1, t2),
        });
    }
    drop(spinners);
    std::thread::sleep(Duration::from_millis(300));
    broker.stop();

    // A call belongs to the steady window if it ran entirely inside it, and to
    // the reload if it overlapped it: a call stalled across the whole reload counts.
    let steady_calls = |samples: &[(u64, u64)], (from, to): (u64, u64)| -> Vec<u64> {
        samples
            .iter()
            .filter(|(t, latency)| *t >= from && t + latency <= to)
            .map(|(_, latency)| *latency)
            .collect()
    };
    let reload_calls = |samples: &[(u64, u64)], (from, to): (u64, u64)| -> Vec<u64> {
        samples
            .iter()
            .filter(|(t, latency)| t + latency > from && *t < to)
            .map(|(_, latency)| *latency)
            .collect()
    };
    let us = |ns: f64| ns / 1000.0;
    println!(
        "state calls (Atomic1.Add, state socket) of the serving generation, µs, on {} busy CPUs",
        std::thread::available_parallelism().map_or(2, |n| n.get())
    );
    println!(
        "{:>4} {:>9} {:>10} {:>10} {:>9} {:>10} {:>10} {:>11} {:>7}",
        "run", "n steady", "p50", "p99", "n reload", "p50", "p99", "max reload", "p99 ×"
    );
    let (mut p50s, mut p99s, mut p50r, mut p99r, mut maxr, mut ratios) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut all_steady, mut all_reload) = (Vec::new(), Vec::new());
    for (i, run) in done.iter().enumerate() {
        let samples = broker.samples(run.generation);
        let s = steady_calls(&samples, run.steady);
        let r = reload_calls(&samples, run.reload);
        all_steady.extend_from_slice(&s);
        all_reload.extend_from_slice(&r);
        let max = r.iter().copied().max().unwrap_or(0) as f64;
        let (ns, nr) = (s.len(), r.len());
        let (s50, s99) = (percentile(s.clone(), 50.0), percentile(s, 99.0));
        let (r50, r99) = (percentile(r.clone(), 50.0), percentile(r, 99.0));
        let ratio = r99 / s99;
        println!(
            "{:>4} {ns:>9} {:>10.1} {:>10.1} {nr:>9} {:>10.1} {:>10.1} {:>11.1} {ratio:>7.2}",
            i + 1,
            us(s50),
            us(s99),
            us(r50),
            us(r99),
            us(max)
        );
        p50s.push(s50);
        p99s.push(s99);
        p50r.push(r50);
        p99r.push(r99);
        maxr.push(max);
        ratios.push(ratio);
    }
    let ratio = median_of(&ratios);
    println!(
        "median {:>7} {:>10.1} {:>10.1} {:>9} {:>10.1} {:>10.1} {:>11.1} {ratio:>7.2}",
        "",
        us(median_of(&p50s)),
        us(median_of(&p99s)),
        "",
        us(median_of(&p50r)),
        us(median_of(&p99r)),
        us(median_of(&maxr))
    );
    // One run's p99 swings with where the scheduler put the caller and the
    // broker among the busy loops; every run's calls pooled are steadier.
    let (pooled_steady, pooled_reload) = (
        percentile(all_steady.clone(), 99.0),
        percentile(all_reload.clone(), 99.0),
    );
    let pooled = pooled_reload / pooled_steady;
    println!(
        "all runs pooled: steady p99 {:.1} µs (n {}), during reloads p99 {:.1} µs (n {}), p99.9 {:.1} vs {:.1} µs",
        us(pooled_steady),
        all_steady.len(),
        us(pooled_reload),
        all_reload.len(),
        us(percentile(all_steady, 99.9)),
        us(percentile(all_reload, 99.9)),
    );
    println!("median of the runs' p99 ratios: {ratio:.2}×");
    println!(
        "p99 during reloads / steady p99, pooled: {pooled:.2}× (target ≤ {TARGET}×): {}",
        if pooled <= TARGET { "PASS" } else { "FAIL" }
    );
    let _ = std::io::stdout().flush();
}
