//! The async client.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;

use crate::direct::{Direct, StateSocket};
use crate::error::{Error, ErrorKind, Result};
use crate::link::{Link, Session};
use crate::listen::simulated;
use crate::reconnect::{self, Method};
use crate::report::{Report, Reporter, Task};
use crate::shared::{Atomic, Backend, Cache, Locker, Simulation};
use crate::status::{InstanceStatus, ListenerStatus, Status};
use crate::stop::{StopHandle, parse_signal};
use ally_core::net;
use ally_core::proxy;

/// An app instance's handle on its broker, or on its stand-in in simulate mode.
///
/// Cloning is cheap and every clone is the same client.
#[derive(Clone, Debug)]
pub struct Ally {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    broker: Option<Arc<Link>>,
    app: String,
    instance: u64,
    generation: u64,
    stop: StopHandle,
    started_usec: u64,
    /// 0 until `ready()`.
    ready_usec: AtomicU64,
    state: Backend,
    report: Reporter,
}

impl Ally {
    /// Connects to the broker named by `ALLY_ADDRESS`, or runs in simulate mode when it is
    /// unset or empty.
    ///
    /// Installs the handler of the stop signal (`ALLY_STOP_SIGNAL`, default `SIGTERM`; in
    /// simulate mode `SIGINT` too) before returning, so a stop requested from now on is
    /// seen by [`stopped`](Self::stopped) whenever it is awaited. Must run inside a Tokio
    /// runtime with I/O and signals enabled.
    pub async fn from_env() -> Result<Ally> {
        match std::env::var("ALLY_ADDRESS") {
            Ok(address) if !address.is_empty() => Ally::connect(&address).await,
            _ => Ally::simulate().await,
        }
    }

    /// Connects to the broker at `address` (a D-Bus address such as `unix:path=/run/ally/web/bus`);
    /// the rest of the identity still comes from the environment.
    ///
    /// In an instance (`ALLY_INSTANCE` set by the broker) the stop signal's handler is
    /// installed as by [`from_env`](Self::from_env). A program that is not an instance — a
    /// deploy tool calling [`reload`](Self::reload), say — keeps its signals as they were,
    /// so SIGTERM still ends it; its [`stopped`](Self::stopped) resolves only on
    /// [`StopHandle::stop`].
    pub async fn connect(address: &str) -> Result<Ally> {
        Ally::connect_with(address, StateSocket::Auto).await
    }

    /// [`connect`](Self::connect), choosing how cache and counter calls reach the broker.
    pub async fn connect_with(address: &str, state_socket: StateSocket) -> Result<Ally> {
        let stop = StopHandle::new();
        if std::env::var_os("ALLY_INSTANCE").is_some_and(|v| !v.is_empty()) {
            stop.install(&[stop_signal()?])?;
        }
        let app = std::env::var("ALLY_APP").ok().filter(|a| !a.is_empty());
        let timeout =
            reconnect::parse_timeout(std::env::var(reconnect::TIMEOUT_ENV).ok().as_deref())
                .map_err(|e| Error::local(ErrorKind::InvalidArgument, e))?;
        let link = Arc::new(Link::connect(address, app.as_deref(), timeout).await?);
        Ally::new(
            Some(link.clone()),
            app.unwrap_or_else(program_name),
            stop,
            Backend::Broker {
                link,
                direct: state_socket
                    .path_for(address)
                    .map(|path| Direct::new(path, timeout)),
            },
        )
    }

    /// Runs without a broker: sockets are bound in this process (with the broker's
    /// normalisation and sharing rules), `ready()` does nothing, and `SIGINT` stops the
    /// instance as well as the stop signal, so Ctrl-C works.
    ///
    /// The shared state ([`cache`](Self::cache), [`atomic`](Self::atomic),
    /// [`locker`](Self::locker)) is the process's [`Simulation`]; each `Ally` acts as one
    /// lock owner.
    pub async fn simulate() -> Result<Ally> {
        Ally::simulate_on(&Simulation::process()).await
    }

    pub(crate) async fn simulate_on(simulation: &Simulation) -> Result<Ally> {
        let stop = StopHandle::new();
        let sig = stop_signal()?;
        if sig == Signal::SIGINT {
            stop.install(&[sig])?;
        } else {
            stop.install(&[sig, Signal::SIGINT])?;
        }
        let app = std::env::var("ALLY_APP")
            .ok()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(program_name);
        Ally::new(None, app, stop, simulation.backend())
    }

    fn new(
        broker: Option<Arc<Link>>,
        app: String,
        stop: StopHandle,
        state: Backend,
    ) -> Result<Ally> {
        Ok(Ally {
            inner: Arc::new(Inner {
                broker,
                app,
                instance: env_number("ALLY_INSTANCE")?.unwrap_or(1),
                generation: env_number("ALLY_GENERATION")?.unwrap_or(1),
                stop,
                started_usec: now_usec(),
                ready_usec: AtomicU64::new(0),
                state,
                report: Reporter::new(),
            }),
        })
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.state
    }

    /// Namespace `namespace` of the app's shared cache.
    pub fn cache(&self, namespace: &str) -> Cache {
        Cache::new(self.clone(), namespace)
    }

    /// The app's shared counter `name`.
    pub fn atomic(&self, name: &str) -> Atomic {
        Atomic::new(self.clone(), name)
    }

    /// The app's shared read/write locks.
    pub fn locker(&self) -> Locker {
        Locker::new(self.clone())
    }

    /// Whether a broker manages this instance (false in simulate mode).
    pub fn is_managed(&self) -> bool {
        self.inner.broker.is_some()
    }

    /// Application name (`ALLY_APP`; in simulate mode the program name when unset).
    pub fn app(&self) -> &str {
        &self.inner.app
    }

    /// Instance id, unique for the broker's life (`ALLY_INSTANCE`; 1 in simulate mode).
    pub fn instance(&self) -> u64 {
        self.inner.instance
    }

    /// Generation of this instance (`ALLY_GENERATION`; 1 in simulate mode).
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// The connection to the broker; `None` in simulate mode.
    pub(crate) fn link(&self) -> Option<&Arc<Link>> {
        self.inner.broker.as_ref()
    }

    /// A handle on the stop request, to pass to tasks and threads.
    pub fn stop_handle(&self) -> StopHandle {
        self.inner.stop.clone()
    }

    /// Resolves when the broker asks this instance to stop.
    ///
    /// The future owns what it needs (it is `'static`), so it can be handed to a server
    /// or a task and outlive this handle. To stop a server without losing requests, see
    /// [`crate::drain`].
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.stop.stopped()
    }

    /// How this instance's servers drain on the stop: its stop handle, with the idle
    /// time the operator configured (`drain_idle`, passed as `ALLY_DRAIN_IDLE`). The
    /// framework integrations (the modules `axum`, `hyper`, `tonic` and `actix`, each
    /// behind its cargo feature) take it; [`crate::drain`] explains each step.
    pub fn drain(&self) -> crate::drain::Drain {
        crate::drain::Drain::from_env(self.inner.stop.clone())
    }

    /// Whether the broker asked this instance to stop.
    pub fn is_stopping(&self) -> bool {
        self.inner.stop.is_stopping()
    }

    /// Tells the broker this instance serves; during a reload this is what lets the older
    /// generation be stopped. Harmless to repeat. Does nothing in simulate mode.
    pub async fn ready(&self) -> Result<()> {
        if let Some(link) = &self.inner.broker {
            link.call(Method::broker("Ready"), |s: Arc<Session>| async move {
                s.broker.ready().await
            })
            .await?;
        }
        let _ = self.inner.ready_usec.compare_exchange(
            0,
            now_usec(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        Ok(())
    }

    /// Tells the broker what this instance is: the keys `report` names replace
    /// those reported before (`ally status` shows them). In simulate mode it only
    /// keeps them, for [`reported`](Self::reported).
    ///
    /// Fails with [`ErrorKind::InvalidArgument`] or [`ErrorKind::LimitExceeded`]
    /// when a string is too long (256 bytes for `version` and `commit`, 1 KiB for
    /// `description`), before anything is sent.
    pub async fn report(&self, report: Report) -> Result<()> {
        let checked = Report::parse(
            crate::report::dict(&report)
                .iter()
                .map(|(key, value)| (*key, ally_core::report::Reported::from_value(value))),
        )
        .map_err(|e| Error::local(e.kind(), format!("Report failed: {}", e.message())))?;
        if let Some(link) = &self.inner.broker {
            link.call(Method::broker("Report"), |s: Arc<Session>| {
                let dict = crate::report::dict(&checked);
                async move { s.broker.report(dict).await }
            })
            .await?;
        }
        self.inner.report.record(&checked);
        Ok(())
    }

    /// Everything this instance reported so far, the task count included.
    pub fn reported(&self) -> Report {
        self.inner.report.reported()
    }

    /// Counts one task (a request, a job) until the guard is dropped, and keeps
    /// the broker's `tasks` up to date: while this instance drains after a
    /// reload, `ally status` shows the tasks it has left. Counts are sent in
    /// the background, the latest one winning (see [`crate::report`]).
    pub fn task(&self) -> Task {
        Task::start(self)
    }

    /// Sets the task count, for an app that counts its own work.
    pub fn set_tasks(&self, tasks: u32) {
        self.inner.report.change_tasks(self.link(), |n| *n = tasks);
    }

    /// The tasks counted now.
    pub fn tasks(&self) -> u32 {
        self.inner.report.tasks()
    }

    pub(crate) fn reporter(&self) -> &Reporter {
        &self.inner.report
    }

    /// Asks the broker for a reload and returns the new generation once it is ready.
    ///
    /// This instance is then asked to stop, like every older one. Fails with
    /// [`ErrorKind::ReloadFailed`] when the new generation does not come up, and with
    /// [`ErrorKind::NotManaged`] in simulate mode.
    pub async fn reload(&self) -> Result<u64> {
        match &self.inner.broker {
            Some(link) => {
                link.call(Method::broker("Reload"), |s: Arc<Session>| async move {
                    s.broker.reload().await
                })
                .await
            }
            None => Err(Error::local(
                ErrorKind::NotManaged,
                "Reload failed: no broker (simulate mode; ALLY_ADDRESS is not set)",
            )),
        }
    }

    /// The broker's status; in simulate mode, this process's own.
    pub async fn status(&self) -> Result<Status> {
        match &self.inner.broker {
            Some(link) => proxy::Status::from_dict(
                link.call(Method::broker("Status"), |s: Arc<Session>| async move {
                    s.broker.status().await
                })
                .await?,
            )
            .map(Status::from)
            .map_err(|e| Error::local(ErrorKind::Broker, e.to_string())),
            None => Ok(self.simulated_status()),
        }
    }

    fn simulated_status(&self) -> Status {
        let ready_usec = self.inner.ready_usec.load(Ordering::SeqCst);
        let stopping = self.is_stopping();
        let state = match (ready_usec, stopping) {
            (_, true) => "stopping",
            (0, false) => "starting",
            _ => "running",
        };
        let instance_state = match (ready_usec, stopping) {
            (_, true) => "draining",
            (0, false) => "starting",
            _ => "ready",
        };
        let listeners = simulated()
            .iter()
            .map(|(key, socket)| ListenerStatus {
                network: key.network.to_string(),
                address: net::local_address(socket).unwrap_or_else(|_| key.endpoint.to_string()),
                references: 1,
            })
            .collect();
        Status {
            app: self.inner.app.clone(),
            state: state.into(),
            generation: if ready_usec == 0 {
                0
            } else {
                self.inner.generation
            },
            pid: std::process::id(),
            instances: vec![InstanceStatus {
                id: self.inner.instance,
                generation: self.inner.generation,
                pid: std::process::id(),
                state: instance_state.into(),
                started_usec: self.inner.started_usec,
                ready_usec,
            }],
            listeners,
            reloads: 0,
            last_reload: String::new(),
            ..Status::default()
        }
    }
}

fn stop_signal() -> Result<Signal> {
    match std::env::var("ALLY_STOP_SIGNAL") {
        Ok(name) if !name.is_empty() => parse_signal(&name),
        _ => Ok(Signal::SIGTERM),
    }
}

fn env_number(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value.trim().parse().map(Some).map_err(|_| {
            Error::local(
                ErrorKind::InvalidArgument,
                format!("{name}: {value:?} is not a number"),
            )
        }),
        _ => Ok(None),
    }
}

fn program_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "app".into())
}

fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
