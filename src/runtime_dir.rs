//! Where a broker's private socket lives. `ally run` and every other `ally`
//! command resolve it the same way, so they meet without being told.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The runtime directory of `app`, in order: `--runtime-dir`, `$RUNTIME_DIRECTORY`
/// (set by systemd from `RuntimeDirectory=`; only for the broker itself, since it
/// names the unit's own directory), `/run/ally/<app>` for root,
/// `$XDG_RUNTIME_DIR/ally/<app>`, `/tmp/ally-<uid>/<app>`.
pub fn resolve(app: &str, explicit: Option<&Path>, for_broker: bool) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    if for_broker && let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty())
    {
        // systemd passes a colon-separated list when several are configured.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        return PathBuf::from(first);
    }
    base_dir().join(app)
}

/// The directory holding every app's runtime directory for this user.
pub fn base_dir() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/ally");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("ally");
    }
    PathBuf::from(format!("/tmp/ally-{uid}"))
}

/// Creates the runtime directory if needed and makes sure nobody but the broker's
/// user (and root) can replace what the broker puts there.
///
/// Every directory on the way must belong to root or the broker's user and be
/// writable by no one else unless sticky (as `/tmp`); a symlink on the way must
/// belong to root or the broker's user too. The runtime directory itself must
/// belong to the broker's user and be writable by no one else. Directories the
/// broker creates are 0711 on the way and 0700 at the end, or 0711 when
/// `reachable_by_others` (the app runs as another user and must reach the socket,
/// which is then theirs alone to open).
pub fn prepare(dir: &Path, reachable_by_others: bool) -> io::Result<()> {
    let owner = nix::unistd::geteuid().as_raw();
    let dir = std::path::absolute(dir)?;
    let mut at = PathBuf::from("/");
    let components: Vec<Component> = dir.components().collect();
    for (i, component) in components.iter().enumerate() {
        match component {
            Component::RootDir => continue,
            Component::Normal(name) => at.push(name),
            Component::ParentDir => {
                at.pop();
                continue;
            }
            Component::CurDir | Component::Prefix(_) => continue,
        }
        let last = i + 1 == components.len();
        let mut meta = match std::fs::symlink_metadata(&at) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mode = if last && !reachable_by_others {
                    0o700
                } else {
                    0o711
                };
                match std::fs::DirBuilder::new().mode(mode).create(&at) {
                    Ok(()) => {
                        // The umask may have taken bits we want others to have.
                        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode))
                            .map_err(|e| cannot("set the mode of", &at, e))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(cannot("create", &at, e)),
                }
                std::fs::symlink_metadata(&at).map_err(|e| cannot("read", &at, e))?
            }
            Err(e) => return Err(cannot("read", &at, e)),
        };
        if meta.file_type().is_symlink() {
            if meta.uid() != 0 && meta.uid() != owner {
                return Err(unsafe_dir(
                    &dir,
                    format!("{} is a symlink owned by uid {}", at.display(), meta.uid()),
                ));
            }
            at = std::fs::canonicalize(&at).map_err(|e| cannot("resolve", &at, e))?;
            meta = std::fs::symlink_metadata(&at).map_err(|e| cannot("read", &at, e))?;
        }
        if !meta.is_dir() {
            return Err(unsafe_dir(
                &dir,
                format!("{} is not a directory", at.display()),
            ));
        }
        let writable_by_others = meta.mode() & 0o022 != 0;
        if last {
            if meta.uid() != owner {
                return Err(unsafe_dir(
                    &dir,
                    format!(
                        "it is owned by uid {}, not by the broker's uid {owner}",
                        meta.uid()
                    ),
                ));
            }
            if writable_by_others {
                return Err(unsafe_dir(
                    &dir,
                    format!(
                        "its mode {:o} lets others write in it",
                        meta.mode() & 0o7777
                    ),
                ));
            }
            if reachable_by_others && meta.mode() & 0o011 != 0o011 {
                let mode = (meta.mode() | 0o011) & 0o7777;
                std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| cannot("set the mode of", &at, e))?;
            }
        } else if meta.uid() != 0 && meta.uid() != owner {
            return Err(unsafe_dir(
                &dir,
                format!("{} is owned by uid {}", at.display(), meta.uid()),
            ));
        } else if writable_by_others && meta.mode() & 0o1000 == 0 {
            return Err(unsafe_dir(
                &dir,
                format!(
                    "{} (mode {:o}) lets others write in it and is not sticky",
                    at.display(),
                    meta.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

fn cannot(what: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
}

fn unsafe_dir(dir: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refusing the runtime directory {}: {why}, so another user could replace the \
             broker's sockets; remove it, or give a directory of the broker's own user \
             with --runtime-dir (or XDG_RUNTIME_DIR)",
            dir.display()
        ),
    )
}

/// Lets `owner` (the instances' user and group) open a socket the broker bound
/// in the directory `prepare` made ready, or (`None`) only the broker's user.
/// The directory is the broker's alone, so the path names the broker's socket;
/// a symlink there is refused all the same.
pub fn set_socket_owner(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| cannot("inspect", path, e))?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not the broker's socket", path.display()),
        ));
    }
    let mode = if owner.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| cannot("set the mode of", path, e))?;
    let (uid, gid) = owner.unwrap_or_else(|| {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    });
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| io::Error::other(format!("cannot chown {}: {e}", path.display())))
}

pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("bus")
}

/// Where the state socket is: beside the private one, as ally-client expects.
pub fn state_socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("state")
}

pub fn dbus_address(socket: &Path) -> String {
    format!(
        "unix:path={}",
        escape_address_value(&socket.to_string_lossy())
    )
}

/// D-Bus address values escape every byte outside a small safe set as `%xx`.
fn escape_address_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_/.\\*".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_directory_wins() {
        let dir = resolve("web", Some(Path::new("/srv/x")), true);
        assert_eq!(dir, PathBuf::from("/srv/x"));
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_directory_is_private_and_an_existing_one_checked() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("base").join("app");
        prepare(&dir, false).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&top.path().join("base")), 0o711);
        prepare(&dir, true).unwrap();
        assert_eq!(mode(&dir), 0o711, "the app's user must reach its socket");
        prepare(&dir, false).unwrap();
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("app");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare(&dir, false).unwrap_err().to_string();
        assert!(err.contains("mode 777 lets others write"), "{err}");
        assert!(err.contains(&dir.display().to_string()), "{err}");
        // On the way, a world-writable directory must be sticky.
        let inner = dir.join("inner");
        let err = prepare(&inner, false).unwrap_err().to_string();
        assert!(err.contains("is not sticky"), "{err}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        prepare(&inner, false).unwrap();
    }

    #[test]
    fn a_symlink_is_followed_only_when_root_or_the_broker_owns_it() {
        let top = tempfile::tempdir().unwrap();
        let target = top.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        prepare(&link.join("app"), false).unwrap();
        assert!(target.join("app").is_dir());
        std::fs::write(top.path().join("file"), "").unwrap();
        let err = prepare(&top.path().join("file"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a directory"), "{err}");
    }

    #[test]
    fn addresses_are_escaped() {
        assert_eq!(
            dbus_address(Path::new("/run/ally/my app/bus")),
            "unix:path=/run/ally/my%20app/bus"
        );
        assert_eq!(
            dbus_address(Path::new("/run/ally/web/bus")),
            "unix:path=/run/ally/web/bus"
        );
    }
}
