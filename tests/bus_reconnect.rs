//! The bus can come and go: when the bus daemon restarts, the broker notices,
//! connects again, takes `org.ally.<app>` back and serves it (methods, signals)
//! on the new bus, while its instances and the private socket carry on.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use nix::sys::signal::Signal;

/// A session bus daemon listening at a fixed path, so that a new one can take
/// the old one's place as `systemctl restart dbus` does.
struct BusDaemon {
    child: Child,
}

impl BusDaemon {
    /// Starts a daemon at `path` and returns once it listens.
    fn start(path: &Path) -> BusDaemon {
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address=unix:path={}", path.display()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon (package dbus-daemon) is needed for this test");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("unix:path="),
            "dbus-daemon printed {line:?}"
        );
        BusDaemon { child }
    }

    /// Stops it with `sig` (SIGTERM: as systemd stops a service) and waits for it to exit.
    fn stop(mut self, sig: Signal) {
        signal(self.child.id(), sig);
        self.child.wait().unwrap();
    }
}

impl Drop for BusDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A broker of `app` on the session bus at `bus`, its generation 1 running.
struct Setup {
    _dir: tempfile::TempDir,
    bus_path: PathBuf,
    address: String,
    daemon: Option<BusDaemon>,
    broker: TestBroker,
    port: u16,
}

impl Setup {
    fn start(app: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let bus_path = dir.path().join("bus");
        let address = format!("unix:path={}", bus_path.display());
        let daemon = BusDaemon::start(&bus_path);
        let port = free_port();
        let broker = TestBroker::start_env(
            app,
            &hello_config(port, "1", ""),
            &["--bus", "session"],
            &[("DBUS_SESSION_BUS_ADDRESS", &address)],
        );
        broker.wait_running(1);
        let setup = Setup {
            _dir: dir,
            bus_path,
            address,
            daemon: Some(daemon),
            broker,
            port,
        };
        wait_until("Status on the bus", Duration::from_secs(10), || {
            setup.bus_status().status.success()
        });
        setup
    }

    fn bus_status(&self) -> Output {
        Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(["--timeout=1", "call"])
            .arg(ally_core::proxy::bus_name(&self.broker.app))
            .args(["/org/ally", "org.ally.Broker1", "Status"])
            .output()
            .unwrap()
    }

    fn app_answers(&self) -> bool {
        http_get(([127, 0, 0, 1], self.port).into()).is_ok_and(|body| body.contains('1'))
    }

    fn count_in_logs(&self, text: &str) -> usize {
        self.broker.logs().matches(text).count()
    }

    /// Stops the bus daemon with `sig` and waits until the broker has logged the loss.
    fn stop_bus(&mut self, sig: Signal) {
        let lost = self.count_in_logs("lost the session bus connection: ");
        self.daemon.take().expect("the bus is up").stop(sig);
        wait_until("the broker to log the loss", Duration::from_secs(5), || {
            self.count_in_logs("lost the session bus connection: ") > lost
        });
    }

    /// Starts a new bus daemon at the same address; returns when it listens.
    fn start_bus(&mut self) -> Instant {
        assert!(self.daemon.is_none(), "the bus is up");
        self.daemon = Some(BusDaemon::start(&self.bus_path));
        Instant::now()
    }
}

#[test]
fn the_broker_serves_its_name_again_when_the_bus_restarts() {
    let mut setup = Setup::start("busre");
    let pids = setup.broker.pids("ready");
    assert_eq!(pids.len(), 1, "{}", setup.broker.logs());
    assert!(setup.app_answers());

    setup.stop_bus(Signal::SIGTERM);
    let logs = setup.broker.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("lost the session bus connection: "))
        .unwrap();
    assert!(
        line.contains("WARN") && line.ends_with("; reconnecting"),
        "{line}"
    );
    // Nothing else notices: the app serves, the private socket answers.
    assert!(setup.app_answers());
    assert_eq!(setup.broker.pids("ready"), pids);
    assert!(!setup.bus_status().status.success());

    let up = setup.start_bus();
    wait_until(
        "Status on the new bus within 2 s",
        Duration::from_secs(2),
        || setup.bus_status().status.success(),
    );
    eprintln!(
        "Status answered {:?} after the new bus was up",
        up.elapsed()
    );
    let out = setup.bus_status();
    assert!(stdout(&out).starts_with("a{sv} "), "{}", stdout(&out));
    assert!(
        setup
            .broker
            .logs()
            .contains("serving org.ally.busre on the session bus again after "),
        "{}",
        setup.broker.logs()
    );

    assert_eq!(
        setup.broker.pids("ready"),
        pids,
        "the instance kept serving"
    );
    assert!(setup.app_answers());
    let out = setup.broker.reload();
    assert!(out.status.success(), "{}", stderr(&out));
    setup.broker.wait_running(2);
    assert!(setup.app_answers());

    // And again, the bus crashing this time: the connection that came back is
    // watched as the first one was.
    setup.stop_bus(Signal::SIGKILL);
    setup.start_bus();
    wait_until("Status on the third bus", Duration::from_secs(2), || {
        setup.bus_status().status.success()
    });
    assert_eq!(setup.count_in_logs("on the session bus again after "), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn signals_and_locks_on_the_new_bus() {
    let mut setup = tokio::task::block_in_place(|| Setup::start("busig"));
    let name = ally_core::proxy::bus_name("busig");
    let lock = |conn: zbus::Connection| {
        let name = name.clone();
        async move {
            let reply = conn
                .call_method(
                    Some(name.as_str()),
                    "/org/ally",
                    Some("org.ally.Locker1"),
                    "Lock",
                    &("held", 0u64),
                )
                .await
                .unwrap();
            reply.body().deserialize::<bool>().unwrap()
        }
    };
    // An admin on the old bus holds a lock through its connection. Its unique
    // name is one the new bus will not have given out (and seen leave) by the
    // time the lock is tried again: only the broker and one client connect to
    // the new bus before that.
    let address = setup.address.clone();
    let connect = || zbus::connection::Builder::address(address.as_str()).build();
    let mut others = Vec::new();
    for _ in 0..10 {
        others.push(connect().await.unwrap());
    }
    let old = connect().await.unwrap();
    assert!(lock(old.clone()).await);

    // A crash: a daemon stopped with SIGTERM may first tell the broker that its
    // clients left, which would release the lock without the bus loss doing it.
    tokio::task::block_in_place(|| {
        setup.stop_bus(Signal::SIGKILL);
        setup.start_bus();
        wait_until("the broker back on the bus", Duration::from_secs(2), || {
            setup.count_in_logs("on the session bus again after ") == 1
        });
    });

    let new = connect().await.unwrap();
    // Its owner went with the old bus, and so did the lock.
    assert!(lock(new.clone()).await, "the old bus's lock is still held");

    let proxy = ally_core::proxy::proxy_on(&new, Some("busig"))
        .await
        .unwrap();
    let mut finished = proxy.receive_reload_finished().await.unwrap();
    let mut states = proxy.receive_instance_state_changed().await.unwrap();
    let out = tokio::task::block_in_place(|| setup.broker.reload());
    assert!(out.status.success(), "{}", stderr(&out));
    let signal = tokio::time::timeout(Duration::from_secs(10), finished.next())
        .await
        .expect("no ReloadFinished on the new bus")
        .unwrap();
    let args = signal.args().unwrap();
    assert_eq!((*args.generation(), *args.success()), (2, true));
    let signal = tokio::time::timeout(Duration::from_secs(10), states.next())
        .await
        .expect("no InstanceStateChanged on the new bus")
        .unwrap();
    assert!(signal.args().is_ok());

    // Clients of the new bus are watched as those of the first one were: one
    // that leaves releases its locks.
    drop((proxy, finished, states));
    new.close().await.unwrap();
    let other = connect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !lock(other.clone()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lock of a client that left the new bus is still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
