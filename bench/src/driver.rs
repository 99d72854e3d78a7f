//! Scenarios: start a server the scenario's way, put it under load, restart it
//! the scenario's way, measure.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ally_bench::load::{self, LoadConfig, LoadResult, Mode, StopFlag};
use ally_bench::report::{self, Row, SoakPoint, Usage};
use ally_bench::stats::{self, Windows};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

/// The tail added to a reload's duration to make its window.
const WINDOW_TAIL: Duration = Duration::from_millis(100);
const STEADY_BEFORE: Duration = Duration::from_secs(2);
const STEADY_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// `ally run` + `ally reload`; gRPC servers use `ally_client::drain` unless
    /// `plain_grpc`; `idle_start` sets `start_priority = "idle"`.
    Ally { plain_grpc: bool, idle_start: bool },
    /// Stop, then start a process that binds the port itself.
    Restart,
    /// A parent holds the sockets; stop the child, then start the next one on them.
    Parent,
    /// The new process binds with `SO_REUSEPORT`, then the old one is stopped.
    ReusePort,
    /// The server restarts itself with the `shellflip` crate.
    Shellflip,
}

impl Scenario {
    /// Ally on its defaults.
    const ALLY: Scenario = Scenario::Ally {
        plain_grpc: false,
        idle_start: false,
    };

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ally {
                plain_grpc: false,
                idle_start: false,
            } => "ally reload",
            Scenario::Ally {
                plain_grpc: false,
                idle_start: true,
            } => "ally reload, start_priority = idle",
            Scenario::Ally {
                plain_grpc: true, ..
            } => "ally reload, gRPC without drain helper",
            Scenario::Restart => "plain restart (stop, start)",
            Scenario::Parent => "socket-holding parent (stop, start)",
            Scenario::ReusePort => "SO_REUSEPORT handover",
            Scenario::Shellflip => "shellflip",
        }
    }
}

#[derive(Debug, Clone)]
struct Settings {
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

struct Bins {
    ally: PathBuf,
    server: PathBuf,
}

fn bins() -> Result<Bins> {
    let dir = std::env::current_exe()?
        .parent()
        .ok_or("no exe dir")?
        .to_path_buf();
    let release = dir.ends_with("release");
    // `cargo run -p ally-bench` builds only this package: build the broker too, so
    // the run measures the broker of this tree.
    if let Ok(cargo) = std::env::var("CARGO") {
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "ally",
            "--bin",
            "ally",
            "-p",
            "ally-bench",
            "--bin",
            "bench-server",
        ]);
        if release {
            cmd.arg("--release");
        }
        if !cmd.status()?.success() {
            return Err("building ally and bench-server failed".into());
        }
    }
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

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A spawned process whose stdout lines arrive on `lines`.
fn spawn_with_lines(mut cmd: Command, lines: &mpsc::UnboundedSender<String>) -> Result<Child> {
    cmd.stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let tx = lines.clone();
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let _ = tx.send(line);
        }
    });
    Ok(child)
}

/// Waits for the next `ready pid=N` line; returns N.
async fn next_ready(lines: &mut mpsc::UnboundedReceiver<String>, timeout: Duration) -> Result<u32> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Err(_) => return Err("no server became ready in time".into()),
            Ok(None) => return Err("server output closed".into()),
            Ok(Some(line)) => {
                if let Some(pid) = line.strip_prefix("ready pid=") {
                    return Ok(pid.trim().parse()?);
                }
            }
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// SIGTERM, then wait (up to 20 s, then SIGKILL).
async fn stop_child(mut child: Child) {
    if let Some(pid) = child.id() {
        signal(pid, nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// The running server(s) of one scenario and how to restart them.
struct Target {
    scenario: Scenario,
    bins_server: PathBuf,
    ally: PathBuf,
    http: SocketAddr,
    grpc: SocketAddr,
    dir: PathBuf,
    lines_tx: mpsc::UnboundedSender<String>,
    lines: mpsc::UnboundedReceiver<String>,
    /// The broker (Ally) or the current server process (others).
    child: Option<Child>,
    /// Processes on their way out (reuseport).
    leaving: Vec<tokio::task::JoinHandle<()>>,
    /// Sockets held by the parent (Parent scenario).
    held: Vec<OwnedFd>,
    /// Every server pid seen (shellflip spawns its own).
    pids: Vec<u32>,
    restarts_failed: u64,
    /// An admin connection to the broker (Ally), made at the first reload.
    admin: Option<ally_client::Ally>,
}

impl Target {
    fn server_cmd(&self, mode: &str) -> Command {
        let mut cmd = Command::new(&self.bins_server);
        cmd.args([
            "--mode",
            mode,
            "--http",
            &self.http.to_string(),
            "--grpc",
            &self.grpc.to_string(),
        ]);
        cmd.args([
            "--shellflip-socket",
            &self.dir.join("shellflip.sock").display().to_string(),
        ]);
        cmd.env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        cmd
    }

    async fn start(scenario: Scenario, bins: &Bins, dir: PathBuf) -> Result<Target> {
        let (lines_tx, lines) = mpsc::unbounded_channel();
        let mut t = Target {
            scenario,
            bins_server: bins.server.clone(),
            ally: bins.ally.clone(),
            http: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            grpc: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            dir,
            lines_tx,
            lines,
            child: None,
            leaving: Vec::new(),
            held: Vec::new(),
            pids: Vec::new(),
            restarts_failed: 0,
            admin: None,
        };
        match scenario {
            Scenario::Ally {
                plain_grpc,
                idle_start,
            } => {
                let config = t.dir.join("bench.toml");
                let command = [
                    t.bins_server.display().to_string(),
                    "--mode".into(),
                    "ally".into(),
                    "--http".into(),
                    t.http.to_string(),
                    "--grpc".into(),
                    t.grpc.to_string(),
                    "--grpc-stop".into(),
                    if plain_grpc { "plain" } else { "drain" }.into(),
                ];
                std::fs::write(
                    &config,
                    format!(
                        "command = {command:?}\nstop_timeout = \"20s\"\nready_timeout = \"20s\"\nmax_draining = 32\nstart_priority = \"{}\"\n",
                        if idle_start { "idle" } else { "normal" }
                    ),
                )?;
                let mut cmd = Command::new(&t.ally);
                cmd.args(["run", "bench", "--config"])
                    .arg(&config)
                    .arg("--runtime-dir")
                    .arg(t.dir.join("run"))
                    .args(["--bus", "none"])
                    .env("ALLY_LOG", "warn")
                    .env_remove("NOTIFY_SOCKET")
                    .env_remove("DBUS_SESSION_BUS_ADDRESS")
                    .stderr(std::fs::File::create(t.dir.join("broker.log"))?);
                t.child = Some(spawn_with_lines(cmd, &t.lines_tx)?);
            }
            Scenario::Restart => {
                t.child = Some(spawn_with_lines(t.server_cmd("bind"), &t.lines_tx)?)
            }
            Scenario::ReusePort => {
                t.child = Some(spawn_with_lines(t.server_cmd("reuseport"), &t.lines_tx)?)
            }
            Scenario::Shellflip => {
                t.child = Some(spawn_with_lines(t.server_cmd("shellflip"), &t.lines_tx)?)
            }
            Scenario::Parent => {
                for addr in [t.http, t.grpc] {
                    let socket = socket2::Socket::new(
                        socket2::Domain::IPV4,
                        socket2::Type::STREAM.cloexec(),
                        None,
                    )?;
                    socket.set_reuse_address(true)?;
                    socket.bind(&addr.into())?;
                    socket.listen(1024)?;
                    t.held.push(socket.into());
                }
                t.child = Some(t.spawn_inheriting()?);
            }
        }
        let pid = next_ready(&mut t.lines, Duration::from_secs(20)).await?;
        t.pids.push(pid);
        Ok(t)
    }

    fn spawn_inheriting(&self) -> Result<Child> {
        let mut cmd = self.server_cmd("inherit");
        cmd.env("LISTEN_FDS", "2");
        let fds: Vec<i32> = self.held.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for (i, &fd) in fds.iter().enumerate() {
                    let target = 3 + i as i32;
                    // dup2 clears close-on-exec on the new fd; the held fds are
                    // above 4, so no source is overwritten before it is copied.
                    if libc::dup2(fd, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        spawn_with_lines(cmd, &self.lines_tx)
    }

    /// The admin connection to the broker, made on first use.
    async fn admin(&mut self) -> Result<&ally_client::Ally> {
        if self.admin.is_none() {
            let address = format!("unix:path={}", self.dir.join("run/bus").display());
            self.admin = Some(ally_client::Ally::connect(&address).await?);
        }
        Ok(self.admin.as_ref().expect("connected above"))
    }

    /// One reload or restart, the scenario's way; returns once the new server serves.
    async fn restart(&mut self) -> Result<()> {
        let ready_timeout = Duration::from_secs(30);
        match self.scenario {
            Scenario::Ally { .. } => {
                // D-Bus `Reload`, as a deploy tool would call it; `ally reload`
                // makes the same call but adds a process start to every window.
                let admin = self.admin().await?;
                admin.reload().await.map_err(|e| format!("Reload: {e}"))?;
            }
            Scenario::Restart | Scenario::Parent => {
                if let Some(old) = self.child.take() {
                    stop_child(old).await;
                }
                self.child = Some(if self.scenario == Scenario::Parent {
                    self.spawn_inheriting()?
                } else {
                    spawn_with_lines(self.server_cmd("bind"), &self.lines_tx)?
                });
                let pid = next_ready(&mut self.lines, ready_timeout).await?;
                self.pids.push(pid);
            }
            Scenario::ReusePort => {
                let new = spawn_with_lines(self.server_cmd("reuseport"), &self.lines_tx)?;
                let pid = next_ready(&mut self.lines, ready_timeout).await?;
                self.pids.push(pid);
                if let Some(old) = self.child.replace(new) {
                    self.leaving.push(tokio::spawn(stop_child(old)));
                }
            }
            Scenario::Shellflip => {
                let config = shellflip::RestartConfig {
                    enabled: true,
                    coordination_socket_path: self.dir.join("shellflip.sock"),
                    ..Default::default()
                };
                let pid = tokio::time::timeout(ready_timeout, config.request_restart())
                    .await
                    .map_err(|_| "shellflip restart timed out")?
                    .map_err(|e| format!("shellflip restart: {e}"))?;
                self.pids.push(pid);
                // Its ready line, to keep the channel in step.
                let _ = next_ready(&mut self.lines, ready_timeout).await;
            }
        }
        Ok(())
    }

    async fn broker_pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    async fn stop(mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child).await;
        }
        for task in self.leaving.drain(..) {
            let _ = task.await;
        }
        // Shellflip successors are not our children: stop them by pid.
        let deadline = Instant::now() + Duration::from_secs(20);
        for &pid in &self.pids {
            if alive(pid) {
                signal(pid, nix::sys::signal::Signal::SIGTERM);
            }
        }
        while self.pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for &pid in &self.pids {
            if alive(pid) {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

async fn run_scenario(
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
    let config = LoadConfig {
        mode,
        http: target.http,
        grpc: target.grpc,
        connections: s.connections,
        // Generous bound: restarts that take 2 s each and then some.
        max_duration: STEADY_BEFORE
            + STEADY_AFTER
            + (s.gap + Duration::from_secs(2)) * restarts as u32
            + Duration::from_secs(30),
        max_requests: 50_000_000,
        timeout: Duration::from_secs(5),
    };
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
async fn datapath(bins: &Bins, s: &Settings) -> Result<report::DataPath> {
    let mut ally = Vec::new();
    let mut own = Vec::new();
    for round in 0..s.datapath_rounds {
        for scenario in [Scenario::ALLY, Scenario::Restart] {
            let dir = tempdir()?;
            let target = Target::start(scenario, bins, dir.clone()).await?;
            let start = Instant::now();
            let config = LoadConfig {
                mode: Mode::KeepAlive,
                http: target.http,
                grpc: target.grpc,
                connections: s.connections,
                max_duration: Duration::from_secs(s.datapath_secs),
                max_requests: 50_000_000,
                timeout: Duration::from_secs(5),
            };
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Usage {
        rss_kib: kib("VmRSS:"),
        anon_kib: kib("RssAnon:"),
        file_kib: kib("RssFile:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64),
        cpu_ms: cpu_ms(pid),
    }
}

/// CPU time a process has used (user + system), ms.
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    fields.iter().sum::<u64>() * 1000 / ticks
}

/// Ally reloads back to back under keep-alive load; broker RSS and fds every 100.
async fn soak(bins: &Bins, s: &Settings) -> Result<Vec<SoakPoint>> {
    let dir = tempdir()?;
    let mut target = Target::start(Scenario::ALLY, bins, dir.clone()).await?;
    let pid = target.broker_pid().await.ok_or("no broker pid")?;
    let stop = StopFlag::default();
    let start = Instant::now();
    let config = LoadConfig {
        mode: Mode::KeepAlive,
        http: target.http,
        grpc: target.grpc,
        connections: s.connections,
        max_duration: Duration::from_secs(60) + Duration::from_millis(500) * s.soak_reloads as u32,
        max_requests: 100_000_000,
        timeout: Duration::from_secs(5),
    };
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
