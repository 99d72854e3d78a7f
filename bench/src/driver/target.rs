//! The scenarios and their running servers: how each starts a server and
//! restarts it.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ally_testkit::free_port;
use ally_testkit::pid_alive as alive;
use ally_testkit::process::signal;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{Bins, Result};

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
    pub const ALLY: Scenario = Scenario::Ally {
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
pub struct Target {
    scenario: Scenario,
    bins_server: PathBuf,
    ally: PathBuf,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
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
    pub restarts_failed: u64,
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

    pub async fn start(scenario: Scenario, bins: &Bins, dir: PathBuf) -> Result<Target> {
        let (lines_tx, lines) = mpsc::unbounded_channel();
        let mut t = Target {
            scenario,
            bins_server: bins.server.clone(),
            ally: bins.ally.clone(),
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            grpc: SocketAddr::from(([127, 0, 0, 1], free_port())),
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
    pub async fn admin(&mut self) -> Result<&ally_client::Ally> {
        if self.admin.is_none() {
            let address = format!("unix:path={}", self.dir.join("run/bus").display());
            self.admin = Some(ally_client::Ally::connect(&address).await?);
        }
        Ok(self.admin.as_ref().expect("connected above"))
    }

    /// One reload or restart, the scenario's way; returns once the new server serves.
    pub async fn restart(&mut self) -> Result<()> {
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

    pub async fn broker_pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub async fn stop(mut self) {
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
