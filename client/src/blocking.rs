//! The client for programs without an async runtime.
//!
//! [`Ally`] owns a small private Tokio runtime (one worker thread) that carries the D-Bus
//! connection and the stop-signal handler; every method blocks the calling thread until
//! done. Do not use it from inside an async runtime: use [`crate::Ally`] there.
//!
//! Listeners are std types. They may be in non-blocking mode because another
//! generation's async code shares them: accept with [`crate::stdnet`].

use std::net::{TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};

use crate::error::{Error, Result};
use crate::net::ListenOptions;
use crate::proxy::Status;
use crate::stop::StopHandle;

/// Blocking twin of [`crate::Ally`].
#[derive(Debug)]
pub struct Ally {
    inner: crate::Ally,
    // Dropped last: the connection's tasks run on it.
    runtime: tokio::runtime::Runtime,
}

impl Ally {
    /// See [`crate::Ally::from_env`].
    pub fn from_env() -> Result<Ally> {
        Ally::start(crate::Ally::from_env())
    }

    /// See [`crate::Ally::connect`].
    pub fn connect(address: &str) -> Result<Ally> {
        Ally::start(crate::Ally::connect(address))
    }

    /// See [`crate::Ally::simulate`].
    pub fn simulate() -> Result<Ally> {
        Ally::start(crate::Ally::simulate())
    }

    fn start(make: impl Future<Output = Result<crate::Ally>>) -> Result<Ally> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ally-client")
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the ally-client runtime", e))?;
        let inner = runtime.block_on(make)?;
        Ok(Ally { inner, runtime })
    }

    /// The async client this one wraps.
    pub fn as_async(&self) -> &crate::Ally {
        &self.inner
    }

    pub fn is_managed(&self) -> bool {
        self.inner.is_managed()
    }

    pub fn app(&self) -> &str {
        self.inner.app()
    }

    pub fn instance(&self) -> u64 {
        self.inner.instance()
    }

    pub fn generation(&self) -> u64 {
        self.inner.generation()
    }

    /// A handle on the stop request; [`StopHandle::wait`] blocks until it comes.
    pub fn stop_handle(&self) -> StopHandle {
        self.inner.stop_handle()
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.is_stopping()
    }

    /// Blocks until the broker asks this instance to stop.
    pub fn wait_stopped(&self) {
        self.inner.stop_handle().wait()
    }

    pub fn listen(&self, network: &str, address: &str) -> Result<OwnedFd> {
        self.runtime.block_on(self.inner.listen(network, address))
    }

    pub fn listen_with(
        &self,
        network: &str,
        address: &str,
        options: &ListenOptions,
    ) -> Result<OwnedFd> {
        self.runtime
            .block_on(self.inner.listen_with(network, address, options))
    }

    pub fn close(&self, network: &str, address: &str) -> Result<()> {
        self.runtime.block_on(self.inner.close(network, address))
    }

    pub fn ready(&self) -> Result<()> {
        self.runtime.block_on(self.inner.ready())
    }

    pub fn reload(&self) -> Result<u64> {
        self.runtime.block_on(self.inner.reload())
    }

    pub fn status(&self) -> Result<Status> {
        self.runtime.block_on(self.inner.status())
    }

    /// Network `tcp`.
    pub fn tcp_listener(&self, address: &str) -> Result<TcpListener> {
        self.runtime.block_on(self.inner.std_tcp_listener(address))
    }

    /// `network` is `tcp`, `tcp4` or `tcp6`.
    pub fn tcp_listener_net(&self, network: &str, address: &str) -> Result<TcpListener> {
        self.runtime
            .block_on(self.inner.std_tcp_listener_net(network, address))
    }

    /// Network `udp`.
    pub fn udp_socket(&self, address: &str) -> Result<UdpSocket> {
        self.runtime.block_on(self.inner.std_udp_socket(address))
    }

    /// `network` is `udp`, `udp4` or `udp6`.
    pub fn udp_socket_net(&self, network: &str, address: &str) -> Result<UdpSocket> {
        self.runtime
            .block_on(self.inner.std_udp_socket_net(network, address))
    }

    /// Network `unix`.
    pub fn unix_listener(&self, address: &str) -> Result<UnixListener> {
        self.runtime.block_on(self.inner.std_unix_listener(address))
    }

    /// Network `unixgram`.
    pub fn unix_datagram(&self, address: &str) -> Result<UnixDatagram> {
        self.runtime.block_on(self.inner.std_unix_datagram(address))
    }

    /// Network `unixpacket`.
    pub fn unix_seqpacket(&self, address: &str) -> Result<OwnedFd> {
        self.runtime.block_on(self.inner.unix_seqpacket(address))
    }
}
