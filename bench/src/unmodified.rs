//! Servers that were never written for Ally (gunicorn, puma), reloaded under
//! `ally reload` and, in the same run and under the same load, the way their
//! users reload them today: gunicorn's binary upgrade (`USR2`, then `WINCH` and
//! `QUIT` to the old master) and `HUP`; puma's phased (`USR1`) and hot (`USR2`)
//! restart; and a parent that holds the socket and stops the old server before
//! it starts the new one (systemd socket activation's model).
//!
//! Every reload writes a new version first; a reload is timed from its trigger
//! until the new version answers a fresh connection, and until every process
//! of the old version has exited. `cargo bench -p ally-bench --bench unmodified`
//! prints the table.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ally_testkit::unmodified::{Build, Server, fixtures};
use ally_testkit::{Broker, Launch, http_get, pid_alive, wait_until};
use nix::sys::signal::Signal;

use crate::load::{self, LoadConfig, Mode, StopFlag};
use crate::stats::{self, Latency, Windows};

/// How a new version replaces the running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `ally run` with `sockets = "listen-fds"`, `ready = "notify"`; `ally reload`.
    Ally,
    /// `USR2` to the master, and once the new master serves, `WINCH` then `QUIT`
    /// to the old one (gunicorn's "upgrading to a new binary on the fly"; it
    /// runs as a daemon, since gunicorn ignores `WINCH` otherwise).
    GunicornUsr2,
    /// `HUP` to the master: new workers with the app loaded again, then the old
    /// workers stopped gracefully.
    GunicornHup,
    /// `USR1` to the master: the workers replaced one by one.
    PumaPhased,
    /// `USR2` to the master: it stops its workers and execs itself again.
    PumaHot,
    /// A parent holds the socket and hands it over `LISTEN_FDS`: it stops the old
    /// server (SIGTERM, waits for it to exit) and then starts the new one.
    StopStart,
}

impl Mechanism {
    pub fn label(self) -> &'static str {
        match self {
            Mechanism::Ally => "ally reload (listen-fds, notify)",
            Mechanism::GunicornUsr2 => "own upgrade (daemon): USR2, then WINCH + QUIT old master",
            Mechanism::GunicornHup => "own reload: HUP",
            Mechanism::PumaPhased => "own phased restart: USR1",
            Mechanism::PumaHot => "own hot restart: USR2",
            Mechanism::StopStart => "socket-holding parent: stop, then start",
        }
    }
}

/// A server and a way to reload it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub server: Server,
    pub mechanism: Mechanism,
}

/// Every case, in the order of the table.
pub const CASES: [Case; 8] = [
    Case {
        server: Server::Gunicorn,
        mechanism: Mechanism::Ally,
    },
    Case {
        server: Server::Gunicorn,
        mechanism: Mechanism::GunicornUsr2,
    },
    Case {
        server: Server::Gunicorn,
        mechanism: Mechanism::GunicornHup,
    },
    Case {
        server: Server::Gunicorn,
        mechanism: Mechanism::StopStart,
    },
    Case {
        server: Server::Puma,
        mechanism: Mechanism::Ally,
    },
    Case {
        server: Server::Puma,
        mechanism: Mechanism::PumaPhased,
    },
    Case {
        server: Server::Puma,
        mechanism: Mechanism::PumaHot,
    },
    Case {
        server: Server::Puma,
        mechanism: Mechanism::StopStart,
    },
];

/// The knobs of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub reloads: u32,
    pub connections: usize,
    /// Pause after a reload is complete, before the next.
    pub gap: Duration,
    /// Load before the first and after the last reload.
    pub steady: Duration,
    pub ally: PathBuf,
}

/// After a reload is complete, requests that overlap this tail still count as
/// in the window (as in the main benchmark).
const WINDOW_TAIL: Duration = Duration::from_millis(100);

/// What one case measured under one load.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub server: String,
    pub mechanism: String,
    pub mode: String,
    pub requests: u64,
    pub failed: u64,
    /// Keep-alive requests the server closed the connection on without answering,
    /// sent again on a new connection (as HTTP clients do).
    pub retried: u64,
    pub steady: Latency,
    pub window: Latency,
    /// Trigger until the new version answered, ms, per reload.
    pub new_answers_ms: Vec<f64>,
    /// Trigger until every process of the old version had exited, ms, per reload.
    pub old_gone_ms: Vec<f64>,
    pub errors: Vec<String>,
}

/// The server while it runs, whichever way it is reloaded.
struct Running {
    case: Case,
    port: u16,
    dir: tempfile::TempDir,
    version_file: PathBuf,
    broker: Option<Broker>,
    /// The process we started (the first master, or the current server of
    /// [`Mechanism::StopStart`]); reaped as it exits.
    child: Option<Child>,
    /// The current master's pid (gunicorn's moves on each `USR2`).
    master: u32,
    /// The socket [`Mechanism::StopStart`] holds.
    held: Option<OwnedFd>,
}

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// `pid` and every process below it.
fn tree(pid: u32) -> Vec<u32> {
    // pid 0 would be the whole machine (and kill(0) our own process group).
    assert!(pid > 0, "no process tree of pid 0");
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            if let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
            {
                parents.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

fn children(pid: u32) -> Vec<u32> {
    tree(pid)
        .into_iter()
        .filter(|&p| p != pid && parent_of(p) == Some(pid))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn send(pid: u32, signal: Signal) {
    ally_testkit::process::signal(pid, signal);
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

impl Running {
    fn start(case: Case, settings: &Settings) -> Running {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let version_file = dir.path().join("version");
        std::fs::write(&version_file, "v0").expect("writing the version");
        let port = ally_testkit::free_port();
        let mut r = Running {
            case,
            port,
            dir,
            version_file,
            broker: None,
            child: None,
            master: 0,
            held: None,
        };
        let fx = fixtures();
        match case.mechanism {
            Mechanism::Ally => {
                let broker = Launch::new("web")
                    .ally(&settings.ally)
                    .config(&case.server.config(port, &r.version_file, Build::Good))
                    .log_level("warn")
                    .start();
                broker.wait_running(1);
                r.broker = Some(broker);
            }
            Mechanism::GunicornUsr2 | Mechanism::GunicornHup => {
                // No --preload: HUP loads the app again only without it.
                let mut cmd = Command::new("gunicorn");
                cmd.args(["--workers", "2", "--bind", &addr(port).to_string(), "--pid"])
                    .arg(r.dir.path().join("gunicorn.pid"))
                    .arg("--chdir")
                    .arg(fx.join("gunicorn"));
                if case.mechanism == Mechanism::GunicornUsr2 {
                    // gunicorn ignores WINCH unless it runs as a daemon.
                    cmd.arg("--daemon")
                        .arg("--error-logfile")
                        .arg(r.dir.path().join("server.log"));
                }
                cmd.arg("wsgi_app:application");
                r.spawn(cmd);
            }
            Mechanism::PumaPhased | Mechanism::PumaHot => {
                // As under Ally (threads, puma.rb), but no --preload: a phased
                // restart needs the workers to load the app.
                let mut cmd = Command::new("puma");
                cmd.args(["--workers", "2", "--threads", "16:16"])
                    .args(["--environment", "production", "--config"])
                    .arg(fx.join("puma/puma.rb"))
                    .arg("--bind")
                    .arg(format!("tcp://{}", addr(port)))
                    .arg(fx.join("puma/config.ru"));
                r.spawn(cmd);
            }
            Mechanism::StopStart => {
                let listener = TcpListener::bind(addr(port)).expect("binding the held socket");
                r.held = Some(listener.into());
                r.spawn_inheriting();
            }
        }
        r.wait_for_version("v0", Instant::now());
        if case.mechanism == Mechanism::GunicornUsr2 {
            let pidfile = r.dir.path().join("gunicorn.pid");
            r.master =
                ally_testkit::wait_for("gunicorn's pid file", Duration::from_secs(30), || {
                    std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
                });
        }
        r
    }

    fn spawn(&mut self, mut cmd: Command) {
        if self.held.is_none() {
            cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
        }
        cmd.env("APP_VERSION_FILE", &self.version_file)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log_file(self.dir.path(), "server.log"))
            .stderr(log_file(self.dir.path(), "server.log"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.case.server.label()));
        self.master = child.id();
        self.child = Some(child);
    }

    /// The server's command as under Ally, on fd 3 with `LISTEN_FDS=1` and its
    /// own pid in `LISTEN_PID` (set by a shell that then execs the server).
    fn spawn_inheriting(&mut self) {
        let command = self.case.server.command(Build::Good);
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "LISTEN_PID=$$ exec \"$@\"", "sh"])
            .args(&command)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "http");
        let fd = self.held.as_ref().expect("the held socket").as_raw_fd();
        // SAFETY: only dup2, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.spawn(cmd);
    }

    /// Polls a fresh connection until version `version` answers; panics after
    /// 60 s. Returns when it did.
    fn wait_for_version(&self, version: &str, since: Instant) -> Instant {
        let want = format!("hello {version} ");
        let deadline = since + Duration::from_secs(60);
        loop {
            if http_get(addr(self.port)).is_ok_and(|body| body.starts_with(&want)) {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{} / {}: version {version} never answered; server log:\n{}",
                self.case.server.label(),
                self.case.mechanism.label(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
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

    fn wait_gone(&mut self, pids: &[u32], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.reap();
            if pids.iter().all(|&p| !pid_alive(p)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} still running after 60 s: {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reload `n`: writes version `n`, triggers the reload the case's way, and
    /// returns (trigger, new version answers, old version gone).
    fn reload(&mut self, n: u32) -> (Instant, Instant, Instant) {
        let version = format!("v{n}");
        std::fs::write(&self.version_file, &version).expect("writing the version");
        match self.case.mechanism {
            Mechanism::Ally => {
                let broker = self.broker.as_ref().expect("the broker");
                let old: Vec<u32> = broker.pids("ready").into_iter().flat_map(tree).collect();
                let t0 = Instant::now();
                let out = broker.reload();
                assert!(
                    out.status.success(),
                    "ally reload {n} failed: {}{}",
                    ally_testkit::stdout(&out),
                    ally_testkit::stderr(&out)
                );
                let answers = self.wait_for_version(&version, t0);
                self.wait_gone(&old, "the old generation");
                (t0, answers, Instant::now())
            }
            Mechanism::GunicornUsr2 => {
                let old_master = self.master;
                let old = tree(old_master);
                let pidfile = self.dir.path().join("gunicorn.pid");
                let pidfile2 = self.dir.path().join("gunicorn.pid.2");
                let t0 = Instant::now();
                send(old_master, Signal::SIGUSR2);
                let answers = self.wait_for_version(&version, t0);
                let new_master: u32 = ally_testkit::wait_for(
                    "the new master's pid file",
                    Duration::from_secs(30),
                    || std::fs::read_to_string(&pidfile2).ok()?.trim().parse().ok(),
                );
                send(old_master, Signal::SIGWINCH);
                let old_workers: Vec<u32> =
                    old.iter().copied().filter(|&p| p != old_master).collect();
                self.wait_gone(&old_workers, "the old workers");
                send(old_master, Signal::SIGQUIT);
                self.wait_gone(&old, "the old master");
                let gone = Instant::now();
                // The new master takes the pid file once it sees its parent gone;
                // only then does it accept the next USR2.
                wait_until(
                    "the new master to be promoted",
                    Duration::from_secs(30),
                    || {
                        std::fs::read_to_string(&pidfile)
                            .is_ok_and(|p| p.trim() == new_master.to_string())
                    },
                );
                self.master = new_master;
                (t0, answers, gone)
            }
            Mechanism::GunicornHup | Mechanism::PumaPhased | Mechanism::PumaHot => {
                let old = children(self.master);
                let signal = match self.case.mechanism {
                    Mechanism::GunicornHup => Signal::SIGHUP,
                    Mechanism::PumaPhased => Signal::SIGUSR1,
                    _ => Signal::SIGUSR2,
                };
                let t0 = Instant::now();
                send(self.master, signal);
                let answers = self.wait_for_version(&version, t0);
                self.wait_gone(&old, "the old workers");
                (t0, answers, Instant::now())
            }
            Mechanism::StopStart => {
                let mut old = self.child.take().expect("the running server");
                let t0 = Instant::now();
                send(old.id(), Signal::SIGTERM);
                let _ = old.wait();
                let gone = Instant::now();
                self.spawn_inheriting();
                let answers = self.wait_for_version(&version, t0);
                (t0, answers, gone)
            }
        }
    }
}

impl Drop for Running {
    /// Stops whatever runs, also when a reload panicked: the broker (its own
    /// drop), or the server's whole tree — SIGTERM, then SIGKILL after 30 s.
    fn drop(&mut self) {
        drop(self.broker.take());
        if self.master == 0 {
            return;
        }
        let everything = tree(self.master);
        send(self.master, Signal::SIGTERM);
        if let Some(mut child) = self.child.take() {
            let _ = ally_testkit::process::wait_exit(&mut child, Duration::from_secs(30));
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while everything.iter().any(|&p| pid_alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in everything {
            if pid_alive(p) {
                send(p, Signal::SIGKILL);
            }
        }
    }
}

/// Runs `case` under each of `modes` in turn: a fresh server per mode, steady
/// load, `settings.reloads` reloads a gap apart, steady load again.
pub fn run(case: Case, modes: &[Mode], settings: &Settings) -> Vec<Row> {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    modes
        .iter()
        .map(|&mode| {
            let mut running = Running::start(case, settings);
            let stop = StopFlag::default();
            let start = Instant::now();
            let config = LoadConfig {
                mode,
                http: addr(running.port),
                grpc: addr(running.port),
                connections: settings.connections,
                max_duration: Duration::from_secs(600),
                max_requests: 50_000_000,
                timeout: Duration::from_secs(5),
            };
            let load = runtime.spawn(load::run(config, stop.clone(), start));
            std::thread::sleep(settings.steady);
            let (mut windows, mut new_answers_ms, mut old_gone_ms) =
                (Vec::new(), Vec::new(), Vec::new());
            for n in 1..=settings.reloads {
                let (t0, answers, gone) = running.reload(n);
                let end = answers.max(gone) + WINDOW_TAIL;
                windows.push((
                    (t0 - start).as_micros() as u64,
                    (end - start).as_micros() as u64,
                ));
                new_answers_ms.push((answers - t0).as_secs_f64() * 1000.0);
                old_gone_ms.push((gone - t0).as_secs_f64() * 1000.0);
                std::thread::sleep(settings.gap);
            }
            std::thread::sleep(settings.steady);
            stop.stop();
            let result = runtime.block_on(load).expect("the load task");
            drop(running);
            let summary =
                stats::summarise(&result.samples, &Windows::new(windows), result.duration_us);
            Row {
                server: case.server.label().to_string(),
                mechanism: case.mechanism.label().to_string(),
                mode: mode.name().to_string(),
                requests: summary.requests,
                failed: summary.failed,
                retried: result.retried,
                steady: summary.steady,
                window: summary.reload,
                new_answers_ms,
                old_gone_ms,
                errors: result
                    .errors
                    .iter()
                    .map(|(class, n)| format!("{n}× {class}"))
                    .collect(),
            }
        })
        .collect()
}

fn median_ms(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn max_ms(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| server | reloaded by | load | requests | failed | retried | steady p99 ms | in-window p99 ms | new version answers after, median (max) ms | old version gone after, median (max) ms |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let failed = if r.failed > 0 {
            format!("**{}**", r.failed)
        } else {
            "0".into()
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {failed} | {} | {:.1} | {:.1} | {:.0} ({:.0}) | {:.0} ({:.0}) |",
            r.server,
            r.mechanism,
            r.mode,
            r.requests,
            r.retried,
            f64::from(r.steady.p99) / 1000.0,
            f64::from(r.window.p99) / 1000.0,
            median_ms(&r.new_answers_ms),
            max_ms(&r.new_answers_ms),
            median_ms(&r.old_gone_ms),
            max_ms(&r.old_gone_ms),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_of_this_process_holds_its_children() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let me = std::process::id();
        assert!(tree(me).contains(&child.id()));
        assert!(children(me).contains(&child.id()));
        assert_eq!(tree(child.id()), vec![child.id()]);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn the_table_marks_failures() {
        let row = Row {
            server: "gunicorn".into(),
            mechanism: "HUP".into(),
            mode: "http-new-conn".into(),
            requests: 100,
            failed: 2,
            retried: 0,
            steady: Latency {
                count: 90,
                p50: 500,
                p99: 1500,
                max: 2000,
            },
            window: Latency {
                count: 8,
                p50: 600,
                p99: 25_000,
                max: 30_000,
            },
            new_answers_ms: vec![10.0, 30.0, 20.0],
            old_gone_ms: vec![100.0, 300.0],
            errors: vec![],
        };
        let t = table(&[row]);
        assert_eq!(
            t.lines().nth(2),
            Some(
                "| gunicorn | HUP | http-new-conn | 100 | **2** | 0 | 1.5 | 25.0 | 20 (30) | 200 (300) |"
            )
        );
    }
}
