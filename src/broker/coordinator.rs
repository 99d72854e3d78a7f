//! The coordinator task: takes the requests in order, asks the plan what to do,
//! and does it — spawn a generation outside the broker's lock, wait until it is
//! ready, then ask the older instances to stop; or stop the new one if it
//! failed, as an old one is stopped.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use super::instances::REAP_GRACE;
use super::plan::{After, Launch, Outcome, Plan, Settle, Step, Waited};
use super::reconfigure::Prepared;
use super::unmodified;
use super::{
    Broker, Error, Event, Life, PendingRestart, Phase, Request, Settings, Shared, Tracked, plan,
};
use crate::config::{Readiness, Sockets};
use crate::generations::{Generation, InstanceId, InstanceState};
use crate::instance;
use crate::priority::{self, Policy};
use crate::process::Process;
use crate::progress::Progress;
use crate::systemd;

/// Why a launch did not end with a ready generation.
struct Failure {
    /// The generation it was for, unless it never got one.
    generation: Option<Generation>,
    message: String,
    outcome: Outcome,
}

impl Broker {
    pub(super) async fn coordinate(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Request>) {
        let settings = self.settings();
        let mut plan = Plan::new(settings.config.restart_delay, settings.config.restart);
        plan.resume(self.restarts.load(std::sync::atomic::Ordering::Relaxed));
        drop(settings);
        let mut pending: Vec<Request> = Vec::new();
        loop {
            if pending.is_empty() {
                match rx.recv().await {
                    Some(request) => pending.push(request),
                    None => return,
                }
            }
            while let Ok(request) = rx.try_recv() {
                pending.push(request);
            }
            let asked: Vec<plan::Request> = pending.iter().map(|r| r.kind).collect();
            let step = plan.next(&asked, self.facts());
            self.restarts
                .store(plan.restarts(), std::sync::atomic::Ordering::Relaxed);
            let (launch, restart) = match step {
                Step::AnswerStopping => {
                    answer(pending.drain(..), Err(stopping_error()));
                    continue;
                }
                Step::AnswerServing(generation) => {
                    self.take_askers();
                    answer(pending.drain(..), Ok(generation));
                    continue;
                }
                Step::Exit { code } => {
                    tracing::info!(
                        "the application is gone and its restart policy is {}; stopping",
                        self.settings().config.restart
                    );
                    self.exit.send_replace(Some((code, None)));
                    pending.clear();
                    continue;
                }
                Step::Forget => {
                    pending.clear();
                    continue;
                }
                Step::Launch { launch, restart } => (launch, restart),
            };
            if let Some(restart) = restart {
                self.back_off(restart).await;
                while let Ok(request) = rx.try_recv() {
                    pending.push(request);
                }
            }
            // A re-exec waits for the launch to be over.
            let launching = self.launching.clone().lock_owned().await;
            let began = (SystemTime::now(), Instant::now());
            let requested_by = match launch {
                Launch::Start => String::new(),
                Launch::Reload => self.take_askers(),
                Launch::Restart => match restart {
                    Some(r) => format!("crash (attempt {})", r.attempt),
                    None => "crash".to_string(),
                },
            };
            // A reload reads the config again; its generation starts with it.
            let prepared = match launch {
                Launch::Reload => self.reconfigure_and_check().await,
                Launch::Start | Launch::Restart => Ok(Prepared::current(self.settings())),
            };
            let (launched, prepared) = match prepared {
                Ok(prepared) => (
                    self.launch_generation(launch, &prepared.settings).await,
                    Some(prepared),
                ),
                Err(message) => {
                    self.finish(0, Err(message.clone()));
                    let failure = Failure {
                        generation: None,
                        message,
                        outcome: Outcome::Failed,
                    };
                    (Err(failure), None)
                }
            };
            if let Some(prepared) = prepared {
                if launched.is_ok() {
                    self.commit(prepared, &mut plan);
                    let keep = self.settings().config.history;
                    self.history
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .set_capacity(keep);
                } else {
                    self.abandon(prepared);
                }
            }
            let outcome = launched
                .as_ref()
                .err()
                .map_or(Outcome::Ready, |f| f.outcome);
            let after = plan.finished(launch, outcome, self.facts());
            self.restarts
                .store(plan.restarts(), std::sync::atomic::Ordering::Relaxed);
            let (generation, success, message) = match &launched {
                Ok((generation, message)) => (*generation, true, message.clone()),
                Err(f) => (f.generation.unwrap_or(0), false, f.message.clone()),
            };
            self.record_history(crate::history::Record {
                kind: match launch {
                    Launch::Start => crate::history::Kind::FirstStart,
                    Launch::Reload => crate::history::Kind::Reload,
                    Launch::Restart => crate::history::Kind::Restart,
                },
                generation,
                started: began.0,
                duration: began.1.elapsed(),
                success,
                message,
                requested_by,
            });
            let result = match launched {
                Ok((generation, message)) => {
                    self.finish(generation, Ok(message));
                    Ok(generation)
                }
                Err(Failure {
                    generation: None,
                    message,
                    ..
                }) => Err(Error::reload_failed(message)),
                Err(Failure {
                    generation: Some(generation),
                    message,
                    ..
                }) => {
                    if let After::Exit { code, fatal: true } = after {
                        // The broker's last word, printed once by `ally run`.
                        let reason = format!("{}: {message}", self.app);
                        let error = self.record_result(generation, Err(message));
                        self.exit.send_replace(Some((code, Some(reason))));
                        Err(error)
                    } else {
                        Err(self.finish(generation, Err(message)))
                    }
                }
            };
            answer(pending.drain(..), result);
            drop(launching);
            match after {
                After::Done | After::Exit { fatal: true, .. } => {}
                After::Restart => pending.push(Request {
                    kind: plan::Request::Restart { stable: false },
                    reply: None,
                }),
                After::Exit { code, fatal: false } => {
                    tracing::error!(
                        "the application could not be started and its restart policy is never; stopping"
                    );
                    self.exit.send_replace(Some((code, None)));
                }
            }
        }
    }

    /// A reload's settings, once its `check` passed with them; else nothing
    /// of them is kept.
    async fn reconfigure_and_check(self: &Arc<Self>) -> Result<Prepared, String> {
        let prepared = self.reconfigure().await?;
        match super::check::run(&prepared.settings).await {
            Ok(()) => Ok(prepared),
            Err(message) => {
                self.abandon(prepared);
                Err(message)
            }
        }
    }

    fn facts(&self) -> plan::Facts {
        let shared = self.lock();
        plan::Facts {
            stopping: *self.stopping.borrow(),
            current: shared.table.current().map(|i| i.generation),
            running: !shared.table.running().is_empty(),
        }
    }

    /// Waits out a crash restart's back-off, shown by `Status` meanwhile.
    async fn back_off(&self, restart: plan::Restart) {
        tracing::info!(
            "restarting the application in {} (attempt {})",
            humantime::format_duration(restart.delay),
            restart.attempt
        );
        self.lock().pending_restart = Some(PendingRestart {
            attempt: restart.attempt,
            at: SystemTime::now() + restart.delay,
        });
        let mut stopping = self.stopping.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(restart.delay) => {}
            _ = stopping.wait_for(|s| *s) => {}
        }
        self.lock().pending_restart = None;
    }

    /// Returns an idle-started generation to the broker's priority.
    fn raise(&self, settings: &Settings, generation: Generation, pid: u32) {
        let Some(policy) = settings.raise_to else {
            return;
        };
        let raised = priority::raise(pid, policy);
        tracing::debug!(
            generation,
            pid,
            "generation {generation} raised to normal CPU priority ({} threads)",
            raised.threads
        );
        for (tid, e) in raised.failed {
            tracing::warn!(
                generation,
                pid,
                tid,
                "cannot raise thread {tid} of generation {generation} from idle CPU priority: {e}"
            );
        }
    }

    /// Starts one generation and waits until it is ready; then the older
    /// instances are asked to stop. The spawn happens with no lock held: its
    /// numbers are reserved before, the instance recorded after.
    async fn launch_generation(
        self: &Arc<Self>,
        launch: Launch,
        settings: &Arc<Settings>,
    ) -> Result<(Generation, String), Failure> {
        let mut stopping = self.stopping.subscribe();
        let unborn = |e: Error| Failure {
            generation: None,
            message: e.to_string(),
            outcome: Outcome::Failed,
        };
        self.wait_for_drain_slot(settings.config.max_draining)
            .await
            .map_err(unborn)?;
        let phase = match launch {
            Launch::Start => Phase::Starting,
            Launch::Reload => Phase::Reloading,
            Launch::Restart => Phase::Restarting,
        };
        let started = Instant::now();
        // Before anything is reserved, so that a stopping broker waits for this spawn.
        let spawning = self.roster.spawning();
        if *self.stopping.borrow() {
            return Err(unborn(stopping_error()));
        }
        if phase != Phase::Starting {
            systemd::reloading();
        }
        let (generation, id, mut idle) = {
            let mut shared = self.lock();
            shared.phase = phase;
            let (generation, id) = shared.table.reserve();
            // Idle only beside a generation that serves: alone, it has no one to spare.
            let idle = settings.raise_to.is_some() && shared.table.count(InstanceState::Ready) > 0;
            (generation, id, idle)
        };
        let failed = |message: String, outcome| Failure {
            generation: Some(generation),
            message,
            outcome,
        };
        let handed = self.hand(settings, id).map_err(|e| {
            failed(
                format!("generation {generation} could not start: {e}"),
                Outcome::Failed,
            )
        })?;
        let notify = match &handed.notify_socket {
            Some(path) => match self.open_notify_socket(settings, path) {
                Ok(socket) => Some((socket, path.clone())),
                Err(e) => {
                    let message = format!(
                        "generation {generation} could not start: cannot make its notification socket {}: {e}",
                        path.display()
                    );
                    return Err(failed(message, Outcome::Failed));
                }
            },
            None => None,
        };
        let how = settings.launch.clone();
        let spawned = tokio::task::spawn_blocking(move || {
            instance::spawn(&how, id, generation, idle, handed)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("the spawn failed: {e}"))));
        if spawned.is_err()
            && let Some((_, path)) = &notify
        {
            let _ = std::fs::remove_file(path);
        }
        let mut child = spawned.map_err(|e| {
            let outcome = if plan::cannot_execute(e.kind()) {
                Outcome::NotExecutable
            } else {
                Outcome::Failed
            };
            failed(
                format!("generation {generation} could not start: {e}"),
                outcome,
            )
        })?;
        let pid = child.id().unwrap_or(0);
        let pipes = self.capture_output(&mut child, generation, id, pid);
        let process = match Process::pin(pid) {
            Ok(process) => Arc::new(process),
            Err(e) => {
                // Unreaped, so its pid is still its own.
                let mut child = child;
                let _ = child.start_kill();
                tokio::spawn(async move { child.wait().await });
                let message = format!("generation {generation} (pid {pid}) cannot be pinned: {e}");
                return Err(failed(message, Outcome::Failed));
            }
        };
        let mut life = {
            let mut shared = self.lock();
            let life = self.record(
                &mut shared,
                id,
                generation,
                pid,
                process.clone(),
                settings.clone(),
            );
            if let Some(tracked) = shared.tracked.get_mut(&id) {
                (tracked.stdout, tracked.stderr) = pipes;
            }
            life
        };
        // Before the instance can be told apart as a caller: its Listen calls come after.
        self.progress(
            generation,
            Progress::Started {
                pid,
                reason: launch.as_str().to_string(),
            },
        );
        if settings.config.sockets == Sockets::ListenFds {
            for entry in &settings.config.listen {
                self.progress(generation, super::listening(&entry.addr));
            }
        }
        self.roster.record(pid, id);
        drop(spawning);
        let last_probe = self.start_unmodified(settings, id, generation, pid, notify);
        self.store_instance_fds(id);
        tracing::info!(
            generation,
            pid,
            instance = id,
            "started generation {generation}{}",
            if idle { " at idle CPU priority" } else { "" }
        );
        self.emit(Event::InstanceStateChanged {
            id,
            state: InstanceState::Starting,
        });
        tokio::spawn(
            self.clone()
                .watch_instance(id, super::Reap::Child(child), process),
        );

        let timeout = settings.config.ready_timeout;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut extended = self.lock().tracked.get(&id).map(|t| t.extended.subscribe());
        let mut exits = self.exits.subscribe();
        let (waited, why) = loop {
            tokio::select! {
                life = life.wait_for(|l| !matches!(l, Life::State(InstanceState::Starting))) => {
                    break match life.map(|l| l.clone()) {
                        Ok(Life::State(InstanceState::Ready)) => (Waited::Ready, String::new()),
                        Ok(Life::Exited(how)) => (Waited::Exited, format!("generation {generation} (pid {pid}) {how} before it was ready")),
                        _ => (Waited::Stopping, format!("generation {generation} (pid {pid}) was stopped before it was ready")),
                    };
                }
                _ = &mut deadline => break (Waited::TimedOut, String::new()),
                Some(Ok(())) = async { match extended.as_mut() { Some(e) => Some(e.changed().await), None => None } } => {
                    let until = extended.as_ref().and_then(|e| *e.borrow());
                    if let Some(until) = until && until > deadline.deadline() {
                        tracing::info!(generation, pid, "start time extended by {} (EXTEND_TIMEOUT_USEC)", ms(until - tokio::time::Instant::now()));
                        deadline.as_mut().reset(until);
                    }
                }
                _ = stopping.wait_for(|s| *s) => break (Waited::Stopping, "the broker is stopping".to_string()),
                Ok(()) = exits.changed(), if idle => {
                    if self.lock().table.count(InstanceState::Ready) == 0 {
                        tracing::info!(generation, pid, "no generation serves any more: generation {generation} continues at normal CPU priority");
                        self.raise(settings, generation, pid);
                        idle = false;
                    }
                }
            }
        };
        let said = self
            .lock()
            .tracked
            .get(&id)
            .and_then(|t| t.reported.explanation());
        match plan::settle(waited) {
            Settle::Promote => {}
            Settle::Nothing => return Err(failed(why, Outcome::Failed)),
            Settle::Stop => {
                let drain = self.lock().table.begin_drain(id);
                let task = if drain { self.drain(id, pid) } else { None };
                let killed = match task {
                    Some(task) => task.await.unwrap_or(false),
                    None => false,
                };
                if drain {
                    let exited = life.wait_for(|l| matches!(l, Life::Exited(_)));
                    let _ = tokio::time::timeout(REAP_GRACE, exited).await;
                }
                let why = if waited == Waited::TimedOut {
                    not_ready_in_time(settings, generation, pid, killed, idle)
                } else {
                    why
                };
                let why = match last_probe.borrow().as_ref() {
                    Some(probe) => format!("{why}; the last {probe}"),
                    None => why,
                };
                let why = match said {
                    Some(said) if !why.contains(&said) => format!("{why}; {said}"),
                    _ => why,
                };
                return Err(failed(why, Outcome::Failed));
            }
        }

        if idle {
            self.raise(settings, generation, pid);
        }
        self.progress(
            generation,
            Progress::Ready {
                seconds: started.elapsed().as_secs_f64(),
            },
        );
        let older: Vec<(u64, u32, Progress)> = {
            let mut shared = self.lock();
            let older = shared.table.others_running(id);
            let older = shared.table.begin_drain_all(older);
            older
                .into_iter()
                .map(|(old, old_pid)| {
                    let draining = Progress::Draining {
                        generation: shared.table.get(old).map_or(0, |i| i.generation),
                        instance: old,
                        pid: old_pid,
                        tasks: self.reported_tasks(&shared, old),
                    };
                    (old, old_pid, draining)
                })
                .collect()
        };
        for (old, old_pid, draining) in older {
            self.progress(generation, draining);
            self.drain(old, old_pid);
        }
        let elapsed = started.elapsed();
        let message = match launch {
            Launch::Start => format!("generation {generation} is ready ({})", ms(elapsed)),
            Launch::Reload => format!("reloaded to generation {generation} ({})", ms(elapsed)),
            Launch::Restart => format!("restarted as generation {generation} ({})", ms(elapsed)),
        };
        tracing::info!("{message}");
        if launch == Launch::Reload {
            self.lock().reloads += 1;
        }
        Ok((generation, message))
    }

    /// Puts a spawned instance in the table; its life is watched from here.
    fn record(
        &self,
        shared: &mut Shared,
        id: u64,
        generation: Generation,
        pid: u32,
        process: Arc<Process>,
        settings: Arc<Settings>,
    ) -> watch::Receiver<Life> {
        shared
            .table
            .spawned(id, generation, pid, Instant::now(), SystemTime::now());
        let (life, life_rx) = watch::channel(Life::State(InstanceState::Starting));
        let watchdog = unmodified::Watchdog::fresh(&settings.config);
        if settings.config.sockets == Sockets::ListenFds {
            for entry in &settings.config.listen {
                shared.listeners.add_ref(&entry.addr, id);
            }
        }
        shared.tracked.insert(
            id,
            Tracked {
                life,
                process,
                settings,
                reported: Default::default(),
                app_report: Default::default(),
                extended: watch::channel(None).0,
                watchdog,
                main: None,
                notify_socket: None,
                stdout: None,
                stderr: None,
                start_ticks: crate::process::start_ticks(pid),
                adopted: false,
            },
        );
        life_rx
    }

    /// Starts what serves an unmodified app's instance: its notification
    /// socket, its delay or probe, its watchdog. Returns the probe's last
    /// failure as it is known.
    fn start_unmodified(
        self: &Arc<Self>,
        settings: &Arc<Settings>,
        id: InstanceId,
        generation: Generation,
        pid: u32,
        notify: Option<(Arc<unmodified::NotifySocket>, std::path::PathBuf)>,
    ) -> watch::Receiver<Option<String>> {
        let (last_probe, last_probe_rx) = watch::channel(None);
        let (life, watchdog) = {
            let mut shared = self.lock();
            let Some(t) = shared.tracked.get_mut(&id) else {
                return last_probe_rx;
            };
            t.notify_socket = notify.as_ref().map(|(socket, _)| socket.clone());
            (
                t.life.subscribe(),
                t.watchdog.as_ref().map(|w| w.subscribe()),
            )
        };
        if let Some((socket, path)) = notify {
            tokio::spawn(
                self.clone()
                    .receive_notifications(id, socket, path, life.clone()),
            );
        }
        if matches!(
            settings.config.ready,
            Readiness::Delay(_) | Readiness::Probe(_)
        ) {
            tokio::spawn(self.clone().await_readiness(
                settings.clone(),
                id,
                generation,
                pid,
                last_probe,
            ));
        }
        if let Some(watchdog) = watchdog {
            tokio::spawn(self.clone().watch_dog(id, watchdog, life));
        }
        last_probe_rx
    }

    /// Records a launch's result, tells D-Bus and systemd, and returns the error
    /// for the caller.
    fn finish(&self, generation: Generation, result: Result<String, String>) -> Error {
        if let Err(message) = &result {
            tracing::warn!("{message}");
        }
        self.record_result(generation, result)
    }

    fn record_result(&self, generation: Generation, result: Result<String, String>) -> Error {
        let (success, message) = match result {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        let (status, serving) = {
            let mut shared = self.lock();
            if shared.phase != Phase::Stopping {
                shared.phase = if shared.table.current().is_some() {
                    Phase::Running
                } else if shared.notified_ready {
                    Phase::Restarting
                } else {
                    Phase::Starting
                };
            }
            shared.last_reload = message.clone();
            shared.notified_ready |= success;
            (status_line(&shared), shared.table.current().is_some())
        };
        // READY=1 also ends the RELOADING=1 of a failed reload: the old generation serves on.
        if serving {
            systemd::ready(&status);
        } else {
            systemd::status(&status);
        }
        self.progress(
            generation,
            Progress::Done {
                success,
                message: message.clone(),
            },
        );
        self.emit(Event::ReloadFinished {
            generation: if success { generation } else { 0 },
            success,
            message: message.clone(),
        });
        Error::reload_failed(message)
    }

    async fn wait_for_drain_slot(&self, max_draining: usize) -> Result<(), Error> {
        let mut exits = self.exits.subscribe();
        loop {
            let draining = self.lock().table.count(InstanceState::Draining);
            if draining < max_draining {
                return Ok(());
            }
            tracing::info!(
                "{draining} instances are draining (max_draining); waiting for one to exit"
            );
            if exits.changed().await.is_err() || *self.stopping.borrow() {
                return Err(stopping_error());
            }
        }
    }
}

fn not_ready_in_time(
    settings: &Settings,
    generation: Generation,
    pid: u32,
    killed: bool,
    idle: bool,
) -> String {
    let config = &settings.config;
    format!(
        "generation {generation} (pid {pid}) was not ready within {} (ready_timeout); it was killed{}, by its stop signal {}{}",
        humantime::format_duration(config.ready_timeout),
        if idle {
            " (it was still at idle CPU priority: start_priority = \"idle\")"
        } else {
            ""
        },
        config.stop_signal,
        if killed {
            format!(
                " and then SIGKILL after {} (stop_timeout)",
                humantime::format_duration(config.stop_timeout)
            )
        } else {
            String::new()
        },
    )
}

fn answer(requests: impl Iterator<Item = Request>, result: Result<Generation, Error>) {
    for request in requests {
        if let Some(reply) = request.reply {
            let _ = reply.send(result.clone());
        }
    }
}

pub(super) fn stopping_error() -> Error {
    Error::reload_failed("the broker is stopping".into())
}

/// The broker's own policy, once it is known that the broker may return an
/// idle instance to it.
pub(super) fn idle_start_policy() -> Result<Policy, Error> {
    let policy = Policy::of_this_thread().map_err(|e| {
        Error::caused_by(
            ally_core::ErrorKind::Failed,
            format_args!("start_priority = \"idle\": cannot read the broker's scheduling policy"),
            e,
        )
    })?;
    priority::check_can_raise(policy).map_err(|e| {
        Error::failed(format!(
            "start_priority = \"idle\": the broker could not return a thread from SCHED_IDLE to its own priority ({e}); it needs CAP_SYS_NICE, or an RLIMIT_NICE that allows its nice value (systemd: LimitNICE=)"
        ))
    })?;
    Ok(policy)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The broker's `STATUS=` for systemd: with the serving instance's own, if
/// it sent one.
pub(super) fn status_line(shared: &Shared) -> String {
    let current = shared.table.current();
    let draining = shared.table.count(InstanceState::Draining);
    match current {
        Some(i) => format!(
            "generation {} ready (pid {}), {} draining{}",
            i.generation,
            i.pid,
            draining,
            shared
                .tracked
                .get(&i.id)
                .and_then(|t| t.reported.status.as_ref())
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        ),
        None => format!(
            "{}; no ready instance, {} draining",
            shared.phase.as_str(),
            draining
        ),
    }
}
