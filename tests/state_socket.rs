//! The state socket (`$RUNTIME/state`): `org.ally.Cache1` and `org.ally.Atomic1`
//! answered outside zbus. The calls' semantics are covered by `tests/state.rs`,
//! which runs its suite over this socket and over D-Bus; here: that it is a D-Bus
//! socket any client can use, that ally-client really uses it, what it refuses, and
//! that bad input leaves the broker serving.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ally_client::{Ally, ErrorKind, StateSocket};
use common::*;

fn broker(app: &str) -> TestBroker {
    TestBroker::start(app, "command = [\"sleep\", \"1000\"]\n")
}

fn state_path(broker: &TestBroker) -> PathBuf {
    broker.socket().with_file_name("state")
}

fn busctl(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new("busctl")
        .arg(format!("--address=unix:path={}", socket.display()))
        .args(["call", "org.ally.x", "/org/ally"])
        .args(args)
        .output()
        .unwrap()
}

/// Connections to `path` the broker has accepted, from /proc/net/unix (an accepted
/// socket carries its listener's path; the listener itself is not connected).
fn connections_to(path: &Path) -> usize {
    let path = path.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path; St 03 is connected.
            fields.len() == 8 && fields[5] == "03" && fields[7] == path
        })
        .count()
}

#[test]
fn the_socket_sits_beside_the_private_one_with_its_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let broker = broker("statesock");
    let state = state_path(&broker);
    let meta = std::fs::metadata(&state).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        std::fs::metadata(broker.socket())
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    );
}

#[test]
fn busctl_calls_it_and_both_sockets_share_one_store() {
    let broker = broker("statebusctl");
    let state = state_path(&broker);
    let out = busctl(&state, &["org.ally.Atomic1", "Add", "sx", "hits", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "x 5");
    let out = busctl(&broker.socket(), &["org.ally.Atomic1", "Load", "s", "hits"]);
    assert_eq!(stdout(&out).trim(), "x 5", "{}", stderr(&out));
    let out = busctl(
        &state,
        &[
            "org.ally.Cache1",
            "Set",
            "ssayt",
            "ns",
            "k",
            "2",
            "104",
            "105",
            "0",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = busctl(
        &broker.socket(),
        &["org.ally.Cache1", "Get", "ss", "ns", "k"],
    );
    assert_eq!(stdout(&out).trim(), "bay true 2 104 105");

    let out = Command::new("busctl")
        .arg(format!("--address=unix:path={}", state.display()))
        .args(["introspect", "org.ally.x", "/org/ally"])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("org.ally.Cache1") && text.contains(".CompareAndSwap"),
        "{text}"
    );
}

#[test]
fn what_it_does_not_serve_is_refused_by_name() {
    let broker = broker("staterefuse");
    let state = state_path(&broker);
    let out = busctl(&state, &["org.ally.Locker1", "Lock", "st", "a", "0"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("org.ally.Locker1") && err.contains("private socket"),
        "{err}"
    );
    let out = busctl(&state, &["org.ally.Atomic1", "Add", "s", "hits"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("sx") || err.contains("signature"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ally_client_calls_go_to_it_and_limits_come_back_as_errors() {
    let broker = TestBroker::start(
        "stateclient",
        "command = [\"sleep\", \"1000\"]\n[limits]\nmax_key_bytes = 8\n",
    );
    let state = state_path(&broker);
    let before = connections_to(&state);
    let ally = Ally::connect(&broker.address()).await.unwrap();
    assert_eq!(ally.atomic("n").add(2).await.unwrap(), 2);
    assert_eq!(connections_to(&state), before + 1);
    let err = ally
        .cache("ns")
        .set("a-key-too-long", b"v", None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded, "{err}");
    assert!(err.message().contains("8"), "{err}");

    let over_dbus = Ally::connect_with(&broker.address(), StateSocket::Off)
        .await
        .unwrap();
    assert_eq!(over_dbus.atomic("n").add(1).await.unwrap(), 3);
    assert_eq!(
        connections_to(&state),
        before + 1,
        "StateSocket::Off opened no state connection"
    );
}

#[test]
fn a_blocking_client_uses_it_too() {
    let broker = broker("stateblocking");
    let state = state_path(&broker);
    let before = connections_to(&state);
    let ally = ally_client::blocking::Ally::connect(&broker.address()).unwrap();
    assert_eq!(ally.atomic("n").add(7).unwrap(), 7);
    assert_eq!(ally.cache("ns").get("k").unwrap(), None);
    assert_eq!(connections_to(&state), before + 1);
    drop(ally);
    wait_until("the connection closes", Duration::from_secs(5), || {
        connections_to(&state) == before
    });
}

/// The broker's thread that serves the state socket: its `/proc` directory. It may
/// start just after the private socket is there.
fn state_thread(broker: &TestBroker) -> PathBuf {
    let find = || {
        std::fs::read_dir(format!("/proc/{}/task", broker.pid()))
            .unwrap()
            .filter_map(|task| Some(task.ok()?.path()))
            .find(|task| {
                std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim() == "state-socket")
            })
    };
    wait_until("a state-socket thread", Duration::from_secs(5), || {
        find().is_some()
    });
    find().expect("a state-socket thread")
}

/// Nanoseconds a thread has run, from its `schedstat`.
fn cpu_nanos(task: &Path) -> u64 {
    let stat = std::fs::read_to_string(task.join("schedstat")).unwrap();
    stat.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn busy_polling_stops_when_calls_stop() {
    for (config, what) in [
        ("state_busy_poll = \"50us\"\n", "polling"),
        ("", "off (default)"),
    ] {
        let broker = TestBroker::start(
            "statepoll",
            &format!("command = [\"sleep\", \"1000\"]\n{config}"),
        );
        let thread = state_thread(&broker);
        let ally = ally_client::blocking::Ally::connect(&broker.address()).unwrap();
        for i in 0..20_000 {
            assert_eq!(ally.atomic("n").add(1).unwrap(), i + 1, "{what}");
        }
        std::thread::sleep(Duration::from_millis(50));
        let before = cpu_nanos(&thread);
        std::thread::sleep(Duration::from_millis(300));
        let idle = Duration::from_nanos(cpu_nanos(&thread) - before);
        // Asleep, the thread runs only for the runtime's own timers.
        assert!(
            idle < Duration::from_millis(15),
            "{what}: the state thread ran {idle:?} in 300 ms without calls"
        );
        assert_eq!(ally.atomic("n").load().unwrap(), 20_000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_state_socket_the_client_uses_dbus() {
    let broker = broker("statefallback");
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("unix:path={}", dir.path().join("none").display());
    let ally = Ally::connect_with(&broker.address(), StateSocket::At(missing))
        .await
        .unwrap();
    assert_eq!(ally.atomic("n").add(4).await.unwrap(), 4);
    assert_eq!(ally.atomic("n").load().await.unwrap(), 4);
}

#[test]
fn garbage_and_strangers_are_dropped_and_the_broker_keeps_serving() {
    let broker = broker("stategarbage");
    let state = state_path(&broker);
    let exchange = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&state).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    };
    // This process's uid, as the client sends it, and another.
    let uid = nix::unistd::geteuid().as_raw();
    let mine = ally_core::wire::client_handshake(uid);
    // No credentials byte.
    assert_eq!(exchange(&mine[1..]), "");
    // Another uid than the caller's.
    let other = ally_core::wire::client_handshake(uid.wrapping_add(1));
    assert!(exchange(&other).starts_with("REJECTED"));
    // Authenticated, then not a D-Bus message.
    let reply = exchange(&[mine.as_slice(), b"GET / HTTP/1.1\r\n\r\n"].concat());
    assert!(reply.starts_with("OK "), "{reply:?}");
    // A message claiming to be huge.
    let mut huge = [mine.as_slice(), b"l\x01\0\x01"].concat();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    assert!(exchange(&huge).starts_with("OK "));

    let out = busctl(&state, &["org.ally.Atomic1", "Add", "sx", "after", "1"]);
    assert_eq!(stdout(&out).trim(), "x 1", "{}", stderr(&out));
    assert!(broker.logs().lines().all(|l| !l.contains("panicked")));
}
