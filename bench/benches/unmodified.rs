//! gunicorn and puma, unmodified, reloaded by `ally reload` and, in the same run
//! under the same load, by their own mechanisms and by a socket-holding parent
//! that stops the old server before starting the new one:
//!
//! ```text
//! cargo bench -p ally-bench --bench unmodified
//! ```
//!
//! Prints a markdown table: failed requests, requests our keep-alive client sent
//! again after the server closed the connection without answering, p99 latency
//! of requests outside and inside reload windows, and how long after the trigger
//! the new version answered and the old one was gone. A server that is not
//! installed is skipped with a line saying so.
//!
//! Env: ALLY_BENCH_RELOADS (default 10), ALLY_BENCH_CONNECTIONS (default 8),
//! ALLY_BENCH_GAP_MS (pause after each reload, default 1000),
//! ALLY_BENCH_ALLY (another `ally` binary to run), ALLY_BENCH_ONLY (run only
//! the cases whose "server / reloaded by" label contains it).

use std::path::PathBuf;
use std::time::Duration;

use ally_bench::load::Mode;
use ally_bench::unmodified::{self, CASES, Settings};
use ally_testkit::env_or;

fn main() {
    let settings = Settings {
        reloads: env_or("ALLY_BENCH_RELOADS", 10u32),
        connections: env_or("ALLY_BENCH_CONNECTIONS", 8usize),
        gap: Duration::from_millis(env_or("ALLY_BENCH_GAP_MS", 1000u64)),
        steady: Duration::from_secs(2),
        ally: std::env::var_os("ALLY_BENCH_ALLY")
            .map_or_else(ally_testkit::build_ally, PathBuf::from),
    };
    eprintln!(
        "unmodified: {} reloads per case and load, {} connections, {} ms between reloads, ally {}",
        settings.reloads,
        settings.connections,
        settings.gap.as_millis(),
        settings.ally.display()
    );
    let modes = [Mode::NewConnection, Mode::KeepAlive];
    let mut rows = Vec::new();
    let only = std::env::var("ALLY_BENCH_ONLY").unwrap_or_default();
    for case in CASES {
        let label = format!("{} / {}", case.server.label(), case.mechanism.label());
        if !label.contains(&only) {
            continue;
        }
        if let Some(why) = case.server.missing() {
            eprintln!("unmodified: skipping {}: {why}", case.server.label());
            continue;
        }
        eprintln!("unmodified: {label} ...");
        for row in unmodified::run(case, &modes, &settings) {
            eprintln!(
                "  {}: {} requests, {} failed, {} retried{}",
                row.mode,
                row.requests,
                row.failed,
                row.retried,
                if row.errors.is_empty() {
                    String::new()
                } else {
                    format!(": {}", row.errors.join("; "))
                }
            );
            rows.push(row);
        }
    }
    println!("{}", unmodified::table(&rows));
    for r in rows.iter().filter(|r| !r.errors.is_empty()) {
        println!(
            "- {} / {} / {}: {}",
            r.server,
            r.mechanism,
            r.mode,
            r.errors.join("; ")
        );
    }
}
