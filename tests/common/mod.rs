//! Shared test harness: a real `ally run` process in a temporary runtime
//! directory, the example apps, and an HTTP load generator that counts every
//! failed request.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const ALLY: &str = env!("CARGO_BIN_EXE_ally");

fn target_dir() -> PathBuf {
    // tests run from target/<profile>/deps/<name>-<hash>
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Path of an example binary, building the examples once if needed (when only
/// this package's tests were asked for, cargo did not build the client's).
pub fn example(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--examples", "--workspace"]);
        if target_dir().ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build --examples");
        assert!(status.success(), "building the examples failed");
    });
    let path = target_dir().join("examples").join(name);
    assert!(path.exists(), "no example binary at {}", path.display());
    path
}

pub fn hello() -> PathBuf {
    example("hello")
}

pub fn probe() -> PathBuf {
    example("probe")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie is gone for our purposes: it serves nothing.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("");
            state != "Z"
        }
        Err(_) => false,
    }
}

/// A broker run as its own process, as users run it.
pub struct TestBroker {
    pub app: String,
    pub dir: tempfile::TempDir,
    pub runtime_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl TestBroker {
    /// Runs `ally run APP --config <file with `config`>`.
    pub fn start(app: &str, config: &str) -> TestBroker {
        Self::start_with(app, config, &[])
    }

    pub fn start_with(app: &str, config: &str, extra: &[&str]) -> TestBroker {
        Self::start_env(app, config, extra, &[])
    }

    /// With extra `ally run` arguments and environment variables.
    pub fn start_env(app: &str, config: &str, extra: &[&str], env: &[(&str, &str)]) -> TestBroker {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join(format!("{app}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let mut args: Vec<String> = vec![
            "run".into(),
            app.into(),
            "--config".into(),
            config_path.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(app, dir, &args, env)
    }

    /// Runs `ally run APP -- COMMAND...` on the built-in defaults.
    pub fn start_command(app: &str, command: &[&str]) -> TestBroker {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = vec!["run".into(), app.into(), "--".into()];
        args.extend(command.iter().map(|s| s.to_string()));
        Self::spawn(app, dir, &args, &[])
    }

    fn spawn(
        app: &str,
        dir: tempfile::TempDir,
        args: &[String],
        env: &[(&str, &str)],
    ) -> TestBroker {
        let runtime_dir = dir.path().join("run");
        let log = dir.path().join("broker.log");
        std::fs::File::create(&log).unwrap();
        // `--` must stay last for the app's command.
        let (before, after): (Vec<String>, Vec<String>) = match args.iter().position(|a| a == "--")
        {
            Some(i) => (args[..i].to_vec(), args[i..].to_vec()),
            None => (args.to_vec(), vec![]),
        };
        let mut cmd = Command::new(ALLY);
        cmd.args(&before).arg("--runtime-dir").arg(&runtime_dir);
        if !before.iter().any(|a| a == "--bus") {
            cmd.args(["--bus", "none"]);
        }
        cmd.args(&after)
            .env("ALLY_LOG", "debug,zbus=warn")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::options().append(true).open(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap());
        let mut child = cmd.spawn().expect("spawning ally run");
        let socket = runtime_dir.join("bus");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "ally run exited ({status}) before serving:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the broker's private socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        TestBroker {
            app: app.to_string(),
            dir,
            runtime_dir,
            child: Some(child),
            log,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("bus")
    }

    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket().display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs an `ally` admin command against this broker.
    pub fn ally(&self, args: &[&str]) -> Output {
        Command::new(ALLY)
            .args(args)
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .output()
            .unwrap()
    }

    pub fn reload(&self) -> Output {
        self.ally(&["reload", &self.app])
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.ally(&["status", &self.app, "--json"]);
        assert!(
            out.status.success(),
            "ally status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn generation(&self) -> u64 {
        self.status()["generation"].as_u64().unwrap()
    }

    /// Pids of instances in `state`.
    pub fn pids(&self, state: &str) -> Vec<u32> {
        self.status()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] == state)
            .map(|i| i["pid"].as_u64().unwrap() as u32)
            .collect()
    }

    pub fn wait_running(&self, generation: u64) {
        wait_until(
            &format!("generation {generation} running"),
            Duration::from_secs(20),
            || {
                let s = self.status();
                s["state"] == "running" && s["generation"].as_u64() >= Some(generation)
            },
        );
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Sends SIGTERM and waits for the broker to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("broker already stopped");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("broker did not stop within 60s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).unwrap();
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if self.child.is_some() {
            let status = self.stop();
            if std::thread::panicking() {
                eprintln!("--- broker log ({status}) ---\n{}", self.logs());
            }
        } else if std::thread::panicking() {
            eprintln!("--- broker log ---\n{}", self.logs());
        }
    }
}

/// A hello config on `port`; `extra` lines are appended.
pub fn hello_config(port: u16, version: &str, extra: &str) -> String {
    format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\", \"--version\", {version:?}]\nstop_timeout = \"10s\"\nready_timeout = \"10s\"\n{extra}\n",
        hello().display().to_string()
    )
}

/// One HTTP/1.1 GET; returns the body.
pub fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut conn = HttpConnection::connect(addr)?;
    conn.request(true).map(|(body, _)| body)
}

pub struct HttpConnection {
    reader: BufReader<TcpStream>,
    pub requests: u64,
}

impl HttpConnection {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection {
            reader: BufReader::new(stream),
            requests: 0,
        })
    }

    /// Sends a request and reads the response: (body, server keeps the connection).
    pub fn request(&mut self, close: bool) -> std::io::Result<(String, bool)> {
        let request = if close {
            "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        } else {
            "GET / HTTP/1.1\r\nHost: test\r\n\r\n"
        };
        self.reader.get_mut().write_all(request.as_bytes())?;
        self.requests += 1;
        let mut status = String::new();
        if self.reader.read_line(&mut status)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before any response",
            ));
        }
        if !status.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("bad status line {status:?}")));
        }
        let mut length = 0usize;
        let mut keep = !close;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed inside the headers",
                ));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                keep = false;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((String::from_utf8_lossy(&body).to_string(), keep))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// A new TCP connection for every request.
    NewConnection,
    /// Keep-alive connections; a request the server never answered on a reused
    /// connection it closed is retried once on a new one, as HTTP clients do.
    KeepAlive,
}

#[derive(Debug, Default)]
pub struct LoadStats {
    pub ok: u64,
    pub failed: u64,
    pub retried: u64,
    pub errors: Vec<String>,
    pub versions: BTreeMap<String, u64>,
    pub pids: BTreeSet<u32>,
}

/// Continuous requests from worker threads until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    stats: Arc<Mutex<LoadStats>>,
}

fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

impl Load {
    pub fn start(addr: SocketAddr, mode: LoadMode, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let workers = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                let stats = stats.clone();
                std::thread::spawn(move || run_worker(addr, mode, &stop, &stats))
            })
            .collect();
        Load {
            stop,
            workers,
            stats,
        }
    }

    pub fn ok(&self) -> u64 {
        self.stats.lock().unwrap().ok
    }

    pub fn finish(self) -> LoadStats {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            w.join().unwrap();
        }
        Arc::try_unwrap(self.stats).unwrap().into_inner().unwrap()
    }
}

fn run_worker(addr: SocketAddr, mode: LoadMode, stop: &AtomicBool, stats: &Mutex<LoadStats>) {
    let mut conn: Option<HttpConnection> = None;
    while !stop.load(Ordering::SeqCst) {
        let result = match mode {
            LoadMode::NewConnection => {
                HttpConnection::connect(addr).and_then(|mut c| c.request(true))
            }
            LoadMode::KeepAlive => {
                let reused = conn.is_some();
                let attempt = match conn.take() {
                    Some(c) => Ok(c),
                    None => HttpConnection::connect(addr),
                }
                .and_then(|mut c| c.request(false).map(|r| (r, c)));
                match attempt {
                    Ok(((body, keep), c)) => {
                        if keep {
                            conn = Some(c);
                        }
                        Ok((body, keep))
                    }
                    Err(e) if reused && is_unanswered(&e) => {
                        stats.lock().unwrap().retried += 1;
                        HttpConnection::connect(addr).and_then(|mut c| {
                            let r = c.request(false)?;
                            if r.1 {
                                conn = Some(c);
                            }
                            Ok(r)
                        })
                    }
                    Err(e) => Err(e),
                }
            }
        };
        let mut s = stats.lock().unwrap();
        match result {
            Ok((body, _)) if body.starts_with("hello ") => {
                s.ok += 1;
                if let Some(v) = field(&body, "version") {
                    *s.versions.entry(v.to_string()).or_default() += 1;
                }
                if let Some(pid) = field(&body, "pid").and_then(|p| p.parse().ok()) {
                    s.pids.insert(pid);
                }
            }
            Ok((body, _)) => {
                s.failed += 1;
                s.errors.push(format!("wrong answer {body:?}"));
            }
            Err(e) => {
                s.failed += 1;
                if s.errors.len() < 20 {
                    s.errors.push(e.to_string());
                }
            }
        }
    }
}

/// The server closed a kept-alive connection without answering: the request
/// was never processed, so clients may retry it.
fn is_unanswered(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    ) && e.to_string() != "connection closed inside the headers"
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The complete JSON lines of a fixture's report; a line still being written
/// is left for the next read.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad report line {l:?}: {e}")))
        .collect()
}

/// Waits until a fixture reported `op` at least `count` times; returns the report.
pub fn wait_for_report(path: &Path, op: &str, count: usize) -> Vec<serde_json::Value> {
    wait_until(
        &format!("{count} {op} reports"),
        Duration::from_secs(10),
        || json_lines(path).iter().filter(|r| r["op"] == op).count() >= count,
    );
    json_lines(path)
}
