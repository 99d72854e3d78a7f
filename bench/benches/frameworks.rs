//! Real frameworks under `ally reload`, loaded by clients that do not retry:
//!
//! ```text
//! cargo bench -p ally-bench --bench frameworks
//! ```
//!
//! For each framework's app (the `ally-client` examples `hello`, `axum_server`,
//! `actix_server`, and this crate's `naive_axum`, the README pattern before
//! issue 13) × each load (`ab`, `ab -k`, `wrk`, ours with a new connection per
//! request and ours on keep-alive connections): a real `ally run`, RELOADS
//! reloads under the load, the failed requests counted. Prints a markdown table
//! and what the generators said about their failures. An app whose example is
//! not in this tree is skipped with a line saying so.
//!
//! Env: ALLY_BENCH_RELOADS (default 20), ALLY_BENCH_CONNECTIONS (default 8),
//! ALLY_BENCH_GAP_MS (pause after each reload, default 200),
//! ALLY_BENCH_FRAMEWORKS (comma-separated binary names to run, default all),
//! ALLY_BENCH_ALLY (another `ally` binary to run).

use std::path::PathBuf;
use std::time::Duration;

use ally_bench::frameworks::{self, Binary, FRAMEWORKS, Generator, Settings};
use ally_testkit::{cargo_build, env_or};

fn main() {
    let settings = Settings {
        reloads: env_or("ALLY_BENCH_RELOADS", 20u32),
        connections: env_or("ALLY_BENCH_CONNECTIONS", 8u32),
        gap: Duration::from_millis(env_or("ALLY_BENCH_GAP_MS", 200u64)),
        ally: std::env::var_os("ALLY_BENCH_ALLY")
            .map_or_else(ally_testkit::build_ally, PathBuf::from),
    };
    let only: Vec<String> = std::env::var("ALLY_BENCH_FRAMEWORKS")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    let chosen: Vec<_> = FRAMEWORKS
        .iter()
        .filter(|f| only.is_empty() || only.iter().any(|o| o == f.binary.name()))
        .collect();
    if chosen
        .iter()
        .any(|f| matches!(f.binary, Binary::Example(_)))
    {
        cargo_build(&["-p", "ally-client", "--examples"]);
    }
    if chosen
        .iter()
        .any(|f| matches!(f.binary, Binary::BenchBin(_)))
    {
        cargo_build(&["-p", "ally-bench", "--bins"]);
    }
    let generators: Vec<Generator> = Generator::ALL
        .into_iter()
        .filter(|g| match g {
            Generator::Tool(tool) => {
                let installed = tool.is_installed();
                if !installed {
                    eprintln!(
                        "frameworks: skipping {tool}: `{}` is not installed (apt install apache2-utils wrk)",
                        tool.program()
                    );
                }
                installed
            }
            Generator::Ours(_) => true,
        })
        .collect();
    eprintln!(
        "frameworks: {} reloads per load, {} connections, {} ms between reloads, ally {}",
        settings.reloads,
        settings.connections,
        settings.gap.as_millis(),
        settings.ally.display()
    );
    let mut rows = Vec::new();
    for framework in chosen {
        let exe = framework.binary.path();
        if !exe.exists() {
            eprintln!(
                "frameworks: skipping {}: no binary `{}` in this tree ({})",
                framework.label,
                framework.binary.name(),
                exe.display()
            );
            continue;
        }
        eprintln!("frameworks: {} ...", framework.label);
        let done = frameworks::run(framework, &exe, &generators, &settings);
        for r in &done {
            eprintln!(
                "  {}: {} requests, {} failed, {} reloads, {:.0} req/s",
                r.generator,
                r.requests,
                r.failed,
                r.reloads,
                r.per_second()
            );
        }
        rows.extend(done);
    }
    println!("{}", frameworks::table(&rows));
    let details = frameworks::failure_details(&rows);
    if !details.is_empty() {
        println!("Failures, as each generator reported them:\n\n{details}");
    }
}
