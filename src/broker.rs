//! The broker: owns the listeners and the generation table, starts and stops
//! instances, and runs reloads one at a time.
//!
//! Every change of which generation runs — the first start, a reload, a crash
//! restart — goes through one coordinator task, in order. Requests that arrive
//! while it is busy are answered together by one follow-up reload, so a reload
//! asked for after a binary was replaced always runs the new binary.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use ally_core::net::{self, Endpoint, ListenAddr, ListenOptions};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::bind_as::{self, BindAs, Credentials, SocketFile};
use crate::config::{Config, RestartPolicy, StartPriority};
use crate::generations::{Generation, Instance, InstanceId, InstanceState, Table};
use crate::identity::RunAs;
use crate::instance::{self, Launch};
use crate::listen_policy;
use crate::listeners::{ListenerInfo, Registry};
use crate::priority::{self, Policy};
use crate::state::State;
use crate::systemd;

/// An instance that stays ready this long has recovered: its next crash
/// restarts without back-off.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Back-off of crash restarts grows up to this (or `restart_delay`, if longer).
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// How long the broker waits for a SIGKILLed process to be reaped.
const REAP_GRACE: Duration = Duration::from_secs(5);
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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
}

#[derive(Debug, Clone)]
pub struct Status {
    pub app: String,
    pub phase: Phase,
    pub generation: Generation,
    pub pid: u32,
    pub instances: Vec<Instance>,
    pub listeners: Vec<ListenerInfo>,
    pub reloads: u64,
    pub last_reload: String,
}

/// A socket the broker holds, with the file of a unix path socket so that
/// closing it unlinks only that file, never one another process bound since.
#[derive(Debug)]
struct Held {
    fd: OwnedFd,
    unix_file: Option<SocketFile>,
}

impl Held {
    /// A socket systemd passed: its file is whatever is at its path now.
    fn adopted(fd: OwnedFd, endpoint: &Endpoint) -> Held {
        let unix_file = match endpoint {
            Endpoint::Path(path) => SocketFile::find(path),
            _ => None,
        };
        Held { fd, unix_file }
    }

    /// Closes the socket for good, returning the identity of the file it
    /// removed. Not done on exit: a restarted broker gets the socket back from
    /// systemd's fd store and its file must still be there.
    fn close(self) -> Option<(u64, u64)> {
        let file = self.unix_file?;
        file.remove().then(|| file.id())
    }
}

/// How an instance's life ended, for whoever waits on it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Life {
    State(InstanceState),
    Exited(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Start,
    Reload,
    /// The current instance exited; `stable` if it had served for a while.
    Restart {
        stable: bool,
    },
    /// The current instance exited and the policy does not restart it.
    GiveUp {
        code: i32,
    },
}

type Reply = oneshot::Sender<Result<Generation, Error>>;

struct Request {
    kind: Kind,
    reply: Option<Reply>,
}

struct Shared {
    table: Table,
    listeners: Registry<Held>,
    phase: Phase,
    reloads: u64,
    last_reload: String,
    lives: HashMap<InstanceId, watch::Sender<Life>>,
    notified_ready: bool,
    /// (dev, ino) of the unix socket files the broker made or got back from the
    /// fd store: the only dead ones it replaces on an instance's behalf.
    socket_files: HashSet<(u64, u64)>,
}

pub struct Broker {
    app: String,
    config: Config,
    launch: Launch,
    shared: Mutex<Shared>,
    requests: mpsc::UnboundedSender<Request>,
    events: broadcast::Sender<Event>,
    /// Bumped whenever an instance exits.
    exits: watch::Sender<u64>,
    stopping: watch::Sender<bool>,
    exit_code: watch::Sender<Option<i32>>,
    coordinator_rx: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
    /// Cache, counters and locks shared by the instances; outlives every one of them.
    state: State,
    /// With `start_priority = "idle"`: the policy a ready generation is raised to.
    raise_to: Option<Policy>,
}

impl Broker {
    /// Creates the broker and binds the configured `[[listen]]` sockets, so a
    /// bad address fails the start instead of the first instance.
    pub fn new(
        app: &str,
        config: Config,
        run_as: RunAs,
        address: String,
        state_address: String,
    ) -> Result<Arc<Self>, Error> {
        let raise_to = match config.start_priority {
            StartPriority::Normal => None,
            StartPriority::Idle => Some(idle_start_policy()?),
        };
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let launch = Launch {
            command: config.command.clone(),
            working_directory: config.working_directory.clone(),
            run_as,
            environment: config.environment.clone(),
            app: app.to_string(),
            address,
            state_address,
            stop_signal: config.stop_signal,
        };
        let broker = Arc::new(Broker {
            app: app.to_string(),
            launch,
            shared: Mutex::new(Shared {
                table: Table::default(),
                listeners: Registry::default(),
                phase: Phase::Starting,
                reloads: 0,
                last_reload: String::new(),
                lives: HashMap::new(),
                notified_ready: false,
                socket_files: HashSet::new(),
            }),
            requests,
            events: broadcast::channel(1024).0,
            exits: watch::channel(0).0,
            stopping: watch::channel(false).0,
            exit_code: watch::channel(None).0,
            coordinator_rx: Mutex::new(None),
            state: State::new(&config.limits),
            config,
            raise_to,
        });
        broker.adopt(systemd::inherited());
        for entry in &broker.config.listen {
            let mut shared = broker.lock();
            if !shared.listeners.contains(&entry.addr) {
                broker.bind(&mut shared, &entry.addr, &entry.options, true)?;
            }
        }
        *broker.coordinator_rx.lock().unwrap() = Some(requests_rx);
        Ok(broker)
    }

    /// Takes over the sockets systemd passed: our own from the fd store after a
    /// restart, and those of a `.socket` unit, kept for the broker's life.
    fn adopt(&self, sockets: Vec<systemd::Inherited>) {
        let mut shared = self.lock();
        for inherited in sockets {
            let systemd::Inherited {
                fd,
                key,
                aliases,
                origin,
            } = inherited;
            if shared.listeners.contains(&key) {
                systemd::unstore(&key);
                continue;
            }
            let bound = net::local_address(&fd).unwrap_or_else(|_| key.endpoint.to_string());
            let held = Held::adopted(fd, &key.endpoint);
            if origin == systemd::Origin::FdStore
                && let Some(file) = &held.unix_file
            {
                shared.socket_files.insert(file.id());
            }
            let from = match origin {
                systemd::Origin::FdStore => "the fd store",
                systemd::Origin::SocketActivation => "socket activation",
            };
            tracing::info!("adopted {key} from {from}");
            let pinned = origin == systemd::Origin::SocketActivation;
            shared
                .listeners
                .insert(key, aliases, held, bound, pinned, Instant::now());
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Runs the application until the broker is told to stop (SIGTERM, SIGINT)
    /// or the application is gone for good. Returns the process exit code.
    pub async fn run(self: Arc<Self>) -> i32 {
        let rx = self
            .coordinator_rx
            .lock()
            .unwrap()
            .take()
            .expect("run once");
        tokio::spawn(self.clone().coordinate(rx));
        tokio::spawn(self.clone().sweep_listeners());
        systemd::spawn_watchdog();
        let broker = self.clone();
        tokio::spawn(async move { broker.state.sweep().await });
        let _ = self.requests.send(Request {
            kind: Kind::Start,
            reply: None,
        });
        let mut sigterm = signal_stream(tokio::signal::unix::SignalKind::terminate());
        let mut sigint = signal_stream(tokio::signal::unix::SignalKind::interrupt());
        let mut sighup = signal_stream(tokio::signal::unix::SignalKind::hangup());
        let mut exit_code = self.exit_code.subscribe();
        let code = loop {
            tokio::select! {
                _ = sigterm.recv() => break 0,
                _ = sigint.recv() => break 0,
                _ = sighup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    let reload = self.reload();
                    tokio::spawn(async move { let _ = reload.await; });
                }
                Ok(()) = exit_code.changed() => {
                    if let Some(code) = *exit_code.borrow() { break code; }
                }
            }
        };
        self.shutdown().await;
        code
    }

    /// Asks for a reload; the future resolves with the new generation once it is
    /// ready, or with the reason it failed.
    pub fn reload(&self) -> impl Future<Output = Result<Generation, Error>> + use<> {
        let (tx, rx) = oneshot::channel();
        let sent = self.requests.send(Request {
            kind: Kind::Reload,
            reply: Some(tx),
        });
        async move {
            sent.map_err(|_| Error::reload_failed("the broker is stopping".into()))?;
            rx.await
                .unwrap_or_else(|_| Err(Error::reload_failed("the broker is stopping".into())))
        }
    }

    pub fn status(&self) -> Status {
        let shared = self.lock();
        Status {
            app: self.app.clone(),
            phase: shared.phase,
            generation: shared.table.current().map_or(0, |i| i.generation),
            pid: std::process::id(),
            instances: shared.table.iter().cloned().collect(),
            listeners: shared.listeners.list(),
            reloads: shared.reloads,
            last_reload: shared.last_reload.clone(),
        }
    }

    /// Instance ids by main pid, for telling callers apart.
    pub fn instance_pids(&self) -> HashMap<u32, InstanceId> {
        self.lock().table.iter().map(|i| (i.pid, i.id)).collect()
    }

    pub fn instance_alive(&self, id: InstanceId) -> bool {
        self.lock().table.get(id).is_some()
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
        let fd = match shared.listeners.get(addr) {
            Some(held) => dup(&held.fd)?,
            None => {
                let fd = self.bind(&mut shared, addr, options, false)?;
                tracing::info!(instance, "listening on {addr}");
                fd
            }
        };
        shared.listeners.add_ref(addr, instance);
        Ok(fd)
    }

    fn bind(
        &self,
        shared: &mut Shared,
        addr: &ListenAddr,
        options: &ListenOptions,
        pinned: bool,
    ) -> Result<OwnedFd, Error> {
        let declared =
            pinned || listen_policy::declared(&self.config.listen, &self.config.allow_listen, addr);
        let bound = if declared {
            // A dead socket file at a declared path that the broker's user owns is
            // most likely the broker's own, from before it was restarted.
            let broker_uid = nix::unistd::geteuid().as_raw();
            let known = &shared.socket_files;
            let removable =
                |dev: u64, ino: u64, uid: u32| uid == broker_uid || known.contains(&(dev, ino));
            match bind_as::bind(addr, options, BindAs::Broker, &removable) {
                // A directory on the way that a user may change (the app's own
                // runtime directory, say): root must not bind there, but that
                // user may, as the instances' user could itself.
                Err(bind_as::Error::Denied(why)) => {
                    let creds = self.instance_credentials()?;
                    let removable = |dev: u64, ino: u64, uid: u32| {
                        uid == creds.uid || known.contains(&(dev, ino))
                    };
                    bind_as::bind(addr, options, BindAs::User(&creds), &removable).map_err(|e| {
                        match e {
                            bind_as::Error::Denied(as_user) => Error::access_denied(format!(
                                "{addr} refused: {why}, so the broker does not bind it as root, and the instances run as {}, who {as_user}; choose a path whose directories only root may change, or one the instances' user may write",
                                self.instance_user(&creds)
                            )),
                            bind_as::Error::Address(e) => e,
                        }
                    })
                }
                Err(bind_as::Error::Address(e)) => Err(e),
                Ok(bound) => Ok(bound),
            }
        } else {
            let creds = self.instance_credentials()?;
            if creds.uid != 0
                && let Some(port) =
                    listen_policy::privileged_port(addr, bind_as::unprivileged_port_start())
            {
                return Err(self.refused(
                    addr,
                    &format!(
                        "port {port} is privileged (below net.ipv4.ip_unprivileged_port_start) and the instances run as {}, who may not bind it",
                        self.instance_user(&creds)
                    ),
                ));
            }
            let known = &shared.socket_files;
            let removable = |dev: u64, ino: u64, _uid: u32| known.contains(&(dev, ino));
            bind_as::bind(addr, options, BindAs::User(&creds), &removable).map_err(|e| match e {
                bind_as::Error::Denied(why) => self.refused(
                    addr,
                    &format!(
                        "the instances run as {}, who {why}",
                        self.instance_user(&creds)
                    ),
                ),
                bind_as::Error::Address(e) => e,
            })
        };
        let bind_as::Bound { socket, file } = bound?;
        if let Some(file) = &file {
            shared.socket_files.insert(file.id());
        }
        let bound = net::local_address(&socket).unwrap_or_else(|_| addr.endpoint.to_string());
        let bound_key = ListenAddr::parse(addr.network.as_str(), &bound).ok();
        let fd: OwnedFd = socket.into();
        let copy = dup(&fd)?;
        systemd::store(addr, &fd);
        shared.listeners.insert(
            addr.clone(),
            bound_key.into_iter().collect(),
            Held {
                fd,
                unix_file: file,
            },
            bound,
            pinned,
            Instant::now(),
        );
        Ok(copy)
    }

    fn refused(&self, addr: &ListenAddr, why: &str) -> Error {
        Error::access_denied(listen_policy::refusal(
            addr,
            why,
            self.config.file.as_deref(),
        ))
    }

    /// The credentials the instances run with (see `instance::spawn`): the
    /// configured user and group with the user's supplementary groups, else the
    /// broker's own, as resolved at start-up (see `crate::identity`).
    fn instance_credentials(&self) -> Result<Credentials, Error> {
        Ok(self.launch.run_as.credentials())
    }

    /// "nobody (uid 65534)", for messages.
    fn instance_user(&self, _creds: &Credentials) -> String {
        self.launch.run_as.describe()
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

    /// Records that an instance serves.
    pub fn ready(&self, instance: InstanceId) -> Result<(), Error> {
        let mut shared = self.lock();
        let changed = shared
            .table
            .mark_ready(instance, Instant::now(), SystemTime::now())
            .map_err(|e| Error::invalid_argument(e.to_string()))?;
        if changed {
            if let Some(life) = shared.lives.get(&instance) {
                life.send_replace(Life::State(InstanceState::Ready));
            }
            drop(shared);
            self.emit(Event::InstanceStateChanged {
                id: instance,
                state: InstanceState::Ready,
            });
        }
        Ok(())
    }

    async fn coordinate(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Request>) {
        let mut restarts: u32 = 0;
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
            if *self.stopping.borrow() {
                answer(pending.drain(..), Err(stopping_error()));
                continue;
            }
            let current = self.lock().table.current().map(|i| i.generation);
            let wants = |pred: fn(Kind) -> bool| pending.iter().any(|r| pred(r.kind));
            let reload = wants(|k| matches!(k, Kind::Reload));
            let start = wants(|k| matches!(k, Kind::Start));
            let restart = wants(|k| matches!(k, Kind::Restart { .. }));
            if pending
                .iter()
                .any(|r| matches!(r.kind, Kind::Restart { stable: true }))
            {
                restarts = 0;
            }
            if !reload && let Some(generation) = current {
                // A crash while a reload was in flight: that reload already replaced it.
                answer(pending.drain(..), Ok(generation));
                continue;
            }
            if !reload && !start && !restart {
                let code = pending
                    .iter()
                    .find_map(|r| match r.kind {
                        Kind::GiveUp { code } => Some(code),
                        _ => None,
                    })
                    .unwrap_or(0);
                if self.lock().table.running().is_empty() {
                    tracing::info!(
                        "the application is gone and its restart policy is {}; stopping",
                        self.config.restart
                    );
                    self.exit_code.send_replace(Some(code));
                }
                pending.clear();
                continue;
            }
            let kind = if reload {
                Kind::Reload
            } else if start {
                Kind::Start
            } else {
                Kind::Restart { stable: false }
            };
            if matches!(kind, Kind::Restart { .. }) {
                let delay = restart_delay(self.config.restart_delay, restarts);
                restarts = restarts.saturating_add(1);
                tracing::info!(
                    "restarting the application in {}",
                    humantime::format_duration(delay)
                );
                let mut stopping = self.stopping.subscribe();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopping.wait_for(|s| *s) => {}
                }
                while let Ok(request) = rx.try_recv() {
                    pending.push(request);
                }
            }
            let result = self.launch_generation(kind).await;
            if matches!(kind, Kind::Reload) && result.is_ok() {
                restarts = 0;
            }
            answer(pending.drain(..), result.clone());
            if result.is_err() && !*self.stopping.borrow() && self.lock().table.current().is_none()
            {
                // Nothing serves: whatever was asked, this is now a crash to recover from.
                if self.config.restart != RestartPolicy::Never {
                    pending.push(Request {
                        kind: Kind::Restart { stable: false },
                        reply: None,
                    });
                } else if self.lock().table.running().is_empty() {
                    tracing::error!(
                        "the application could not be started and its restart policy is never; stopping"
                    );
                    self.exit_code.send_replace(Some(1));
                }
            }
        }
    }

    /// Returns an idle-started generation to the broker's priority.
    fn raise(&self, generation: Generation, pid: u32) {
        let Some(policy) = self.raise_to else { return };
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
    /// instances are asked to stop.
    async fn launch_generation(self: &Arc<Self>, kind: Kind) -> Result<Generation, Error> {
        let mut stopping = self.stopping.subscribe();
        self.wait_for_drain_slot().await?;
        let phase = match kind {
            Kind::Start => Phase::Starting,
            Kind::Reload => Phase::Reloading,
            _ => Phase::Restarting,
        };
        let started = Instant::now();
        if phase != Phase::Starting {
            systemd::reloading();
        }
        let spawned = {
            let mut shared = self.lock();
            shared.phase = phase;
            let generation = shared.table.next_generation();
            // Idle only beside a generation that serves: alone, it has no one to spare.
            let idle = self.raise_to.is_some() && shared.table.count(InstanceState::Ready) > 0;
            match instance::spawn(&self.launch, shared.table.next_id(), generation, idle) {
                Ok(child) => {
                    let pid = child.id().unwrap_or(0);
                    let id =
                        shared
                            .table
                            .spawned(generation, pid, Instant::now(), SystemTime::now());
                    let (life, life_rx) = watch::channel(Life::State(InstanceState::Starting));
                    shared.lives.insert(id, life);
                    Ok((generation, id, pid, child, life_rx, idle))
                }
                Err(e) => Err((generation, e)),
            }
        };
        let (generation, id, pid, child, mut life, mut idle) = match spawned {
            Ok(s) => s,
            Err((generation, e)) => {
                let message = format!("generation {generation} could not start: {e}");
                return Err(self.finish(generation, Err(message)));
            }
        };
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
        tokio::spawn(self.clone().watch_instance(id, child));

        let timeout = self.config.ready_timeout;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut exits = self.exits.subscribe();
        let outcome = loop {
            tokio::select! {
                life = life.wait_for(|l| !matches!(l, Life::State(InstanceState::Starting))) => {
                    break match life.map(|l| l.clone()) {
                        Ok(Life::State(InstanceState::Ready)) => Ok(()),
                        Ok(Life::Exited(how)) => Err(format!("generation {generation} (pid {pid}) {how} before it was ready")),
                        _ => Err(format!("generation {generation} (pid {pid}) was stopped before it was ready")),
                    };
                }
                _ = &mut deadline => {
                    break Err(format!(
                        "generation {generation} (pid {pid}) was not ready within {} (ready_timeout); it was killed{}",
                        humantime::format_duration(timeout),
                        if idle { " (it was still at idle CPU priority: start_priority = \"idle\")" } else { "" }
                    ));
                }
                _ = stopping.wait_for(|s| *s) => break Err("the broker is stopping".to_string()),
                Ok(()) = exits.changed(), if idle => {
                    if self.lock().table.count(InstanceState::Ready) == 0 {
                        tracing::info!(generation, pid, "no generation serves any more: generation {generation} continues at normal CPU priority");
                        self.raise(generation, pid);
                        idle = false;
                    }
                }
            }
        };
        if let Err(message) = outcome {
            self.lock().table.begin_drain(id);
            instance::kill_group(pid);
            let _ =
                tokio::time::timeout(REAP_GRACE, life.wait_for(|l| matches!(l, Life::Exited(_))))
                    .await;
            return Err(self.finish(generation, Err(message)));
        }

        if idle {
            self.raise(generation, pid);
        }
        let older: Vec<(InstanceId, u32)> = {
            let mut shared = self.lock();
            let older = shared.table.others_running(id);
            shared.table.begin_drain_all(older)
        };
        for (old, old_pid) in older {
            self.drain(old, old_pid);
        }
        let elapsed = started.elapsed();
        let message = match kind {
            Kind::Start => format!("generation {generation} is ready ({})", ms(elapsed)),
            Kind::Reload => format!("reloaded to generation {generation} ({})", ms(elapsed)),
            _ => format!("restarted as generation {generation} ({})", ms(elapsed)),
        };
        tracing::info!("{message}");
        if matches!(kind, Kind::Reload) {
            self.lock().reloads += 1;
        }
        self.finish(generation, Ok(message));
        Ok(generation)
    }

    /// Records a reload's result, tells D-Bus and systemd, and returns the error
    /// for the caller.
    fn finish(&self, generation: Generation, result: Result<String, String>) -> Error {
        let (success, message) = match &result {
            Ok(m) => (true, m.clone()),
            Err(m) => (false, m.clone()),
        };
        if !success {
            tracing::warn!("{message}");
        }
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
        self.emit(Event::ReloadFinished {
            generation: if success { generation } else { 0 },
            success,
            message: message.clone(),
        });
        Error::reload_failed(message)
    }

    /// Asks an instance to stop, and SIGKILLs it if it is still there after
    /// `stop_timeout`.
    fn drain(self: &Arc<Self>, id: InstanceId, pid: u32) {
        tracing::info!(
            instance = id,
            pid,
            "asking instance to stop with {}",
            self.config.stop_signal
        );
        self.emit(Event::InstanceStateChanged {
            id,
            state: InstanceState::Draining,
        });
        let life = self.lock().lives.get(&id).map(|l| {
            l.send_replace(Life::State(InstanceState::Draining));
            l.subscribe()
        });
        instance::signal(pid, self.config.stop_signal);
        let Some(mut life) = life else { return };
        let timeout = self.config.stop_timeout;
        tokio::spawn(async move {
            let exited = life.wait_for(|l| matches!(l, Life::Exited(_)));
            if tokio::time::timeout(timeout, exited).await.is_err() {
                tracing::warn!(
                    instance = id,
                    pid,
                    "did not stop within {} (stop_timeout); sending SIGKILL",
                    humantime::format_duration(timeout)
                );
                instance::kill_group(pid);
            }
        });
    }

    async fn wait_for_drain_slot(&self) -> Result<(), Error> {
        let mut exits = self.exits.subscribe();
        loop {
            let draining = self.lock().table.count(InstanceState::Draining);
            if draining < self.config.max_draining {
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

    async fn watch_instance(self: Arc<Self>, id: InstanceId, mut child: tokio::process::Child) {
        let how = match child.wait().await {
            Ok(status) => (
                instance::describe_exit(&status),
                status.success(),
                status.code(),
            ),
            Err(e) => (format!("could not be waited for: {e}"), false, None),
        };
        let (description, success, code) = how;
        let now = Instant::now();
        let departure = {
            let mut shared = self.lock();
            shared.listeners.release_instance(id, now);
            if let Some(life) = shared.lives.remove(&id) {
                life.send_replace(Life::Exited(description.clone()));
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
        let restart = match self.config.restart {
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
            Kind::Restart {
                stable: departure.ready_for.is_some_and(|d| d >= STABLE_AFTER),
            }
        } else {
            Kind::GiveUp {
                code: if success {
                    0
                } else {
                    code.filter(|c| *c != 0).unwrap_or(1)
                },
            }
        };
        let _ = self.requests.send(Request { kind, reply: None });
    }

    async fn sweep_listeners(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            let closed = {
                let mut shared = self.lock();
                let paused = shared.table.current().is_none();
                shared
                    .listeners
                    .take_expired(Instant::now(), self.config.listener_linger, paused)
            };
            let mut removed = Vec::new();
            for (addr, held) in closed {
                tracing::info!(
                    "closing {addr}: no instance has used it for {}",
                    humantime::format_duration(self.config.listener_linger)
                );
                systemd::unstore(&addr);
                removed.extend(held.close());
            }
            if !removed.is_empty() {
                let mut shared = self.lock();
                for id in removed {
                    shared.socket_files.remove(&id);
                }
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
            let running = shared.table.running();
            shared.table.begin_drain_all(running)
        };
        for (id, pid) in running {
            self.drain(id, pid);
        }
        let mut exits = self.exits.subscribe();
        let deadline = tokio::time::Instant::now() + self.config.stop_timeout + REAP_GRACE;
        while !self.lock().table.is_empty() {
            if tokio::time::timeout_at(deadline, exits.changed())
                .await
                .is_err()
            {
                tracing::error!("instances still running after stop_timeout and SIGKILL");
                break;
            }
        }
    }
}

fn answer(requests: impl Iterator<Item = Request>, result: Result<Generation, Error>) {
    for request in requests {
        if let Some(reply) = request.reply {
            let _ = reply.send(result.clone());
        }
    }
}

fn stopping_error() -> Error {
    Error::reload_failed("the broker is stopping".into())
}

/// The broker's own policy, once it is known that the broker may return an
/// idle instance to it.
fn idle_start_policy() -> Result<Policy, Error> {
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

fn restart_delay(base: Duration, attempt: u32) -> Duration {
    let cap = MAX_RESTART_DELAY.max(base);
    base.saturating_mul(1u32 << attempt.min(16)).min(cap)
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, Error> {
    fd.as_fd().try_clone_to_owned().map_err(|e| {
        Error::caused_by(
            ally_core::ErrorKind::Failed,
            format_args!("cannot duplicate socket"),
            e,
        )
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn signal_stream(kind: tokio::signal::unix::SignalKind) -> tokio::signal::unix::Signal {
    tokio::signal::unix::signal(kind).expect("installing a signal handler")
}

fn status_line(shared: &Shared) -> String {
    let current = shared.table.current();
    let draining = shared.table.count(InstanceState::Draining);
    match current {
        Some(i) => format!(
            "generation {} ready (pid {}), {} draining",
            i.generation, i.pid, draining
        ),
        None => format!(
            "{}; no ready instance, {} draining",
            shared.phase.as_str(),
            draining
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_back_off_doubles_up_to_a_cap() {
        let base = Duration::from_secs(1);
        assert_eq!(restart_delay(base, 0), Duration::from_secs(1));
        assert_eq!(restart_delay(base, 1), Duration::from_secs(2));
        assert_eq!(restart_delay(base, 3), Duration::from_secs(8));
        assert_eq!(restart_delay(base, 30), MAX_RESTART_DELAY);
        let slow = Duration::from_secs(120);
        assert_eq!(restart_delay(slow, 5), slow);
    }
}
