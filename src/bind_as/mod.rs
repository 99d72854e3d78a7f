//! Binding a socket with someone's rights, and never through a symlink on the
//! broker's behalf.
//!
//! An instance's socket is made on a short-lived thread of its own that first
//! unshares its filesystem context (`CLONE_FS`: cwd and umask become its own)
//! and takes the instance's credentials for file access (`setgroups`,
//! `setfsgid`, `setfsuid`, as raw syscalls: glibc's wrappers would change every
//! thread). The kernel then checks every directory as the instance's user and
//! the socket file is that user's; an internet socket is that user's too, which
//! is what `SO_REUSEPORT` groups go by. The mode of a unix socket comes from the
//! thread's umask at `bind()`: no path is ever chmod-ed, and `bind()` refuses an
//! existing name, so a symlink there is never followed.
//!
//! A socket the operator declared is made with the broker's own rights, on the
//! same kind of thread (for the umask), reaching its directory through symlinks
//! only if root or the broker's user owns them and only through directories no
//! one else may change.
//!
//! The parts: `rights_thread` is the thread that takes the rights,
//! `dir_walk` the broker's walk to a declared socket's directory, and
//! `socket_file` the socket file itself: made, found again, and removed only
//! while it is the same file, or when stale and the caller allows it.

mod dir_walk;
mod rights_thread;
mod socket_file;
#[cfg(test)]
mod tests;

use std::io;
use std::path::Path;

use ally_core::net::{self, Endpoint, ListenAddr, ListenOptions, Network};
use ally_core::{Error as CoreError, ErrorKind};
use nix::errno::Errno;
use nix::sys::stat::Mode;
use socket2::{Domain, SockAddr, Socket, Type};

use dir_walk::{open_dir, open_dir_as_broker, split};
use rights_thread::on_own_thread;
use socket_file::{clear_stale, made};

pub use socket_file::SocketFile;

/// The file-access identity of an instance's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Whose rights a bind uses.
#[derive(Debug, Clone, Copy)]
pub enum BindAs<'a> {
    /// The broker's own, for an address the operator declared.
    Broker,
    /// An instance's: only what that user could bind.
    User(&'a Credentials),
}

/// Why a bind failed: the address's own error, or the user's lack of rights.
#[derive(Debug, Clone)]
pub enum Error {
    Address(CoreError),
    /// The user may not: the reason, for the caller to put in its message.
    Denied(String),
}

impl From<CoreError> for Error {
    fn from(e: CoreError) -> Self {
        Error::Address(e)
    }
}

/// A bound socket and, for a filesystem unix socket, the file it made.
#[derive(Debug)]
pub struct Bound {
    pub socket: Socket,
    pub file: Option<SocketFile>,
}

/// Which dead socket files a bind may replace: `removable(dev, ino, uid)`.
pub type Removable<'a> = &'a (dyn Fn(u64, u64, u32) -> bool + Sync);

/// Creates, binds and (for connection-oriented networks) starts listening on a
/// socket for `addr`, with the rights of `who`. A dead socket file in the way is
/// removed only if `removable` says so.
pub fn bind(
    addr: &ListenAddr,
    options: &ListenOptions,
    who: BindAs<'_>,
    removable: Removable<'_>,
) -> Result<Bound, Error> {
    if let Some(mode) = options.mode
        && (mode > 0o777 || !matches!(addr.endpoint, Endpoint::Path(_)))
    {
        return Err(CoreError::invalid_argument(format!(
            "{addr}: mode {mode:#o} applies only to filesystem unix sockets and must be at most 0o777"
        ))
        .into());
    }
    match (&addr.endpoint, who) {
        (Endpoint::Path(path), _) => {
            on_own_thread(who, || bind_path(addr, path, options, who, removable))
        }
        (Endpoint::Inet(_), BindAs::User(_)) => on_own_thread(who, || plain(addr, options)),
        _ => plain(addr, options),
    }
}

fn plain(addr: &ListenAddr, options: &ListenOptions) -> Result<Bound, Error> {
    Ok(Bound {
        socket: net::bind(addr, options)?,
        file: None,
    })
}

/// The lowest port an unprivileged user may bind (`net.ipv4.ip_unprivileged_port_start`).
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

fn bind_path(
    addr: &ListenAddr,
    path: &Path,
    options: &ListenOptions,
    who: BindAs<'_>,
    removable: Removable<'_>,
) -> Result<Bound, Error> {
    let io = |what: &str, e: Errno| -> Error {
        match e {
            Errno::EACCES | Errno::EPERM => Error::Denied(format!("{what}: {}", e.desc())),
            Errno::EADDRINUSE | Errno::EEXIST => {
                CoreError::address_in_use(format!("{addr} is already in use")).into()
            }
            _ => CoreError::caused_by(ErrorKind::Io, format_args!("{addr}: {what}"), e).into(),
        }
    };
    let (parent, name) = split(path).map_err(|e| io("the path", e))?;
    let dir = match who {
        BindAs::Broker => open_dir_as_broker(parent)?,
        BindAs::User(_) => {
            open_dir(parent).map_err(|e| io(&format!("cannot reach {}", parent.display()), e))?
        }
    };
    clear_stale(addr, &dir, name, removable)?;
    if let Some(mode) = options.mode {
        nix::sys::stat::umask(Mode::from_bits_truncate(!mode & 0o777));
    }
    let socket = Socket::new(Domain::UNIX, socket_type(addr.network), None)
        .map_err(|e| io("socket", errno(&e)))?;
    // The whole path, so that the socket's own address (what the app and the fd
    // store see) is absolute: resolved again as the user for an instance, and,
    // for the broker, along directories only root may change (see
    // `open_dir_as_broker`); `bind()` itself never follows the last component.
    let sockaddr = SockAddr::unix(path).map_err(|e| io("address", errno(&e)))?;
    socket.bind(&sockaddr).map_err(|e| {
        io(
            &format!("cannot create files in {}", parent.display()),
            errno(&e),
        )
    })?;
    let owner = match who {
        BindAs::Broker => nix::unistd::geteuid().as_raw(),
        BindAs::User(creds) => creds.uid,
    };
    let file = made(&dir, name, owner, options.mode);
    if addr.network.is_listening() {
        let backlog = options
            .backlog
            .unwrap_or(net::DEFAULT_BACKLOG)
            .min(i32::MAX as u32);
        socket
            .listen(backlog as i32)
            .map_err(|e| io("listen", errno(&e)))?;
    }
    Ok(Bound { socket, file })
}

pub(super) fn socket_type(network: Network) -> Type {
    match network {
        Network::Unixgram | Network::Udp | Network::Udp4 | Network::Udp6 => Type::DGRAM,
        Network::Unixpacket => Type::SEQPACKET,
        _ => Type::STREAM,
    }
}

pub(super) fn errno(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}
