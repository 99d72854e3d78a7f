//! Where a broker's private socket lives. `ally run` and every other `ally`
//! command resolve it the same way, so they meet without being told.

use std::path::{Path, PathBuf};

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
