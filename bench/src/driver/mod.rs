//! Scenarios: start a server the scenario's way, put it under load, restart it
//! the scenario's way, measure. `target` starts and restarts, `runs` measures;
//! here the command line and the plan.

mod runs;
mod target;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ally_bench::load::Mode;
use ally_bench::report;

use runs::{datapath, run_scenario, soak};
use target::Scenario;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// The tail added to a reload's duration to make its window.
pub const WINDOW_TAIL: Duration = Duration::from_millis(100);
pub const STEADY_BEFORE: Duration = Duration::from_secs(2);
pub const STEADY_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Settings {
    connections: usize,
    ally_reloads: usize,
    alt_restarts: usize,
    gap: Duration,
    soak_reloads: usize,
    datapath_rounds: usize,
    datapath_secs: u64,
    write: bool,
    only: Option<String>,
}

pub struct Bins {
    pub ally: PathBuf,
    pub server: PathBuf,
}

fn bins() -> Result<Bins> {
    // `cargo run -p ally-bench` builds only this package: build the broker too, so
    // the run measures the broker of this tree.
    if std::env::var_os("CARGO").is_some() {
        ally_testkit::cargo_build(&[
            "-p",
            "ally",
            "--bin",
            "ally",
            "-p",
            "ally-bench",
            "--bin",
            "bench-server",
        ]);
    }
    let dir = ally_testkit::target_dir();
    let b = Bins {
        ally: dir.join("ally"),
        server: dir.join("bench-server"),
    };
    for p in [&b.ally, &b.server] {
        if !p.exists() {
            return Err(format!(
                "{} is missing: cargo build --release --workspace",
                p.display()
            )
            .into());
        }
    }
    Ok(b)
}

pub async fn main(args: Vec<String>) -> Result<()> {
    let mut settings = Settings {
        connections: 32,
        ally_reloads: 100,
        alt_restarts: 10,
        gap: Duration::from_millis(200),
        soak_reloads: 1000,
        datapath_rounds: 3,
        datapath_secs: 4,
        write: true,
        only: None,
    };
    let command = args.first().cloned().unwrap_or_else(|| "all".into());
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {
                settings.ally_reloads = 10;
                settings.alt_restarts = 3;
                settings.soak_reloads = 100;
                settings.datapath_rounds = 1;
                settings.datapath_secs = 2;
                settings.write = false;
            }
            "--no-write" => settings.write = false,
            "--connections" => {
                settings.connections = it.next().ok_or("--connections N")?.parse()?
            }
            "--reloads" => settings.ally_reloads = it.next().ok_or("--reloads N")?.parse()?,
            "--restarts" => settings.alt_restarts = it.next().ok_or("--restarts N")?.parse()?,
            "--soak-reloads" => {
                settings.soak_reloads = it.next().ok_or("--soak-reloads N")?.parse()?
            }
            "--only" => settings.only = Some(it.next().ok_or("--only SUBSTRING")?.clone()),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let bins = bins()?;
    match command.as_str() {
        "all" => all(&bins, &settings).await,
        "soak" => {
            let points = soak(&bins, &settings).await?;
            println!("{}", report::soak_table(&points));
            if let Some(ms) = report::cpu_per_reload(&points) {
                println!("broker CPU: {ms:.2} ms per reload");
            }
            Ok(())
        }
        other => Err(format!("unknown command {other:?} (all, soak)").into()),
    }
}

async fn all(bins: &Bins, s: &Settings) -> Result<()> {
    let started = Instant::now();
    let mut rows = Vec::new();
    let plan: Vec<(Scenario, Mode, usize)> = {
        let mut plan = Vec::new();
        for mode in Mode::ALL {
            plan.push((Scenario::ALLY, mode, s.ally_reloads));
            plan.push((
                Scenario::Ally {
                    plain_grpc: false,
                    idle_start: true,
                },
                mode,
                s.ally_reloads,
            ));
            if mode == Mode::Grpc {
                plan.push((
                    Scenario::Ally {
                        plain_grpc: true,
                        idle_start: false,
                    },
                    mode,
                    s.ally_reloads,
                ));
            }
            for alt in [
                Scenario::Restart,
                Scenario::Parent,
                Scenario::ReusePort,
                Scenario::Shellflip,
            ] {
                plan.push((alt, mode, s.alt_restarts));
            }
        }
        plan
    };
    for (scenario, mode, restarts) in plan {
        let label = format!("{} / {}", scenario.name(), mode.name());
        if let Some(only) = &s.only
            && !label.contains(only.as_str())
        {
            continue;
        }
        eprintln!(
            "ally-bench: {label}: {restarts} restarts under {} connections",
            s.connections
        );
        let row = run_scenario(bins, scenario, mode, restarts, s).await?;
        eprintln!("ally-bench:   {}", report::row_line(&row));
        rows.push(row);
    }
    let datapath = if s.only.is_none() {
        Some(datapath(bins, s).await?)
    } else {
        None
    };
    let soak_points = if s.only.is_none() {
        soak(bins, s).await?
    } else {
        Vec::new()
    };
    let doc = report::Doc {
        rows,
        datapath,
        soak: soak_points,
        machine: report::machine(),
        connections: s.connections,
        gap_ms: s.gap.as_millis() as u64,
        window_tail_ms: WINDOW_TAIL.as_millis() as u64,
        elapsed_s: started.elapsed().as_secs(),
    };
    println!("{}", report::table(&doc.rows));
    println!("{}", report::offset_table(&doc.rows, "http-keepalive"));
    if let Some(d) = &doc.datapath {
        println!("{}", report::datapath_line(d));
    }
    println!("{}", report::soak_table(&doc.soak));
    if s.write {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("docs");
        std::fs::write(root.join("benchmarks.svg"), report::svg(&doc.rows))?;
        std::fs::write(root.join("benchmarks.md"), report::markdown(&doc))?;
        eprintln!("ally-bench: wrote docs/benchmarks.md and docs/benchmarks.svg");
    }
    Ok(())
}
