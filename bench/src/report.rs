//! The table, the plot and `docs/benchmarks.md`.

mod svg;

pub use svg::svg;

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::stats::{Latency, Summary};

/// One scenario under one kind of load.
/// What the broker holds: resident memory in KiB (anonymous: heap and stacks; file:
/// mapped files, mostly its own code as it is paged in) and open fds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub fds: u64,
    /// CPU time used since it started (user + system), ms.
    pub cpu_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Row {
    pub scenario: String,
    pub mode: String,
    pub restarts: usize,
    pub restarts_failed: u64,
    pub restart_errors: Vec<String>,
    pub summary: Summary,
    pub retried: u64,
    pub retried_kinds: BTreeMap<String, u64>,
    /// Duration of each successful reload/restart, ms.
    pub reload_ms: Vec<f64>,
    pub errors: BTreeMap<String, u64>,
    /// (ok, failed) per second.
    pub series: Vec<(u64, u64)>,
    /// Reload/restart starts, µs since the load started.
    pub marks_us: Vec<u64>,
    /// Latency of successful requests by when they started after the latest
    /// reload start, one per [`OFFSET_EDGES_MS`] bucket.
    pub by_offset: Vec<Latency>,
}

/// Buckets of time since a reload started, ms, for [`Row::by_offset`].
pub const OFFSET_EDGES_MS: [u64; 10] = [0, 5, 10, 20, 50, 100, 200, 400, 1000, 2000];

impl Row {
    pub fn is_ally(&self) -> bool {
        self.scenario.starts_with("ally reload")
    }

    pub fn reload_p50_ms(&self) -> f64 {
        median(&self.reload_ms)
    }

    pub fn reload_max_ms(&self) -> f64 {
        self.reload_ms.iter().copied().fold(0.0, f64::max)
    }

    /// p99 inside reload windows over steady-state p99.
    pub fn p99_ratio(&self) -> f64 {
        if self.summary.steady.p99 == 0 {
            return 0.0;
        }
        self.summary.reload.p99 as f64 / self.summary.steady.p99 as f64
    }
}

pub use ally_testkit::stats::median;

#[derive(Debug, Clone, Default)]
pub struct DataPath {
    /// Requests/s per round under Ally.
    pub ally: Vec<f64>,
    /// Requests/s per round of the same server binding its own socket.
    pub own: Vec<f64>,
}

impl DataPath {
    pub fn ratio(&self) -> f64 {
        let own = median(&self.own);
        if own == 0.0 {
            0.0
        } else {
            median(&self.ally) / own
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SoakPoint {
    pub reloads: usize,
    pub usage: Usage,
    pub failed_requests: u64,
    pub failed_reloads: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Doc {
    pub rows: Vec<Row>,
    pub datapath: Option<DataPath>,
    pub soak: Vec<SoakPoint>,
    pub machine: Vec<(String, String)>,
    pub connections: usize,
    pub gap_ms: u64,
    pub window_tail_ms: u64,
    pub elapsed_s: u64,
}

fn ms(us: u32) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

pub fn row_line(r: &Row) -> String {
    format!(
        "{} req, {} failed ({} retried), {:.0} req/s, p99 steady {} ms / reload {} ms, max {} / {} ms, reload p50 {:.1} ms max {:.1} ms{}",
        r.summary.requests,
        r.summary.failed,
        r.retried,
        r.summary.rps,
        ms(r.summary.steady.p99),
        ms(r.summary.reload.p99),
        ms(r.summary.steady.max),
        ms(r.summary.reload.max),
        r.reload_p50_ms(),
        r.reload_max_ms(),
        if r.restarts_failed > 0 {
            format!(", {} restarts FAILED", r.restarts_failed)
        } else {
            String::new()
        }
    ) + &if r.errors.is_empty() {
        String::new()
    } else {
        format!("\n    errors: {}", top_errors(&r.errors, 4))
    } + &if r.retried_kinds.is_empty() {
        String::new()
    } else {
        format!("\n    retried: {}", top_errors(&r.retried_kinds, 4))
    }
}

/// The main table, markdown.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str("| load | scenario | reloads | requests | failed | retried¹ | req/s | p99 steady ms | p99 in reload ms | ratio | max steady ms | max in reload ms | reload p50 ms | reload max ms |\n");
    t.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        let name = if r.is_ally() {
            format!("**{}**", r.scenario)
        } else {
            r.scenario.clone()
        };
        let _ = writeln!(
            t,
            "| {} | {} | {}{} | {} | {} | {} | {:.0} | {} | {} | {:.2} | {} | {} | {:.1} | {:.1} |",
            r.mode,
            name,
            r.restarts,
            if r.restarts_failed > 0 {
                format!(" ({} failed)", r.restarts_failed)
            } else {
                String::new()
            },
            r.summary.requests,
            r.summary.failed,
            r.retried,
            r.summary.rps,
            ms(r.summary.steady.p99),
            ms(r.summary.reload.p99),
            r.p99_ratio(),
            ms(r.summary.steady.max),
            ms(r.summary.reload.max),
            r.reload_p50_ms(),
            r.reload_max_ms(),
        );
    }
    t
}

pub fn datapath_line(d: &DataPath) -> String {
    let f = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "data path (keep-alive HTTP, no reloads): under Ally {:.0} req/s (rounds: {}), own socket {:.0} req/s (rounds: {}); ratio {:.3}",
        median(&d.ally),
        f(&d.ally),
        median(&d.own),
        f(&d.own),
        d.ratio()
    )
}

/// The broker's CPU time per reload between the first and the last soak figure, ms.
pub fn cpu_per_reload(points: &[SoakPoint]) -> Option<f64> {
    let (first, last) = (points.first()?, points.last()?);
    (last.reloads > first.reloads).then(|| {
        last.usage.cpu_ms.saturating_sub(first.usage.cpu_ms) as f64
            / (last.reloads - first.reloads) as f64
    })
}

pub fn soak_table(points: &[SoakPoint]) -> String {
    let mut t = String::from(
        "| reloads | broker RSS KiB | anonymous | file-backed | broker open fds | failed reloads | failed requests |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (i, p) in points.iter().enumerate() {
        let last = i + 1 == points.len();
        let _ = writeln!(
            t,
            "| {}{} | {} | {} | {} | {} | {} | {} |",
            p.reloads,
            if last && i > 0 { " (end, settled)" } else { "" },
            p.usage.rss_kib,
            p.usage.anon_kib,
            p.usage.file_kib,
            p.usage.fds,
            p.failed_reloads,
            if last {
                p.failed_requests.to_string()
            } else {
                "".into()
            }
        );
    }
    t
}

/// nproc, CPU model, kernel, memory.
pub fn machine() -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = read("/proc/meminfo");
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("unknown".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0)
        });
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    vec![
        ("CPUs (nproc)".into(), cpus.to_string()),
        ("CPU model".into(), model),
        ("kernel".into(), kernel),
        ("memory".into(), mem),
    ]
}

fn top_errors(errors: &BTreeMap<String, u64>, n: usize) -> String {
    let mut v: Vec<_> = errors.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .take(n)
        .map(|(k, c)| format!("{c}× `{}`", k.replace('`', "'")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Figures where an alternative does better than Ally under the same load.
pub fn better_than_ally(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for ally in rows.iter().filter(|r| r.scenario == "ally reload") {
        for alt in rows.iter().filter(|r| r.mode == ally.mode && !r.is_ally()) {
            let mut better = Vec::new();
            if alt.summary.failed < ally.summary.failed {
                better.push(format!(
                    "fewer failed requests ({} vs {})",
                    alt.summary.failed, ally.summary.failed
                ));
            }
            if alt.reload_p50_ms() < ally.reload_p50_ms() && !alt.reload_ms.is_empty() {
                better.push(format!(
                    "shorter reload (p50 {:.1} ms vs {:.1} ms)",
                    alt.reload_p50_ms(),
                    ally.reload_p50_ms()
                ));
            }
            if alt.summary.reload.p99 < ally.summary.reload.p99 && alt.summary.reload.count > 0 {
                better.push(format!(
                    "lower p99 inside reload windows ({} ms vs {} ms)",
                    ms(alt.summary.reload.p99),
                    ms(ally.summary.reload.p99)
                ));
            }
            if alt.summary.reload.max < ally.summary.reload.max && alt.summary.reload.count > 0 {
                better.push(format!(
                    "lower max latency inside reload windows ({} ms vs {} ms)",
                    ms(alt.summary.reload.max),
                    ms(ally.summary.reload.max)
                ));
            }
            if alt.summary.rps > ally.summary.rps {
                better.push(format!(
                    "more requests/s over its run ({:.0} vs {:.0}; runs differ in length and reload count)",
                    alt.summary.rps, ally.summary.rps
                ));
            }
            if !better.is_empty() {
                out.push(format!(
                    "{} / {}: {}",
                    alt.scenario,
                    alt.mode,
                    better.join(", ")
                ));
            }
        }
    }
    out
}

/// p99 by time since the reload started, one column per scenario of `mode`.
pub fn offset_table(rows: &[Row], mode: &str) -> String {
    let rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.mode == mode && r.by_offset.len() + 1 == OFFSET_EDGES_MS.len())
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut m = format!(
        "\n### Where the latency inside reloads goes ({mode})\n\np99 of successful requests by when they started after the latest reload or restart began, ms (in parentheses: requests). A reload window ends 100 ms after its command returned.\n\n| since start |"
    );
    for r in &rows {
        let _ = write!(m, " {} |", r.scenario);
    }
    m.push_str("\n| --- |");
    m.push_str(&" ---: |".repeat(rows.len()));
    m.push('\n');
    for (i, edge) in OFFSET_EDGES_MS.windows(2).enumerate() {
        let _ = write!(m, "| {}–{} ms |", edge[0], edge[1]);
        for r in &rows {
            let latency = r.by_offset[i];
            if latency.count == 0 {
                m.push_str(" – |");
            } else {
                let _ = write!(m, " {} ({}) |", ms(latency.p99), latency.count);
            }
        }
        m.push('\n');
    }
    m.push_str("| steady |");
    for r in &rows {
        let _ = write!(m, " {} |", ms(r.summary.steady.p99));
    }
    m.push('\n');
    m
}

pub fn markdown(doc: &Doc) -> String {
    let mut m = String::new();
    m.push_str(include_str!("report_intro.md"));
    m.push_str("\n## Machine\n\n| | |\n| --- | --- |\n");
    for (k, v) in &doc.machine {
        let _ = writeln!(m, "| {k} | {v} |");
    }
    let _ = writeln!(
        m,
        "\nLoad: {} concurrent clients per run, on the same machine as the servers (loopback). A reload or restart every {} ms after the previous one finished, 2 s of steady load before the first and after the last. A *reload window* runs from the start of the reload or restart command until it returned + {} ms; a request is *in* a window if its lifetime overlaps one. Latencies are of successful requests. Whole run: {} s.\n",
        doc.connections, doc.gap_ms, doc.window_tail_ms, doc.elapsed_s
    );
    m.push_str("\n## Results\n\n");
    m.push_str(&table(&doc.rows));
    m.push_str("\n¹ requests sent again because the server never saw them: HTTP, a reused keep-alive connection the server closed before answering; gRPC, a call refused by the server's GOAWAY or dropped by the client on a closing connection (gRPC transparent retry; tonic does not retry, so a plain tonic client reports each as a failed call). Each counts once, as one request, and is a failure only if the retry fails too.\n\n");
    m.push_str("![throughput and failures over time, reloads marked](benchmarks.svg)\n\n");
    m.push_str("### Failures, by kind\n\n");
    let mut any = false;
    for r in &doc.rows {
        if !r.errors.is_empty() || !r.restart_errors.is_empty() {
            any = true;
            let _ = write!(
                m,
                "- {} / {}: {}",
                r.scenario,
                r.mode,
                top_errors(&r.errors, 4)
            );
            if !r.restart_errors.is_empty() {
                let _ = write!(m, "; restarts failed: {}", r.restart_errors.join("; "));
            }
            m.push('\n');
        }
    }
    if !any {
        m.push_str("None.\n");
    }
    m.push_str("\n### Retried requests, by what they met first\n\n");
    for r in doc.rows.iter().filter(|r| !r.retried_kinds.is_empty()) {
        let _ = writeln!(
            m,
            "- {} / {}: {}",
            r.scenario,
            r.mode,
            top_errors(&r.retried_kinds, 4)
        );
    }
    m.push_str(&offset_table(&doc.rows, "http-keepalive"));
    if let Some(d) = &doc.datapath {
        let _ = writeln!(m, "\n## Data path\n\n{}.\n", datapath_line(d));
        m.push_str("The same `bench-server`, keep-alive HTTP load, no reloads, rounds alternating between the server under `ally run` and the server binding its own socket; medians compared. Under Ally the sockets are the broker's, but once the instance has them the broker is not on the path of a single byte.\n");
    }
    if !doc.soak.is_empty() {
        m.push_str("\n## Soak: 1000 reloads under load\n\n`ally reload` back to back (20 ms apart) under keep-alive HTTP load; the broker's RSS (`VmRSS`) and open fds from `/proc`.\n\n");
        m.push_str(&soak_table(&doc.soak));
        if let Some(per_reload) = cpu_per_reload(&doc.soak) {
            let _ = writeln!(
                m,
                "\nThe broker's own CPU time (user + system) over the soak: {per_reload:.2} ms per reload."
            );
        }
    }
    m.push_str("\n## Where an alternative does better than Ally\n\n");
    let better = better_than_ally(&doc.rows);
    if better.is_empty() {
        m.push_str("On no figure of this run.\n");
    } else {
        m.push_str("Computed from the table above:\n\n");
        for b in &better {
            let _ = writeln!(m, "- {b}");
        }
    }
    m.push_str(include_str!("report_notes.md"));
    m
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::stats::Latency;

    pub(crate) fn row(scenario: &str, failed: u64, reload_ms: Vec<f64>, p99: u32) -> Row {
        Row {
            scenario: scenario.into(),
            mode: "grpc".into(),
            summary: Summary {
                requests: 100,
                failed,
                rps: 10.0,
                steady: Latency {
                    count: 10,
                    p50: 1,
                    p99: 10,
                    max: 10,
                },
                reload: Latency {
                    count: 10,
                    p50: 1,
                    p99,
                    max: p99,
                },
            },
            reload_ms,
            series: vec![(5, 0), (6, 2), (7, 0)],
            marks_us: vec![1_500_000],
            ..Default::default()
        }
    }

    #[test]
    fn reports_where_alternatives_win() {
        let rows = vec![
            row("ally reload", 0, vec![30.0, 40.0], 12),
            row("SO_REUSEPORT handover", 3, vec![10.0], 20),
            row("shellflip", 0, vec![50.0], 11),
        ];
        let better = better_than_ally(&rows);
        assert_eq!(better.len(), 2, "{better:?}");
        assert!(better[0].starts_with("SO_REUSEPORT handover / grpc: shorter reload"));
        assert!(!better[0].contains("fewer failed"));
        assert!(better[1].contains("lower p99"));
        assert_eq!(rows[0].p99_ratio(), 1.2);
    }

    #[test]
    fn soak_reports_memory_by_kind_and_cpu_per_reload() {
        let point = |reloads, anon_kib, cpu_ms| SoakPoint {
            reloads,
            usage: Usage {
                rss_kib: 7000 + anon_kib,
                anon_kib,
                file_kib: 7000,
                fds: 22,
                cpu_ms,
            },
            failed_requests: 0,
            failed_reloads: 0,
        };
        let points = [
            point(0, 700, 100),
            point(100, 1700, 300),
            point(100, 1700, 300),
        ];
        assert_eq!(cpu_per_reload(&points), Some(2.0));
        assert_eq!(cpu_per_reload(&points[..1]), None);
        let table = soak_table(&points);
        assert!(
            table.contains("| 0 | 7700 | 700 | 7000 | 22 | 0 |  |"),
            "{table}"
        );
        assert!(
            table.contains("| 100 (end, settled) | 8700 | 1700 | 7000 | 22 | 0 | 0 |"),
            "{table}"
        );
    }
}
