//! Re-executing the broker in place, and the broker a re-exec starts: what it
//! carries (an [image](crate::reexec::image)) and how it takes it back.
//!
//! The image is taken with everything frozen: the coordinator holds no launch
//! (`launching`), the broker's bookkeeping and the shared state are locked, and
//! the `execve` happens under those locks, so no call is answered from state
//! the image does not hold. What the instances write to their stdout and
//! stderr stays in their pipes, read on by the new broker.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::{Broker, Error, Life, Phase, Request, Settings, Tracked, plan, unmodified};
use crate::config::Config;
use crate::config::revision::Revision;
use crate::generations::{Instance, InstanceId, InstanceState, Table};
use crate::listeners::{Carried, Registry};
use crate::process::Process;
use crate::reexec::{self, image};

/// How long the instances' output already read may take to be written before
/// the exec goes ahead without it.
const LOGS_BEFORE_EXEC: Duration = Duration::from_secs(1);

/// What `Status` shows of re-executions.
#[derive(Debug, Clone, Default)]
pub struct Reexecs {
    /// Re-executions since `ally run` started.
    pub count: u64,
    /// Why the last one failed, if it did (the broker then went on as it was).
    pub last_error: Option<String>,
}

/// The config texts of the revisions in use, by revision number.
pub(super) type ConfigTexts = HashMap<u64, Option<String>>;

impl Broker {
    /// Remembers the text revision `revision` was read from, for a re-exec.
    pub(super) fn remember_config(&self, revision: &Revision, text: Option<String>) {
        self.config_texts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(revision.number, text);
    }

    pub fn reexecs(&self) -> Reexecs {
        self.reexecs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records why the last re-exec did not run the new binary.
    pub fn reexec_failed(&self, message: String) {
        self.reexecs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = Some(message);
    }

    /// The private and state sockets' listening fds, carried across a re-exec.
    pub fn set_own_sockets(&self, private: RawFd, state: RawFd) {
        *self.own_sockets.lock().unwrap_or_else(|p| p.into_inner()) = Some((private, state));
    }

    /// Runs the broker's binary again in this process, carrying everything.
    /// Returns only if that could not happen, with the reason; the broker then
    /// goes on as it was.
    pub async fn reexecute(self: &Arc<Self>, who: &str) -> Result<(), Error> {
        let phase = self.lock().phase;
        if matches!(phase, Phase::Starting | Phase::Stopping) {
            return Err(Error::failed(format!(
                "the broker is {}: re-execute once it runs",
                phase.as_str()
            )));
        }
        let Some(startup) = reexec::startup() else {
            return Err(Error::failed(
                "the broker does not know its own binary".to_string(),
            ));
        };
        // No launch in flight from here on: this is never given back on success.
        let launching = self.launching.clone().lock_owned().await;
        if *self.stopping.borrow() {
            return Err(Error::failed("the broker is stopping".to_string()));
        }
        tracing::info!("re-executing {} (asked by {who})", startup.exe.display());
        let logs = self.logs.clone();
        let written = tokio::task::spawn_blocking(move || logs.pause(LOGS_BEFORE_EXEC))
            .await
            .unwrap_or(false);
        if !written {
            tracing::warn!(
                "the instances' output read so far was not all written before the re-exec"
            );
        }
        let error = self.exec_image(startup);
        self.resume_logs();
        drop(launching);
        let message = format!("cannot re-execute {}: {error}", startup.exe.display());
        tracing::error!("{message}");
        self.reexecs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = Some(message.clone());
        Err(Error::failed(message))
    }

    /// Takes the image and execs, all under the locks; returns the exec's error.
    fn exec_image(&self, startup: &reexec::Startup) -> String {
        let count = self.reexecs().count + 1;
        self.with_image(count, |image, fds| {
            let mut kept = reexec::Kept::new();
            for fd in fds {
                if let Err(e) = kept.keep(fd) {
                    return format!("cannot keep fd {fd} open across the exec: {e}");
                }
            }
            let bytes = match serde_json::to_vec(&image) {
                Ok(b) => b,
                Err(e) => return format!("cannot write the image: {e}"),
            };
            let memfd = match reexec::image_fd(&bytes) {
                Ok(fd) => fd,
                Err(e) => return format!("cannot keep the image in memory: {e}"),
            };
            let fallback = reexec::open_fallback().ok();
            let mut env = vec![(reexec::IMAGE_ENV, memfd.as_raw_fd().to_string())];
            if let Some(fd) = &fallback {
                env.push((reexec::FALLBACK_ENV, fd.as_raw_fd().to_string()));
            }
            let error = reexec::exec(&startup.exe, &startup.args, &env);
            drop(kept);
            error.to_string()
        })
        .unwrap_or_else(|e| e)
    }

    /// Runs `then` on the broker's image and the fds it names, with the
    /// bookkeeping, the history and the shared state locked: nothing changes
    /// until `then` returns.
    pub(super) fn with_image<R>(
        &self,
        reexecs: u64,
        then: impl FnOnce(image::BrokerImage, Vec<RawFd>) -> R,
    ) -> Result<R, String> {
        let settings = self.settings();
        let texts = self
            .config_texts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let own = *self.own_sockets.lock().unwrap_or_else(|p| p.into_inner());
        let Some((private_socket, state_socket)) = own else {
            return Err("the broker's own sockets are not known".to_string());
        };
        let shared = self.lock();
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        Ok(self.state.store.with(|store, store_now| {
            let mut configs: Vec<image::ConfigImage> = Vec::new();
            let mut config_index = |revision: &Revision| -> usize {
                if let Some(i) = configs.iter().position(|c| c.revision == revision.number) {
                    return i;
                }
                configs.push(image::ConfigImage {
                    text: texts.get(&revision.number).cloned().flatten(),
                    revision: revision.number,
                    digest: revision.digest.clone(),
                });
                configs.len() - 1
            };
            let current = config_index(&settings.revision);
            let mut instances = Vec::new();
            for instance in shared.table.iter() {
                let Some(tracked) = shared.tracked.get(&instance.id) else {
                    continue;
                };
                instances.push(image::InstanceImage {
                    id: instance.id,
                    generation: instance.generation,
                    pid: instance.pid,
                    state: instance.state.as_str().to_string(),
                    started_unix_us: unix_us(instance.started),
                    started_age_ms: age_ms(now, instance.started_at),
                    ready_unix_us: instance.ready.map(unix_us),
                    ready_age_ms: instance.ready_at.map(|at| age_ms(now, at)),
                    settings: config_index(&tracked.settings.revision),
                    start_ticks: tracked.start_ticks,
                    pidfd: tracked.process.pidfd(),
                    main: tracked.main.as_ref().map(|m| (m.pid(), m.pidfd())),
                    stdout: tracked.stdout.as_ref().map(AsRawFd::as_raw_fd),
                    stderr: tracked.stderr.as_ref().map(AsRawFd::as_raw_fd),
                    notify_socket: tracked.notify_socket.as_ref().map(|s| s.raw_fd()),
                    status: tracked.reported.status.clone(),
                    stopping: tracked.reported.stopping,
                    errno: tracked.reported.errno,
                    app_report: tracked.app_report.clone(),
                });
            }
            let listeners: Vec<image::ListenerImage> = shared
                .listeners
                .carried(now, |held| held.fd.as_raw_fd())
                .into_iter()
                .map(|l| image::ListenerImage {
                    key: crate::systemd::fd_name(&l.key),
                    aliases: l.aliases.iter().map(crate::systemd::fd_name).collect(),
                    fd: l.socket,
                    bound: l.bound,
                    refs: l.refs,
                    pinned: l.pinned,
                    unreferenced_age_ms: l.unreferenced_for.map(|d| d.as_millis() as u64),
                })
                .collect();
            let fds = instances
                .iter()
                .flat_map(|i| {
                    [
                        Some(i.pidfd),
                        i.main.map(|m| m.1),
                        i.stdout,
                        i.stderr,
                        i.notify_socket,
                    ]
                })
                .flatten()
                .chain(listeners.iter().map(|l| l.fd))
                .chain([private_socket, state_socket])
                .collect();
            let (next_id, last_generation) = shared.table.counters();
            let image = image::BrokerImage {
                version: image::VERSION,
                taken_by: env!("CARGO_PKG_VERSION").to_string(),
                app: self.app.clone(),
                reexecs,
                private_socket,
                state_socket,
                configs,
                settings: current,
                last_generation,
                next_id,
                instances,
                listeners,
                reloads: shared.reloads,
                last_reload: shared.last_reload.clone(),
                notified_ready: shared.notified_ready,
                socket_files: shared.socket_files.iter().copied().collect(),
                state: store.image(store_now),
                history: history.image(),
                // A restart waiting for its back-off is asked for again by the
                // new image, as the same attempt.
                restarts: self
                    .restarts
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .saturating_sub(u32::from(shared.pending_restart.is_some())),
            };
            then(image, fds)
        }))
    }

    /// Reads the instances' output again after a re-exec that did not happen.
    fn resume_logs(&self) {
        self.logs.resume();
        let shared = self.lock();
        for instance in shared.table.iter() {
            if let Some(tracked) = shared.tracked.get(&instance.id) {
                self.capture_carried(tracked, instance.generation, instance.id, instance.pid);
            }
        }
    }

    /// Reads an instance's output from the pipes the broker keeps a copy of.
    fn capture_carried(&self, tracked: &Tracked, generation: u64, id: InstanceId, pid: u32) {
        let origin = Arc::new(crate::app_logs::Origin {
            app: self.app.clone(),
            generation,
            instance: id,
            pid,
        });
        for (fd, stream) in [
            (&tracked.stdout, crate::app_logs::Stream::Stdout),
            (&tracked.stderr, crate::app_logs::Stream::Stderr),
        ] {
            let Some(fd) = fd else { continue };
            match fd
                .try_clone()
                .and_then(tokio::net::unix::pipe::Receiver::from_owned_fd)
            {
                Ok(pipe) => self.logs.capture(origin.clone(), stream, pipe),
                Err(e) => tracing::warn!(
                    instance = id,
                    "cannot read the {} of pid {pid} again: {e}",
                    stream.as_str()
                ),
            }
        }
    }

    /// The broker an image describes: its instances, listeners, history and
    /// shared state, with `settings` (read from the command line) for what the
    /// image does not say.
    pub fn restore(
        base: Arc<Broker>,
        image: image::BrokerImage,
        parse: impl Fn(&str) -> Result<Config, String>,
    ) -> Result<Vec<String>, String> {
        let now = Instant::now();
        let mut warnings = Vec::new();
        let current = base.settings();
        let settings = base.settings_of_image(&image.configs, &parse, &mut warnings);
        if let Some(s) = settings.get(image.settings) {
            *base.settings.lock().unwrap_or_else(|p| p.into_inner()) = s.clone();
        }
        let settings_of = |i: usize| settings.get(i).cloned().unwrap_or_else(|| current.clone());

        let mut listeners = Vec::new();
        for l in image.listeners {
            let fd = reexec::take_fd(l.fd)
                .map_err(|e| format!("listener {}: fd {}: {e}", l.key, l.fd))?;
            let Some(key) = crate::systemd::parse_fd_name(&l.key) else {
                warnings.push(format!("listener {:?} cannot be read; closed", l.key));
                continue;
            };
            let aliases = l
                .aliases
                .iter()
                .filter_map(|a| crate::systemd::parse_fd_name(a))
                .collect();
            let held = super::sockets::Held::carried(fd, &key.endpoint);
            listeners.push(Carried {
                key,
                aliases,
                socket: held,
                bound: l.bound,
                refs: l.refs,
                pinned: l.pinned,
                unreferenced_for: l.unreferenced_age_ms.map(Duration::from_millis),
            });
        }

        let mut table = Vec::new();
        let mut tracked = HashMap::new();
        for i in image.instances {
            let state = match i.state.as_str() {
                "starting" => InstanceState::Starting,
                "ready" => InstanceState::Ready,
                "draining" => InstanceState::Draining,
                other => {
                    warnings.push(format!("instance {} has unknown state {other:?}", i.id));
                    InstanceState::Draining
                }
            };
            let pidfd =
                reexec::take_fd(i.pidfd).map_err(|e| format!("instance {}: pidfd: {e}", i.id))?;
            let process = Arc::new(
                Process::from_pidfd(i.pid, pidfd).map_err(|e| format!("instance {}: {e}", i.id))?,
            );
            let main = match i.main {
                Some((pid, fd)) => {
                    let fd = reexec::take_fd(fd)
                        .map_err(|e| format!("instance {}: MAINPID pidfd: {e}", i.id))?;
                    Some(Arc::new(
                        Process::from_pidfd(pid, fd)
                            .map_err(|e| format!("instance {}: {e}", i.id))?,
                    ))
                }
                None => None,
            };
            let stdout = i
                .stdout
                .map(reexec::take_fd)
                .transpose()
                .map_err(|e| e.to_string())?;
            let stderr = i
                .stderr
                .map(reexec::take_fd)
                .transpose()
                .map_err(|e| e.to_string())?;
            let notify_socket = match i
                .notify_socket
                .map(reexec::take_fd)
                .transpose()
                .map_err(|e| e.to_string())?
            {
                Some(fd) => Some(
                    unmodified::NotifySocket::from_fd(fd)
                        .map_err(|e| format!("instance {}: notification socket: {e}", i.id))?,
                ),
                None => None,
            };
            let settings = settings_of(i.settings);
            let watchdog = unmodified::Watchdog::fresh(&settings.config);
            table.push(table_entry(&i, state, now));
            tracked.insert(
                i.id,
                Tracked {
                    life: watch::channel(Life::State(state)).0,
                    process,
                    settings,
                    reported: unmodified::Reported {
                        status: i.status,
                        stopping: i.stopping,
                        errno: i.errno,
                        main_pid: main.as_ref().map(|m| m.pid()),
                    },
                    app_report: i.app_report,
                    extended: watch::channel(None).0,
                    watchdog,
                    main,
                    notify_socket,
                    stdout,
                    stderr,
                    start_ticks: i.start_ticks.or_else(|| crate::process::start_ticks(i.pid)),
                    adopted: false,
                },
            );
        }
        *base.history.lock().unwrap_or_else(|p| p.into_inner()) =
            crate::history::History::restore(current.config.history, image.history);
        {
            let mut shared = base.lock();
            shared.table = Table::from_parts(table, image.next_id, image.last_generation);
            shared.listeners = Registry::from_carried(listeners, now);
            shared.tracked = tracked;
            shared.reloads = image.reloads;
            shared.last_reload = image.last_reload;
            shared.notified_ready = image.notified_ready;
            shared.socket_files = image.socket_files.into_iter().collect::<HashSet<_>>();
            shared.phase = Phase::Running;
        }
        base.restarts
            .store(image.restarts, std::sync::atomic::Ordering::Relaxed);
        *base.reexecs.lock().unwrap_or_else(|p| p.into_inner()) = Reexecs {
            count: image.reexecs,
            last_error: None,
        };
        base.restored.send_replace(true);
        Ok(warnings)
    }

    /// The settings of each config revision an image names, read again from
    /// its text with `parse`; the broker's current ones where that fails.
    pub(super) fn settings_of_image(
        &self,
        configs: &[image::ConfigImage],
        parse: &dyn Fn(&str) -> Result<Config, String>,
        warnings: &mut Vec<String>,
    ) -> Vec<Arc<Settings>> {
        let current = self.settings();
        let mut settings = Vec::new();
        for config in configs {
            let revision = Revision {
                number: config.revision,
                digest: config.digest.clone(),
            };
            let restored = match &config.text {
                Some(text) => parse(text).and_then(|c| {
                    Settings::new(c, current.launch.clone(), revision.clone())
                        .map_err(|e| e.to_string())
                }),
                None => Settings::new(
                    current.config.clone(),
                    current.launch.clone(),
                    revision.clone(),
                )
                .map_err(|e| e.to_string()),
            };
            let restored = match restored {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    warnings.push(format!(
                        "config revision {} cannot be read again ({e}): its instances keep the config the broker read at this start",
                        config.revision
                    ));
                    current.clone()
                }
            };
            self.remember_config(&restored.revision, config.text.clone());
            settings.push(restored);
        }
        settings
    }

    /// After a restore, in the runtime: watches every carried instance as its
    /// spawn would have, and asks for a restart when none serves.
    pub(super) fn resume_instances(self: &Arc<Self>) {
        let instances: Vec<Instance> = self.lock().table.iter().cloned().collect();
        for instance in &instances {
            let (process, life, notify, watchdog, adopted) = {
                let shared = self.lock();
                let Some(t) = shared.tracked.get(&instance.id) else {
                    continue;
                };
                self.capture_carried(t, instance.generation, instance.id, instance.pid);
                (
                    t.process.clone(),
                    t.life.subscribe(),
                    t.notify_socket.clone(),
                    t.watchdog.as_ref().map(|w| w.subscribe()),
                    t.adopted,
                )
            };
            self.roster.record(instance.pid, instance.id);
            if let Some(socket) = notify
                && let Ok(path) = self.notify_socket_path(instance.id)
            {
                tokio::spawn(self.clone().receive_notifications(
                    instance.id,
                    socket,
                    path,
                    life.clone(),
                ));
            }
            if let Some(watchdog) = watchdog {
                tokio::spawn(self.clone().watch_dog(instance.id, watchdog, life));
            }
            let reap = if adopted {
                super::Reap::Adopted
            } else {
                super::Reap::Carried
            };
            tokio::spawn(self.clone().watch_instance(instance.id, reap, process));
            match instance.state {
                InstanceState::Draining => self.keep_draining(instance.id, instance.pid),
                // Its launch was not carried: it is stopped as a failed one is.
                InstanceState::Starting => {
                    tracing::warn!(
                        instance = instance.id,
                        "generation {} was starting when the broker re-executed: stopping it",
                        instance.generation
                    );
                    let begun = self.lock().table.begin_drain(instance.id);
                    if begun {
                        self.drain(instance.id, instance.pid);
                    }
                }
                _ => {}
            }
        }
        let status = {
            let shared = self.lock();
            shared
                .table
                .current()
                .is_some()
                .then(|| super::coordinator::status_line(&shared))
        };
        if let Some(status) = status {
            // Again after a crash restart: systemd waits for it; after a re-exec
            // it changes nothing.
            crate::systemd::ready(&status);
            self.lock().notified_ready = true;
        } else {
            tracing::warn!("no generation serves after the re-exec: restarting the application");
            self.lock().phase = Phase::Restarting;
            let _ = self.requests.send(Request {
                kind: plan::Request::Restart { stable: false },
                reply: None,
            });
        }
    }
}

/// An instance as the image's table had it, its times on this process's clocks.
pub(super) fn table_entry(
    i: &image::InstanceImage,
    state: InstanceState,
    now: Instant,
) -> Instance {
    let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
    Instance {
        id: i.id,
        generation: i.generation,
        pid: i.pid,
        state,
        started: from_unix_us(i.started_unix_us),
        started_at: ago(i.started_age_ms),
        ready: i.ready_unix_us.map(from_unix_us),
        ready_at: i.ready_age_ms.map(ago),
    }
}

pub(super) fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub(super) fn from_unix_us(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

fn age_ms(now: Instant, then: Instant) -> u64 {
    now.saturating_duration_since(then).as_millis() as u64
}

/// Keeps `fd` for the caller as an `OwnedFd` duplicate.
pub(super) fn dup(fd: &impl std::os::fd::AsFd) -> Option<OwnedFd> {
    fd.as_fd().try_clone_to_owned().ok()
}
