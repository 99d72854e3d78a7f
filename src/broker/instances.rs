//! An instance's life after its spawn, as the broker sees it: asking it to stop
//! (and SIGKILLing it after `stop_timeout`), reaping it, and what its exit means
//! for the application; and stopping them all when the broker stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::{Broker, Event, Life, Phase, Reap, Request, plan};
use crate::app_logs;
use crate::config::RestartPolicy;
use crate::generations::{Generation, InstanceId, InstanceState};
use crate::instance;
use crate::process::Process;
use crate::systemd;

/// How long the broker waits for a SIGKILLed process to be reaped.
pub(super) const REAP_GRACE: Duration = Duration::from_secs(5);
/// How often what is left of an instance's process group is looked for.
const GROUP_POLL: Duration = Duration::from_millis(50);

impl Broker {
    /// Asks an instance to stop with its stop signal, and SIGKILLs it and its
    /// process group if it is still there after `stop_timeout`. The task ends
    /// once it exited (false) or was SIGKILLed (true); `None` if it was already
    /// reaped.
    ///
    /// The stop signal and `stop_timeout` are those the instance was started
    /// with: its stop signal is the one its `ALLY_STOP_SIGNAL` names.
    pub(super) fn drain(self: &Arc<Self>, id: InstanceId, pid: u32) -> Option<JoinHandle<bool>> {
        self.emit(Event::InstanceStateChanged {
            id,
            state: InstanceState::Draining,
        });
        let (mut life, process, main, settings) = self.lock().tracked.get(&id).map(|t| {
            t.life.send_replace(Life::State(InstanceState::Draining));
            (
                t.life.subscribe(),
                t.process.clone(),
                t.main_process(),
                t.settings.clone(),
            )
        })?;
        let signal = settings.config.stop_signal;
        tracing::info!(
            instance = id,
            pid = main.pid(),
            "asking instance to stop with {signal}"
        );
        main.signal(signal);
        let timeout = settings.config.stop_timeout;
        Some(tokio::spawn(async move {
            let exited = life.wait_for(|l| matches!(l, Life::Exited(_)));
            if tokio::time::timeout(timeout, exited).await.is_ok() {
                return false;
            }
            tracing::warn!(
                instance = id,
                pid,
                "did not stop within {} (stop_timeout); sending SIGKILL",
                humantime::format_duration(timeout)
            );
            process.kill_group();
            true
        }))
    }

    /// After a re-exec: waits out the stop of an instance that was draining,
    /// SIGKILLing it after its `stop_timeout`, counted again from now.
    pub(super) fn keep_draining(self: &Arc<Self>, id: InstanceId, pid: u32) {
        let Some((mut life, process, timeout)) = self.lock().tracked.get(&id).map(|t| {
            (
                t.life.subscribe(),
                t.process.clone(),
                t.settings.config.stop_timeout,
            )
        }) else {
            return;
        };
        tokio::spawn(async move {
            let exited = life.wait_for(|l| matches!(l, Life::Exited(_)));
            if tokio::time::timeout(timeout, exited).await.is_err() {
                tracing::warn!(
                    instance = id,
                    pid,
                    "did not stop within {} (stop_timeout) of the re-exec; sending SIGKILL",
                    humantime::format_duration(timeout)
                );
                process.kill_group();
            }
        });
    }

    /// Waits for the instance's exit, reaps it, and decides what its exit means.
    pub(super) async fn watch_instance(
        self: Arc<Self>,
        id: InstanceId,
        reap: Reap,
        process: Arc<Process>,
    ) {
        process.exited().await;
        if matches!(reap, Reap::Adopted) {
            // Not its child: whoever reaps it may let its pid and group go at once.
            process.mark_reaped();
            self.departed(
                id,
                "exited (its exit status is unknown: it was adopted after a broker restart)"
                    .to_string(),
                false,
                None,
            );
            return;
        }
        let main = self.outlive_leader(id, &process).await;
        process.mark_reaped();
        let waited = match reap {
            Reap::Adopted => unreachable!("handled above"),
            Reap::Child(mut child) => child.wait().await,
            Reap::Carried => {
                let pid = process.pid();
                tokio::task::spawn_blocking(move || wait_carried(pid))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            }
        };
        let (description, success, code) = match waited {
            // Its status is not the broker's to know: it is not its child.
            Ok(_) if let Some(main) = main => (
                format!("ended: its main process {main} (MAINPID) exited"),
                false,
                None,
            ),
            Ok(status) => (
                instance::describe_exit(&status),
                status.success(),
                status.code(),
            ),
            Err(e) => (format!("could not be waited for: {e}"), false, None),
        };
        self.departed(id, description, success, code);
    }

    /// Takes an instance that exited out of the books, and decides what its
    /// exit means for the app.
    fn departed(
        self: &Arc<Self>,
        id: InstanceId,
        description: String,
        success: bool,
        code: Option<i32>,
    ) {
        self.forget_stored_fds(id);
        self.roster.remove(id);
        let now = Instant::now();
        let departure = {
            let mut shared = self.lock();
            shared.listeners.release_instance(id, now);
            if let Some(tracked) = shared.tracked.remove(&id) {
                let how = match tracked.reported.explanation() {
                    Some(said) => format!("{description} ({said})"),
                    None => description.clone(),
                };
                tracked.life.send_replace(Life::Exited(how));
            }
            shared.table.exited(id, now)
        };
        self.state.instance_exited(id);
        self.exits.send_modify(|n| *n += 1);
        let Some(departure) = departure else { return };
        let instance = &departure.instance;
        tracing::info!(
            instance = id,
            pid = instance.pid,
            generation = instance.generation,
            "instance {description}"
        );
        self.emit(Event::InstanceStateChanged {
            id,
            state: InstanceState::Exited,
        });
        if !departure.was_current || *self.stopping.borrow() {
            return;
        }
        let restart = match self.settings().config.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
        tracing::warn!(
            generation = instance.generation,
            "the current instance {description}"
        );
        let kind = if restart {
            self.lock().phase = Phase::Restarting;
            plan::Request::Restart {
                stable: departure.ready_for.is_some_and(|d| d >= plan::STABLE_AFTER),
            }
        } else {
            plan::Request::GiveUp {
                code: if success {
                    0
                } else {
                    code.filter(|c| *c != 0).unwrap_or(1)
                },
            }
        };
        let _ = self.requests.send(Request { kind, reply: None });
    }

    /// After the instance's first process exited, and before it is reaped (so
    /// that its process group id stays its own): waits for the process
    /// `MAINPID=` named, then asks what is left of the group to stop with the
    /// instance's stop signal — a shell wrapper's app, a master's orphaned
    /// workers — and SIGKILLs it after `stop_timeout`. The instance has
    /// exited only once its group is empty, as a systemd service has once its
    /// cgroup is.
    ///
    /// Returns the pid of the `MAINPID=` process it waited for, if any.
    async fn outlive_leader(&self, id: InstanceId, leader: &Process) -> Option<u32> {
        let socket = {
            let shared = self.lock();
            match shared.tracked.get(&id) {
                Some(t) => t.notify_socket.clone(),
                None => return None,
            }
        };
        if let Some(socket) = socket {
            self.drain_notifications(id, &socket);
        }
        let (main, settings) = {
            let shared = self.lock();
            match shared.tracked.get(&id) {
                Some(t) => (t.main.clone(), t.settings.clone()),
                None => return None,
            }
        };
        if let Some(main) = &main {
            main.exited().await;
        }
        let main = main.map(|m| m.pid());
        let group = leader.pid();
        let left = crate::process::group_members(group);
        if left.is_empty() {
            return main;
        }
        let signal = settings.config.stop_signal;
        tracing::info!(
            instance = id,
            "pid {group} exited; asking the rest of its process group ({}) to stop with {signal}",
            left.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        leader.signal_group(signal);
        let deadline = tokio::time::Instant::now() + settings.config.stop_timeout;
        let mut killed = false;
        loop {
            tokio::time::sleep(GROUP_POLL).await;
            if crate::process::group_members(group).is_empty() {
                return main;
            }
            let now = tokio::time::Instant::now();
            if !killed && now >= deadline {
                tracing::warn!(
                    instance = id,
                    "the rest of process group {group} did not stop within {} (stop_timeout); sending SIGKILL",
                    humantime::format_duration(settings.config.stop_timeout)
                );
                leader.kill_group();
                killed = true;
            } else if killed && now >= deadline + REAP_GRACE {
                tracing::error!(instance = id, "process group {group} survived SIGKILL");
                return main;
            }
        }
    }

    /// Stops every instance with its stop signal, waits up to `stop_timeout`
    /// (then SIGKILL), and returns once all are reaped.
    pub async fn shutdown(self: &Arc<Self>) {
        tracing::info!("stopping");
        systemd::stopping();
        self.stopping.send_replace(true);
        let running: Vec<(InstanceId, u32)> = {
            let mut shared = self.lock();
            shared.phase = Phase::Stopping;
            shared.pending_restart = None;
            let running = shared.table.running();
            shared.table.begin_drain_all(running)
        };
        for (id, pid) in running {
            self.drain(id, pid);
        }
        // A spawn in flight records its instance, sees the broker stopping and
        // stops it: wait for it to be in the table.
        self.roster.settled().await;
        let mut exits = self.exits.subscribe();
        let stop_timeout = {
            let shared = self.lock();
            let started_with = shared
                .tracked
                .values()
                .map(|t| t.settings.config.stop_timeout);
            started_with.fold(self.settings().config.stop_timeout, Duration::max)
        };
        let deadline = tokio::time::Instant::now() + stop_timeout + REAP_GRACE;
        while !self.lock().table.is_empty() {
            if tokio::time::timeout_at(deadline, exits.changed())
                .await
                .is_err()
            {
                tracing::error!("instances still running after stop_timeout and SIGKILL");
                break;
            }
        }
        let logs = self.logs.clone();
        let flushed =
            tokio::task::spawn_blocking(move || logs.flush(app_logs::FLUSH_TIMEOUT)).await;
        if !matches!(flushed, Ok(true)) {
            tracing::warn!(
                "the instances' last output was not all written within {}s",
                app_logs::FLUSH_TIMEOUT.as_secs()
            );
        }
    }

    /// Reads the instance's stdout and stderr, where they are pipes, into the
    /// journal with its generation. Returns copies of the pipes' read ends,
    /// which a re-exec carries.
    pub(super) fn capture_output(
        &self,
        child: &mut tokio::process::Child,
        generation: Generation,
        instance: InstanceId,
        pid: u32,
    ) -> (Option<std::os::fd::OwnedFd>, Option<std::os::fd::OwnedFd>) {
        let origin = Arc::new(app_logs::Origin {
            app: self.app.clone(),
            generation,
            instance,
            pid,
        });
        let mut copies = (None, None);
        if let Some(stdout) = child.stdout.take() {
            copies.0 = super::reexec::dup(&stdout);
            self.logs
                .capture(origin.clone(), app_logs::Stream::Stdout, stdout);
        }
        if let Some(stderr) = child.stderr.take() {
            copies.1 = super::reexec::dup(&stderr);
            self.logs.capture(origin, app_logs::Stream::Stderr, stderr);
        }
        copies
    }
}

/// Reaps carried child `pid`, which has exited.
fn wait_carried(pid: u32) -> std::io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing its status into `status`.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if rc >= 0 {
            return Ok(std::process::ExitStatus::from_raw(status));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
