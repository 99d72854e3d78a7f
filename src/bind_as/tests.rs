//! The bind, as the broker and as a user, through real files and sockets.

use super::dir_walk::may_replace;
use super::*;
use nix::fcntl::AtFlags;
use nix::sys::stat::{FileStat, fstat};
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
