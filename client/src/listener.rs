//! The socket types [`Ally::listen`](crate::Ally::listen) hands out, and what each
//! checks about the socket it is made from.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use socket2::{Domain, SockRef, Type};

use crate::error::{Error, ErrorKind, Result};
use ally_core::net::Network;

/// A socket type that can be made from a shared listening socket: Tokio's and std's
/// `TcpListener`, `UdpSocket`, `UnixListener` and `UnixDatagram`, [`SeqpacketListener`],
/// and [`OwnedFd`] for any socket.
///
/// The type implies the network (`tcp`, `udp`, `unix`, `unixgram`, `unixpacket`);
/// [`ListenOptions::network`] picks another one of its family (`tcp6`, say). The
/// socket received is checked to be of the kind the type expects.
///
/// Tokio types turn `O_NONBLOCK` on, for every holder of the socket; std types leave it
/// alone (see the crate docs and [`crate::stdnet`]).
pub trait FromShared: sealed::Shared {}

impl<T: sealed::Shared> FromShared for T {}

/// The std socket types of [`FromShared`] (and [`SeqpacketListener`], [`OwnedFd`]):
/// what [`blocking::Ally::listen`](crate::blocking::Ally::listen) hands out, as a
/// program without an async runtime has no use for Tokio's.
pub trait FromSharedStd: FromShared + sealed::Std {}

impl<T: sealed::Std> FromSharedStd for T {}

pub(crate) mod sealed {
    use super::*;

    pub trait Std: Shared {}

    pub trait Shared: Sized {
        /// The networks this type takes; the first is the default. Empty: any, and
        /// the network must be given.
        const NETWORKS: &'static [Network];
        /// The family, in "not a … network".
        const FAMILY: &'static str;
        fn from_fd(fd: OwnedFd, context: &str) -> Result<Self>;
    }
}

const TCP: &[Network] = &[Network::Tcp, Network::Tcp4, Network::Tcp6];
const UDP: &[Network] = &[Network::Udp, Network::Udp4, Network::Udp6];
const INET: &[Domain] = &[Domain::IPV4, Domain::IPV6];

/// A std socket of `ty` in one of `domains`, made from `fd`.
fn checked<T: From<OwnedFd>>(
    fd: OwnedFd,
    context: &str,
    ty: Type,
    domains: &[Domain],
) -> Result<T> {
    check_socket(&fd, context, ty, domains)?;
    Ok(fd.into())
}

/// Tokio needs `O_NONBLOCK`, which lives in the open file description shared with every
/// other duplicate of the socket (see the crate docs).
fn nonblocking<T: AsFd>(socket: T, context: &str) -> Result<T> {
    SockRef::from(&socket)
        .set_nonblocking(true)
        .map_err(|e| Error::io(format!("{context}: O_NONBLOCK"), e))?;
    Ok(socket)
}

macro_rules! shared {
    ($ty:ty, $family:literal, $networks:expr, $sock:expr, $domains:expr) => {
        impl sealed::Std for $ty {}
        impl sealed::Shared for $ty {
            const NETWORKS: &'static [Network] = $networks;
            const FAMILY: &'static str = $family;
            fn from_fd(fd: OwnedFd, context: &str) -> Result<Self> {
                checked(fd, context, $sock, $domains)
            }
        }
    };
    (tokio $ty:ty, $std:ty, $what:literal) => {
        impl sealed::Shared for $ty {
            const NETWORKS: &'static [Network] = <$std as sealed::Shared>::NETWORKS;
            const FAMILY: &'static str = <$std as sealed::Shared>::FAMILY;
            fn from_fd(fd: OwnedFd, context: &str) -> Result<Self> {
                let std = nonblocking(<$std as sealed::Shared>::from_fd(fd, context)?, context)?;
                <$ty>::from_std(std).map_err(|e| Error::io(concat!("tokio ", $what), e))
            }
        }
    };
}

shared!(std::net::TcpListener, "TCP", TCP, Type::STREAM, INET);
shared!(std::net::UdpSocket, "UDP", UDP, Type::DGRAM, INET);
shared!(
    std::os::unix::net::UnixListener,
    "unix stream",
    &[Network::Unix],
    Type::STREAM,
    &[Domain::UNIX]
);
shared!(
    std::os::unix::net::UnixDatagram,
    "unix datagram",
    &[Network::Unixgram],
    Type::DGRAM,
    &[Domain::UNIX]
);
shared!(tokio tokio::net::TcpListener, std::net::TcpListener, "TcpListener");
shared!(tokio tokio::net::UdpSocket, std::net::UdpSocket, "UdpSocket");
shared!(tokio tokio::net::UnixListener, std::os::unix::net::UnixListener, "UnixListener");
shared!(tokio tokio::net::UnixDatagram, std::os::unix::net::UnixDatagram, "UnixDatagram");

/// A listening unix `SOCK_SEQPACKET` socket (network `unixpacket`), which neither std
/// nor Tokio has a type for.
#[derive(Debug)]
pub struct SeqpacketListener(OwnedFd);

shared!(
    SeqpacketListener,
    "unix seqpacket",
    &[Network::Unixpacket],
    Type::SEQPACKET,
    &[Domain::UNIX]
);

impl From<OwnedFd> for SeqpacketListener {
    fn from(fd: OwnedFd) -> Self {
        SeqpacketListener(fd)
    }
}

impl From<SeqpacketListener> for OwnedFd {
    fn from(listener: SeqpacketListener) -> OwnedFd {
        listener.0
    }
}

impl AsFd for SeqpacketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for SeqpacketListener {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Any socket, unchecked: the network must be given in [`ListenOptions::network`].
impl sealed::Std for OwnedFd {}
impl sealed::Shared for OwnedFd {
    const NETWORKS: &'static [Network] = &[];
    const FAMILY: &'static str = "socket";
    fn from_fd(fd: OwnedFd, _context: &str) -> Result<Self> {
        Ok(fd)
    }
}

/// Options of a [`listen_with`](crate::Ally::listen_with) request. The socket options
/// apply only if the socket has to be created: a later request for the same address
/// shares the existing socket whatever its options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenOptions {
    /// The network, e.g. `tcp6`; `None`: the listener type's default.
    pub network: Option<String>,
    /// The `listen(2)` backlog.
    pub backlog: Option<u32>,
    /// `SO_REUSEPORT`.
    pub reuse_port: bool,
    /// Permission bits of a filesystem unix socket.
    pub mode: Option<u32>,
}

impl ListenOptions {
    /// Options with `network` and nothing else.
    pub fn network(network: impl Into<String>) -> ListenOptions {
        ListenOptions {
            network: Some(network.into()),
            ..ListenOptions::default()
        }
    }

    pub(crate) fn socket_options(&self) -> ally_core::net::ListenOptions {
        ally_core::net::ListenOptions {
            backlog: self.backlog,
            reuse_port: self.reuse_port,
            mode: self.mode,
        }
    }

    /// The network to ask the broker for when the type `L` is wanted.
    pub(crate) fn network_for<L: sealed::Shared>(&self) -> Result<String> {
        let Some(network) = &self.network else {
            return match L::NETWORKS.first() {
                Some(default) => Ok(default.as_str().to_owned()),
                None => Err(Error::local(
                    ErrorKind::InvalidArgument,
                    "a raw socket has no default network: name one in ListenOptions::network",
                )),
            };
        };
        if L::NETWORKS.is_empty() {
            // Checked by whoever binds it.
            return Ok(network.clone());
        }
        let parsed: Network = network.parse()?;
        if L::NETWORKS.contains(&parsed) {
            return Ok(network.clone());
        }
        let names: Vec<&str> = L::NETWORKS.iter().map(|n| n.as_str()).collect();
        Err(Error::local(
            ErrorKind::InvalidArgument,
            format!(
                "{network} is not a {} network (expected {})",
                L::FAMILY,
                names.join(", ")
            ),
        ))
    }
}

fn check_socket(fd: &OwnedFd, context: &str, ty: Type, domains: &[Domain]) -> Result<()> {
    let sock = SockRef::from(fd);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_type_implies_the_network_and_limits_the_choice() {
        let default = ListenOptions::default();
        assert_eq!(
            default.network_for::<tokio::net::TcpListener>().unwrap(),
            "tcp"
        );
        assert_eq!(
            default
                .network_for::<std::os::unix::net::UnixDatagram>()
                .unwrap(),
            "unixgram"
        );
        assert_eq!(
            default.network_for::<SeqpacketListener>().unwrap(),
            "unixpacket"
        );
        let tcp6 = ListenOptions::network("tcp6");
        assert_eq!(tcp6.network_for::<std::net::TcpListener>().unwrap(), "tcp6");
        let err = tcp6.network_for::<std::net::UdpSocket>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(
            err.to_string().contains("expected udp, udp4, udp6"),
            "{err}"
        );
        let err = default.network_for::<OwnedFd>().unwrap_err();
        assert!(err.to_string().contains("ListenOptions::network"), "{err}");
        // A raw socket passes any name on, for the binder to judge.
        assert_eq!(
            ListenOptions::network("sctp")
                .network_for::<OwnedFd>()
                .unwrap(),
            "sctp"
        );
    }
}
