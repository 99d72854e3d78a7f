//! Talking to systemd: readiness and status through `sd_notify`, the fd store
//! that keeps listeners across a broker restart, and the sockets systemd
//! passes at start (fd store or socket activation). Every call is a no-op when
//! the broker does not run under systemd.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use ally_core::net::ListenAddr;
use sd_notify::NotifyState;

fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState]) {
    if !under_systemd() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` carries the monotonic time so systemd (253+) can tell the
/// reload it asked for from an older one; 252 ignores it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its period for as long as the runtime runs, when
/// the unit sets `WatchdogSec=`.
pub fn spawn_watchdog() {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let interval = (period / 2).max(Duration::from_millis(10));
    tracing::info!("watchdog every {}", humantime::format_duration(interval));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}

/// Keeps a copy of a listener in systemd's fd store, named after its key, so a
/// restarted broker gets the same socket back.
pub fn store(key: &ListenAddr, fd: &OwnedFd) {
    if !under_systemd() {
        return;
    }
    let name = fd_name(key);
    if let Err(e) = sd_notify::notify_with_fds(
        &[NotifyState::FdStore, NotifyState::FdName(&name)],
        &[fd.as_fd()],
    ) {
        tracing::warn!("cannot keep {key} in the fd store: {e}");
    }
}

pub fn unstore(key: &ListenAddr) {
    let name = fd_name(key);
    send(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
}

/// Names of the broker's own fds in the fd store that are not listeners (an
/// instance's output pipe, its notification socket, the private and state
/// sockets); none holds a space, which every listener's name does.
pub const OWN_FD_PREFIX: &str = "ally-";

/// Keeps a copy of `fd` in systemd's fd store as `name` (which starts with
/// [`OWN_FD_PREFIX`]), so a restarted broker gets it back.
pub fn store_named(name: &str, fd: std::os::fd::BorrowedFd<'_>) {
    if !under_systemd() {
        return;
    }
    if let Err(e) =
        sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd])
    {
        tracing::warn!("cannot keep {name} in the fd store: {e}");
    }
}

pub fn unstore_named(name: &str) {
    send(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
}

/// Whether the broker runs under systemd, whose fd store keeps fds across a
/// restart (the unit sets `FileDescriptorStoreMax=`; 252 does not say so).
pub fn has_fd_store() -> bool {
    under_systemd()
}

/// Where an inherited socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The broker's own fd store: it was a listener before the broker restarted.
    FdStore,
    /// A `.socket` unit: systemd owns it and it stays for the broker's life.
    SocketActivation,
}

/// A socket systemd passed at start, with the keys it answers to.
#[derive(Debug)]
pub struct Inherited {
    pub fd: OwnedFd,
    pub key: ListenAddr,
    pub aliases: Vec<ListenAddr>,
    pub origin: Origin,
}

/// The sockets in `LISTEN_FDS`. Ones that are not listening sockets are closed
/// with a warning; the broker's own other fds (named [`OWN_FD_PREFIX`]...) are
/// returned by name.
pub fn inherited() -> (Vec<Inherited>, std::collections::HashMap<String, OwnedFd>) {
    let mut own = std::collections::HashMap::new();
    let fds = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds.collect::<Vec<_>>(),
        Err(e) => {
            tracing::warn!("ignoring LISTEN_FDS: {e}");
            return (Vec::new(), own);
        }
    };
    let mut sockets = Vec::new();
    for (raw, name) in fds {
        // SAFETY: systemd passed these fds to this process and nothing else owns them.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Passed without close-on-exec: a re-exec or a spawn must not inherit
        // them unless the broker says so.
        let _ = crate::reexec::set_cloexec(raw, true);
        if name.starts_with(OWN_FD_PREFIX) {
            own.insert(name, fd);
            continue;
        }
        match classify(&fd) {
            Ok((key, aliases)) => {
                // Our own names parse as keys; a .socket unit's names do not.
                let from_store = parse_fd_name(&name);
                let origin = if from_store.is_some() {
                    Origin::FdStore
                } else {
                    Origin::SocketActivation
                };
                let (key, aliases) = match from_store {
                    Some(stored) if stored != key => {
                        let mut all = aliases;
                        all.push(key);
                        (stored, all)
                    }
                    _ => (key, aliases),
                };
                sockets.push(Inherited {
                    fd,
                    key,
                    aliases,
                    origin,
                });
            }
            Err(e) => tracing::warn!(fd = raw, name, "ignoring a socket from systemd: {e}"),
        }
    }
    (sockets, own)
}

/// The key of a socket, and the other keys that name it, read off the socket.
fn classify(fd: &OwnedFd) -> io::Result<(ListenAddr, Vec<ListenAddr>)> {
    use socket2::{Domain, SockRef, Type};
    let socket = SockRef::from(fd);
    let domain = socket.domain()?;
    let kind = socket.r#type()?;
    let local = ally_core::net::local_address(&fd.as_raw_fd())?;
    let listening = socket.is_listener().unwrap_or(false);
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let parse =
        |network: &str| ListenAddr::parse(network, &local).map_err(|e| invalid(&e.to_string()));
    let stream = kind == Type::STREAM;
    if (stream || kind == Type::SEQPACKET) && !listening {
        return Err(invalid(
            "not a listening socket (Accept=yes is not supported)",
        ));
    }
    let (base, v4, v6) = match kind {
        Type::STREAM => ("tcp", "tcp4", "tcp6"),
        Type::DGRAM => ("udp", "udp4", "udp6"),
        _ => ("", "", ""),
    };
    if domain == Domain::UNIX {
        let network = match kind {
            Type::STREAM => "unix",
            Type::DGRAM => "unixgram",
            Type::SEQPACKET => "unixpacket",
            _ => return Err(invalid("unsupported unix socket type")),
        };
        return Ok((parse(network)?, vec![]));
    }
    if base.is_empty() {
        return Err(invalid("unsupported socket type"));
    }
    if domain == Domain::IPV4 {
        return Ok((parse(v4)?, vec![parse(base)?]));
    }
    if domain == Domain::IPV6 {
        let dual = !socket.only_v6()?;
        let any = parse(v6)?;
        let unspecified =
            matches!(&any.endpoint, ally_core::net::Endpoint::Inet(a) if a.ip().is_unspecified());
        if dual && unspecified {
            return Ok((parse(base)?, vec![]));
        }
        return Ok((
            any,
            if unspecified {
                vec![]
            } else {
                vec![parse(base)?]
            },
        ));
    }
    Err(invalid("unsupported address family"))
}

/// `FDNAME=` allows printable ASCII but `:`, so `:` and `%` are percent-encoded.
pub fn fd_name(key: &ListenAddr) -> String {
    let address = key
        .endpoint
        .to_string()
        .replace('%', "%25")
        .replace(':', "%3A");
    format!("{} {address}", key.network)
}

pub fn parse_fd_name(name: &str) -> Option<ListenAddr> {
    let (network, address) = name.split_once(' ')?;
    let address = address.replace("%3A", ":").replace("%25", "%");
    ListenAddr::parse(network, &address).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_names_round_trip_and_hold_no_colon() {
        for (network, address) in [
            ("tcp", ":8080"),
            ("tcp6", "[::1]:443"),
            ("udp4", "127.0.0.1:53"),
            ("unix", "/run/app/a%b:c.sock"),
            ("unixgram", "@abstract"),
        ] {
            let key = ListenAddr::parse(network, address).unwrap();
            let name = fd_name(&key);
            assert!(!name.contains(':'), "{name}");
            assert_eq!(parse_fd_name(&name), Some(key), "{name}");
        }
        assert_eq!(parse_fd_name("ally@web.socket"), None);
        assert_eq!(parse_fd_name("http"), None);
    }

    fn classify_bound(network: &str, address: &str) -> (String, Vec<String>) {
        let addr = ListenAddr::parse(network, address).unwrap();
        let socket = ally_core::net::bind(&addr, &Default::default()).unwrap();
        let fd: OwnedFd = socket.into();
        let (key, aliases) = classify(&fd).unwrap();
        (
            key.to_string(),
            aliases.iter().map(|a| a.to_string()).collect(),
        )
    }

    #[test]
    fn inherited_sockets_are_named_by_what_they_are() {
        let (key, aliases) = classify_bound("tcp", "127.0.0.1:0");
        assert!(key.starts_with("tcp4 127.0.0.1:"), "{key}");
        assert_eq!(aliases, vec![key.replacen("tcp4", "tcp", 1)]);
        let (key, aliases) = classify_bound("tcp", ":0");
        assert!(key.starts_with("tcp [::]:"), "dual-stack any: {key}");
        assert!(aliases.is_empty());
        let (key, _) = classify_bound("udp6", "[::1]:0");
        assert!(key.starts_with("udp6 [::1]:"), "{key}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock").display().to_string();
        let (key, _) = classify_bound("unixpacket", &path);
        assert_eq!(key, format!("unixpacket {path}"));
    }

    #[test]
    fn a_socket_that_does_not_listen_is_refused() {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let fd: OwnedFd = socket.into();
        assert!(
            classify(&fd)
                .unwrap_err()
                .to_string()
                .contains("not a listening socket")
        );
    }
}
