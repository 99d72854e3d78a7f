//! Listening addresses: parsing, normalisation and binding.
//!
//! Networks carry the names of Go's `net` package (`tcp`, `tcp4`, `tcp6`, `udp`,
//! `udp4`, `udp6`, `unix`, `unixgram`, `unixpacket`). The broker and the simulate
//! mode of this crate share this module, so an address means the same thing in
//! both.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::Error;

/// Longest path a `sockaddr_un` holds, without the terminating NUL.
const UNIX_PATH_MAX: usize = 107;

/// Backlog used when the caller gives none; the kernel caps it at `net.core.somaxconn`.
pub const DEFAULT_BACKLOG: u32 = 4096;

/// A socket family and type, named as in Go's `net` package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    Tcp,
    Tcp4,
    Tcp6,
    Udp,
    Udp4,
    Udp6,
    Unix,
    Unixgram,
    Unixpacket,
}

impl Network {
    pub const ALL: [Network; 9] = [
        Network::Tcp,
        Network::Tcp4,
        Network::Tcp6,
        Network::Udp,
        Network::Udp4,
        Network::Udp6,
        Network::Unix,
        Network::Unixgram,
        Network::Unixpacket,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Network::Tcp => "tcp",
            Network::Tcp4 => "tcp4",
            Network::Tcp6 => "tcp6",
            Network::Udp => "udp",
            Network::Udp4 => "udp4",
            Network::Udp6 => "udp6",
            Network::Unix => "unix",
            Network::Unixgram => "unixgram",
            Network::Unixpacket => "unixpacket",
        }
    }

    pub fn is_unix(self) -> bool {
        matches!(
            self,
            Network::Unix | Network::Unixgram | Network::Unixpacket
        )
    }

    /// Whether the socket listens for connections (as opposed to receiving datagrams).
    pub fn is_listening(self) -> bool {
        matches!(
            self,
            Network::Tcp | Network::Tcp4 | Network::Tcp6 | Network::Unix | Network::Unixpacket
        )
    }

    fn socket_type(self) -> Type {
        match self {
            Network::Tcp | Network::Tcp4 | Network::Tcp6 | Network::Unix => Type::STREAM,
            Network::Udp | Network::Udp4 | Network::Udp6 | Network::Unixgram => Type::DGRAM,
            Network::Unixpacket => Type::SEQPACKET,
        }
    }

    fn family(self) -> Family {
        match self {
            Network::Tcp | Network::Udp => Family::Any,
            Network::Tcp4 | Network::Udp4 => Family::V4,
            Network::Tcp6 | Network::Udp6 => Family::V6,
            Network::Unix | Network::Unixgram | Network::Unixpacket => Family::Unix,
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Network {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Network::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "unknown network {s:?}: expected one of tcp, tcp4, tcp6, udp, udp4, udp6, unix, unixgram, unixpacket"
                ))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Any,
    V4,
    V6,
    Unix,
}

/// Where a socket is bound, after normalisation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Inet(SocketAddr),
    /// A filesystem unix socket; always an absolute path.
    Path(PathBuf),
    /// A Linux abstract unix socket, without the leading `@`.
    Abstract(Vec<u8>),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Inet(addr) => write!(f, "{addr}"),
            Endpoint::Path(path) => write!(f, "{}", path.display()),
            Endpoint::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// A normalised (network, address) pair: equal keys name the same socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenAddr {
    pub network: Network,
    pub endpoint: Endpoint,
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.network, self.endpoint)
    }
}

impl ListenAddr {
    /// Parses and normalises `address` for `network`, the way Go's `net.Listen` reads it.
    ///
    /// `":8080"` means every address; for `tcp`/`udp` that is the dual-stack `[::]`.
    /// Host names are resolved once, here. Unix paths must be absolute; `@name` is abstract.
    pub fn parse(network: &str, address: &str) -> Result<Self, Error> {
        let network: Network = network.parse()?;
        let endpoint = match network.family() {
            Family::Unix => parse_unix(network, address)?,
            family => Endpoint::Inet(parse_inet(network, family, address)?),
        };
        Ok(ListenAddr { network, endpoint })
    }

    /// `tcp`/`udp` on an unspecified IPv6 address accept IPv4 too, as in Go.
    fn dual_stack(&self) -> bool {
        matches!(self.network.family(), Family::Any)
            && matches!(self.endpoint, Endpoint::Inet(SocketAddr::V6(a)) if a.ip().is_unspecified())
    }
}

/// Whether parsing `address` may call the resolver, which blocks: only a host
/// name does; literal IPs, `:port` and unix addresses do not.
pub fn needs_resolver(network: &str, address: &str) -> bool {
    if network.starts_with("unix") {
        return false;
    }
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    !host.is_empty() && host.parse::<IpAddr>().is_err()
}

fn parse_inet(network: Network, family: Family, address: &str) -> Result<SocketAddr, Error> {
    let invalid = |why: &str| {
        Error::invalid_argument(format!(
            "invalid {network} address {address:?}: {why} (expected host:port, [ipv6]:port or :port)"
        ))
    };
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| invalid("missing port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| invalid("port must be a number from 0 to 65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.contains(':') && !address.starts_with('[') {
        return Err(invalid("an IPv6 host must be in brackets"));
    }
    let ip = if host.is_empty() {
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::Any if !ipv6_available() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            _ => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        ip
    } else {
        let resolved: Vec<IpAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| invalid(&format!("cannot resolve host {host:?}: {e}")))?
            .map(|a| a.ip())
            .collect();
        resolved
            .iter()
            .copied()
            .find(|ip| family_accepts(family, ip))
            .ok_or_else(|| invalid(&format!("host {host:?} has no address for {network}")))?
    };
    if !family_accepts(family, &ip) {
        return Err(invalid(&format!("{ip} is not an address of {network}")));
    }
    Ok(SocketAddr::new(canonical_ip(ip, family), port))
}

fn family_accepts(family: Family, ip: &IpAddr) -> bool {
    match family {
        Family::V4 => ip.is_ipv4() || ip_is_v4_mapped(ip),
        Family::V6 => ip.is_ipv6() && !ip_is_v4_mapped(ip),
        _ => true,
    }
}

fn ip_is_v4_mapped(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

fn canonical_ip(ip: IpAddr, family: Family) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if family != Family::V6 => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        _ => ip,
    }
}

fn ipv6_available() -> bool {
    Socket::new(Domain::IPV6, Type::STREAM, None).is_ok()
}

fn parse_unix(network: Network, address: &str) -> Result<Endpoint, Error> {
    let invalid = |why: String| {
        Error::invalid_argument(format!("invalid {network} address {address:?}: {why}"))
    };
    if address.is_empty() {
        return Err(invalid("empty path".into()));
    }
    if address.contains('\0') {
        return Err(invalid("contains a NUL byte".into()));
    }
    if address.len() > UNIX_PATH_MAX {
        return Err(invalid(format!(
            "longer than {UNIX_PATH_MAX} bytes, the limit of a unix socket address"
        )));
    }
    if let Some(name) = address.strip_prefix('@') {
        if name.is_empty() {
            return Err(invalid("abstract name after '@' is empty".into()));
        }
        return Ok(Endpoint::Abstract(name.as_bytes().to_vec()));
    }
    let path = Path::new(address);
    if !path.is_absolute() {
        return Err(invalid("the path must be absolute".into()));
    }
    // A last component of `.` or `..` names a directory too; normalising would make
    // "/run/." the directory "/run", and "/." the root "/".
    if address.ends_with('/') || address.ends_with("/.") || address.ends_with("/..") {
        return Err(invalid("the path names a directory".into()));
    }
    Ok(Endpoint::Path(normalise_path(path)))
}

/// Drops `.` components and repeated slashes; `..` is kept (it may cross a symlink).
fn normalise_path(path: &Path) -> PathBuf {
    path.components().collect()
}

/// Options applied when a socket is created; a later request for the same address
/// shares the existing socket whatever its options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenOptions {
    pub backlog: Option<u32>,
    pub reuse_port: bool,
    /// Permission bits of a filesystem unix socket.
    pub mode: Option<u32>,
}

/// Creates, binds and (for connection-oriented networks) starts listening on a socket.
///
/// Sockets are close-on-exec. Stream sockets get `SO_REUSEADDR` so a restarted broker
/// can bind past connections in TIME_WAIT; datagram sockets do not, since on Linux it
/// would let two processes share a UDP port silently. A stale unix socket file (nobody
/// accepting on it) is replaced; a live one is `InUse`.
pub fn bind(addr: &ListenAddr, options: &ListenOptions) -> Result<Socket, Error> {
    let io_error = |what: &str, e: io::Error| match e.raw_os_error() {
        Some(libc::EADDRINUSE) => Error::address_in_use(format!("{addr} is already in use")),
        Some(libc::EADDRNOTAVAIL) => {
            Error::invalid_argument(format!("{addr}: the address is not on this machine"))
        }
        _ => Error::io(format!("{addr}: {what}"), e),
    };
    if let Some(mode) = options.mode
        && (mode > 0o7777 || !matches!(addr.endpoint, Endpoint::Path(_)))
    {
        return Err(Error::invalid_argument(format!(
            "{addr}: mode {mode:#o} applies only to filesystem unix sockets and must be at most 0o7777"
        )));
    }
    let (domain, sockaddr) = match &addr.endpoint {
        Endpoint::Inet(sa) => (Domain::for_address(*sa), SockAddr::from(*sa)),
        Endpoint::Path(path) => {
            remove_stale_unix_socket(addr, path)?;
            (
                Domain::UNIX,
                SockAddr::unix(path).map_err(|e| io_error("address", e))?,
            )
        }
        Endpoint::Abstract(name) => {
            use std::os::unix::ffi::OsStrExt;
            let mut raw = vec![0u8];
            raw.extend_from_slice(name);
            let path = std::ffi::OsStr::from_bytes(&raw);
            (
                Domain::UNIX,
                SockAddr::unix(path).map_err(|e| io_error("address", e))?,
            )
        }
    };
    let socket =
        Socket::new(domain, addr.network.socket_type(), None).map_err(|e| io_error("socket", e))?;
    if matches!(addr.endpoint, Endpoint::Inet(_)) {
        if addr.network.is_listening() {
            socket
                .set_reuse_address(true)
                .map_err(|e| io_error("SO_REUSEADDR", e))?;
        }
        if options.reuse_port {
            socket
                .set_reuse_port(true)
                .map_err(|e| io_error("SO_REUSEPORT", e))?;
        }
        if domain == Domain::IPV6 {
            socket
                .set_only_v6(!addr.dual_stack())
                .map_err(|e| io_error("IPV6_V6ONLY", e))?;
        }
    }
    socket.bind(&sockaddr).map_err(|e| io_error("bind", e))?;
    if let (Some(mode), Endpoint::Path(path)) = (options.mode, &addr.endpoint) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_error("chmod", e))?;
    }
    if addr.network.is_listening() {
        let backlog = options
            .backlog
            .unwrap_or(DEFAULT_BACKLOG)
            .min(i32::MAX as u32) as i32;
        socket.listen(backlog).map_err(|e| io_error("listen", e))?;
    }
    Ok(socket)
}

fn remove_stale_unix_socket(addr: &ListenAddr, path: &Path) -> Result<(), Error> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(addr, e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(Error::address_in_use(format!(
            "{addr}: the path exists and is not a socket"
        )));
    }
    let alive = match addr.network {
        Network::Unixgram => UnixDatagram::unbound()
            .and_then(|s| s.connect(path))
            .is_ok(),
        Network::Unixpacket => Socket::new(Domain::UNIX, Type::SEQPACKET, None)
            .and_then(|s| s.connect(&SockAddr::unix(path)?))
            .is_ok(),
        _ => UnixStream::connect(path).is_ok(),
    };
    if alive {
        return Err(Error::address_in_use(format!(
            "{addr} is already in use (another process accepts on it)"
        )));
    }
    std::fs::remove_file(path)
        .or_else(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| Error::io(format!("{addr}: removing stale socket file"), e))
}

/// The address a socket is bound to, in the same form as [`Endpoint`]'s display
/// (so a port-0 request reports the port the kernel chose).
pub fn local_address(fd: &impl AsRawFd) -> io::Result<String> {
    let fd = fd.as_raw_fd();
    // SAFETY: the fd is borrowed only for this call; ManuallyDrop keeps it open.
    let socket =
        std::mem::ManuallyDrop::new(unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    let addr = socket.local_addr()?;
    if let Some(sa) = addr.as_socket() {
        return Ok(sa.to_string());
    }
    if let Some(path) = addr.as_pathname() {
        return Ok(path.display().to_string());
    }
    if let Some(name) = addr.as_abstract_namespace() {
        return Ok(format!("@{}", String::from_utf8_lossy(name)));
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn parse(n: &str, a: &str) -> Result<String, Error> {
        ListenAddr::parse(n, a).map(|l| l.to_string())
    }

    #[test]
    fn empty_host_means_every_address() {
        assert_eq!(parse("tcp4", ":80").unwrap(), "tcp4 0.0.0.0:80");
        assert_eq!(parse("tcp6", ":80").unwrap(), "tcp6 [::]:80");
        assert_eq!(parse("udp", ":53").unwrap(), "udp [::]:53");
    }

    #[test]
    fn hosts_normalise_to_one_key() {
        assert_eq!(
            ListenAddr::parse("tcp", "localhost:8080").unwrap(),
            ListenAddr::parse("tcp", "127.0.0.1:8080").unwrap()
        );
        assert_eq!(
            parse("tcp", "[::ffff:127.0.0.1]:1").unwrap(),
            "tcp 127.0.0.1:1"
        );
        assert_eq!(parse("tcp6", "[::1]:1").unwrap(), "tcp6 [::1]:1");
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        let err = parse("tcp", "8080").unwrap_err().to_string();
        assert!(err.contains("missing port"), "{err}");
        let err = parse("tcp", "127.0.0.1:http").unwrap_err().to_string();
        assert!(err.contains("port must be a number"), "{err}");
        let err = parse("tcp", "127.0.0.1:70000").unwrap_err().to_string();
        assert!(err.contains("port must be a number"), "{err}");
        let err = parse("tcp4", "[::1]:80").unwrap_err().to_string();
        assert!(err.contains("not an address of tcp4"), "{err}");
        let err = parse("tcp6", "127.0.0.1:80").unwrap_err().to_string();
        assert!(err.contains("not an address of tcp6"), "{err}");
        let err = parse("tcp", "::1:80").unwrap_err().to_string();
        assert!(err.contains("brackets"), "{err}");
        let err = parse("sctp", ":80").unwrap_err().to_string();
        assert!(err.contains("unknown network \"sctp\""), "{err}");
    }

    #[test]
    fn only_host_names_need_the_resolver() {
        assert!(!needs_resolver("tcp", ":80"));
        assert!(!needs_resolver("tcp4", "127.0.0.1:80"));
        assert!(!needs_resolver("tcp6", "[::1]:80"));
        assert!(!needs_resolver("unix", "/run/a.sock"));
        assert!(!needs_resolver("unixgram", "@name"));
        assert!(needs_resolver("tcp", "localhost:80"));
        assert!(needs_resolver("udp", "example.org:53"));
    }

    #[test]
    fn unix_addresses() {
        assert_eq!(
            parse("unix", "/run//x/./a.sock").unwrap(),
            "unix /run/x/a.sock"
        );
        assert_eq!(
            parse("unixgram", "@ally-test").unwrap(),
            "unixgram @ally-test"
        );
        assert!(
            parse("unix", "relative.sock")
                .unwrap_err()
                .to_string()
                .contains("absolute")
        );
        for directory in ["/run/", "/run/.", "/run/..", "/.", "/"] {
            let error = parse("unix", directory).unwrap_err().to_string();
            assert!(error.contains("names a directory"), "{directory}: {error}");
        }
        assert!(parse("unix", "@").is_err());
        assert!(parse("unix", "").is_err());
        let long = format!("/{}", "a".repeat(200));
        assert!(
            parse("unixpacket", &long)
                .unwrap_err()
                .to_string()
                .contains("107")
        );
    }

    #[test]
    fn port_zero_reports_the_chosen_port() {
        let addr = ListenAddr::parse("tcp4", "127.0.0.1:0").unwrap();
        let socket = bind(&addr, &ListenOptions::default()).unwrap();
        let local = local_address(&socket).unwrap();
        assert!(local.starts_with("127.0.0.1:"), "{local}");
        assert_ne!(local, "127.0.0.1:0");
    }

    #[test]
    fn a_port_in_use_is_named() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let addr = ListenAddr::parse("tcp", &format!("127.0.0.1:{port}")).unwrap();
        let err = bind(&addr, &ListenOptions::default()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddressInUse, "{err:?}");
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }

    #[test]
    fn a_failed_bind_keeps_the_os_error_as_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("s.sock");
        let addr = ListenAddr::parse("unix", path.to_str().unwrap()).unwrap();
        let err = bind(&addr, &ListenOptions::default()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io, "{err:?}");
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err:?}");
        let source = std::error::Error::source(&err).expect("the cause is kept");
        assert!(source.downcast_ref::<io::Error>().is_some(), "{source:?}");
        assert_eq!(
            err.to_string(),
            format!("unix {}: bind: {source}", path.display())
        );
    }

    #[test]
    fn stale_unix_socket_is_replaced_and_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let addr = ListenAddr::parse("unix", path.to_str().unwrap()).unwrap();
        let live = bind(
            &addr,
            &ListenOptions {
                mode: Some(0o660),
                ..Default::default()
            },
        )
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o660);
        assert_eq!(
            bind(&addr, &ListenOptions::default())
                .map_err(|e| e.kind())
                .err(),
            Some(ErrorKind::AddressInUse)
        );
        drop(live);
    }

    #[test]
    fn every_network_binds() {
        let dir = tempfile::tempdir().unwrap();
        for network in Network::ALL {
            let address = match network {
                Network::Tcp6 | Network::Udp6 => "[::1]:0".to_string(),
                n if n.is_unix() => dir.path().join(n.as_str()).display().to_string(),
                _ => "127.0.0.1:0".to_string(),
            };
            let addr = ListenAddr::parse(network.as_str(), &address).unwrap();
            if matches!(network, Network::Tcp6 | Network::Udp6) && !ipv6_available() {
                continue;
            }
            let socket =
                bind(&addr, &ListenOptions::default()).unwrap_or_else(|e| panic!("{network}: {e}"));
            assert!(!local_address(&socket).unwrap().is_empty());
        }
        let abs =
            ListenAddr::parse("unix", &format!("@ally-net-test-{}", std::process::id())).unwrap();
        let socket = bind(&abs, &ListenOptions::default()).unwrap();
        assert!(
            local_address(&socket)
                .unwrap()
                .starts_with("@ally-net-test-")
        );
    }
}
