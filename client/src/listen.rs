//! Asking for a listening socket: from the broker, or bound here in simulate mode.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use socket2::Socket;
use zbus::Variant;

use crate::Ally;
use crate::error::{Error, Result};
use crate::link::Session;
use crate::listener::{FromShared, ListenOptions};
use crate::reconnect::Method;
use ally_core::net::{self, ListenAddr};

/// Sockets of simulate mode, shared by every [`Ally`] of the process, as the broker
/// shares its sockets between instances.
static SIMULATED: Mutex<BTreeMap<ListenAddr, Socket>> = Mutex::new(BTreeMap::new());

impl Ally {
    /// The listening socket on `address`, as the type asked for, on that type's network
    /// (`tcp` for a `TcpListener`, `unix` for a `UnixListener`, …):
    ///
    /// ```no_run
    /// # async fn run(ally: ally_client::Ally) -> ally_client::Result<()> {
    /// let listener = ally.listen::<tokio::net::TcpListener>("127.0.0.1:8080").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Equal (normalised) requests get the same kernel socket, duplicated: across reloads
    /// from the broker, within the process in simulate mode. See the crate docs on the
    /// consequences for `O_NONBLOCK`. The socket is checked to be of the type's kind.
    pub async fn listen<L: FromShared>(&self, address: &str) -> Result<L> {
        self.listen_with(address, &ListenOptions::default()).await
    }

    /// [`listen`](Self::listen) on another network of the type's family (`tcp6`), or with
    /// options used if the socket has to be created.
    ///
    /// ```no_run
    /// # async fn run(ally: ally_client::Ally) -> ally_client::Result<()> {
    /// use ally_client::ListenOptions;
    /// let v6: std::net::TcpListener = ally.listen_with("[::1]:8080", &ListenOptions::network("tcp6")).await?;
    /// let options = ListenOptions { mode: Some(0o660), ..Default::default() };
    /// let unix: tokio::net::UnixListener = ally.listen_with("/run/app/http.sock", &options).await?;
    /// # Ok(()) }
    /// ```
    pub async fn listen_with<L: FromShared>(
        &self,
        address: &str,
        options: &ListenOptions,
    ) -> Result<L> {
        let network = options.network_for::<L>()?;
        let fd = self.listen_fd(&network, address, options).await?;
        L::from_fd(fd, &format!("{network} {address}"))
    }

    async fn listen_fd(
        &self,
        network: &str,
        address: &str,
        options: &ListenOptions,
    ) -> Result<OwnedFd> {
        let socket_options = options.socket_options();
        let Some(link) = self.link() else {
            return simulate_listen(network, address, &socket_options);
        };
        let fd = if socket_options == net::ListenOptions::default() {
            link.call(Method::broker("Listen"), |s: Arc<Session>| async move {
                s.broker.listen(network, address).await
            })
            .await?
        } else {
            link.call(Method::broker("ListenWith"), |s: Arc<Session>| {
                let dict = options_dict(&socket_options);
                async move { s.broker.listen_with(network, address, dict).await }
            })
            .await?
        };
        Ok(fd.into())
    }

    /// Drops this instance's reference to a socket (file descriptors already handed out
    /// stay valid). In simulate mode the next `listen` binds anew.
    pub async fn close(&self, network: &str, address: &str) -> Result<()> {
        match self.link() {
            Some(link) => {
                link.call(Method::broker("Close"), |s: Arc<Session>| async move {
                    s.broker.close(network, address).await
                })
                .await
            }
            None => {
                let key = ListenAddr::parse(network, address)?;
                simulated().remove(&key);
                Ok(())
            }
        }
    }
}

/// The `a{sv}` of `ListenWith`: the options that differ from the defaults.
fn options_dict(options: &net::ListenOptions) -> HashMap<&'static str, Variant<'static>> {
    let mut dict = HashMap::new();
    if let Some(backlog) = options.backlog {
        dict.insert("backlog", Variant::from(backlog));
    }
    if options.reuse_port {
        dict.insert("reuse_port", Variant::from(true));
    }
    if let Some(mode) = options.mode {
        dict.insert("mode", Variant::from(mode));
    }
    dict
}

pub(crate) fn simulated() -> std::sync::MutexGuard<'static, BTreeMap<ListenAddr, Socket>> {
    SIMULATED.lock().unwrap_or_else(|e| e.into_inner())
}

fn simulate_listen(network: &str, address: &str, options: &net::ListenOptions) -> Result<OwnedFd> {
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
