//! One scenario under load, the data-path comparison and the soak: what each
//! measures and how.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ally_bench::load::{self, LoadConfig, LoadResult, Mode, StopFlag};
use ally_bench::report::{self, Row, SoakPoint, Usage};
use ally_bench::stats::{self, Windows};
use ally_testkit::procfs;

use super::target::{Scenario, Target};
use super::{Bins, Result, STEADY_AFTER, STEADY_BEFORE, Settings, WINDOW_TAIL};

/// The load of a run on `target`, bounded in time and requests per client; a
/// request not answered in 5 s failed.
fn load_config(
    target: &Target,
    mode: Mode,
    s: &Settings,
    max_duration: Duration,
    max_requests: u64,
) -> LoadConfig {
    LoadConfig {
        mode,
        http: target.http,
        grpc: target.grpc,
        connections: s.connections,
        max_duration,
        max_requests,
        timeout: Duration::from_secs(5),
    }
}

pub async fn run_scenario(
    bins: &Bins,
    scenario: Scenario,
    mode: Mode,
    restarts: usize,
    s: &Settings,
) -> Result<Row> {
    let dir = tempdir()?;
    let mut target = Target::start(scenario, bins, dir.clone()).await?;
    let stop = StopFlag::default();
    let start = Instant::now();
    let config = load_config(
        &target,
        mode,
        s,
        // Generous bound: restarts that take 2 s each and then some.
        STEADY_BEFORE
            + STEADY_AFTER
            + (s.gap + Duration::from_secs(2)) * restarts as u32
            + Duration::from_secs(30),
        50_000_000,
    );
    let load = tokio::spawn(load::run(config, stop.clone(), start));
    tokio::time::sleep(STEADY_BEFORE).await;
    let mut windows = Vec::new();
    let mut reload_ms = Vec::new();
    let mut marks = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..restarts {
        let t0 = Instant::now();
        let result = target.restart().await;
        let t1 = Instant::now();
        match result {
            Ok(()) => reload_ms.push((t1 - t0).as_secs_f64() * 1000.0),
            Err(e) => {
                target.restarts_failed += 1;
                if failures.len() < 5 {
                    failures.push(e.to_string());
                }
            }
        }
        let a = (t0 - start).as_micros() as u64;
        let b = (t1 + WINDOW_TAIL - start).as_micros() as u64;
        windows.push((a, b));
        marks.push(a);
        tokio::time::sleep(s.gap).await;
    }
    tokio::time::sleep(STEADY_AFTER).await;
    stop.stop();
    let result: LoadResult = load.await?;
    let restarts_failed = target.restarts_failed;
    target.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    let windows = Windows::new(windows);
    let summary = stats::summarise(&result.samples, &windows, result.duration_us);
    let seconds = (result.duration_us / 1_000_000 + 1) as usize;
    Ok(Row {
        scenario: scenario.name().to_string(),
        mode: mode.name().to_string(),
        restarts,
        restarts_failed,
        restart_errors: failures,
        summary,
        retried: result.retried,
        retried_kinds: result.retried_kinds,
        reload_ms,
        errors: result.errors,
        series: stats::per_second(&result.samples, seconds),
        by_offset: stats::by_offset(&result.samples, &marks, &report::OFFSET_EDGES_MS),
        marks_us: marks,
    })
}

fn tempdir() -> Result<PathBuf> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ally-bench-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Requests/s of the same server under Ally and binding its own socket, keep-alive
/// HTTP, no reloads, alternating rounds.
pub async fn datapath(bins: &Bins, s: &Settings) -> Result<report::DataPath> {
    let mut ally = Vec::new();
    let mut own = Vec::new();
    for round in 0..s.datapath_rounds {
        for scenario in [Scenario::ALLY, Scenario::Restart] {
            let dir = tempdir()?;
            let target = Target::start(scenario, bins, dir.clone()).await?;
            let start = Instant::now();
            let duration = Duration::from_secs(s.datapath_secs);
            let config = load_config(&target, Mode::KeepAlive, s, duration, 50_000_000);
            let result = load::run(config, StopFlag::default(), start).await;
            target.stop().await;
            let _ = std::fs::remove_dir_all(&dir);
            let sum = stats::summarise(&result.samples, &Windows::default(), result.duration_us);
            eprintln!(
                "ally-bench: data path round {round}: {}: {:.0} req/s, {} failed",
                scenario.name(),
                sum.rps,
                sum.failed
            );
            if matches!(scenario, Scenario::Ally { .. }) {
                ally.push(sum.rps);
            } else {
                own.push(sum.rps);
            }
        }
    }
    Ok(report::DataPath { ally, own })
}

/// The broker's resident memory (total, anonymous, file-backed: KiB) and open fds.
fn broker_usage(pid: u32) -> Usage {
    Usage {
        rss_kib: procfs::status_kib(pid, "VmRSS:"),
        anon_kib: procfs::status_kib(pid, "RssAnon:"),
        file_kib: procfs::status_kib(pid, "RssFile:"),
        fds: procfs::open_fds(pid) as u64,
        cpu_ms: procfs::cpu_ms(pid),
    }
}

/// Ally reloads back to back under keep-alive load; broker RSS and fds every 100.
pub async fn soak(bins: &Bins, s: &Settings) -> Result<Vec<SoakPoint>> {
    let dir = tempdir()?;
    let mut target = Target::start(Scenario::ALLY, bins, dir.clone()).await?;
    let pid = target.broker_pid().await.ok_or("no broker pid")?;
    let stop = StopFlag::default();
    let start = Instant::now();
    let duration = Duration::from_secs(60) + Duration::from_millis(500) * s.soak_reloads as u32;
    let config = load_config(&target, Mode::KeepAlive, s, duration, 100_000_000);
    let load = tokio::spawn(load::run(config, stop.clone(), start));
    // Connected before the first figure, so that its fd is counted from the start.
    target.admin().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut points = Vec::new();
    let mut failed_reloads = 0;
    points.push(SoakPoint {
        reloads: 0,
        usage: broker_usage(pid),
        failed_requests: 0,
        failed_reloads: 0,
    });
    eprintln!("ally-bench: soak: {} reloads", s.soak_reloads);
    for i in 1..=s.soak_reloads {
        if target.restart().await.is_err() {
            failed_reloads += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if i % 100 == 0 || i == s.soak_reloads {
            // Let the drained generations exit before measuring.
            let usage = broker_usage(pid);
            eprintln!(
                "ally-bench: soak: {i} reloads: RSS {} KiB ({} anonymous), {} fds, {} ms CPU",
                usage.rss_kib, usage.anon_kib, usage.fds, usage.cpu_ms
            );
            points.push(SoakPoint {
                reloads: i,
                usage,
                failed_requests: 0,
                failed_reloads,
            });
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let usage = broker_usage(pid);
    stop.stop();
    let result = load.await?;
    let failed = result.samples.iter().filter(|s| !s.ok).count() as u64;
    points.push(SoakPoint {
        reloads: s.soak_reloads,
        usage,
        failed_requests: failed,
        failed_reloads,
    });
    if let Some(last) = points.last_mut() {
        last.failed_requests = failed;
    }
    eprintln!(
        "ally-bench: soak: {} requests, {failed} failed, {failed_reloads} failed reloads",
        result.samples.len()
    );
    target.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(points)
}
