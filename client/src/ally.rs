//! The async client.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use socket2::{Domain, SockRef, Socket, Type};
use zbus::Variant;

use crate::direct::{Direct, StateSocket};
use crate::error::{Error, ErrorKind, Result};
use crate::shared::{Atomic, Backend, Cache, Locker, Simulation};
use crate::stop::{StopHandle, parse_signal};
use ally_core::net::{self, ListenAddr, ListenOptions, Network};
use ally_core::proxy::{self, BrokerProxy, Instance, Listener, StateProxies, Status};

/// Sockets of simulate mode, shared by every [`Ally`] of the process, as the broker
/// shares its sockets between instances.
static SIMULATED: Mutex<BTreeMap<ListenAddr, Socket>> = Mutex::new(BTreeMap::new());

/// An app instance's handle on its broker, or on its stand-in in simulate mode.
///
/// Cloning is cheap and every clone is the same client.
#[derive(Clone, Debug)]
pub struct Ally {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    broker: Option<BrokerProxy<'static>>,
    app: String,
    instance: u64,
    generation: u64,
    stop: StopHandle,
    started_usec: u64,
    /// 0 until `ready()`.
    ready_usec: AtomicU64,
    state: Backend,
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
        let broker = proxy::connect(address, app.as_deref())
            .await
            .map_err(|source| Error::Transport {
                context: format!("cannot connect to the broker at {address}"),
                source,
            })?;
        let state = StateProxies::on(broker.inner().connection(), app.as_deref())
            .await
            .map_err(|source| Error::Transport {
                context: "cannot create the state proxies".into(),
                source,
            })?;
        Ally::new(
            Some(broker),
            app.unwrap_or_else(program_name),
            stop,
            Backend::Broker {
                proxies: state,
                direct: state_socket.path_for(address).map(Direct::new),
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
        broker: Option<BrokerProxy<'static>>,
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

    /// The broker proxy, for calls this type does not wrap; `None` in simulate mode.
    pub fn broker(&self) -> Option<&BrokerProxy<'static>> {
        self.inner.broker.as_ref()
    }

    /// A handle on the stop request, to pass to tasks and threads.
    pub fn stop_handle(&self) -> StopHandle {
        self.inner.stop.clone()
    }

    /// Resolves when the broker asks this instance to stop.
    pub async fn stopped(&self) {
        self.inner.stop.stopped().await
    }

    /// Whether the broker asked this instance to stop.
    pub fn is_stopping(&self) -> bool {
        self.inner.stop.is_stopping()
    }

    /// The listening socket for `network` and `address`, as a raw file descriptor.
    ///
    /// Equal (normalised) requests get the same kernel socket, duplicated: across reloads
    /// from the broker, within the process in simulate mode. See the crate docs on the
    /// consequences for `O_NONBLOCK`.
    pub async fn listen(&self, network: &str, address: &str) -> Result<OwnedFd> {
        self.listen_with(network, address, &ListenOptions::default())
            .await
    }

    /// [`listen`](Self::listen) with options used if the socket has to be created.
    pub async fn listen_with(
        &self,
        network: &str,
        address: &str,
        options: &ListenOptions,
    ) -> Result<OwnedFd> {
        let Some(broker) = &self.inner.broker else {
            return simulate_listen(network, address, options);
        };
        let fd = if options == &ListenOptions::default() {
            broker
                .listen(network, address)
                .await
                .map_err(|e| Error::call("Listen", e))?
        } else {
            let mut dict: HashMap<&str, Variant<'_>> = HashMap::new();
            if let Some(backlog) = options.backlog {
                dict.insert("backlog", Variant::from(backlog));
            }
            if options.reuse_port {
                dict.insert("reuse_port", Variant::from(true));
            }
            if let Some(mode) = options.mode {
                dict.insert("mode", Variant::from(mode));
            }
            broker
                .listen_with(network, address, dict)
                .await
                .map_err(|e| Error::call("ListenWith", e))?
        };
        Ok(fd.into())
    }

    /// Drops this instance's reference to a socket (file descriptors already handed out
    /// stay valid). In simulate mode the next `listen` binds anew.
    pub async fn close(&self, network: &str, address: &str) -> Result<()> {
        match &self.inner.broker {
            Some(broker) => broker
                .close(network, address)
                .await
                .map_err(|e| Error::call("Close", e)),
            None => {
                let key = ListenAddr::parse(network, address)?;
                simulated().remove(&key);
                Ok(())
            }
        }
    }

    /// Tells the broker this instance serves; during a reload this is what lets the older
    /// generation be stopped. Harmless to repeat. Does nothing in simulate mode.
    pub async fn ready(&self) -> Result<()> {
        if let Some(broker) = &self.inner.broker {
            broker.ready().await.map_err(|e| Error::call("Ready", e))?;
        }
        let _ = self.inner.ready_usec.compare_exchange(
            0,
            now_usec(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        Ok(())
    }

    /// Asks the broker for a reload and returns the new generation once it is ready.
    ///
    /// This instance is then asked to stop, like every older one. Fails with
    /// [`ErrorKind::ReloadFailed`] when the new generation does not come up, and with
    /// [`ErrorKind::NotManaged`] in simulate mode.
    pub async fn reload(&self) -> Result<u64> {
        match &self.inner.broker {
            Some(broker) => broker.reload().await.map_err(|e| Error::call("Reload", e)),
            None => Err(Error::local(
                ErrorKind::NotManaged,
                "Reload failed: no broker (simulate mode; ALLY_ADDRESS is not set)",
            )),
        }
    }

    /// The broker's status; in simulate mode, this process's own.
    pub async fn status(&self) -> Result<Status> {
        match &self.inner.broker {
            Some(broker) => Status::from_dict(
                broker
                    .status()
                    .await
                    .map_err(|e| Error::call("Status", e))?,
            )
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
            .map(|(key, socket)| Listener {
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
            instances: vec![Instance {
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

    // Typed listeners. Each checks the socket it gets is of the kind asked for.

    /// A Tokio TCP listener on `address` (network `tcp`).
    pub async fn tcp_listener(&self, address: &str) -> Result<tokio::net::TcpListener> {
        self.tcp_listener_net("tcp", address).await
    }

    /// A Tokio TCP listener; `network` is `tcp`, `tcp4` or `tcp6`.
    pub async fn tcp_listener_net(
        &self,
        network: &str,
        address: &str,
    ) -> Result<tokio::net::TcpListener> {
        let std = self.std_tcp_listener_net(network, address).await?;
        to_tokio(&std, network, address)?;
        tokio::net::TcpListener::from_std(std).map_err(|e| Error::io("tokio TcpListener", e))
    }

    /// A std TCP listener on `address` (network `tcp`). Its accept may fail with
    /// `WouldBlock`: see [`crate::stdnet`].
    pub async fn std_tcp_listener(&self, address: &str) -> Result<std::net::TcpListener> {
        self.std_tcp_listener_net("tcp", address).await
    }

    /// A std TCP listener; `network` is `tcp`, `tcp4` or `tcp6`.
    pub async fn std_tcp_listener_net(
        &self,
        network: &str,
        address: &str,
    ) -> Result<std::net::TcpListener> {
        expect_network(
            network,
            &[Network::Tcp, Network::Tcp4, Network::Tcp6],
            "a TCP",
        )?;
        let fd = self.listen(network, address).await?;
        check_socket(
            &fd,
            network,
            address,
            Type::STREAM,
            &[Domain::IPV4, Domain::IPV6],
        )?;
        Ok(fd.into())
    }

    /// A Tokio UDP socket on `address` (network `udp`).
    pub async fn udp_socket(&self, address: &str) -> Result<tokio::net::UdpSocket> {
        self.udp_socket_net("udp", address).await
    }

    /// A Tokio UDP socket; `network` is `udp`, `udp4` or `udp6`.
    pub async fn udp_socket_net(
        &self,
        network: &str,
        address: &str,
    ) -> Result<tokio::net::UdpSocket> {
        let std = self.std_udp_socket_net(network, address).await?;
        to_tokio(&std, network, address)?;
        tokio::net::UdpSocket::from_std(std).map_err(|e| Error::io("tokio UdpSocket", e))
    }

    /// A std UDP socket on `address` (network `udp`).
    pub async fn std_udp_socket(&self, address: &str) -> Result<std::net::UdpSocket> {
        self.std_udp_socket_net("udp", address).await
    }

    /// A std UDP socket; `network` is `udp`, `udp4` or `udp6`.
    pub async fn std_udp_socket_net(
        &self,
        network: &str,
        address: &str,
    ) -> Result<std::net::UdpSocket> {
        expect_network(
            network,
            &[Network::Udp, Network::Udp4, Network::Udp6],
            "a UDP",
        )?;
        let fd = self.listen(network, address).await?;
        check_socket(
            &fd,
            network,
            address,
            Type::DGRAM,
            &[Domain::IPV4, Domain::IPV6],
        )?;
        Ok(fd.into())
    }

    /// A Tokio unix stream listener on a path or `@abstract` name (network `unix`).
    pub async fn unix_listener(&self, address: &str) -> Result<tokio::net::UnixListener> {
        let std = self.std_unix_listener(address).await?;
        to_tokio(&std, "unix", address)?;
        tokio::net::UnixListener::from_std(std).map_err(|e| Error::io("tokio UnixListener", e))
    }

    /// A std unix stream listener (network `unix`).
    pub async fn std_unix_listener(
        &self,
        address: &str,
    ) -> Result<std::os::unix::net::UnixListener> {
        let fd = self.listen("unix", address).await?;
        check_socket(&fd, "unix", address, Type::STREAM, &[Domain::UNIX])?;
        Ok(fd.into())
    }

    /// A Tokio unix datagram socket (network `unixgram`).
    pub async fn unix_datagram(&self, address: &str) -> Result<tokio::net::UnixDatagram> {
        let std = self.std_unix_datagram(address).await?;
        to_tokio(&std, "unixgram", address)?;
        tokio::net::UnixDatagram::from_std(std).map_err(|e| Error::io("tokio UnixDatagram", e))
    }

    /// A std unix datagram socket (network `unixgram`).
    pub async fn std_unix_datagram(
        &self,
        address: &str,
    ) -> Result<std::os::unix::net::UnixDatagram> {
        let fd = self.listen("unixgram", address).await?;
        check_socket(&fd, "unixgram", address, Type::DGRAM, &[Domain::UNIX])?;
        Ok(fd.into())
    }

    /// A listening unix `SOCK_SEQPACKET` socket (network `unixpacket`), which neither std
    /// nor Tokio has a type for.
    pub async fn unix_seqpacket(&self, address: &str) -> Result<OwnedFd> {
        let fd = self.listen("unixpacket", address).await?;
        check_socket(&fd, "unixpacket", address, Type::SEQPACKET, &[Domain::UNIX])?;
        Ok(fd)
    }
}

fn simulated() -> std::sync::MutexGuard<'static, BTreeMap<ListenAddr, Socket>> {
    SIMULATED.lock().unwrap_or_else(|e| e.into_inner())
}

fn simulate_listen(network: &str, address: &str, options: &ListenOptions) -> Result<OwnedFd> {
    let key = ListenAddr::parse(network, address)?;
    let mut sockets = simulated();
    let socket = match sockets.get(&key) {
        Some(socket) => socket,
        None => {
            let socket = net::bind(&key, options)?;
            sockets.entry(key.clone()).or_insert(socket)
        }
    };
    let dup = socket
        .try_clone()
        .map_err(|e| Error::io(format!("{key}: dup"), e))?;
    Ok(dup.into())
}

fn expect_network(network: &str, allowed: &[Network], what: &str) -> Result<()> {
    let parsed: Network = network.parse()?;
    if allowed.contains(&parsed) {
        Ok(())
    } else {
        let names: Vec<&str> = allowed.iter().map(|n| n.as_str()).collect();
        Err(Error::local(
            ErrorKind::InvalidArgument,
            format!(
                "{network} is not {what} network (expected {})",
                names.join(", ")
            ),
        ))
    }
}

fn check_socket(
    fd: &OwnedFd,
    network: &str,
    address: &str,
    ty: Type,
    domains: &[Domain],
) -> Result<()> {
    let sock = SockRef::from(fd);
    let context = format!("{network} {address}");
    let got_type = sock
        .r#type()
        .map_err(|e| Error::io(format!("{context}: SO_TYPE"), e))?;
    let got_domain = sock
        .domain()
        .map_err(|e| Error::io(format!("{context}: SO_DOMAIN"), e))?;
    if got_type != ty || !domains.contains(&got_domain) {
        return Err(Error::local(
            ErrorKind::InvalidArgument,
            format!(
                "{context}: got a socket of type {got_type:?} in domain {got_domain:?}, expected {ty:?}"
            ),
        ));
    }
    Ok(())
}

/// Tokio needs `O_NONBLOCK`, which lives in the open file description shared with every
/// other duplicate of the socket (see the crate docs).
fn to_tokio(fd: &impl std::os::fd::AsFd, network: &str, address: &str) -> Result<()> {
    SockRef::from(fd)
        .set_nonblocking(true)
        .map_err(|e| Error::io(format!("{network} {address}: O_NONBLOCK"), e))
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
