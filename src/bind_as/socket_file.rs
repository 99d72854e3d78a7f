//! The unix socket file a bind makes: known by its directory and identity
//! (device and inode), so that it is removed only while it is still the same
//! file, and a stale one in the way of a new bind goes only if it is dead and
//! the caller allows it. Every look goes through `O_PATH | O_NOFOLLOW`, so no
//! symlink at the name is ever followed.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use ally_core::net::{ListenAddr, Network};
use ally_core::{Error as CoreError, ErrorKind};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use socket2::{Domain, SockAddr, Socket};

use super::dir_walk::{open_dir_as_broker, split};
use super::{Error, Removable, socket_type};

/// A unix socket file, known by its directory and identity, so that it is
/// removed only while it is still the same file.
#[derive(Debug)]
pub struct SocketFile {
    dir: OwnedFd,
    name: OsString,
    pub dev: u64,
    pub ino: u64,
}

impl SocketFile {
    /// The socket file at `path` as it is now (for a socket the broker got back
    /// from systemd), reached as [`BindAs::Broker`] reaches a directory.
    pub fn find(path: &Path) -> Option<SocketFile> {
        let (parent, name) = split(path).ok()?;
        let dir = open_dir_as_broker(parent).ok()?;
        let st = fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
        is_socket(&st).then(|| SocketFile {
            dir,
            name: name.to_os_string(),
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    pub fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Unlinks the file if it is still this socket. Returns whether it did.
    pub fn remove(&self) -> bool {
        let same = fstatat(
            &self.dir,
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| is_socket(&st) && (st.st_dev, st.st_ino) == self.id());
        same && nix::unistd::unlinkat(
            &self.dir,
            self.name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .is_ok()
    }
}

/// The socket file just bound, if it is still there (a socket that `owner`
/// owns); its mode set through the file itself should a default ACL of the
/// directory have overridden the umask.
pub(super) fn made(
    dir: &OwnedFd,
    name: &OsStr,
    owner: u32,
    mode: Option<u32>,
) -> Option<SocketFile> {
    let file = openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let st = fstat(&file).ok()?;
    if !is_socket(&st) || st.st_uid != owner {
        return None;
    }
    if let Some(mode) = mode
        && st.st_mode & 0o7777 != mode
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(proc_fd(&file), std::fs::Permissions::from_mode(mode));
    }
    Some(SocketFile {
        dir: dir.try_clone().ok()?,
        name: name.to_os_string(),
        dev: st.st_dev,
        ino: st.st_ino,
    })
}

/// Removes a socket file nobody accepts on, if `removable`; anything else in the
/// way is an address in use.
pub(super) fn clear_stale(
    addr: &ListenAddr,
    dir: &OwnedFd,
    name: &OsStr,
    removable: Removable<'_>,
) -> Result<(), Error> {
    let in_use = |why: String| Error::Address(CoreError::address_in_use(format!("{addr}: {why}")));
    let entry = match openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(entry) => entry,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e @ (Errno::EACCES | Errno::EPERM)) => {
            return Err(Error::Denied(format!(
                "cannot look for {:?} in its directory: {}",
                name,
                e.desc()
            )));
        }
        Err(e) => {
            return Err(in_use(format!(
                "cannot look at the file there: {}",
                e.desc()
            )));
        }
    };
    let st = fstat(&entry)
        .map_err(|e| in_use(format!("cannot look at the file there: {}", e.desc())))?;
    if !is_socket(&st) {
        return Err(in_use("the path exists and is not a socket".into()));
    }
    let alive = || {
        Err(Error::Address(CoreError::address_in_use(format!(
            "{addr} is already in use (another process accepts on it)"
        ))))
    };
    match connect(addr.network, &proc_fd(&entry)) {
        Ok(()) => return alive(),
        // A full accept queue is a live socket too.
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return alive(),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        Err(e) => {
            return Err(in_use(format!(
                "a socket file is there and the broker cannot tell whether it is in use ({e})"
            )));
        }
    }
    if !removable(st.st_dev, st.st_ino, st.st_uid) {
        return Err(in_use(
            "a socket file the broker did not create is there and nothing accepts on it: remove it if it is stale".into(),
        ));
    }
    let still = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|now| (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino));
    if still {
        nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir).map_err(|e| {
            CoreError::caused_by(
                ErrorKind::Io,
                format_args!("{addr}: removing the stale socket file"),
                e,
            )
        })?;
    }
    Ok(())
}

/// Connects to the socket file open as `path` (a `/proc/self/fd` link, so no
/// symlink is followed to reach it), without waiting on a full accept queue.
fn connect(network: Network, path: &str) -> io::Result<()> {
    let socket = Socket::new(Domain::UNIX, socket_type(network), None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(path)?)
}

fn proc_fd(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

pub(super) fn is_socket(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK
}
