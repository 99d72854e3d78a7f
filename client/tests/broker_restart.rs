//! The client across a broker that goes away and comes back: a real `ally run`,
//! SIGKILLed and started again on the same runtime directory, with a client (an
//! admin: this test runs as root and is no instance) that never reconnects by hand.
//!
//! A call is put "in flight" for certain by stopping the broker (SIGSTOP), making
//! the call, and waiting until its bytes sit unread in the broker's socket (`ss`)
//! before the SIGKILL.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use ally_client::{Ally, ErrorKind, StateSocket};
use ally_testkit::process::terminate;
use ally_testkit::{build_ally, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Every client of this file gives up reconnecting after this long.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// Longer than anything here may take; a call still pending then hangs.
const HANG: Duration = Duration::from_secs(30);

fn setup() {
    static ENV: Once = Once::new();
    ENV.call_once(|| {
        // SAFETY: every test calls this before anything else, and the others wait
        // for it, so no thread reads the environment meanwhile.
        unsafe { std::env::set_var("ALLY_RECONNECT_TIMEOUT", "4s") };
    });
}

fn ally() -> &'static Path {
    static ALLY: OnceLock<PathBuf> = OnceLock::new();
    ALLY.get_or_init(build_ally)
}

/// An `ally run` that can be killed and started again on the same runtime directory.
struct Broker {
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: u32,
}

impl Broker {
    fn start() -> Broker {
        let mut broker = Broker {
            dir: tempfile::tempdir().unwrap(),
            child: None,
            starts: 0,
        };
        broker.run();
        broker
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn address(&self) -> String {
        format!("unix:path={}", self.runtime().join("bus").display())
    }

    fn log(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("broker{start}.log"))
    }

    /// Starts `ally run` and waits until both its sockets accept.
    fn run(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log(self.starts)).unwrap();
        // The instance ends when its broker is gone, as nothing else would end it.
        let child = Command::new(ally())
            .args(["run", "restart", "--bus", "none", "--runtime-dir"])
            .arg(self.runtime())
            .args([
                "--",
                "sh",
                "-c",
                "while kill -0 $PPID 2>/dev/null; do sleep 0.1; done",
            ])
            .env("ALLY_LOG", "debug,zbus=warn")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let runtime = self.runtime();
        wait_until("the broker's sockets", Duration::from_secs(20), || {
            ["bus", "state"]
                .iter()
                .all(|s| std::os::unix::net::UnixStream::connect(runtime.join(s)).is_ok())
        });
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("a broker runs").id()
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.child.take().unwrap().wait().unwrap();
    }

    /// SIGKILL, and a new broker on the same runtime directory.
    fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// Whether every thread of the broker is stopped.
    fn stopped(&self) -> bool {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid())).unwrap();
        tasks.map(|t| t.unwrap().path().join("stat")).all(|stat| {
            std::fs::read_to_string(stat).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    == Some("T")
            })
        })
    }

    /// The broker's connections accepted on its state socket.
    fn state_connections(&self) -> usize {
        let out = ss();
        let owner = format!("pid={},", self.pid());
        let state = self.runtime().join("state");
        let state = state.to_str().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                line.contains(&owner)
                    && fields.get(1) == Some(&"ESTAB")
                    && fields.get(4) == Some(&state)
            })
            .count()
    }

    /// Whether bytes wait unread on one of the broker's connections.
    fn has_unread(&self) -> bool {
        let out = ss();
        let owner = format!("pid={},", self.pid());
        String::from_utf8_lossy(&out.stdout).lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            line.contains(&owner)
                && fields.get(1) == Some(&"ESTAB")
                && fields.get(2).and_then(|q| q.parse::<u64>().ok()) > Some(0)
        })
    }

    /// Stops the broker, starts `call` (a task of its own), waits until the call
    /// sits unread in the broker's socket, then SIGKILLs the broker.
    async fn kill_during<T: Send + 'static>(
        &mut self,
        call: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.signal(Signal::SIGSTOP);
        // The signal is delivered when each thread next runs: until then the
        // broker would still answer.
        wait_until("the broker to stop", HANG, || self.stopped());
        let task = tokio::spawn(call);
        let deadline = Instant::now() + HANG;
        while !self.has_unread() {
            assert!(
                Instant::now() < deadline,
                "the call never reached the stopped broker"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.kill();
        task
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child, Duration::from_secs(30));
        }
        if std::thread::panicking() {
            for start in 1..=self.starts {
                let log = std::fs::read_to_string(self.log(start)).unwrap_or_default();
                eprintln!("--- broker log {start} ---\n{log}");
            }
        }
    }
}

/// `ss -x -p -n`: the unix sockets, their queues and owners.
fn ss() -> std::process::Output {
    Command::new("ss")
        .args(["-x", "-p", "-n"])
        .output()
        .expect("ss (iproute2), which shows what waits in the broker's sockets")
}

async fn within<T>(what: &str, call: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, call)
        .await
        .unwrap_or_else(|_| panic!("{what} hangs"))
}

fn assert_disconnected<T: std::fmt::Debug>(
    result: ally_client::Result<T>,
    member: &str,
    tail: &str,
) {
    let e = result.expect_err("the call fails");
    assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
    let message = e.to_string();
    let head = format!("the broker's connection closed during {member} (the broker restarted?); ");
    assert!(
        message.starts_with(&head) && message.contains(tail),
        "{message}"
    );
}

const NOT_REPEATED: &str = "it was not repeated because it may have taken effect";

/// The client's calls through each way it reaches the broker: D-Bus only, or cache
/// and counters on the state socket.
const WAYS: [StateSocket; 2] = [StateSocket::Off, StateSocket::Auto];

#[tokio::test(flavor = "multi_thread")]
async fn calls_after_a_restart_go_to_the_new_broker() {
    setup();
    for way in WAYS {
        let mut broker = Broker::start();
        let ally = Ally::connect_with(&broker.address(), way.clone())
            .await
            .unwrap();
        assert_eq!(ally.status().await.unwrap().pid, broker.pid());
        ally.cache("c").set("k", "before", None).await.unwrap();
        assert_eq!(ally.atomic("n").add(1).await.unwrap(), 1, "{way:?}");

        broker.restart();
        // Not a repeatable call, and it succeeds: it was never sent on the dead
        // connection (known closed, or its write failed).
        let started = Instant::now();
        assert_eq!(
            within("Add", ally.atomic("after").add(5)).await.unwrap(),
            5,
            "{way:?}"
        );
        eprintln!(
            "{way:?}: the first Add on a new connection took {:?}",
            started.elapsed()
        );
        assert_eq!(
            within("Status", ally.status()).await.unwrap().pid,
            broker.pid()
        );
        let cache = ally.cache("c");
        cache.set("k", "after", None).await.unwrap();
        assert_eq!(
            cache.get_string("k").await.unwrap().as_deref(),
            Some("after")
        );
        assert!(ally.locker().queues("l").await.unwrap().holders.is_empty());

        // And again: each restart is one more new connection.
        broker.restart();
        assert_eq!(within("Add", ally.atomic("again").add(2)).await.unwrap(), 2);
        assert_eq!(ally.status().await.unwrap().pid, broker.pid());
    }
}

#[test]
fn the_blocking_client_calls_the_new_broker_after_a_restart() {
    setup();
    for way in WAYS {
        let mut broker = Broker::start();
        let ally =
            ally_client::blocking::Ally::connect_with(&broker.address(), way.clone()).unwrap();
        assert_eq!(ally.atomic("n").add(1).unwrap(), 1);
        ally.cache("c").set("k", "v", None).unwrap();

        broker.restart();
        assert_eq!(ally.atomic("after").add(3).unwrap(), 3, "{way:?}");
        ally.cache("c").set("k", "after", None).unwrap();
        let got = ally.cache("c").get_string("k").unwrap();
        assert_eq!(got.as_deref(), Some("after"), "{way:?}");
        assert_eq!(ally.status().unwrap().pid, broker.pid());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_add_in_flight_when_the_broker_dies_fails_disconnected() {
    setup();
    for way in WAYS {
        let mut broker = Broker::start();
        let ally = Ally::connect_with(&broker.address(), way.clone())
            .await
            .unwrap();
        assert_eq!(ally.atomic("n").add(1).await.unwrap(), 1);

        let counter = ally.atomic("n");
        let add = broker
            .kill_during(async move { counter.add(1).await })
            .await;
        let result = within("Add in flight", add).await.unwrap();
        assert_disconnected(result, "Add", NOT_REPEATED);

        // The next call finds the broker that came back.
        broker.run();
        assert_eq!(
            within("Add", ally.atomic("after").add(7)).await.unwrap(),
            7,
            "{way:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_harmless_call_in_flight_is_repeated_on_the_new_broker() {
    setup();
    for way in WAYS {
        let mut broker = Broker::start();
        let ally = Ally::connect_with(&broker.address(), way.clone())
            .await
            .unwrap();
        ally.cache("c").set("k", "v", None).await.unwrap();

        let cache = ally.cache("c");
        let get = broker
            .kill_during(async move { cache.get("absent").await })
            .await;
        broker.run();
        let served = Instant::now();
        assert_eq!(
            within("Get in flight", get).await.unwrap().unwrap(),
            None,
            "{way:?}"
        );
        eprintln!(
            "{way:?}: the Get in flight was answered {:?} after the new broker served",
            served.elapsed()
        );

        // Over D-Bus, whose connection (with the state socket) is still the first
        // broker's until a call needs it.
        assert_eq!(ally.status().await.unwrap().pid, broker.pid());
        let status = {
            let ally = ally.clone();
            broker.kill_during(async move { ally.status().await }).await
        };
        broker.run();
        let status = within("Status in flight", status).await.unwrap().unwrap();
        assert_eq!(status.pid, broker.pid(), "{way:?}");
    }
}

#[test]
fn the_blocking_client_repeats_a_harmless_call_and_not_an_add() {
    setup();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for way in WAYS {
        let mut broker = Broker::start();
        let address = broker.address();
        let ally = std::sync::Arc::new(
            ally_client::blocking::Ally::connect_with(&address, way.clone()).unwrap(),
        );
        ally.cache("c").set("k", "v", None).unwrap();
        let blocking = |f: fn(&ally_client::blocking::Ally) -> String| {
            let ally = ally.clone();
            async move { tokio::task::spawn_blocking(move || f(&ally)).await.unwrap() }
        };

        let get = blocking(|ally| format!("{:?}", ally.cache("c").get("absent")));
        let get = runtime.block_on(broker.kill_during(get));
        broker.run();
        let got = runtime.block_on(within("Get in flight", get)).unwrap();
        assert_eq!(got, "Ok(None)", "{way:?}");

        let add = blocking(|ally| match ally.atomic("n").add(1) {
            Err(e) if e.kind() == ErrorKind::Disconnected => e.to_string(),
            other => format!("{other:?}"),
        });
        let add = runtime.block_on(broker.kill_during(add));
        let got = runtime.block_on(within("Add in flight", add)).unwrap();
        assert!(got.ends_with(NOT_REPEATED), "{way:?}: {got}");
        broker.run();
        assert_eq!(ally.atomic("after").add(1).unwrap(), 1, "{way:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_waiting_when_the_broker_dies_fails_disconnected() {
    setup();
    let mut broker = Broker::start();
    let holder = Ally::connect(&broker.address()).await.unwrap();
    let waiter = Ally::connect(&broker.address()).await.unwrap();
    let _held = holder.locker().lock("l", None).await.unwrap();
    let locker = waiter.locker();
    let wait = tokio::spawn(async move { locker.lock("l", None).await.map(|_| ()) });
    let queued = || async { holder.locker().queues("l").await.unwrap().waiters.len() };
    let deadline = Instant::now() + HANG;
    while queued().await == 0 {
        assert!(Instant::now() < deadline, "the lock never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.restart();
    let result = within("Lock waiting", wait).await.unwrap();
    assert_disconnected(result, "Lock", NOT_REPEATED);
    assert!(
        waiter.locker().try_lock("l").await.unwrap().is_some(),
        "the new broker's lock is free"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_broker_coming_back_calls_fail_after_the_reconnect_timeout() {
    setup();
    let mut broker = Broker::start();
    let address = broker.address();
    let mut clients = Vec::new();
    for way in WAYS {
        let ally = Ally::connect_with(&address, way).await.unwrap();
        ally.cache("c").set("k", "v", None).await.unwrap();
        clients.push(ally);
    }
    broker.kill();
    // Each way at once: the D-Bus connection, and the state socket.
    tokio::join!(two_gets_give_up(&clients[0]), two_gets_give_up(&clients[1]));
    // Calls waiting together for one connection give up together, not one
    // timeout after another.
    let started = Instant::now();
    let status = || within("Status", clients[0].status());
    let (a, b, c) = tokio::join!(status(), status(), status());
    let took = started.elapsed();
    for result in [a, b, c] {
        assert_disconnected(result, "Status", "(ALLY_RECONNECT_TIMEOUT)");
    }
    assert!(
        took >= RECONNECT_TIMEOUT && took < RECONNECT_TIMEOUT + Duration::from_secs(3),
        "three calls gave up after {took:?}"
    );

    // A broker that comes back later is found by the next call, and the state
    // socket, which failed to connect meanwhile, is still used.
    broker.run();
    wait_until("the probes' connections to end", HANG, || {
        broker.state_connections() == 0
    });
    assert_eq!(clients[1].cache("c").get("absent").await.unwrap(), None);
    assert_eq!(
        broker.state_connections(),
        1,
        "Get went over the state socket"
    );
    assert_eq!(clients[0].status().await.unwrap().pid, broker.pid());
}

async fn two_gets_give_up(ally: &Ally) {
    for _ in 0..2 {
        let started = Instant::now();
        let result = within("Get", ally.cache("c").get("k")).await;
        let took = started.elapsed();
        assert_disconnected(result, "Get", "reconnecting failed: no broker answered at ");
        assert!(
            took >= RECONNECT_TIMEOUT && took < RECONNECT_TIMEOUT + Duration::from_secs(3),
            "gave up after {took:?}"
        );
    }
}
