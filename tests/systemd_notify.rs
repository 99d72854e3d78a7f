//! What the broker tells systemd, read off a real notify socket: readiness only
//! once the app is ready, status lines, RELOADING=1/READY=1 around reloads,
//! listeners handed to the fd store, STOPPING=1, and watchdog pings.

mod common;

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

struct Notify {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: String,
}

/// One datagram: its text and any fds it carried.
struct Message {
    text: String,
    fds: Vec<OwnedFd>,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Notify {
            socket,
            path: path.display().to_string(),
            _dir: dir,
        }
    }

    fn recv(&self, timeout: Duration) -> Option<Message> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .ok()?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS gave this process new fds that nothing else owns.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let len = msg.bytes;
        Some(Message {
            text: String::from_utf8_lossy(&buf[..len]).to_string(),
            fds,
        })
    }

    /// Messages until one contains `needle`.
    fn until(&self, needle: &str) -> Vec<Message> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(m) = self.recv(Duration::from_millis(200)) {
                let done = m.text.contains(needle);
                seen.push(m);
                if done {
                    return seen;
                }
            }
        }
        let texts: Vec<&str> = seen.iter().map(|m| m.text.as_str()).collect();
        panic!("no {needle:?} from the broker; got {texts:?}");
    }
}

#[test]
fn the_broker_speaks_sd_notify() {
    let notify = Notify::new();
    let port = free_port();
    let mut broker = TestBroker::start_env(
        "notified",
        &hello_config(
            port,
            "1",
            "[[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:0\"\n",
        ),
        &[],
        &[("NOTIFY_SOCKET", &notify.path), ("WATCHDOG_USEC", "200000")],
    );
    // The configured listener goes to the fd store before the app starts.
    let first = notify.until("FDSTORE=1");
    let stored = first.last().unwrap();
    assert!(
        stored.text.contains("FDNAME=tcp 127.0.0.1%3A0"),
        "{}",
        stored.text
    );
    assert_eq!(stored.fds.len(), 1, "the socket itself is attached");
    let local = ally_core::net::local_address(&stored.fds[0]).unwrap();
    assert!(local.starts_with("127.0.0.1:"), "{local}");

    // READY=1 only once generation 1 is ready, i.e. it serves.
    let startup = notify.until("READY=1");
    let ready = startup.last().unwrap();
    assert!(
        ready.text.contains("STATUS=generation 1 ready (pid "),
        "{}",
        ready.text
    );
    assert!(http_get(format!("127.0.0.1:{port}").parse().unwrap()).is_ok());
    // The app's own listener was stored too.
    let all: Vec<String> = first
        .iter()
        .chain(&startup)
        .map(|m| m.text.clone())
        .collect();
    assert!(
        all.iter()
            .any(|t| t.contains(&format!("FDNAME=tcp 127.0.0.1%3A{port}"))),
        "{all:?}"
    );

    assert!(broker.reload().status.success());
    let reload = notify.until("READY=1");
    let reloading = reload
        .iter()
        .find(|m| m.text.contains("RELOADING=1"))
        .expect("RELOADING=1");
    assert!(
        reloading.text.contains("MONOTONIC_USEC="),
        "{}",
        reloading.text
    );
    assert!(
        reload
            .last()
            .unwrap()
            .text
            .contains("STATUS=generation 2 ready")
    );

    // Watchdog pings at half of WATCHDOG_USEC.
    let pings = notify.until("WATCHDOG=1");
    assert!(!pings.is_empty());

    broker.stop();
    notify.until("STOPPING=1");
}
