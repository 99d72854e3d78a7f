//! The broker: owns the listeners and the generation table, starts and stops
//! instances, and runs reloads one at a time.
//!
//! Every change of which generation runs — the first start, a reload, a crash
//! restart — goes through one coordinator task, in order (`coordinator`, which
//! follows the pure `plan`). Requests that arrive while it is busy are answered
//! together by one follow-up reload, so a reload asked for after a binary was
//! replaced always runs the new binary.
//!
//! Locks: `Shared` (the broker's bookkeeping) is never held across a spawn or an
//! await. The calls instances make often never take it: the shared state has its
//! own lock (`crate::state`), and who is an instance is the `roster`'s.

mod check;
mod coordinator;
mod instances;
pub mod plan;
mod reconfigure;
mod reexec;
mod release;
mod roster;
pub mod snapshot;
mod sockets;
mod strays;
mod unmodified;

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use ally_core::net::{ListenAddr, ListenOptions};
use ally_core::report::AppReport;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::app_logs::AppLogs;
use crate::config::revision::Revision;
use crate::config::{Config, StartPriority};
use crate::generations::{Generation, Instance, InstanceId, InstanceState, Table};
use crate::identity::RunAs;
use crate::instance::Launch;
use crate::listeners::{ListenerInfo, Registry};
use crate::priority::Policy;
use crate::process::Process;
use crate::progress::Progress;
use crate::state::State;
use crate::systemd;

pub use reexec::Reexecs;
pub use release::Shown as WatchShown;
pub use roster::Snapshot;
pub use unmodified::Reported;

/// What went wrong: the kind a D-Bus caller sees, the message and the cause.
pub use ally_core::Error;

/// The broker's own state, as `State` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Running,
    Reloading,
    Restarting,
    Stopping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Reloading => "reloading",
            Phase::Restarting => "restarting",
            Phase::Stopping => "stopping",
        }
    }
}

/// Broadcast to every D-Bus connection as signals.
#[derive(Debug, Clone)]
pub enum Event {
    ReloadFinished {
        generation: Generation,
        success: bool,
        message: String,
    },
    InstanceStateChanged {
        id: InstanceId,
        state: InstanceState,
    },
    /// A phase of generation `generation`'s launch (`ReloadProgress`).
    ReloadProgress {
        generation: Generation,
        progress: Progress,
    },
    /// An instance's `Report` changed what it reports; `report` is all of it.
    InstanceReported {
        id: InstanceId,
        generation: Generation,
        report: AppReport,
    },
}

/// Distinct askers remembered for one launch: many callers asking at once are
/// answered by one reload, and its history entry names the first ones.
const MAX_ASKERS: usize = 8;

/// A crash restart waiting for its back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingRestart {
    /// 1 for the first restart since the app last recovered.
    pub attempt: u32,
    pub at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub app: String,
    pub phase: Phase,
    pub generation: Generation,
    pub pid: u32,
    pub instances: Vec<Instance>,
    /// The config file the broker re-reads at every reload, if it has one.
    pub config_file: Option<std::path::PathBuf>,
    /// The config revision the next restart would run.
    pub revision: Revision,
    /// The config revision each instance was started with.
    pub instance_revisions: Vec<(InstanceId, Revision)>,
    pub listeners: Vec<ListenerInfo>,
    pub reloads: u64,
    pub last_reload: String,
    pub pending_restart: Option<PendingRestart>,
    /// What instances said on their notification sockets, for those that did.
    pub reported: Vec<(InstanceId, Reported)>,
    /// `watch`: the watched paths and the last change acted on.
    pub watch: release::Shown,
    /// Lines of the instances' output lost since the broker started.
    pub log_lines_dropped: u64,
    /// What instances said with `Report`, for those that did.
    pub app_reports: Vec<(InstanceId, AppReport)>,
    pub reexecs: Reexecs,
}

/// How an instance's life ended, for whoever waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Life {
    State(InstanceState),
    Exited(String),
}

/// A spawned instance the broker has not reaped yet.
struct Tracked {
    life: watch::Sender<Life>,
    process: Arc<Process>,
    /// What it was started with: it is stopped with its own stop signal.
    settings: Arc<Settings>,
    /// What it said on its notification socket.
    reported: Reported,
    /// What it said with `Report`.
    app_report: AppReport,
    /// Until when `EXTEND_TIMEOUT_USEC=` let its start run.
    extended: watch::Sender<Option<tokio::time::Instant>>,
    /// Its watchdog, with `watchdog` configured.
    watchdog: Option<watch::Sender<unmodified::Watchdog>>,
    /// The process `MAINPID=` named, which then gets the stop signal.
    main: Option<Arc<Process>>,
    /// Its notification socket, with `ready = "notify"`.
    notify_socket: Option<Arc<unmodified::NotifySocket>>,
    /// Copies of its stdout and stderr pipes' read ends, which a re-exec carries.
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// Its process's start time, which tells it from a later process with its
    /// pid when a restarted broker adopts it.
    start_ticks: Option<u64>,
    /// Spawned by a broker that died: not this process's child.
    adopted: bool,
}

/// How an instance's exit status is had once it exited.
pub(crate) enum Reap {
    /// Spawned by this process image.
    Child(tokio::process::Child),
    /// Spawned before a re-exec: still this process's child, waited for by pid.
    Carried,
    /// Spawned by a broker that died: no longer a child; its status is unknown.
    Adopted,
}

impl Tracked {
    /// The process its stop signal goes to.
    fn main_process(&self) -> Arc<Process> {
        self.main.clone().unwrap_or_else(|| self.process.clone())
    }
}

/// Where the config came from, for the reloads that read it again.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// The text `ally run` read from `config.file`; none on the built-in defaults.
    pub text: Option<String>,
    /// The command given on `ally run`'s command line, which replaces the file's.
    pub command_override: Option<Vec<String>>,
    /// What `ally run`'s other options change.
    pub overrides: crate::config::Overrides,
}

/// What a generation is started with: its config and what the broker resolved
/// of it. A reload that reads the config again swaps the broker's once its
/// generation is ready; each instance keeps its own.
#[derive(Debug)]
struct Settings {
    config: Config,
    launch: Launch,
    /// With `start_priority = "idle"`: the policy a ready generation is raised to.
    raise_to: Option<Policy>,
    revision: Revision,
}

type Reply = oneshot::Sender<Result<Generation, Error>>;

struct Request {
    kind: plan::Request,
    reply: Option<Reply>,
}

struct Shared {
    table: Table,
    listeners: Registry<sockets::Held>,
    phase: Phase,
    reloads: u64,
    last_reload: String,
    tracked: HashMap<InstanceId, Tracked>,
    notified_ready: bool,
    /// (dev, ino) of the unix socket files the broker made or got back from the
    /// fd store: the only dead ones it replaces on an instance's behalf.
    socket_files: HashSet<(u64, u64)>,
    pending_restart: Option<PendingRestart>,
}

pub struct Broker {
    app: String,
    /// The settings of the generations started from now on.
    settings: Mutex<Arc<Settings>>,
    command_override: Option<Vec<String>>,
    overrides: crate::config::Overrides,
    /// See [`Broker::serve_socket_files`].
    socket_files: Mutex<Option<(std::path::PathBuf, Vec<std::path::PathBuf>)>>,
    shared: Mutex<Shared>,
    roster: roster::Roster,
    requests: mpsc::UnboundedSender<Request>,
    events: broadcast::Sender<Event>,
    /// Bumped whenever an instance exits.
    exits: watch::Sender<u64>,
    stopping: watch::Sender<bool>,
    /// The exit code once the broker is done, with the reason when it failed.
    exit: watch::Sender<Option<(i32, Option<String>)>>,
    coordinator_rx: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
    /// Cache, counters and locks shared by the instances; outlives every one of them.
    state: State,
    /// `watch`: reloads on a new release.
    release_watch: release::ReleaseWatch,
    /// The last reloads and restarts (config `history`).
    history: Mutex<crate::history::History>,
    metrics: crate::metrics::Metrics,
    /// Who asked for the reloads not yet launched; the next launch takes them all.
    askers: Mutex<Vec<String>>,
    /// The instances' stdout and stderr, with `stdout`/`stderr = "journal"`.
    logs: AppLogs,
    /// Held by the coordinator through each launch, and by a re-exec.
    launching: Arc<tokio::sync::Mutex<()>>,
    /// The config texts of the revisions in use, for a re-exec.
    config_texts: Mutex<reexec::ConfigTexts>,
    reexecs: Mutex<Reexecs>,
    /// The private and state sockets' listening fds.
    own_sockets: Mutex<Option<(std::os::fd::RawFd, std::os::fd::RawFd)>>,
    /// Set once the broker was restored from a re-exec's image: its instances
    /// run already.
    restored: watch::Sender<bool>,
    /// The broker's own fds systemd gave back from the fd store, by name.
    inherited_own: Mutex<HashMap<String, OwnedFd>>,
    /// Woken when something a snapshot holds changed.
    changed: tokio::sync::Notify,
    /// The plan's crash restarts since the app last recovered, as the
    /// coordinator last left them (an image carries them).
    restarts: std::sync::atomic::AtomicU32,
}

impl Broker {
    /// Creates the broker and binds the configured `[[listen]]` sockets, so a
    /// bad address fails the start instead of the first instance.
    pub fn new(
        app: &str,
        config: Config,
        source: Source,
        run_as: RunAs,
        address: String,
        state_address: String,
        state: State,
    ) -> Result<Arc<Self>, Error> {
        let broker = Broker::assemble(app, config, source, run_as, address, state_address, state)?;
        let (sockets, own) = systemd::inherited();
        broker.adopt(sockets);
        *broker
            .inherited_own
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = own;
        let settings = broker.settings();
        for entry in &settings.config.listen {
            let mut shared = broker.lock();
            if shared.listeners.contains(&entry.addr) {
                // Back from the fd store: still one of the config's, kept for good.
                shared
                    .listeners
                    .set_pinned(&entry.addr, true, std::time::Instant::now());
            } else {
                broker.bind(&mut shared, &settings, &entry.addr, &entry.options, true)?;
            }
        }
        Ok(broker)
    }

    /// The broker with nothing bound or running yet, around `state`.
    pub fn assemble(
        app: &str,
        config: Config,
        source: Source,
        run_as: RunAs,
        address: String,
        state_address: String,
        state: State,
    ) -> Result<Arc<Self>, Error> {
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let launch = Launch {
            command: Vec::new(),
            working_directory: None,
            run_as,
            environment: Default::default(),
            app: app.to_string(),
            address,
            state_address,
            stop_signal: config.stop_signal,
            drain_idle: config.drain_idle,
            stdout: config.stdout,
            stderr: config.stderr,
        };
        let logs = AppLogs::start(AppLogs::journal_path(), crate::app_logs::QUEUE_BYTES)
            .map_err(|e| Error::io("cannot start the thread that writes the app's output", e))?;
        let history = crate::history::History::new(config.history);
        let revision = Revision::first(source.text.as_deref());
        let config_texts = [(revision.number, source.text.clone())]
            .into_iter()
            .collect();
        let settings = Settings::new(config, launch, revision)?;
        let broker = Arc::new(Broker {
            app: app.to_string(),
            settings: Mutex::new(Arc::new(settings)),
            command_override: source.command_override,
            overrides: source.overrides,
            socket_files: Mutex::new(None),
            shared: Mutex::new(Shared {
                table: Table::default(),
                listeners: Registry::default(),
                phase: Phase::Starting,
                reloads: 0,
                last_reload: String::new(),
                tracked: HashMap::new(),
                notified_ready: false,
                socket_files: HashSet::new(),
                pending_restart: None,
            }),
            roster: roster::Roster::default(),
            requests,
            events: broadcast::channel(1024).0,
            exits: watch::channel(0).0,
            stopping: watch::channel(false).0,
            exit: watch::channel(None).0,
            coordinator_rx: Mutex::new(None),
            state,
            release_watch: release::ReleaseWatch::new(),
            history: Mutex::new(history),
            metrics: crate::metrics::Metrics::new(),
            askers: Mutex::new(Vec::new()),
            logs,
            launching: Arc::new(tokio::sync::Mutex::new(())),
            config_texts: Mutex::new(config_texts),
            reexecs: Mutex::new(Reexecs::default()),
            own_sockets: Mutex::new(None),
            restored: watch::channel(false).0,
            inherited_own: Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
            restarts: std::sync::atomic::AtomicU32::new(0),
        });
        *broker.coordinator_rx.lock().unwrap() = Some(requests_rx);
        Ok(broker)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The settings the next generation is started with.
    fn settings(&self) -> Arc<Settings> {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The settings `instance` was started with, or the broker's.
    fn settings_of(&self, shared: &Shared, instance: InstanceId) -> Arc<Settings> {
        match shared.tracked.get(&instance) {
            Some(tracked) => tracked.settings.clone(),
            None => self.settings(),
        }
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    /// Lines of the instances' output lost since the broker started (see
    /// [`crate::app_logs`]).
    pub fn log_lines_dropped(&self) -> u64 {
        self.logs.dropped()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, event: Event) {
        self.changed.notify_one();
        let _ = self.events.send(event);
    }

    /// An fd systemd gave back from the fd store, named `name`.
    pub fn take_inherited(&self, name: &str) -> Option<OwnedFd> {
        self.inherited_own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    fn progress(&self, generation: Generation, progress: Progress) {
        self.emit(Event::ReloadProgress {
            generation,
            progress,
        });
    }

    /// Runs the application until the broker is told to stop (SIGTERM, SIGINT)
    /// or the application is gone for good. Returns the process exit code, or
    /// the one-line reason the application could not be started at all.
    pub async fn run(self: Arc<Self>) -> Result<i32, String> {
        let rx = self
            .coordinator_rx
            .lock()
            .unwrap()
            .take()
            .expect("run once");
        tokio::spawn(self.clone().coordinate(rx));
        tokio::spawn(self.clone().sweep_listeners());
        tokio::spawn(self.clone().watch_releases());
        systemd::spawn_watchdog();
        let broker = self.clone();
        tokio::spawn(async move { broker.state.sweep().await });
        if *self.restored.borrow() {
            self.resume_instances();
        } else {
            let _ = self.requests.send(Request {
                kind: plan::Request::Start,
                reply: None,
            });
        }
        let mut sigterm = signal_stream(tokio::signal::unix::SignalKind::terminate());
        let mut sigint = signal_stream(tokio::signal::unix::SignalKind::interrupt());
        let mut sighup = signal_stream(tokio::signal::unix::SignalKind::hangup());
        let mut exit = self.exit.subscribe();
        let result = loop {
            tokio::select! {
                _ = sigterm.recv() => break Ok(0),
                _ = sigint.recv() => break Ok(0),
                _ = sighup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    let reload = self.reload_by("SIGHUP".to_string());
                    tokio::spawn(async move { let _ = reload.await; });
                }
                Ok(done) = exit.wait_for(Option::is_some) => {
                    match done.clone() {
                        Some((code, None)) => break Ok(code),
                        Some((_, Some(reason))) => break Err(reason),
                        None => {}
                    }
                }
            }
        };
        self.shutdown().await;
        result
    }

    /// Asks for a reload; the future resolves with the new generation once it is
    /// ready, or with the reason it failed.
    pub fn reload(&self) -> impl Future<Output = Result<Generation, Error>> + use<> {
        let (tx, rx) = oneshot::channel();
        let sent = self.requests.send(Request {
            kind: plan::Request::Reload,
            reply: Some(tx),
        });
        async move {
            sent.map_err(|_| coordinator::stopping_error())?;
            rx.await
                .unwrap_or_else(|_| Err(coordinator::stopping_error()))
        }
    }

    /// [`Broker::reload`], recording in the history who asked.
    pub fn reload_by(
        &self,
        who: String,
    ) -> impl Future<Output = Result<Generation, Error>> + use<> {
        let mut askers = self.askers.lock().unwrap_or_else(|p| p.into_inner());
        if !askers.contains(&who) && askers.len() < MAX_ASKERS {
            askers.push(who);
        }
        drop(askers);
        self.reload()
    }

    /// Who asked for the launch that starts now, joined.
    fn take_askers(&self) -> String {
        std::mem::take(&mut *self.askers.lock().unwrap_or_else(|p| p.into_inner())).join(", ")
    }

    /// The last reloads and restarts, oldest first.
    pub fn history(&self) -> Vec<crate::history::Entry> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.entries().cloned().collect()
    }

    fn record_history(&self, record: crate::history::Record) {
        self.metrics
            .record(record.kind, record.success, record.duration);
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The OpenMetrics text of `Metrics()` and `metrics_address`.
    pub fn metrics_text(&self) -> String {
        let gauges = {
            let shared = self.lock();
            let states = [
                InstanceState::Starting,
                InstanceState::Ready,
                InstanceState::Draining,
            ];
            crate::metrics::Gauges {
                instances: states
                    .iter()
                    .map(|&s| (s.as_str(), shared.table.count(s) as i64))
                    .collect(),
                listeners: shared.listeners.list().len() as i64,
                draining_tasks: Some(
                    shared
                        .table
                        .iter()
                        .filter(|i| i.state == InstanceState::Draining)
                        .filter_map(|i| shared.tracked.get(&i.id)?.app_report.tasks)
                        .map(i64::from)
                        .sum(),
                ),
                log_lines_dropped: Some(self.logs.dropped()),
            }
        };
        self.metrics.render(&gauges)
    }

    pub fn status(&self) -> Status {
        let settings = self.settings();
        let shared = self.lock();
        Status {
            app: self.app.clone(),
            phase: shared.phase,
            generation: shared.table.current().map_or(0, |i| i.generation),
            pid: std::process::id(),
            instances: shared.table.iter().cloned().collect(),
            config_file: settings.config.file.clone(),
            revision: settings.revision.clone(),
            instance_revisions: shared
                .table
                .iter()
                .filter_map(|i| {
                    let tracked = shared.tracked.get(&i.id)?;
                    Some((i.id, tracked.settings.revision.clone()))
                })
                .collect(),
            listeners: shared.listeners.list(),
            reloads: shared.reloads,
            last_reload: shared.last_reload.clone(),
            pending_restart: shared.pending_restart,
            reported: shared
                .table
                .iter()
                .filter_map(|i| {
                    let tracked = shared.tracked.get(&i.id)?;
                    (tracked.reported != Reported::default())
                        .then(|| (i.id, tracked.reported.clone()))
                })
                .collect(),
            watch: self.release_watch.shown(),
            log_lines_dropped: self.logs.dropped(),
            app_reports: app_reports(&shared)
                .map(|(id, _, report)| (id, report.clone()))
                .collect(),
            reexecs: self.reexecs(),
        }
    }

    /// What each instance not yet reaped reported with `Report`, for those
    /// that did, in the instance table's order: `(id, generation, report)`.
    pub fn instance_app_reports(&self) -> Vec<(InstanceId, Generation, AppReport)> {
        app_reports(&self.lock())
            .map(|(id, generation, report)| (id, generation, report.clone()))
            .collect()
    }

    /// Replaces the keys `update` names in what `instance` reports, and tells
    /// every subscriber when that changed anything.
    pub fn report(&self, instance: InstanceId, update: AppReport) -> Result<(), Error> {
        let mut shared = self.lock();
        let generation = shared
            .table
            .get(instance)
            .map(|i| i.generation)
            .ok_or_else(|| Error::invalid_argument(format!("instance {instance} has exited")))?;
        let Some(tracked) = shared.tracked.get_mut(&instance) else {
            return Err(Error::invalid_argument(format!(
                "instance {instance} has exited"
            )));
        };
        if !tracked.app_report.merge(update) {
            return Ok(());
        }
        let report = tracked.app_report.clone();
        // Sent under the lock, so subscribers see changes in the order they were made.
        self.emit(Event::InstanceReported {
            id: instance,
            generation,
            report,
        });
        drop(shared);
        Ok(())
    }

    /// Instance ids by main pid, for telling callers apart.
    pub fn instance_pids(&self) -> HashMap<u32, InstanceId> {
        self.roster.snapshot().by_pid
    }

    /// Instance ids by main pid, and whether a spawn was in flight: then a
    /// process found in none may be the instance being recorded.
    pub fn instance_snapshot(&self) -> Snapshot {
        self.roster.snapshot()
    }

    /// Resolves once no spawn is in flight.
    pub async fn spawns_settled(&self) {
        self.roster.settled().await
    }

    pub fn instance_alive(&self, id: InstanceId) -> bool {
        self.roster.alive(id)
    }

    /// Returns a duplicate of the socket for `addr`, binding it on first request,
    /// and counts a reference for `instance`.
    pub fn listen(
        &self,
        instance: InstanceId,
        addr: &ListenAddr,
        options: &ListenOptions,
    ) -> Result<OwnedFd, Error> {
        let mut shared = self.lock();
        if shared.table.get(instance).is_none() {
            return Err(Error::invalid_argument(format!(
                "instance {instance} has exited"
            )));
        }
        let starting = shared
            .table
            .get(instance)
            .filter(|i| i.state == InstanceState::Starting)
            .map(|i| i.generation);
        let fd = match shared.listeners.get(addr) {
            Some(held) => sockets::dup(&held.fd)?,
            None => {
                let settings = self.settings_of(&shared, instance);
                let fd = self.bind(&mut shared, &settings, addr, options, false)?;
                tracing::info!(instance, "listening on {addr}");
                fd
            }
        };
        shared.listeners.add_ref(addr, instance);
        drop(shared);
        self.changed.notify_one();
        if let Some(generation) = starting {
            self.progress(generation, listening(addr));
        }
        Ok(fd)
    }

    /// Drops the instance's references to a listener.
    pub fn close(&self, instance: InstanceId, addr: &ListenAddr) -> Result<(), Error> {
        if self
            .lock()
            .listeners
            .release(addr, instance, Instant::now())
        {
            Ok(())
        } else {
            Err(Error::invalid_argument(format!(
                "instance {instance} holds no reference to {addr}"
            )))
        }
    }

    /// The tasks instance `id` last reported with `Report`, for the `draining` phase.
    fn reported_tasks(&self, shared: &Shared, id: InstanceId) -> Option<u32> {
        shared.tracked.get(&id)?.app_report.tasks
    }

    /// Records that an instance serves.
    pub fn ready(&self, instance: InstanceId) -> Result<(), Error> {
        let mut shared = self.lock();
        let changed = shared
            .table
            .mark_ready(instance, Instant::now(), SystemTime::now())
            .map_err(|e| Error::invalid_argument(e.to_string()))?;
        if changed {
            if let Some(tracked) = shared.tracked.get(&instance) {
                tracked.life.send_replace(Life::State(InstanceState::Ready));
            }
            drop(shared);
            self.emit(Event::InstanceStateChanged {
                id: instance,
                state: InstanceState::Ready,
            });
        }
        Ok(())
    }
}

impl Settings {
    /// `launch` with what `config` says about the instances' processes; the
    /// rest of it (who they run as, the broker's addresses) as given.
    fn new(config: Config, launch: Launch, revision: Revision) -> Result<Settings, Error> {
        let raise_to = match config.start_priority {
            StartPriority::Normal => None,
            StartPriority::Idle => Some(coordinator::idle_start_policy()?),
        };
        let launch = Launch {
            command: config.command.clone(),
            working_directory: config.working_directory.clone(),
            environment: config.environment.clone(),
            stop_signal: config.stop_signal,
            drain_idle: config.drain_idle,
            stdout: config.stdout,
            stderr: config.stderr,
            ..launch
        };
        Ok(Settings {
            config,
            launch,
            raise_to,
            revision,
        })
    }
}

/// What each instance not yet reaped reported, for those that did.
fn app_reports(shared: &Shared) -> impl Iterator<Item = (InstanceId, Generation, &AppReport)> {
    shared.table.iter().filter_map(|i| {
        let report = &shared.tracked.get(&i.id)?.app_report;
        (!report.is_empty()).then_some((i.id, i.generation, report))
    })
}

/// The `listening` phase for a socket taken.
fn listening(addr: &ListenAddr) -> Progress {
    Progress::Listening {
        network: addr.network.as_str().to_string(),
        address: addr.endpoint.to_string(),
    }
}

fn signal_stream(kind: tokio::signal::unix::SignalKind) -> tokio::signal::unix::Signal {
    tokio::signal::unix::signal(kind).expect("installing a signal handler")
}
