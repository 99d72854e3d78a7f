//! One re-exec of the broker, call → serving again: `cargo bench -p ally-bench
//! --bench reexec`. A real broker runs the hello example under a keep-alive
//! HTTP load that never retries (wrk, else the testkit's client); for each
//! cache size it re-executes RUNS times by a raw `Reexecute()` call and RUNS
//! times by `ally reexec APP`, and prints p50/p90/max and the load's failures
//! (see `ally_bench::reexec`).
//!
//! Env: ALLY_BENCH_RUNS (default 100), ALLY_BENCH_CACHE_MIB (default "0,16,64";
//! 64 MiB is `max_total_bytes`' default), ALLY_BENCH_CONNECTIONS (default 4),
//! ALLY_BENCH_GAP_MS (between re-execs, default 50), ALLY_BENCH_POLL_MS
//! (default 1), ALLY_BENCH_ALLY (another `ally` binary, e.g. an older build).

use std::time::Duration;

use ally_bench::reexec::{self, Settings};
use ally_testkit::env_or;

fn main() {
    let cache_mib: Vec<u64> = env_or("ALLY_BENCH_CACHE_MIB", "0,16,64".to_string())
        .split(',')
        .map(|m| {
            m.trim()
                .parse()
                .expect("ALLY_BENCH_CACHE_MIB: MiB, comma-separated")
        })
        .collect();
    let settings = Settings {
        runs: env_or("ALLY_BENCH_RUNS", 100usize),
        cache_mib,
        connections: env_or("ALLY_BENCH_CONNECTIONS", 4u32),
        gap: Duration::from_millis(env_or("ALLY_BENCH_GAP_MS", 50u64)),
        poll: Duration::from_millis(env_or("ALLY_BENCH_POLL_MS", 1u64)),
        ally: std::env::var_os("ALLY_BENCH_ALLY")
            .map_or_else(ally_testkit::build_ally, std::path::PathBuf::from),
        hello: ally_testkit::example("hello"),
    };
    let cases = reexec::run(&settings);
    println!(
        "one re-exec of the broker, ms, on {} CPUs; closed: Reexecute() sent → its connection closed (image written, exec done); serving: → first Status() of the new image (polled every {} ms on fresh connections); command: `ally reexec APP` start → exit",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
        settings.poll.as_millis()
    );
    print!("{}", reexec::table(&cases));
    for case in cases.iter().filter(|c| c.failed > 0) {
        println!(
            "{} MiB: {} failed requests: {}",
            case.cache_bytes >> 20,
            case.failed,
            case.detail
        );
    }
}
