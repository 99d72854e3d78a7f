//! The way to a directory, component by component, without following a
//! symlink on the broker's behalf unless root or the broker's user owns it,
//! and never through a directory someone else may change: that someone could
//! otherwise point a declared socket, made with root's rights, anywhere.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use ally_core::{Error as CoreError, ErrorKind};
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

use super::Error;

pub(super) fn split(path: &Path) -> Result<(&Path, &OsStr), Errno> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if path.is_absolute() => Ok((parent, name)),
        _ => Err(Errno::EINVAL),
    }
}

pub(super) fn open_dir(path: &Path) -> Result<OwnedFd, Errno> {
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
pub(super) fn open_dir_as_broker(path: &Path) -> Result<OwnedFd, Error> {
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
pub(super) fn may_replace(
    dir: &FileStat,
    entry: &FileStat,
    trusted: impl Fn(u32) -> bool,
) -> Option<String> {
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
