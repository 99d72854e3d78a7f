//! The runtime directory is the broker's alone: a directory another user made
//! (or can write, or points to with a symlink) is refused before any socket is
//! put there.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const NOBODY: u32 = 65534;
const ATTACKER: u32 = 4242;

/// `ally run` as nobody with no XDG_RUNTIME_DIR, so it uses /tmp/ally-65534.
fn run_as_nobody(app: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        ALLY,
        "run",
        app,
        "--bus",
        "none",
        "--",
        "sleep",
        "60",
    ])
    .env_remove("XDG_RUNTIME_DIR")
    .env_remove("RUNTIME_DIRECTORY")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

fn refused(app: &str) -> String {
    let child = run_as_nobody(app).spawn().unwrap();
    let pid = child.id();
    let out = std::thread::spawn(move || child.wait_with_output().unwrap());
    wait_until("the broker to refuse", Duration::from_secs(20), || {
        out.is_finished()
    });
    let out = out.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "pid {pid} ran: {stderr}");
    stderr
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

#[test]
fn a_runtime_directory_another_user_controls_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to act as two other users");
        return;
    }
    let base = Path::new("/tmp/ally-65534");
    let chown = |path: &Path, uid: u32| {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    };

    // Made first by another user, open to all: that user could swap the socket.
    remove(base);
    std::fs::create_dir(base).unwrap();
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o777)).unwrap();
    chown(base, ATTACKER);
    let err = refused("hijacked");
    assert!(
        err.contains("refusing the runtime directory /tmp/ally-65534/hijacked"),
        "{err}"
    );
    assert!(
        err.contains("/tmp/ally-65534 is owned by uid 4242"),
        "{err}"
    );
    assert!(!base.join("hijacked").join("bus").exists());

    // A symlink the other user planted, to a directory that looks fine.
    remove(base);
    let planted = tempfile::tempdir().unwrap();
    chown(planted.path(), NOBODY);
    std::fs::set_permissions(planted.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(planted.path(), base).unwrap();
    chown(base, ATTACKER);
    let err = refused("planted");
    assert!(err.contains("is a symlink owned by uid 4242"), "{err}");
    assert!(!planted.path().join("planted").exists());

    // Nobody's own directory, but writable by everyone.
    remove(base);
    std::fs::create_dir(base).unwrap();
    chown(base, NOBODY);
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = refused("open");
    assert!(
        err.contains("lets others write in it and is not sticky"),
        "{err}"
    );

    // None there: the broker makes it, for its user alone, and serves.
    remove(base);
    let mut broker = run_as_nobody("fresh").spawn().unwrap();
    let socket = base.join("fresh").join("bus");
    wait_until("the private socket", Duration::from_secs(20), || {
        socket.exists()
    });
    let meta = std::fs::symlink_metadata(base).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (NOBODY, 0o711));
    let meta = std::fs::symlink_metadata(base.join("fresh")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (NOBODY, 0o700));
    broker.kill().unwrap();
    broker.wait().unwrap();
    remove(base);
}
