//! Real frameworks under `ally reload`, loaded by clients that do not retry
//! (`ab`, `ab -k`, `wrk`) and by ours ([`ally_testkit::Load`], which retries a
//! keep-alive request the server closed before answering, as browsers do).
//!
//! Each framework's app runs under a real `ally run`; for every generator the
//! harness starts the load, reloads the app a number of times, waits until no
//! old generation is left draining, stops the load and keeps what it counted.
//! `cargo bench -p ally-bench --bench frameworks` prints the table.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ally_testkit::loadgen::{self, Tool};
use ally_testkit::{Broker, Launch, Load, LoadMode, free_port, http_get, target_dir, wait_until};

/// How a framework's app is found in the target directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// An example of `ally-client` (`target/<profile>/examples/NAME`).
    Example(&'static str),
    /// A binary of this crate (`target/<profile>/NAME`).
    BenchBin(&'static str),
}

impl Binary {
    pub fn name(self) -> &'static str {
        match self {
            Binary::Example(name) | Binary::BenchBin(name) => name,
        }
    }

    /// Where cargo puts it for the running program's profile.
    pub fn path(self) -> PathBuf {
        match self {
            Binary::Example(name) => target_dir().join("examples").join(name),
            Binary::BenchBin(name) => target_dir().join(name),
        }
    }
}

/// One app to reload under load; it takes `--listen ADDR` and answers `GET /`
/// with a body that starts with `hello `.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framework {
    pub label: &'static str,
    pub binary: Binary,
}

/// Every app the benchmark runs, in the order of the table. gRPC (`tonic_server`)
/// is not among them: these loads speak HTTP/1.
pub const FRAMEWORKS: [Framework; 4] = [
    Framework {
        label: "hyper (hello)",
        binary: Binary::Example("hello"),
    },
    Framework {
        label: "axum (axum_server)",
        binary: Binary::Example("axum_server"),
    },
    Framework {
        label: "actix-web (actix_server)",
        binary: Binary::Example("actix_server"),
    },
    Framework {
        label: "axum, README pattern before issue 13 (naive_axum)",
        binary: Binary::BenchBin("naive_axum"),
    },
];

/// A load and how it uses connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// A third-party tool that never retries.
    Tool(Tool),
    /// Ours: a keep-alive request the server closed before answering is retried once.
    Ours(LoadMode),
}

impl Generator {
    pub const ALL: [Generator; 5] = [
        Generator::Tool(Tool::Ab),
        Generator::Tool(Tool::AbKeepAlive),
        Generator::Tool(Tool::Wrk),
        Generator::Ours(LoadMode::NewConnection),
        Generator::Ours(LoadMode::KeepAlive),
    ];
}

impl fmt::Display for Generator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Generator::Tool(Tool::Ab) => f.write_str("ab (new connection per request)"),
            Generator::Tool(tool) => write!(f, "{tool} (keep-alive)"),
            Generator::Ours(LoadMode::NewConnection) => {
                f.write_str("ours (new connection per request)")
            }
            Generator::Ours(LoadMode::KeepAlive) => f.write_str("ours (keep-alive, retries)"),
        }
    }
}

/// The knobs of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Reloads per framework and generator.
    pub reloads: u32,
    /// Concurrent connections (or worker threads, for ours).
    pub connections: u32,
    /// Pause after each reload returned, before the next.
    pub gap: Duration,
    /// The `ally` binary to run.
    pub ally: PathBuf,
}

/// What one generator counted over one framework's reloads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub framework: String,
    pub generator: String,
    pub requests: u64,
    pub failed: u64,
    /// Requests ours sent again (`None` for a generator that never retries).
    pub retried: Option<u64>,
    pub reloads: u64,
    pub seconds: f64,
    /// The generator's own words about its failures.
    pub detail: String,
}

impl Row {
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The load while it runs.
enum Running {
    Tool(loadgen::Generator),
    Ours(Load),
}

impl Running {
    /// Starts `generator` and returns once it is under way.
    fn start(generator: Generator, addr: SocketAddr, connections: u32) -> Running {
        match generator {
            Generator::Tool(tool) => {
                let running =
                    loadgen::Generator::start(tool, &format!("http://{addr}/"), connections);
                // ab and wrk say nothing until they end: give their connections time to open.
                std::thread::sleep(Duration::from_millis(300));
                Running::Tool(running)
            }
            Generator::Ours(mode) => {
                let load = Load::start(addr, mode, connections as usize);
                wait_until("our load to get going", Duration::from_secs(10), || {
                    load.ok() > 100
                });
                Running::Ours(load)
            }
        }
    }

    /// (requests, failed, retried, detail)
    fn finish(self) -> (u64, u64, Option<u64>, String) {
        match self {
            Running::Tool(mut running) => {
                // ab stops after its -n requests: a load that ended early measured less.
                assert!(
                    running.is_running(),
                    "the load stopped before the reloads were done: {:?}",
                    running.finish()
                );
                let r = running.finish();
                (r.requests, r.failed, None, r.detail)
            }
            Running::Ours(load) => {
                let s = load.finish();
                (s.ok, s.failed, Some(s.retried), s.errors.join("\n"))
            }
        }
    }
}

/// The config `ally run` gets for `exe` listening on `port`.
pub fn config(exe: &Path, port: u16) -> String {
    format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\"]\nstop_timeout = \"30s\"\nready_timeout = \"30s\"\n",
        exe.display().to_string()
    )
}

/// Runs `exe` under `ally run` and, for each of `generators` in turn, reloads it
/// `settings.reloads` times under that load. Panics if a reload fails or the app
/// never serves: the figures would mean nothing.
pub fn run(
    framework: &Framework,
    exe: &Path,
    generators: &[Generator],
    settings: &Settings,
) -> Vec<Row> {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let broker = Launch::new("fw")
        .ally(&settings.ally)
        .config(&config(exe, port))
        .log_level("warn")
        .start();
    broker.wait_running(1);
    wait_until(
        &format!("{} to answer on {addr}", framework.label),
        Duration::from_secs(20),
        || http_get(addr).is_ok_and(|body| body.starts_with("hello ")),
    );
    generators
        .iter()
        .map(|&generator| {
            let row = run_one(&broker, addr, generator, settings);
            Row {
                framework: framework.label.to_string(),
                ..row
            }
        })
        .collect()
}

fn run_one(broker: &Broker, addr: SocketAddr, generator: Generator, s: &Settings) -> Row {
    let first = broker.generation();
    let started = Instant::now();
    let running = Running::start(generator, addr, s.connections);
    for n in 1..=s.reloads {
        let out = broker.reload();
        assert!(
            out.status.success(),
            "reload {n} of {} under {generator} failed: {}{}",
            s.reloads,
            ally_testkit::stdout(&out),
            ally_testkit::stderr(&out)
        );
        std::thread::sleep(s.gap);
    }
    wait_until(
        "the old generations to finish draining",
        Duration::from_secs(120),
        || broker.pids("draining").is_empty(),
    );
    let (requests, failed, retried, detail) = running.finish();
    Row {
        framework: String::new(),
        generator: generator.to_string(),
        requests,
        failed,
        retried,
        reloads: broker.generation() - first,
        seconds: started.elapsed().as_secs_f64(),
        detail,
    }
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| framework | load | requests | failed | retried | reloads | req/s |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let retried = r.retried.map_or("–".to_string(), |n| n.to_string());
        let failed = if r.failed > 0 {
            format!("**{}**", r.failed)
        } else {
            "0".to_string()
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {failed} | {retried} | {} | {:.0} |",
            r.framework,
            r.generator,
            r.requests,
            r.reloads,
            r.per_second()
        );
    }
    t
}

/// What each generator said about the failures it counted, one line per row
/// that had any; a line said several times is given once, with its count (ours
/// keeps only its first 20 errors).
pub fn failure_details(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| r.failed > 0) {
        let mut said: Vec<(&str, usize)> = Vec::new();
        for line in r.detail.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match said.iter_mut().find(|(l, _)| *l == line) {
                Some((_, n)) => *n += 1,
                None => said.push((line, 1)),
            }
        }
        let said: Vec<String> = said
            .into_iter()
            .map(|(line, n)| match n {
                1 => line.to_string(),
                n => format!("{n}× {line}"),
            })
            .collect();
        let _ = writeln!(
            out,
            "- {} / {}: {}",
            r.framework,
            r.generator,
            said.join("; ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(failed: u64, retried: Option<u64>) -> Row {
        Row {
            framework: "axum".into(),
            generator: "ab -k (keep-alive)".into(),
            requests: 1000,
            failed,
            retried,
            reloads: 20,
            seconds: 4.0,
            detail:
                "Failed requests:        3\n   (Connect: 0, Receive: 3, Length: 0, Exceptions: 0)"
                    .into(),
        }
    }

    #[test]
    fn the_table_marks_failures_and_says_who_never_retries() {
        let t = table(&[row(0, Some(2)), row(3, None)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert_eq!(
            lines[2],
            "| axum | ab -k (keep-alive) | 1000 | 0 | 2 | 20 | 250 |"
        );
        assert_eq!(
            lines[3],
            "| axum | ab -k (keep-alive) | 1000 | **3** | – | 20 | 250 |"
        );
    }

    #[test]
    fn details_cover_only_rows_that_failed() {
        let d = failure_details(&[row(0, None), row(3, None)]);
        assert_eq!(
            d,
            "- axum / ab -k (keep-alive): Failed requests:        3; (Connect: 0, Receive: 3, Length: 0, Exceptions: 0)\n"
        );
    }

    #[test]
    fn details_count_a_line_said_again() {
        let mut r = row(3, Some(0));
        r.detail = "Connection reset by peer (os error 104)\nConnection reset by peer (os error 104)\nwrong answer \"\"".into();
        assert_eq!(
            failure_details(&[r]),
            "- axum / ab -k (keep-alive): 2× Connection reset by peer (os error 104); wrong answer \"\"\n"
        );
    }

    #[test]
    fn an_empty_run_has_no_rate() {
        let r = Row::default();
        assert_eq!(r.per_second(), 0.0);
    }

    #[test]
    fn the_config_runs_the_app_on_its_port() {
        let c = config(Path::new("/x/hello"), 8123);
        assert!(
            c.starts_with("command = [\"/x/hello\", \"--listen\", \"127.0.0.1:8123\"]\n"),
            "{c}"
        );
    }
}
