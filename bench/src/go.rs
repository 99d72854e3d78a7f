//! One Go `net/http` handler (`bench/goserver`, built offline with Debian's Go
//! and libraries by `go/offline.sh`) upgraded three ways, in the same run and
//! under the same loads: under `ally reload` through the Go package
//! (`ally.Listen`, `ally.Ready`, `ally.Serve`), upgrading itself with
//! cloudflare/tableflip as its example does (`SIGHUP` → `Upgrade`, `Ready`,
//! `Exit`, `http.Server.Shutdown`), and a plain restart (`SIGTERM` →
//! `Shutdown`, exit, start the new version, which binds the port again).
//!
//! Every upgrade writes a new version first; it is timed from its trigger until
//! the new version answers a fresh connection, and until the old process has
//! exited. `cargo bench -p ally-bench --bench go` prints the tables; the second
//! one is the Go package's state calls beside the Rust blocking client's.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ally_testkit::loadgen::{self, Tool};
use ally_testkit::{Broker, Launch, http_get, pid_alive, target_dir};
use nix::sys::signal::Signal;

use crate::load::{self, LoadConfig, Mode, StopFlag};
use crate::stats::{self, Latency, Windows};

/// How a new version of the Go server replaces the running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `ally run`, the Go package, `ally reload`.
    Ally,
    /// cloudflare/tableflip: `SIGHUP` to the running process.
    Tableflip,
    /// `SIGTERM`, wait for the exit, start the new version.
    Plain,
}

impl Mechanism {
    pub const ALL: [Mechanism; 3] = [Mechanism::Ally, Mechanism::Tableflip, Mechanism::Plain];

    pub fn label(self) -> &'static str {
        match self {
            Mechanism::Ally => "ally reload (Go package, ally.Serve)",
            Mechanism::Tableflip => "tableflip (SIGHUP → Upgrade; Exit → Shutdown)",
            Mechanism::Plain => "plain restart (SIGTERM → Shutdown, start again)",
        }
    }

    /// The goserver mode.
    fn mode(self) -> &'static str {
        match self {
            Mechanism::Ally => "ally",
            Mechanism::Tableflip => "tableflip",
            Mechanism::Plain => "plain",
        }
    }
}

/// A load: a third-party client that never retries, or ours, which records every
/// request's latency (and retries a keep-alive request the server closed
/// unanswered once, counting it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    Tool(Tool),
    Ours(Mode),
}

impl Load {
    pub const ALL: [Load; 4] = [
        Load::Tool(Tool::Ab),
        Load::Tool(Tool::AbKeepAlive),
        Load::Ours(Mode::NewConnection),
        Load::Ours(Mode::KeepAlive),
    ];
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Load::Tool(Tool::Ab) => f.write_str("ab (new connection per request)"),
            Load::Tool(tool) => write!(f, "{tool} (keep-alive)"),
            Load::Ours(Mode::NewConnection) => f.write_str("ours (new connection per request)"),
            Load::Ours(_) => f.write_str("ours (keep-alive, retries once)"),
        }
    }
}

/// The knobs of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub upgrades: u32,
    pub connections: u32,
    /// Pause after an upgrade is complete, before the next.
    pub gap: Duration,
    /// Load before the first and after the last upgrade.
    pub steady: Duration,
    pub ally: PathBuf,
    pub goserver: PathBuf,
}

/// Requests that overlap this tail after the new version answered still count as
/// in the upgrade's window (as in the other benchmarks).
const WINDOW_TAIL: Duration = Duration::from_millis(100);

/// What one mechanism measured under one load.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub mechanism: String,
    pub load: String,
    pub requests: u64,
    pub failed: u64,
    /// Requests ours sent again (`None` for a client that never retries).
    pub retried: Option<u64>,
    /// Ours only: p99 outside and inside upgrade windows.
    pub steady: Option<Latency>,
    pub window: Option<Latency>,
    /// Trigger until the new version answered, ms, per upgrade.
    pub new_answers_ms: Vec<f64>,
    /// Trigger until the old process had exited, ms, per upgrade.
    pub old_gone_ms: Vec<f64>,
    /// The upgrade after which a third-party client gave up, if it did.
    pub gave_up_after: Option<u32>,
    pub detail: String,
}

/// Why the Go rows cannot run here, or `None` if they can.
pub fn missing() -> Option<String> {
    let go = Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !go {
        return Some("`go` is not installed (apt install golang-go)".into());
    }
    for (dir, package) in [
        (
            "github.com/cloudflare/tableflip",
            "golang-github-cloudflare-tableflip-dev",
        ),
        ("github.com/godbus/dbus", "golang-dbus-dev"),
    ] {
        if !Path::new("/usr/share/gocode/src").join(dir).is_dir() {
            return Some(format!("{dir} is not installed (apt install {package})"));
        }
    }
    None
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf()
}

/// Builds `bench/goserver` with `go/offline.sh` into the target directory.
pub fn build_goserver() -> PathBuf {
    let binary = target_dir().join("ally-bench-goserver");
    let out = Command::new(repo().join("go/offline.sh"))
        .args(["build", "-o"])
        .arg(&binary)
        .arg("../bench/goserver")
        .output()
        .unwrap_or_else(|e| panic!("running go/offline.sh: {e}"));
    assert!(
        out.status.success(),
        "building bench/goserver: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

fn log_file(dir: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// The `ally run` config of the Go server on `port`.
pub fn ally_config(goserver: &Path, port: u16, version_file: &Path) -> String {
    format!(
        "command = [{:?}, \"ally\", \"--listen\", \"{}\"]\nready_timeout = \"20s\"\nstop_timeout = \"20s\"\nenvironment = {{ APP_VERSION_FILE = {:?} }}\n",
        goserver.display().to_string(),
        addr(port),
        version_file.display().to_string(),
    )
}

/// The Go server while it runs, whichever way it is upgraded.
struct Running {
    mechanism: Mechanism,
    port: u16,
    dir: tempfile::TempDir,
    version_file: PathBuf,
    goserver: PathBuf,
    broker: Option<Broker>,
    /// The process we started; reaped once it exits (tableflip's next
    /// versions are its descendants, orphaned when it exits).
    child: Option<Child>,
    /// The serving process (tableflip's moves on each upgrade).
    pid: u32,
}

impl Running {
    fn start(mechanism: Mechanism, settings: &Settings) -> Running {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let version_file = dir.path().join("version");
        std::fs::write(&version_file, "v0").expect("writing the version");
        let mut r = Running {
            mechanism,
            port: ally_testkit::free_port(),
            dir,
            version_file,
            goserver: settings.goserver.clone(),
            broker: None,
            child: None,
            pid: 0,
        };
        if mechanism == Mechanism::Ally {
            let broker = Launch::new("gobench")
                .ally(&settings.ally)
                .config(&ally_config(&r.goserver, r.port, &r.version_file))
                .log_level("warn")
                .start();
            broker.wait_running(1);
            r.broker = Some(broker);
        } else {
            r.spawn();
        }
        r.wait_for_version("v0", Instant::now());
        r
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("tableflip.pid")
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.goserver);
        cmd.args([
            self.mechanism.mode(),
            "--listen",
            &addr(self.port).to_string(),
        ]);
        if self.mechanism == Mechanism::Tableflip {
            cmd.arg("--pid-file").arg(self.pid_file());
        }
        for name in [
            "ALLY_ADDRESS",
            "ALLY_STATE_ADDRESS",
            "LISTEN_FDS",
            "LISTEN_PID",
        ] {
            cmd.env_remove(name);
        }
        let child = cmd
            .env("APP_VERSION_FILE", &self.version_file)
            .stdin(Stdio::null())
            .stdout(log_file(self.dir.path()))
            .stderr(log_file(self.dir.path()))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.goserver.display()));
        self.pid = child.id();
        self.child = Some(child);
    }

    /// Polls a fresh connection until version `version` answers; panics after 60 s.
    fn wait_for_version(&self, version: &str, since: Instant) -> Instant {
        let want = format!("hello {version} ");
        let deadline = since + Duration::from_secs(60);
        loop {
            if http_get(addr(self.port)).is_ok_and(|body| body.starts_with(&want)) {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{}: version {version} never answered; log:\n{}",
                self.mechanism.label(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn logs(&self) -> String {
        let mut text =
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        if let Some(b) = &self.broker {
            text.push_str(&b.logs());
        }
        text
    }

    fn reap(&mut self) {
        if let Some(child) = self.child.as_mut()
            && child.try_wait().ok().flatten().is_some()
        {
            self.child = None;
        }
    }

    fn wait_gone(&mut self, pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.reap();
            if !pid_alive(pid) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the old version (pid {pid}) still runs after 60 s; log:\n{}",
                self.mechanism.label(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Upgrade `n`: writes version `n`, triggers the upgrade, and returns
    /// (trigger, new version answers, old version gone).
    fn upgrade(&mut self, n: u32) -> (Instant, Instant, Instant) {
        let version = format!("v{n}");
        std::fs::write(&self.version_file, &version).expect("writing the version");
        match self.mechanism {
            Mechanism::Ally => {
                let broker = self.broker.as_ref().expect("the broker");
                let old = broker.pids("ready");
                let t0 = Instant::now();
                let out = broker.reload();
                assert!(
                    out.status.success(),
                    "ally reload {n} failed: {}{}",
                    ally_testkit::stdout(&out),
                    ally_testkit::stderr(&out)
                );
                let answers = self.wait_for_version(&version, t0);
                for pid in old {
                    self.wait_gone(pid);
                }
                (t0, answers, Instant::now())
            }
            Mechanism::Tableflip => {
                let old = self.pid;
                let t0 = Instant::now();
                ally_testkit::process::signal(old, Signal::SIGHUP);
                let answers = self.wait_for_version(&version, t0);
                // The new process writes the pid file once ready; the next
                // upgrade is refused until the old one has exited.
                let pid_file = self.pid_file();
                self.pid = ally_testkit::wait_for(
                    "tableflip's new pid in its pid file",
                    Duration::from_secs(30),
                    || {
                        let pid: u32 = std::fs::read_to_string(&pid_file)
                            .ok()?
                            .trim()
                            .parse()
                            .ok()?;
                        (pid != old).then_some(pid)
                    },
                );
                self.wait_gone(old);
                (t0, answers, Instant::now())
            }
            Mechanism::Plain => {
                let old = self.pid;
                let t0 = Instant::now();
                ally_testkit::process::signal(old, Signal::SIGTERM);
                self.wait_gone(old);
                let gone = Instant::now();
                self.spawn();
                let answers = self.wait_for_version(&version, t0);
                (t0, answers, gone)
            }
        }
    }
}

impl Drop for Running {
    /// Stops whatever runs, also after a panic: the broker (its own drop), or
    /// the serving process — SIGTERM, then SIGKILL after 30 s.
    fn drop(&mut self) {
        drop(self.broker.take());
        if self.pid == 0 {
            return;
        }
        ally_testkit::process::signal(self.pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while pid_alive(self.pid) && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(10));
        }
        if pid_alive(self.pid) {
            ally_testkit::process::signal(self.pid, Signal::SIGKILL);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The load while it runs.
enum LoadRun {
    Tool(loadgen::Generator),
    Ours {
        stop: StopFlag,
        task: tokio::task::JoinHandle<load::LoadResult>,
    },
}

/// Runs `mechanism` under `load`: a fresh server, steady load, `settings.upgrades`
/// upgrades a gap apart, steady load again.
pub fn run(
    mechanism: Mechanism,
    load: Load,
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
) -> Row {
    let mut running = Running::start(mechanism, settings);
    let start = Instant::now();
    let mut generator = match load {
        Load::Tool(tool) => LoadRun::Tool(loadgen::Generator::start(
            tool,
            &format!("http://{}/", addr(running.port)),
            settings.connections,
        )),
        Load::Ours(mode) => {
            let stop = StopFlag::default();
            let config = LoadConfig {
                mode,
                http: addr(running.port),
                grpc: addr(running.port),
                connections: settings.connections as usize,
                max_duration: Duration::from_secs(600),
                max_requests: 50_000_000,
                timeout: Duration::from_secs(5),
            };
            let task = runtime.spawn(load::run(config, stop.clone(), start));
            LoadRun::Ours { stop, task }
        }
    };
    std::thread::sleep(settings.steady);
    let mut row = Row {
        mechanism: mechanism.label().to_string(),
        load: load.to_string(),
        ..Row::default()
    };
    let (mut switches, mut whole) = (Vec::new(), Vec::new());
    let micros = |t: Instant| (t - start).as_micros() as u64;
    for n in 1..=settings.upgrades {
        let (t0, answers, gone) = running.upgrade(n);
        switches.push((micros(t0), micros(answers + WINDOW_TAIL)));
        whole.push((micros(t0), micros(answers.max(gone) + WINDOW_TAIL)));
        row.new_answers_ms
            .push((answers - t0).as_secs_f64() * 1000.0);
        row.old_gone_ms.push((gone - t0).as_secs_f64() * 1000.0);
        std::thread::sleep(settings.gap);
        if let LoadRun::Tool(g) = &mut generator
            && row.gave_up_after.is_none()
            && !g.is_running()
        {
            row.gave_up_after = Some(n);
        }
    }
    std::thread::sleep(settings.steady);
    match generator {
        LoadRun::Tool(mut g) => {
            if row.gave_up_after.is_none() && !g.is_running() {
                row.gave_up_after = Some(settings.upgrades);
            }
            let report = g.finish();
            row.requests = report.requests;
            row.failed = report.failed;
            row.detail = report.detail;
        }
        LoadRun::Ours { stop, task } => {
            stop.stop();
            let result = runtime.block_on(task).expect("the load task");
            // Steady: outside every upgrade, the old version's drain included.
            // In the window: from the trigger until the new version answered, the
            // same span for every mechanism (a drain of a second would otherwise
            // dilute one mechanism's p99 and not another's).
            let outside =
                stats::summarise(&result.samples, &Windows::new(whole), result.duration_us);
            let inside =
                stats::summarise(&result.samples, &Windows::new(switches), result.duration_us);
            row.requests = outside.requests;
            row.failed = outside.failed;
            row.retried = Some(result.retried);
            row.steady = Some(outside.steady);
            row.window = Some(inside.reload);
            row.detail = result
                .errors
                .iter()
                .chain(&result.retried_kinds)
                .map(|(class, n)| format!("{n}× {class}"))
                .collect::<Vec<_>>()
                .join("\n");
        }
    }
    drop(running);
    row
}

pub fn median_ms(values: &[f64]) -> f64 {
    ally_testkit::median(values)
}

fn max_ms(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn p99_ms(latency: Option<Latency>) -> String {
    latency.map_or("–".into(), |l| {
        format!("{:.1}", f64::from(l.p99) / 1000.0)
    })
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| Go server upgraded by | load | requests | failed | retried | steady p99 ms | in-window p99 ms | new version answers after, median (max) ms | old version gone after, median (max) ms |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let mut failed = if r.failed > 0 {
            format!("**{}**", r.failed)
        } else {
            "0".into()
        };
        if let Some(n) = r.gave_up_after {
            failed = format!("**≥ {}** (gave up by upgrade {n})", r.failed);
        }
        let _ = writeln!(
            t,
            "| {} | {} | {} | {failed} | {} | {} | {} | {:.0} ({:.0}) | {:.0} ({:.0}) |",
            r.mechanism,
            r.load,
            r.requests,
            r.retried.map_or("–".into(), |n| n.to_string()),
            p99_ms(r.steady),
            p99_ms(r.window),
            median_ms(&r.new_answers_ms),
            max_ms(&r.new_answers_ms),
            median_ms(&r.old_gone_ms),
            max_ms(&r.old_gone_ms),
        );
    }
    t
}

/// What each load said about its failures (and ours about the requests it
/// retried), one line per row that had any.
pub fn failure_details(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows
        .iter()
        .filter(|r| r.failed > 0 || r.retried.is_some_and(|n| n > 0))
    {
        let said: Vec<&str> = r
            .detail
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let _ = writeln!(out, "- {} / {}: {}", r.mechanism, r.load, said.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_runs_the_go_server_under_the_package() {
        let c = ally_config(Path::new("/x/goserver"), 8123, Path::new("/v"));
        assert!(
            c.starts_with(
                "command = [\"/x/goserver\", \"ally\", \"--listen\", \"127.0.0.1:8123\"]\n"
            ),
            "{c}"
        );
        assert!(c.contains("APP_VERSION_FILE = \"/v\""), "{c}");
    }

    #[test]
    fn the_table_marks_failures_and_a_client_that_gave_up() {
        let row = Row {
            mechanism: "plain".into(),
            load: "ab".into(),
            requests: 100,
            failed: 11,
            retried: None,
            steady: None,
            window: None,
            new_answers_ms: vec![10.0, 30.0, 20.0],
            old_gone_ms: vec![1.0, 3.0],
            gave_up_after: Some(1),
            detail: String::new(),
        };
        let t = table(&[row]);
        assert_eq!(
            t.lines().nth(2),
            Some(
                "| plain | ab | 100 | **≥ 11** (gave up by upgrade 1) | – | – | – | 20 (30) | 2 (3) |"
            )
        );
    }
}
