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

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use ally_core::net::{self, Endpoint, ListenAddr, ListenOptions, Network};
use ally_core::{Error as CoreError, ErrorKind};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use socket2::{Domain, SockAddr, Socket, Type};

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

/// Runs `f` on a new thread with its own cwd and umask and, for a user, that
/// user's file-access credentials; the thread ends with `f`, and its
/// credentials with it.
fn on_own_thread<T: Send>(
    who: BindAs<'_>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> Result<T, Error> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                isolate(who).map_err(|e| {
                    CoreError::io("cannot take the instance's credentials to bind", e)
                })?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(CoreError::failed("the bind thread panicked".into()).into()))
    })
}

fn isolate(who: BindAs<'_>) -> io::Result<()> {
    // SAFETY: these calls change only the calling thread: after
    // unshare(CLONE_FS) its cwd and umask are its own, and the raw syscalls
    // bypass glibc's broadcast of credential changes to every thread.
    unsafe {
        if libc::unshare(libc::CLONE_FS) != 0 {
            return Err(io::Error::last_os_error());
        }
        let BindAs::User(creds) = who else {
            return Ok(());
        };
        if libc::geteuid() == 0 {
            let groups: Vec<libc::gid_t> = creds.groups.clone();
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // setfs[ug]id report no error: ask back (an invalid id changes nothing).
        libc::syscall(libc::SYS_setfsgid, creds.gid);
        if libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32 != creds.gid {
            return Err(io::Error::other(format!("setfsgid({}) failed", creds.gid)));
        }
        libc::syscall(libc::SYS_setfsuid, creds.uid);
        if libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 != creds.uid {
            return Err(io::Error::other(format!("setfsuid({}) failed", creds.uid)));
        }
    }
    Ok(())
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

/// The socket file just bound, if it is still there (a socket that `owner`
/// owns); its mode set through the file itself should a default ACL of the
/// directory have overridden the umask.
fn made(dir: &OwnedFd, name: &OsStr, owner: u32, mode: Option<u32>) -> Option<SocketFile> {
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
fn clear_stale(
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

fn socket_type(network: Network) -> Type {
    match network {
        Network::Unixgram | Network::Udp | Network::Udp4 | Network::Udp6 => Type::DGRAM,
        Network::Unixpacket => Type::SEQPACKET,
        _ => Type::STREAM,
    }
}

fn is_socket(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn split(path: &Path) -> Result<(&Path, &OsStr), Errno> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if path.is_absolute() => Ok((parent, name)),
        _ => Err(Errno::EINVAL),
    }
}

fn open_dir(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Most symlinks one path may go through, as the kernel allows.
const MAX_SYMLINKS: usize = 40;

/// Opens directory `path` one component at a time, following a symlink only if
/// root or the broker's user owns it, and only through directories that no one
/// else may change: a user who could rename a directory or plant a symlink on
/// the way cannot redirect the broker elsewhere, now or between this walk and
/// the `bind()` that resolves the path again.
fn open_dir_as_broker(path: &Path) -> Result<OwnedFd, Error> {
    let broker = nix::unistd::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == broker;
    let fail = |what: String, e: Errno| {
        Error::Address(CoreError::caused_by(
            ErrorKind::Io,
            format_args!("{}: {what}", path.display()),
            e,
        ))
    };
    let root = || open_dir(Path::new("/")).map_err(|e| fail("/".into(), e));
    let mut dir = root()?;
    let mut pending: VecDeque<OsString> = components(path);
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        let next = openat(
            &dir,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(name.to_string_lossy().into(), e))?;
        let st = fstat(&next).map_err(|e| fail(name.to_string_lossy().into(), e))?;
        let here = fstat(&dir).map_err(|e| fail(name.to_string_lossy().into(), e))?;
        if let Some(who) = may_replace(&here, &st, trusted) {
            return Err(Error::Denied(format!(
                "the way to {} goes through {:?} in a directory {who} may change, which the broker does not follow for declared sockets",
                path.display(),
                name,
            )));
        }
        match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => dir = next,
            SFlag::S_IFLNK => {
                if !trusted(st.st_uid) {
                    return Err(Error::Denied(format!(
                        "the way to {} goes through a symlink {:?} owned by uid {}, which the broker does not follow",
                        path.display(),
                        name,
                        st.st_uid
                    )));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(fail("too many symlinks".into(), Errno::ELOOP));
                }
                let target =
                    readlinkat(&next, "").map_err(|e| fail(name.to_string_lossy().into(), e))?;
                let target = Path::new(&target);
                if target.is_absolute() {
                    dir = root()?;
                }
                for component in components(target).into_iter().rev() {
                    pending.push_front(component);
                }
            }
            _ => return Err(fail(name.to_string_lossy().into(), Errno::ENOTDIR)),
        }
    }
    Ok(dir)
}

/// Who other than the trusted users may rename or replace `entry` in directory
/// `dir`, if anyone: its owner, or the users its group and other write bits
/// admit, unless the sticky bit keeps them off an entry a trusted user owns.
fn may_replace(dir: &FileStat, entry: &FileStat, trusted: impl Fn(u32) -> bool) -> Option<String> {
    if !trusted(dir.st_uid) {
        return Some(format!("uid {}", dir.st_uid));
    }
    let sticky_guards = dir.st_mode & 0o1000 != 0 && trusted(entry.st_uid);
    if dir.st_mode & 0o002 != 0 && !sticky_guards {
        return Some("every user".into());
    }
    if dir.st_mode & 0o020 != 0 && dir.st_gid != 0 && !sticky_guards {
        return Some(format!("group {}", dir.st_gid));
    }
    None
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsStr::from_bytes(b"..").to_os_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn unix(path: &Path) -> ListenAddr {
        ListenAddr::parse("unix", path.to_str().unwrap()).unwrap()
    }

    fn with_mode(mode: u32) -> ListenOptions {
        ListenOptions {
            mode: Some(mode),
            ..Default::default()
        }
    }

    const ANY: Removable<'static> = &|_, _, _| true;
    const NONE: Removable<'static> = &|_, _, _| false;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn me() -> Credentials {
        Credentials {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            groups: nix::unistd::getgroups()
                .unwrap()
                .into_iter()
                .map(|g| g.as_raw())
                .collect(),
        }
    }

    #[test]
    fn the_mode_comes_from_the_umask_without_changing_the_process_umask() {
        let dir = tempfile::tempdir().unwrap();
        let before = nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
        for (i, mode) in [0o600, 0o666, 0o777, 0o640].into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.sock"));
            let bound = bind(&unix(&path), &with_mode(mode), BindAs::Broker, NONE).unwrap();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!(meta.mode() & 0o7777, mode, "{mode:o}");
            assert_eq!(bound.file.unwrap().id(), (meta.dev(), meta.ino()));
        }
        let now = nix::sys::stat::umask(before);
        assert_eq!(now.bits(), 0o022, "the process umask is untouched");
    }

    #[test]
    fn more_than_0o777_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let err = bind(&unix(&path), &with_mode(0o4777), BindAs::Broker, NONE).unwrap_err();
        assert!(
            matches!(&err, Error::Address(e) if e.kind() == ErrorKind::InvalidArgument),
            "{err:?}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn a_symlink_at_the_path_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("s.sock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = bind(&unix(&path), &with_mode(0o666), BindAs::User(&me()), ANY).unwrap_err();
        assert!(
            matches!(&err, Error::Address(e) if e.kind() == ErrorKind::AddressInUse),
            "{err:?}"
        );
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o600);
        assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
    }

    #[test]
    fn a_dead_socket_goes_only_if_removable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let ino = std::fs::symlink_metadata(&path).unwrap().ino();
        let err = bind(&unix(&path), &Default::default(), BindAs::Broker, NONE).unwrap_err();
        assert!(err_says(&err, "did not create"), "{err:?}");
        assert_eq!(std::fs::symlink_metadata(&path).unwrap().ino(), ino);
        let this = move |_: u64, i: u64, _: u32| i == ino;
        let bound = bind(&unix(&path), &Default::default(), BindAs::Broker, &this).unwrap();
        std::os::unix::net::UnixStream::connect(&path).expect("the new socket is there");
        // A live one stays, whatever `removable` says.
        let err = bind(&unix(&path), &Default::default(), BindAs::Broker, ANY).unwrap_err();
        assert!(err_says(&err, "another process accepts on it"), "{err:?}");
        let file = bound.file.unwrap();
        drop(bound.socket);
        assert!(file.remove());
        assert!(!path.exists());
    }

    #[test]
    fn a_live_socket_with_a_full_queue_is_in_use_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        live.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        live.listen(0).unwrap();
        let mut queued = Vec::new();
        loop {
            let client = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
            client.set_nonblocking(true).unwrap();
            match client.connect(&SockAddr::unix(&path).unwrap()) {
                Ok(()) => queued.push(client),
                Err(_) => break,
            }
        }
        let err = bind(&unix(&path), &Default::default(), BindAs::Broker, ANY).unwrap_err();
        assert!(err_says(&err, "another process accepts on it"), "{err:?}");
    }

    #[test]
    fn a_socket_file_is_removed_only_while_it_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let bound = bind(&unix(&path), &Default::default(), BindAs::Broker, NONE).unwrap();
        let file = bound.file.unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(!file.remove());
        assert!(path.exists());
        drop(other);
        let found = SocketFile::find(&path).unwrap();
        assert!(found.remove());
        assert!(!path.exists());
    }

    fn nobody() -> Credentials {
        Credentials {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        }
    }

    fn err_says(err: &Error, words: &str) -> bool {
        match err {
            Error::Address(e) => e.to_string().contains(words),
            Error::Denied(m) => m.contains(words),
        }
    }

    #[test]
    fn a_user_gets_only_what_it_could_do_itself() {
        if !root() {
            eprintln!("skipped: needs root to act as another user");
            return;
        }
        let nobody = nobody();
        let dir = tempfile::tempdir().unwrap();
        // A root-only directory: denied, and nothing is made there.
        let path = dir.path().join("root.sock");
        let err = bind(&unix(&path), &with_mode(0o666), BindAs::User(&nobody), ANY).unwrap_err();
        assert!(err_says(&err, "cannot create files in"), "{err:?}");
        assert!(!path.exists());
        // Its own directory: the file is nobody's, with the mode asked for.
        let own = dir.path().join("own");
        std::fs::create_dir(&own).unwrap();
        std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = own.join("s.sock");
        bind(&unix(&path), &with_mode(0o640), BindAs::User(&nobody), ANY).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (65534, 65534, 0o640)
        );
        // The caller's own credentials are untouched.
        assert_eq!(me().uid, 0);
        assert!(std::fs::File::create(dir.path().join("still-root")).is_ok());
    }

    #[test]
    fn the_broker_follows_only_symlinks_root_owns() {
        if !root() {
            eprintln!("skipped: needs root to own symlinks as another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let trusted = dir.path().join("trusted");
        std::os::unix::fs::symlink(&real, &trusted).unwrap();
        bind(
            &unix(&trusted.join("a.sock")),
            &Default::default(),
            BindAs::Broker,
            NONE,
        )
        .unwrap();
        assert!(real.join("a.sock").exists());
        let planted = dir.path().join("planted");
        std::os::unix::fs::symlink(&real, &planted).unwrap();
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &planted,
            Some(nix::unistd::Uid::from_raw(65534)),
            None,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        let err = bind(
            &unix(&planted.join("b.sock")),
            &Default::default(),
            BindAs::Broker,
            NONE,
        )
        .unwrap_err();
        assert!(err_says(&err, "owned by uid 65534"), "{err:?}");
        assert!(!real.join("b.sock").exists());
    }

    #[test]
    fn a_way_others_may_change_is_not_the_brokers() {
        let stat = |uid: u32, gid: u32, mode: u32| {
            // SAFETY: FileStat is a plain C struct of integers; all zeroes is valid.
            let mut st: FileStat = unsafe { std::mem::zeroed() };
            (st.st_uid, st.st_gid, st.st_mode) = (uid, gid, mode);
            st
        };
        let trusted = |uid: u32| uid == 0;
        let root_entry = stat(0, 0, 0o40755);
        let user_entry = stat(1000, 1000, 0o40755);
        let replace = |dir: &FileStat, entry: &FileStat| may_replace(dir, entry, trusted);
        assert_eq!(replace(&stat(0, 0, 0o40755), &user_entry), None);
        assert_eq!(
            replace(&stat(0, 0, 0o40775), &root_entry),
            None,
            "group root"
        );
        assert_eq!(
            replace(&stat(1000, 0, 0o40755), &root_entry).as_deref(),
            Some("uid 1000")
        );
        assert_eq!(
            replace(&stat(0, 0, 0o40777), &root_entry).as_deref(),
            Some("every user")
        );
        assert_eq!(
            replace(&stat(0, 50, 0o40775), &root_entry).as_deref(),
            Some("group 50")
        );
        // /tmp: the sticky bit keeps others off what root owns, not off the rest.
        assert_eq!(replace(&stat(0, 0, 0o41777), &root_entry), None);
        assert_eq!(
            replace(&stat(0, 0, 0o41777), &user_entry).as_deref(),
            Some("every user")
        );
    }

    #[test]
    fn the_broker_refuses_a_way_through_a_directory_anyone_may_change() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let sub = open.join("sub");
        std::fs::create_dir(&sub).unwrap();
        // Directly in it: bind() itself never follows; fine.
        bind(
            &unix(&open.join("a.sock")),
            &Default::default(),
            BindAs::Broker,
            NONE,
        )
        .unwrap();
        // Below it: `sub` could be swapped for a symlink between walk and bind.
        let err = bind(
            &unix(&sub.join("b.sock")),
            &Default::default(),
            BindAs::Broker,
            NONE,
        )
        .unwrap_err();
        assert!(
            err_says(&err, "\"sub\" in a directory every user may change"),
            "{err:?}"
        );
        assert!(!sub.join("b.sock").exists());
        // As a user, the kernel checks every step: fine.
        bind(
            &unix(&sub.join("c.sock")),
            &Default::default(),
            BindAs::User(&me()),
            NONE,
        )
        .unwrap();
    }

    #[test]
    fn internet_sockets_belong_to_the_user() {
        if !root() {
            eprintln!("skipped: needs root to act as another user");
            return;
        }
        let nobody = nobody();
        let addr = ListenAddr::parse("tcp4", "127.0.0.1:0").unwrap();
        let bound = bind(&addr, &Default::default(), BindAs::User(&nobody), NONE).unwrap();
        // The socket inode's owner is what SO_REUSEPORT groups compare.
        let st = fstat(bound.socket.as_fd()).unwrap();
        assert_eq!(st.st_uid, 65534);
    }

    /// What the thread per bind costs:
    /// `cargo test -p ally --lib bind_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn bind_cost() {
        const N: u32 = 300;
        let dir = tempfile::tempdir().unwrap();
        let creds = me();
        let time = |what: &str, bind_one: &dyn Fn(u32)| {
            let start = std::time::Instant::now();
            for i in 0..N {
                bind_one(i);
            }
            eprintln!("{what}: {:?} per bind", start.elapsed() / N);
        };
        let path = |tag: &str, i: u32| unix(&dir.path().join(format!("{tag}{i}.sock")));
        let options = with_mode(0o660);
        time("unix, in place (net::bind)", &|i| {
            net::bind(&path("a", i), &options).unwrap();
        });
        time("unix, broker's thread", &|i| {
            bind(&path("b", i), &options, BindAs::Broker, NONE).unwrap();
        });
        time("unix, user's thread", &|i| {
            bind(&path("c", i), &options, BindAs::User(&creds), NONE).unwrap();
        });
        let tcp = ListenAddr::parse("tcp4", "127.0.0.1:0").unwrap();
        time("tcp, in place (net::bind)", &|_| {
            net::bind(&tcp, &Default::default()).unwrap();
        });
        time("tcp, user's thread", &|_| {
            bind(&tcp, &Default::default(), BindAs::User(&creds), NONE).unwrap();
        });
    }
}
