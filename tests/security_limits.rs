//! Everything a stranger can make the broker hold is bounded, and the broker keeps
//! serving everyone else: connections (per uid and in total), handshake time, message
//! size (checked before the message is read, and for a caller that may call nothing,
//! before anything is read), lock waiters; and no byte sequence in a handshake panics.
//!
//! The stranger is a process of uid 65533 in the app's group (`nogroup`), so the
//! sockets (mode 0660, owned by the app's user `nobody`) let it connect; it is no
//! instance, root, or the broker's user. It runs as this test binary, re-executed as
//! that user (see [`stranger`]).

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ally_core::wire::{self, FIXED_HEADER};
use common::*;

const STRANGER_UID: u32 = 65533;
const APP_GID: u32 = 65534;
const MB: u64 = 1 << 20;

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: needs root to run processes as another user");
    false
}

/// A broker whose app (hello) runs as nobody, so its sockets are open to nobody's
/// group; `limits` is the body of its `[limits]` table.
fn broker_for_nobody(app: &str, limits: &str) -> TestBroker {
    let config = hello_config(
        free_port(),
        "1",
        &format!("user = \"nobody\"\n[limits]\n{limits}\n"),
    );
    let broker = TestBroker::start(app, &config);
    std::fs::set_permissions(broker.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    broker.wait_running(1);
    broker
}

fn state_socket(broker: &TestBroker) -> PathBuf {
    broker.runtime_dir.join("state")
}

/// A field of /proc/PID/status in kB, e.g. `VmHWM` (peak resident memory).
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Runs `plan` (see [`stranger`]) as the stranger; the child, with its stdin and stdout.
fn spawn_stranger(plan: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stranger",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ALLY_TEST_STRANGER", plan)
        .uid(STRANGER_UID)
        .gid(APP_GID)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What follows `RESULT ` in `child`'s stdout (the test harness may have begun the line).
fn result_line(child: &mut std::process::Child) -> String {
    let stdout = child.stdout.as_mut().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some((_, result)) = line.split_once("RESULT ") {
            return result.to_string();
        }
    }
    panic!("the stranger reported nothing");
}

/// Not a test of its own: what the stranger does, as a re-executed copy of this binary
/// running as another user. `ALLY_TEST_STRANGER` says what:
/// `oversized SOCKET BYTES` sends one message that declares BYTES of body, and
/// `flood SOCKET1 SOCKET2 N` opens N connections to the two sockets in turn and holds
/// them until stdin closes.
#[test]
#[ignore = "not a test: the stranger process the other tests run"]
fn stranger() {
    let Ok(plan) = std::env::var("ALLY_TEST_STRANGER") else {
        return;
    };
    let words: Vec<&str> = plan.split(' ').collect();
    match words[..] {
        ["oversized", socket, bytes] => {
            let (sent, closed) = send_oversized(Path::new(socket), bytes.parse().unwrap());
            println!("RESULT {sent} {closed}");
        }
        ["flood", first, second, n] => {
            let n: usize = n.parse().unwrap();
            let (soft, hard) =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
            if soft < n as u64 + 64 {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    hard,
                    hard,
                )
                .unwrap();
            }
            let mut held = Vec::with_capacity(n);
            for i in 0..n {
                let socket = if i % 2 == 0 { first } else { second };
                match UnixStream::connect(socket) {
                    Ok(s) => held.push(s),
                    Err(e) => {
                        println!("RESULT connect failed after {i}: {e}");
                        return;
                    }
                }
            }
            println!("RESULT opened {}", held.len());
            let _ = std::io::stdin().read(&mut [0u8; 1]);
        }
        _ => panic!("unknown plan {plan:?}"),
    }
}

/// Authenticates on `socket` and sends the fixed header of a method call that declares
/// `body` bytes, then the body; how much of it went out, and whether the broker
/// closed the connection before all did.
fn send_oversized(socket: &Path, body: u64) -> (u64, bool) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&wire::client_handshake(nix::unistd::getuid().as_raw()))
        .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "handshake answer: {line:?}");
    let mut fixed = vec![b'l', 1, 0, 1];
    fixed.extend((body as u32).to_le_bytes());
    fixed.extend(1u32.to_le_bytes());
    fixed.extend(0u32.to_le_bytes());
    assert_eq!(fixed.len(), FIXED_HEADER);
    if s.write_all(&fixed).is_err() {
        return (0, true);
    }
    let chunk = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    while sent < body {
        let n = chunk.len().min((body - sent) as usize);
        match s.write(&chunk[..n]) {
            Ok(n) => sent += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (sent, true),
        }
    }
    (sent, false)
}

/// Reads what the broker says until it closes, within `within`; the text, or `None`
/// if the connection was still open then.
/// Sends the start of an `EXTERNAL` handshake and reads the answer: `OK` if the
/// broker admitted the connection, an `ERROR` line if it turned it away.
fn authenticated(s: &mut UnixStream) -> bool {
    let uid: String = nix::unistd::getuid()
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(format!("\0AUTH EXTERNAL {uid}\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut line = vec![];
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match s.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return false,
        }
    }
    line.starts_with(b"OK ")
}

fn read_until_closed(s: &mut UnixStream, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned());
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

fn assert_serving(broker: &TestBroker) {
    let out = broker.ally(&["status", &broker.app]);
    assert!(out.status.success(), "ally status: {}", stderr(&out));
}

#[test]
fn oversized_messages_are_refused_before_they_are_read() {
    if !is_root() {
        return;
    }
    let broker = broker_for_nobody("oversized", "");
    let body = 100 * MB;
    // A stranger on the state socket may call nothing: it is closed before a byte is
    // read. On the private socket (where it is refused call by call) and for an
    // admin on either socket, the message's header is enough to refuse it.
    for socket in [state_socket(&broker), broker.socket()] {
        for _ in 0..2 {
            let mut child = spawn_stranger(&format!("oversized {} {body}", socket.display()));
            let result = result_line(&mut child);
            assert!(child.wait().unwrap().success());
            let (sent, closed) = result.split_once(' ').unwrap();
            let sent: u64 = sent.parse().unwrap();
            assert!(
                closed == "true" && sent < 8 * MB,
                "a stranger sent {sent} of {body} bytes to {} (closed: {closed})",
                socket.display()
            );
        }
        let (sent, closed) = send_oversized(&socket, body);
        assert!(
            closed && sent < 8 * MB,
            "an admin sent {sent} of {body} bytes to {} (closed: {closed})",
            socket.display()
        );
    }
    let peak = proc_status_kb(broker.pid(), "VmHWM");
    eprintln!("the broker's peak resident memory after the oversized messages: {peak} kB");
    assert!(
        peak < 64 * 1024,
        "the broker's peak resident memory is {peak} kB"
    );
    let logs = broker.logs();
    assert!(
        logs.contains("state socket: closing the connection of pid")
            && logs.contains(&format!(
                "over max_message_bytes ({})",
                2 * (MB + 1024) + 65536
            )),
        "{logs}"
    );
    assert!(
        logs.contains(&format!(
            "(uid {STRANGER_UID}): it is neither root, the broker's user, nor a process of an instance"
        )),
        "{logs}"
    );
    assert_serving(&broker);
    // The largest call the limits allow (two values of max_value_bytes) still goes
    // through, on either socket.
    let (old, new) = (vec![1u8; MB as usize], vec![2u8; MB as usize]);
    for state_socket in [
        ally_client::StateSocket::Auto,
        ally_client::StateSocket::Off,
    ] {
        let ally =
            ally_client::blocking::Ally::connect_with(&broker.address(), state_socket).unwrap();
        let cache = ally.cache("ns");
        cache.set("big", &old, None).unwrap();
        assert!(cache.compare_and_swap("big", &old, &new, None).unwrap());
        assert_eq!(cache.get("big").unwrap(), Some(new.clone()));
    }
}

#[test]
fn a_half_finished_handshake_is_closed_after_handshake_timeout() {
    let broker = TestBroker::start(
        "handshake",
        &hello_config(free_port(), "1", "[limits]\nhandshake_timeout = \"1s\""),
    );
    broker.wait_running(1);
    for socket in [broker.socket(), state_socket(&broker)] {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(b"\0AUTH EXTERNAL 30").unwrap();
        let start = Instant::now();
        let said = read_until_closed(&mut s, Duration::from_secs(5)).unwrap_or_else(|| {
            panic!("{} still open after 5s", socket.display());
        });
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "closed after only {:?}",
            start.elapsed()
        );
        assert_eq!(said, "ERROR no handshake within 1s (handshake_timeout)\r\n");
    }
    assert!(
        broker
            .logs()
            .contains("private socket: closed the connection of pid")
            && broker
                .logs()
                .contains("no handshake within 1s (handshake_timeout)"),
        "{}",
        broker.logs()
    );
    assert_serving(&broker);
}

#[test]
fn a_flood_of_connections_is_capped_and_the_admin_and_the_app_get_in() {
    if !is_root() {
        return;
    }
    let broker = broker_for_nobody("flood", "");
    let pid = broker.pid();
    assert_serving(&broker);
    let baseline = open_fds(pid);
    let started = Instant::now();
    let mut child = spawn_stranger(&format!(
        "flood {} {} 5000",
        broker.socket().display(),
        state_socket(&broker).display()
    ));
    let result = result_line(&mut child);
    assert_eq!(result, "opened 5000");

    let out = broker.ally(&["status", &broker.app]);
    assert!(out.status.success(), "ally status: {}", stderr(&out));
    let out = broker.reload();
    assert!(
        out.status.success(),
        "reload during the flood (the app's own user must get in): {}",
        stderr(&out)
    );
    let fds = open_fds(pid);
    assert!(
        // Each admitted connection holds its socket and the pidfd of its peer.
        fds <= baseline + 2 * 128 + 64 + 64,
        "the broker holds {fds} descriptors (from {baseline}) while a stranger holds 5000 connections"
    );
    let rss = proc_status_kb(pid, "VmRSS");
    eprintln!(
        "during the flood the broker holds {fds} descriptors (from {baseline}) and {rss} kB resident"
    );
    assert!(rss < 64 * 1024, "the broker's resident memory is {rss} kB");

    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    wait_until(
        "the broker's descriptors back to before",
        Duration::from_secs(15),
        || {
            broker.status()["instances"].as_array().map(Vec::len) == Some(1)
                && open_fds(pid) <= baseline + 2
        },
    );
    let logs = broker.logs();
    let refusals = logs
        .lines()
        .filter(|l| l.contains("refused a connection of pid"))
        .count();
    assert!(
        logs.contains(&format!(
            "(uid {STRANGER_UID}): too many connections from uid {STRANGER_UID} (max_connections_per_uid = 128)"
        )),
        "{logs}"
    );
    let seconds = started.elapsed().as_secs() as usize;
    assert!(
        (1..=seconds + 2).contains(&refusals),
        "{refusals} refusal lines in {seconds}s"
    );
}

#[test]
fn a_refused_admin_is_told_why() {
    let broker = TestBroker::start(
        "refused",
        &hello_config(free_port(), "1", "[limits]\nmax_connections_per_uid = 1"),
    );
    broker.wait_running(1);
    // Root's own share (1) and its reserve (4) make five places: the instance (hello,
    // run as root) holds one, these four the rest. Each proves it was admitted by
    // getting its handshake answered; one refused because an earlier connection
    // (the launcher's probe, `ally status`) still held its place is replaced.
    let mut held: Vec<UnixStream> = vec![];
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < 4 {
        assert!(Instant::now() < deadline, "four connections never admitted");
        let mut s = UnixStream::connect(broker.socket()).unwrap();
        if authenticated(&mut s) {
            held.push(s);
        }
    }
    let mut refused = UnixStream::connect(broker.socket()).unwrap();
    let said = read_until_closed(&mut refused, Duration::from_secs(5)).unwrap();
    let uid = nix::unistd::getuid();
    assert_eq!(
        said,
        format!("ERROR too many connections from uid {uid} (max_connections_per_uid = 1)\r\n")
    );
    let out = broker.ally(&["status", &broker.app]);
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "ally: the broker for refused at {} refused the connection: too many connections from uid {uid} (max_connections_per_uid = 1)",
            broker.socket().display()
        )
    );
    drop(held);
    wait_until("room again", Duration::from_secs(5), || {
        broker.ally(&["status", &broker.app]).status.success()
    });
}

#[test]
fn lock_waiters_are_capped_per_connection_and_per_lock() {
    let broker = TestBroker::start(
        "waiters",
        &hello_config(
            free_port(),
            "1",
            "[limits]\nmax_lock_waiters_per_connection = 3\nmax_lock_waiters_per_lock = 5",
        ),
    );
    broker.wait_running(1);
    use ally_core::proxy::StateProxies;
    use ally_core::state::calls::locker::{Lock, Queues, Unlock};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let address = broker.address();
        let locker = || async {
            let conn = zbus::connection::Builder::address(address.as_str())
                .p2p()
                .build()
                .await
                .unwrap();
            StateProxies::on(&conn, Some("waiters")).await.unwrap()
        };
        let holder = locker().await;
        assert!(holder.call::<Lock>(("x", 0)).await.unwrap());
        let refusal = |result: zbus::Result<bool>| match result {
            Err(zbus::Error::MethodError(name, Some(message), _)) => {
                assert_eq!(name.as_str(), "org.ally.Error.LimitExceeded");
                message
            }
            other => panic!("expected LimitExceeded, got {other:?}"),
        };
        let waits = |proxy: StateProxies, n: usize| {
            (0..n)
                .map(|_| {
                    let proxy = proxy.clone();
                    tokio::spawn(async move { proxy.call::<Lock>(("x", 60_000)).await })
                })
                .collect::<Vec<_>>()
        };
        let waiting_count = |proxy: StateProxies| async move {
            proxy.call::<Queues>(("x",)).await.unwrap().1.len()
        };

        let first = locker().await;
        let mut pending = waits(first.clone(), 3);
        let until = Instant::now() + Duration::from_secs(5);
        while waiting_count(holder.clone()).await < 3 {
            assert!(Instant::now() < until, "three waits never queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let m = refusal(first.call::<Lock>(("x", 60_000)).await);
        assert_eq!(
            m,
            "3 lock requests made through this connection already wait (max_lock_waiters_per_connection)"
        );
        let second = locker().await;
        pending.extend(waits(second.clone(), 2));
        while waiting_count(holder.clone()).await < 5 {
            assert!(Instant::now() < until, "five waits never queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let m = refusal(second.call::<Lock>(("x", 60_000)).await);
        assert_eq!(
            m,
            "5 requests already wait for lock \"x\" (max_lock_waiters_per_lock)"
        );
        // The refused ones left no trace: the five waiters get the lock in turn, in
        // the order they came (a grant happens as the lock is released).
        assert_eq!(waiting_count(holder.clone()).await, 5);
        holder.call::<Unlock>(("x",)).await.unwrap();
        for proxy in [&first, &first, &first, &second, &second] {
            proxy.call::<Unlock>(("x",)).await.unwrap();
        }
        for wait in pending {
            assert!(wait.await.unwrap().unwrap());
        }
    });
    assert!(
        broker
            .logs()
            .contains("refused Lock of \"x\" for connection "),
        "{}",
        broker.logs()
    );
    assert_serving(&broker);
}

/// zbus 6.2.1's server handshake panics on a line that starts with `\n`
/// (docs/notes/zbus-handshake-panic.md); the broker reads handshakes itself.
#[test]
fn malformed_handshakes_close_the_connection_without_a_panic() {
    // A conversation that is merely wrong (a line that is no command) is answered with
    // `ERROR` and may go on; the timeout ends it.
    let broker = TestBroker::start(
        "handshakes",
        &hello_config(free_port(), "1", "[limits]\nhandshake_timeout = \"1s\""),
    );
    broker.wait_running(1);
    let long = [b"\0AUTH EXTERNAL ".as_slice(), &[b'3'; 4000]].concat();
    let cases: [&[u8]; 9] = [
        b"\n",
        b"\0\n",
        b"\r\n",
        b"\n\n\n\n",
        b"\0AUTH EXTERNAL 30\r\n\n",
        b"\0AUTH EXTERNAL 30\r\n\nBEGIN\r\n",
        b"\0AUTH\n",
        b"\0\xff\xfe\r\n",
        &long,
    ];
    for socket in [broker.socket(), state_socket(&broker)] {
        for case in cases {
            let mut s = UnixStream::connect(&socket).unwrap();
            let _ = s.write_all(case);
            let said = read_until_closed(&mut s, Duration::from_secs(5));
            assert!(
                said.is_some(),
                "{} still open after {:?}",
                socket.display(),
                String::from_utf8_lossy(case)
            );
        }
    }
    assert_serving(&broker);
    let out = Command::new("busctl")
        .arg(format!("--address=unix:path={}", broker.socket().display()))
        .args([
            "call",
            "org.ally.handshakes",
            "/org/ally",
            "org.ally.Broker1",
            "Status",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "busctl: {}", stderr(&out));
    let logs = broker.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}
