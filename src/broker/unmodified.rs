//! What apps that were never written for Ally get and say: the `[[listen]]`
//! sockets handed over as systemd would (`sockets = "listen-fds"`), an
//! `sd_notify` socket of each instance's own (`ready = "notify"`), readiness
//! after a delay or a probe, and the watchdog.
//!
//! A notification socket belongs to one instance: whatever process writes to
//! it — a shell wrapper's `systemd-notify --ready`, a forked master, a worker —
//! speaks for that instance, with none of the guessing by pid that systemd's
//! `NotifyAccess=all` does. It lives in the broker's runtime directory (which
//! no one else can write to) and only the instance's user may send to it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::sync::watch;

use super::{Broker, Life, Settings};
use crate::config::{PROBE_INTERVAL, PROBE_TIMEOUT, Readiness, Sockets};
use crate::generations::{Generation, InstanceId, InstanceState};
use crate::instance::Handed;
use crate::notify::{self, Field};
use crate::process::Process;

/// What an instance said about itself on its notification socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    /// `STATUS=`.
    pub status: Option<String>,
    /// `STOPPING=1`.
    pub stopping: bool,
    /// `ERRNO=`.
    pub errno: Option<i32>,
    /// `MAINPID=`, once accepted.
    pub main_pid: Option<u32>,
}

impl Reported {
    /// What it said that explains a failed start: `STATUS=` and `ERRNO=`.
    pub fn explanation(&self) -> Option<String> {
        let mut said = Vec::new();
        if let Some(status) = &self.status {
            said.push(format!("STATUS={status:?}"));
        }
        if let Some(errno) = self.errno {
            let name = nix::errno::Errno::from_raw(errno);
            said.push(format!("ERRNO={errno} ({})", name.desc()));
        }
        (!said.is_empty()).then(|| format!("it said {}", said.join(", ")))
    }
}

/// An instance's notification socket, read by its receiver task and, when
/// its first process exits, by the reaper.
pub(super) struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    /// Held while a datagram is read and applied; its buffer.
    reading: std::sync::Mutex<Vec<u8>>,
}

impl Watchdog {
    /// The watchdog of an instance started (or taken over) now, if its config
    /// sets one.
    pub(super) fn fresh(config: &crate::config::Config) -> Option<watch::Sender<Watchdog>> {
        config.watchdog.map(|timeout| {
            watch::channel(Watchdog {
                timeout,
                last: tokio::time::Instant::now(),
                triggered: false,
            })
            .0
        })
    }
}

impl NotifySocket {
    /// The socket a re-exec carried.
    pub(super) fn from_fd(fd: std::os::fd::OwnedFd) -> io::Result<Arc<NotifySocket>> {
        let socket = std::os::unix::net::UnixDatagram::from(fd);
        socket.set_nonblocking(true)?;
        Ok(Arc::new(NotifySocket {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            reading: std::sync::Mutex::new(vec![0u8; notify::MAX_DATAGRAM + 1]),
        }))
    }

    pub(super) fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.socket)
    }
}

/// Watchdog pings and the timeout they keep.
#[derive(Debug, Clone, Copy)]
pub(super) struct Watchdog {
    pub timeout: Duration,
    pub last: tokio::time::Instant,
    pub triggered: bool,
}

/// A notification datagram and the fds that came with it, which are closed.
const CMSG_SPACE: usize = 256;

impl Broker {
    /// What an instance of `settings` is handed at its spawn.
    pub(super) fn hand(&self, settings: &Settings, id: InstanceId) -> Result<Handed, String> {
        let config = &settings.config;
        let mut handed = Handed {
            watchdog: config.watchdog,
            ..Handed::default()
        };
        if config.sockets == Sockets::ListenFds {
            let shared = self.lock();
            for entry in &config.listen {
                let held = shared
                    .listeners
                    .get(&entry.addr)
                    .ok_or_else(|| format!("the socket for {} is not open", entry.addr))?;
                let fd = super::sockets::dup(&held.fd).map_err(|e| e.to_string())?;
                handed.sockets.push((fd, entry.fd_name()));
            }
        }
        if config.ready == Readiness::Notify {
            handed.notify_socket = Some(self.notify_socket_path(id)?);
        }
        Ok(handed)
    }

    pub(super) fn notify_socket_path(&self, id: InstanceId) -> Result<PathBuf, String> {
        let files = self.socket_files.lock().unwrap_or_else(|p| p.into_inner());
        let (dir, _) = files.as_ref().ok_or(
            "ready = \"notify\" needs the broker's runtime directory, and it has none yet",
        )?;
        Ok(dir.join(format!("notify-{id}")))
    }

    /// Binds the notification socket of instance `id`, for its user alone.
    pub(super) fn open_notify_socket(
        &self,
        settings: &Settings,
        path: &Path,
    ) -> io::Result<Arc<NotifySocket>> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = UnixDatagram::bind(path)?;
        let run_as = &settings.launch.run_as;
        let owner = run_as.switch.then_some((run_as.uid, run_as.gid));
        crate::runtime_dir::set_socket_owner(path, owner)?;
        socket.set_nonblocking(true)?;
        Ok(Arc::new(NotifySocket {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            reading: std::sync::Mutex::new(vec![0u8; notify::MAX_DATAGRAM + 1]),
        }))
    }

    /// Applies what instance `id` sends on `socket` until it has exited; then
    /// removes the socket's file.
    pub(super) async fn receive_notifications(
        self: Arc<Self>,
        id: InstanceId,
        socket: Arc<NotifySocket>,
        path: PathBuf,
        mut life: watch::Receiver<Life>,
    ) {
        loop {
            tokio::select! {
                () = exited(&mut life) => break,
                received = socket.socket.async_io(Interest::READABLE, || self.take_one(id, &socket)) => {
                    if let Err(e) = received {
                        tracing::warn!(instance = id, "cannot read the notification socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Reads and applies one datagram, under the socket's lock: a datagram is
    /// never out of the queue without having been applied.
    fn take_one(&self, id: InstanceId, socket: &NotifySocket) -> io::Result<()> {
        let mut buf = socket.reading.lock().unwrap_or_else(|p| p.into_inner());
        let len = receive(&socket.socket, &mut buf)?;
        self.handle_datagram(id, &buf[..len.min(buf.len())]);
        Ok(())
    }

    /// Applies the datagrams already queued on instance `id`'s socket, and
    /// waits for one being applied: its first process has exited, and a
    /// `MAINPID=` it sent before must count.
    pub(super) fn drain_notifications(&self, id: InstanceId, socket: &NotifySocket) {
        while self.take_one(id, socket).is_ok() {}
    }

    fn handle_datagram(&self, id: InstanceId, datagram: &[u8]) {
        static REFUSED: crate::throttle::Throttle =
            crate::throttle::Throttle::new(Duration::from_secs(10));
        match notify::parse(datagram) {
            Ok(message) => {
                for skipped in &message.skipped {
                    if let Some(more) = REFUSED.allow(std::time::Instant::now()) {
                        tracing::warn!(
                            instance = id,
                            "notification field skipped: {skipped}{}",
                            crate::throttle::more(more)
                        );
                    }
                }
                for field in message.fields {
                    self.apply_notification(id, field);
                }
            }
            Err(why) => {
                if let Some(more) = REFUSED.allow(std::time::Instant::now()) {
                    tracing::warn!(
                        instance = id,
                        "notification dropped: {why}{}",
                        crate::throttle::more(more)
                    );
                }
            }
        }
    }

    fn apply_notification(&self, id: InstanceId, field: Field) {
        match field {
            Field::Ready => {
                if let Err(e) = self.ready(id) {
                    tracing::debug!(instance = id, "READY=1 ignored: {e}");
                }
            }
            Field::Status(status) => {
                tracing::debug!(instance = id, "STATUS={status}");
                let generation = self.lock().table.get(id).map(|i| i.generation);
                if let Some(generation) = generation {
                    let text = status.clone();
                    self.progress(generation, crate::progress::Progress::Status { text });
                }
                self.update_reported(id, |r| r.status = Some(status));
                let shared = self.lock();
                if shared.table.current().is_some_and(|i| i.id == id) {
                    crate::systemd::status(&super::coordinator::status_line(&shared));
                }
            }
            Field::Stopping => {
                tracing::info!(
                    instance = id,
                    "the instance says it is stopping (STOPPING=1)"
                );
                self.update_reported(id, |r| r.stopping = true);
            }
            Field::Errno(errno) => {
                self.update_reported(id, |r| r.errno = Some(errno));
            }
            Field::ExtendTimeout(by) => {
                let shared = self.lock();
                if let Some(tracked) = shared.tracked.get(&id) {
                    let until = tokio::time::Instant::now() + by;
                    tracked.extended.send_modify(|e| {
                        *e = Some(e.map_or(until, |old| old.max(until)));
                    });
                }
            }
            Field::MainPid(pid) => self.accept_main_pid(id, pid),
            Field::Watchdog | Field::WatchdogTrigger | Field::WatchdogTimeout(_) => {
                let shared = self.lock();
                let Some(dog) = shared.tracked.get(&id).and_then(|t| t.watchdog.as_ref()) else {
                    return;
                };
                dog.send_modify(|w| match field {
                    Field::Watchdog => w.last = tokio::time::Instant::now(),
                    Field::WatchdogTrigger => w.triggered = true,
                    Field::WatchdogTimeout(timeout) => {
                        w.timeout = timeout;
                        w.last = tokio::time::Instant::now();
                    }
                    _ => {}
                });
            }
        }
    }

    fn update_reported(&self, id: InstanceId, change: impl FnOnce(&mut Reported)) {
        let mut shared = self.lock();
        if let Some(tracked) = shared.tracked.get_mut(&id) {
            change(&mut tracked.reported);
        }
    }

    /// `MAINPID=`: taken only for a live process of the instance's own process
    /// group and of its user, pinned before it is checked again, so the broker
    /// never signals a process outside the instance, nor one the instance's
    /// user could not signal itself.
    fn accept_main_pid(&self, id: InstanceId, pid: u32) {
        let (leader, uid) = {
            let shared = self.lock();
            match shared.tracked.get(&id) {
                Some(t) => (t.process.pid(), t.settings.launch.run_as.uid),
                None => return,
            }
        };
        if pid == leader {
            return;
        }
        let in_group = || {
            crate::process::group_of(pid) == Some(leader)
                && crate::process::real_uid(pid) == Some(uid)
        };
        if !in_group() {
            tracing::warn!(
                instance = id,
                "MAINPID={pid} ignored: not a live process of the instance's process group {leader} and user {uid}"
            );
            return;
        }
        let process = match Process::pin(pid) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(instance = id, "MAINPID={pid} ignored: {e}");
                return;
            }
        };
        if !in_group() {
            tracing::warn!(
                instance = id,
                "MAINPID={pid} ignored: it left the process group"
            );
            return;
        }
        tracing::info!(instance = id, "main process is now pid {pid} (MAINPID)");
        let mut shared = self.lock();
        if let Some(tracked) = shared.tracked.get_mut(&id) {
            tracked.main = Some(Arc::new(process));
            tracked.reported.main_pid = Some(pid);
        }
    }

    /// `ready = "delay"` and `"probe"`: marks instance `id` ready once it ran
    /// `delay` without exiting, or once the probe succeeded. Returns the
    /// probe's last failure, for the reload's error, if it never did.
    pub(super) async fn await_readiness(
        self: Arc<Self>,
        settings: Arc<Settings>,
        id: InstanceId,
        generation: Generation,
        pid: u32,
        last_probe: watch::Sender<Option<String>>,
    ) {
        match &settings.config.ready {
            Readiness::Delay(delay) => {
                tokio::time::sleep(*delay).await;
                let _ = self.ready(id);
            }
            Readiness::Probe(command) => loop {
                if !self.instance_starting(id) {
                    return;
                }
                match run_probe(command, &settings, generation, pid).await {
                    Ok(()) => {
                        let _ = self.ready(id);
                        return;
                    }
                    Err(why) => {
                        last_probe.send_replace(Some(why));
                    }
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            },
            Readiness::Dbus | Readiness::Notify => {}
        }
    }

    fn instance_starting(&self, id: InstanceId) -> bool {
        self.lock()
            .table
            .get(id)
            .is_some_and(|i| i.state == InstanceState::Starting)
    }

    /// Kills instance `id` with SIGABRT (then SIGKILL after its stop_timeout)
    /// once it misses its watchdog; its exit then counts as a crash.
    pub(super) async fn watch_dog(
        self: Arc<Self>,
        id: InstanceId,
        mut dog: watch::Receiver<Watchdog>,
        mut life: watch::Receiver<Life>,
    ) {
        if life
            .wait_for(|l| !matches!(l, Life::State(InstanceState::Starting)))
            .await
            .map(|l| !matches!(*l, Life::State(InstanceState::Ready)))
            .unwrap_or(true)
        {
            return;
        }
        // Armed from the instance's readiness: a start may take ready_timeout.
        dog.borrow_and_update();
        let mut armed_at = tokio::time::Instant::now();
        loop {
            let w = *dog.borrow_and_update();
            if w.triggered {
                break;
            }
            let last = w.last.max(armed_at);
            let expires = last + w.timeout;
            tokio::select! {
                _ = tokio::time::sleep_until(expires) => {
                    if dog.borrow().last <= last && !dog.borrow().triggered {
                        break;
                    }
                }
                changed = dog.changed() => if changed.is_err() { return },
                () = async { let _ = life.wait_for(|l| !matches!(l, Life::State(InstanceState::Ready))).await; } => return,
            }
            armed_at = armed_at.min(tokio::time::Instant::now());
        }
        let (process, stop_timeout, timeout) = {
            let shared = self.lock();
            let Some(t) = shared.tracked.get(&id) else {
                return;
            };
            (
                t.main.clone().unwrap_or_else(|| t.process.clone()),
                t.settings.config.stop_timeout,
                dog.borrow().timeout,
            )
        };
        tracing::error!(
            instance = id,
            pid = process.pid(),
            "missed its watchdog ({}): sending SIGABRT",
            humantime::format_duration(timeout)
        );
        process.signal(nix::sys::signal::Signal::SIGABRT);
        let exited = life.wait_for(|l| matches!(l, Life::Exited(_)));
        if tokio::time::timeout(stop_timeout, exited).await.is_err() {
            let leader = self.lock().tracked.get(&id).map(|t| t.process.clone());
            if let Some(leader) = leader {
                leader.kill_group();
            }
        }
    }
}

/// Resolves once the instance has exited (or its life is no longer watched).
async fn exited(life: &mut watch::Receiver<Life>) {
    let _ = life.wait_for(|l| matches!(l, Life::Exited(_))).await;
}

/// Reads one datagram into `buf`, closing any fds that came with it; a
/// datagram longer than [`notify::MAX_DATAGRAM`] reads as longer than that.
fn receive(socket: &tokio::net::UnixDatagram, buf: &mut [u8]) -> io::Result<usize> {
    let mut cmsg = [0u8; CMSG_SPACE];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = cmsg.as_mut_ptr().cast();
    header.msg_controllen = cmsg.len();
    // SAFETY: a plain recvmsg into buffers we own.
    let n = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &mut header,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    close_passed_fds(&header);
    Ok(n as usize)
}

/// Closes fds passed with a notification (`FDSTORE=1`, `BARRIER=1`): the
/// broker keeps none, and closing a barrier's fd is the answer its sender
/// waits for.
fn close_passed_fds(header: &libc::msghdr) {
    // SAFETY: walking the control buffer recvmsg filled, with libc's macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const libc::c_int;
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<libc::c_int>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    drop(<OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
}

/// Runs `ready_probe` once, as the instances' user, with
/// `ALLY_INSTANCE_PID` and `ALLY_GENERATION`; killed after [`PROBE_TIMEOUT`].
/// The error holds how it ended and the end of its output.
async fn run_probe(
    command: &[String],
    settings: &Settings,
    generation: Generation,
    pid: u32,
) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("the probe is empty")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(&settings.config.environment)
        .env("ALLY_INSTANCE_PID", pid.to_string())
        .env("ALLY_GENERATION", generation.to_string())
        .env("ALLY_APP", &settings.launch.app)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &settings.config.working_directory {
        cmd.current_dir(dir);
    }
    crate::instance::run_as(&mut cmd, &settings.launch.run_as);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("ready_probe {program:?} cannot start: {e}"))?;
    let output = collect_output(&mut child);
    let status = match tokio::time::timeout(PROBE_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("ready_probe could not be waited for: {e}")),
        Err(_) => {
            // Unreaped, so its group id is still its own.
            if let Some(probe_pid) = child.id() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(probe_pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            return Err(format!(
                "ready_probe did not finish within {} and was killed",
                humantime::format_duration(PROBE_TIMEOUT)
            ));
        }
    };
    if status.success() {
        return Ok(());
    }
    // Output still open after the probe exited (a helper holding it) is not waited for.
    let text = tokio::time::timeout(Duration::from_millis(100), output)
        .await
        .unwrap_or_default();
    let text = tail(text.trim(), 512);
    Err(format!(
        "ready_probe {}{}",
        crate::instance::describe_exit(&status),
        if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        }
    ))
}

/// The probe's stdout then stderr, read as they come, at most 64 KiB each.
fn collect_output(child: &mut tokio::process::Child) -> impl Future<Output = String> + use<> {
    use tokio::io::AsyncReadExt;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    async move {
        let mut text = String::new();
        for stream in [
            stdout.map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            stderr.map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let mut bytes = Vec::new();
            let _ = stream.take(64 << 10).read_to_end(&mut bytes).await;
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
        text
    }
}

fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}
