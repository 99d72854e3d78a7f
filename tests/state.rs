//! The shared-state test suite, run three times with the same functions: against
//! simulate mode in-process, against a real broker (`ally run`) with cache and
//! counter calls on its state socket, and against one with every call over the
//! D-Bus connection. Clients here are
//! separate owners: separate `Simulation` clients, or separate admin connections to
//! the broker (each owns the locks it takes). Behaviours that need real instances
//! (SIGKILL, reloads) are in `tests/state_instances.rs`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ally_client::{Ally, ErrorKind, Simulation, StateSocket};
use ally_core::state::Limits;
use common::*;

const LIMITS: Limits = Limits {
    max_key_bytes: 32,
    max_value_bytes: 1024,
    max_keys_per_namespace: 50,
    max_total_bytes: 8192,
    max_lock_waiters_per_connection: 128,
    max_lock_waiters_per_lock: 1024,
};

trait World {
    /// A new client: a new lock owner on the same state.
    async fn client(&self) -> Ally;
    /// Makes blocking clients on the same state.
    fn blocking(&self) -> impl Fn() -> ally_client::blocking::Ally + Send + 'static;
}

struct Sim(Simulation);

impl World for Sim {
    async fn client(&self) -> Ally {
        self.0.ally().await.unwrap()
    }

    fn blocking(&self) -> impl Fn() -> ally_client::blocking::Ally + Send + 'static {
        let sim = self.0.clone();
        move || sim.blocking_ally().unwrap()
    }
}

struct Real(
    TestBroker,
    #[allow(dead_code)] tempfile::TempDir,
    StateSocket,
);

impl Real {
    fn start(state_socket: StateSocket) -> Real {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("report");
        let config = format!(
            "command = [{:?}, \"--report\", {:?}, \"--ready\"]\n\
             [limits]\nmax_key_bytes = {}\nmax_value_bytes = {}\nmax_keys_per_namespace = {}\nmax_total_bytes = {}\n",
            example("stateprobe").display().to_string(),
            report.display().to_string(),
            LIMITS.max_key_bytes,
            LIMITS.max_value_bytes,
            LIMITS.max_keys_per_namespace,
            LIMITS.max_total_bytes,
        );
        Real(TestBroker::start("state", &config), dir, state_socket)
    }
}

impl World for Real {
    async fn client(&self) -> Ally {
        Ally::connect_with(&self.0.address(), self.2.clone())
            .await
            .unwrap()
    }

    fn blocking(&self) -> impl Fn() -> ally_client::blocking::Ally + Send + 'static {
        let (address, state_socket) = (self.0.address(), self.2.clone());
        move || ally_client::blocking::Ally::connect_with(&address, state_socket.clone()).unwrap()
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod simulate {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(&super::Sim(super::Simulation::new(super::LIMITS))).await
                }
            )*
        }
        mod broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(&super::Real::start(super::StateSocket::Auto)).await
                }
            )*
        }
        mod broker_over_dbus {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(&super::Real::start(super::StateSocket::Off)).await
                }
            )*
        }
    };
}

suite!(
    cache_operations,
    ttl_expiry,
    cas_race_between_two_clients,
    atomic_operations_and_overflow,
    writer_waiting_behind_readers_goes_before_later_readers,
    try_lock_timeout_and_not_owner,
    a_waiting_lock_stalls_no_other_caller,
    a_waiter_whose_timeout_ran_out_lets_the_next_one_in,
    limits_are_enforced_with_clear_errors,
    blocking_api_and_guards,
);

async fn cache_operations(w: &impl World) {
    let a = w.client().await;
    let b = w.client().await;
    let ca = a.cache("sessions");
    let cb = b.cache("sessions");
    assert_eq!(ca.get("k").await.unwrap(), None);
    ca.set("k", b"\x00\xffbytes", None).await.unwrap();
    assert_eq!(cb.get("k").await.unwrap(), Some(b"\x00\xffbytes".to_vec()));
    assert_eq!(
        cb.get_string("k").await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(b.cache("other").get("k").await.unwrap(), None);
    cb.set_json("user", &serde_json::json!({"id": 7}), None)
        .await
        .unwrap();
    let user: serde_json::Value = ca.get_json("user").await.unwrap().unwrap();
    assert_eq!(user["id"], 7);
    assert!(ca.exists("user").await.unwrap());
    assert_eq!(ca.keys().await.unwrap(), vec!["k", "user"]);
    assert_eq!(ca.count().await.unwrap(), 2);
    assert!(cb.delete("k").await.unwrap());
    assert!(!cb.delete("k").await.unwrap());
    assert!(ca.set_if_absent("k", "1", None).await.unwrap());
    assert!(!cb.set_if_absent("k", "2", None).await.unwrap());
    assert!(!cb.compare_and_swap("k", "2", "3", None).await.unwrap());
    assert!(cb.compare_and_swap("k", "1", "3", None).await.unwrap());
    assert_eq!(ca.get_string("k").await.unwrap().as_deref(), Some("3"));
    assert!(!ca.compare_and_swap("absent", "", "x", None).await.unwrap());
    assert_eq!(ca.flush().await.unwrap(), 2);
    assert_eq!(cb.count().await.unwrap(), 0);
}

async fn ttl_expiry(w: &impl World) {
    let a = w.client().await;
    let c = a.cache("ttl");
    c.set("short", "1", Some(Duration::from_millis(300)))
        .await
        .unwrap();
    c.set("forever", "2", None).await.unwrap();
    assert!(
        c.set_if_absent("cas", "x", Some(Duration::from_millis(300)))
            .await
            .unwrap()
    );
    assert_eq!(c.count().await.unwrap(), 3);
    assert_eq!(c.get_string("short").await.unwrap().as_deref(), Some("1"));
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(c.get("short").await.unwrap(), None);
    assert!(!c.exists("cas").await.unwrap());
    assert_eq!(c.keys().await.unwrap(), vec!["forever"]);
    assert_eq!(c.count().await.unwrap(), 1);
    assert!(
        c.set_if_absent("short", "again", None).await.unwrap(),
        "expired is absent"
    );
    // A CAS resets the TTL to the one it gives.
    c.set("renew", "a", Some(Duration::from_millis(200)))
        .await
        .unwrap();
    assert!(c.compare_and_swap("renew", "a", "b", None).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.get_string("renew").await.unwrap().as_deref(), Some("b"));
}

async fn cas_race_between_two_clients(w: &impl World) {
    const EACH: u64 = 150;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let ally = w.client().await;
        tasks.push(tokio::spawn(async move {
            let cache = ally.cache("race");
            let counter = ally.atomic("race");
            let mut retries = 0;
            for _ in 0..EACH {
                cache.set_if_absent("n", "0", None).await.unwrap();
                loop {
                    let old = cache.get_string("n").await.unwrap().unwrap();
                    let new = (old.parse::<u64>().unwrap() + 1).to_string();
                    if cache.compare_and_swap("n", &old, &new, None).await.unwrap() {
                        break;
                    }
                    retries += 1;
                }
                loop {
                    let old = counter.load().await.unwrap();
                    if counter.compare_and_swap(old, old + 1).await.unwrap() {
                        break;
                    }
                }
            }
            retries
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    let check = w.client().await;
    assert_eq!(
        check
            .cache("race")
            .get_string("n")
            .await
            .unwrap()
            .as_deref(),
        Some((2 * EACH).to_string().as_str()),
        "no increment lost ({retries} retries)"
    );
    assert_eq!(check.atomic("race").load().await.unwrap(), 2 * EACH as i64);
}

async fn atomic_operations_and_overflow(w: &impl World) {
    let a = w.client().await;
    let b = w.client().await;
    let n = a.atomic("hits");
    assert_eq!(n.load().await.unwrap(), 0);
    assert_eq!(n.add(5).await.unwrap(), 5);
    assert_eq!(b.atomic("hits").add(-2).await.unwrap(), 3);
    n.store(10).await.unwrap();
    assert_eq!(n.swap(11).await.unwrap(), 10);
    assert!(!n.compare_and_swap(10, 12).await.unwrap());
    assert!(n.compare_and_swap(11, 12).await.unwrap());
    assert_eq!(b.atomic("hits").load().await.unwrap(), 12);
    n.store(i64::MAX).await.unwrap();
    assert_eq!(n.add(1).await.unwrap(), i64::MIN, "wraps");
    let concurrent: Vec<_> = (0..4)
        .map(|_| {
            let counter = n.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    counter.add(1).await.unwrap();
                }
            })
        })
        .collect();
    for t in concurrent {
        t.await.unwrap();
    }
    assert_eq!(n.load().await.unwrap(), i64::MIN + 400);
}

async fn wait_for_waiters(ally: &Ally, name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let q = ally.locker().queues(name).await.unwrap();
        if q.waiters.len() == n {
            return;
        }
        assert!(Instant::now() < deadline, "{n} waiters never queued: {q:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn writer_waiting_behind_readers_goes_before_later_readers(w: &impl World) {
    let reader = w.client().await;
    let writer = w.client().await;
    let late = w.client().await;
    let events = Arc::new(Mutex::new(Vec::<&str>::new()));
    let r1 = reader.locker().rlock("db", None).await.unwrap();
    assert!(r1.is_read());
    let w_task = {
        let events = events.clone();
        tokio::spawn(async move {
            let g = writer
                .locker()
                .lock("db", Some(Duration::from_secs(10)))
                .await
                .unwrap();
            events.lock().unwrap().push("writer in");
            tokio::time::sleep(Duration::from_millis(100)).await;
            events.lock().unwrap().push("writer out");
            g.unlock().await.unwrap();
        })
    };
    wait_for_waiters(&reader, "db", 1).await;
    assert!(
        late.locker().try_rlock("db").await.unwrap().is_none(),
        "a writer waits"
    );
    let r_task = {
        let events = events.clone();
        tokio::spawn(async move {
            let g = late
                .locker()
                .rlock("db", Some(Duration::from_secs(10)))
                .await
                .unwrap();
            events.lock().unwrap().push("late reader in");
            g.unlock().await.unwrap();
        })
    };
    wait_for_waiters(&reader, "db", 2).await;
    let q = reader.locker().queues("db").await.unwrap();
    assert_eq!(q.holders.len(), 1);
    assert_eq!(
        q.waiters
            .iter()
            .map(|e| e.mode.as_str())
            .collect::<Vec<_>>(),
        vec!["write", "read"]
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        events.lock().unwrap().is_empty(),
        "nobody passed the first reader"
    );
    r1.unlock().await.unwrap();
    w_task.await.unwrap();
    r_task.await.unwrap();
    assert_eq!(
        *events.lock().unwrap(),
        vec!["writer in", "writer out", "late reader in"]
    );
}

async fn try_lock_timeout_and_not_owner(w: &impl World) {
    let a = w.client().await;
    let b = w.client().await;
    let g = a.locker().lock("x", Some(Duration::ZERO)).await.unwrap();
    assert!(b.locker().try_lock("x").await.unwrap().is_none());
    assert!(b.locker().try_rlock("x").await.unwrap().is_none());
    let t0 = Instant::now();
    let err = b
        .locker()
        .lock("x", Some(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(t0.elapsed() >= Duration::from_millis(200));
    let err = b.locker().unlock("x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotOwner, "{err}");
    let err = a.locker().runlock("x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotOwner, "{err}");
    assert!(err.to_string().contains("holds it for writing"), "{err}");
    drop(g);
    let deadline = Instant::now() + Duration::from_secs(5);
    let g2 = loop {
        if let Some(g) = b.locker().try_lock("x").await.unwrap() {
            break g;
        }
        assert!(
            Instant::now() < deadline,
            "dropping the guard never unlocked"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let q = a.locker().queues("x").await.unwrap();
    assert_eq!(q.holders.len(), 1);
    assert_eq!(q.holders[0].mode, "write");
    g2.unlock().await.unwrap();
    assert!(a.locker().queues("x").await.unwrap().holders.is_empty());
}

async fn a_waiting_lock_stalls_no_other_caller(w: &impl World) {
    let a = w.client().await;
    let b = w.client().await;
    let g = a.locker().lock("busy", None).await.unwrap();
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.locker().lock("busy", None).await.map(drop) })
    };
    wait_for_waiters(&a, "busy", 1).await;
    // The waiting client's own connection, and everybody else, are served meanwhile.
    for ally in [&a, &b] {
        let t0 = Instant::now();
        for _ in 0..20 {
            ally.atomic("side").add(1).await.unwrap();
            ally.cache("side").set("k", "v", None).await.unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "calls stalled behind Lock"
        );
    }
    assert!(!waiting.is_finished());
    drop(g);
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter was granted")
        .unwrap()
        .unwrap();
}

async fn a_waiter_whose_timeout_ran_out_lets_the_next_one_in(w: &impl World) {
    let a = w.client().await;
    let b = w.client().await;
    let c = w.client().await;
    let r = a.locker().rlock("q", None).await.unwrap();
    let writer = tokio::spawn(async move {
        b.locker()
            .lock("q", Some(Duration::from_millis(300)))
            .await
            .map(drop)
    });
    wait_for_waiters(&a, "q", 1).await;
    let reader = tokio::spawn(async move {
        c.locker()
            .rlock("q", Some(Duration::from_secs(10)))
            .await
            .map(drop)
    });
    wait_for_waiters(&a, "q", 2).await;
    let err = writer.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    // The reader behind the writer that gave up joins the first reader at once.
    tokio::time::timeout(Duration::from_secs(2), reader)
        .await
        .expect("the reader behind the expired writer was let in")
        .unwrap()
        .unwrap();
    drop(r);
}

async fn limits_are_enforced_with_clear_errors(w: &impl World) {
    let a = w.client().await;
    let c = a.cache("lim");
    c.set("k", "old", None).await.unwrap();
    let long = "k".repeat(33);
    let err = c.set(&long, "v", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded, "{err}");
    assert!(err.to_string().contains("max_key_bytes (32)"), "{err}");
    let err = c.set("k", vec![0u8; 1025], None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded);
    assert!(err.to_string().contains("max_value_bytes (1024)"), "{err}");
    let err = c
        .compare_and_swap("k", "old", vec![0u8; 1025], None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded);
    assert_eq!(
        c.get_string("k").await.unwrap().as_deref(),
        Some("old"),
        "unchanged"
    );
    for i in 1..50 {
        c.set(&format!("k{i}"), "", None).await.unwrap();
    }
    let err = c.set("one-too-many", "", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded);
    assert!(err.to_string().contains("max_keys_per_namespace"), "{err}");
    assert_eq!(c.count().await.unwrap(), 50);
    c.set("k", "replacing is fine", None).await.unwrap();
    // 8192 bytes in all: seven 1 KiB values in other namespaces fit, the eighth not.
    let mut stored = 0;
    let err = loop {
        match a
            .cache(&format!("big{stored}"))
            .set("v", vec![1u8; 1000], None)
            .await
        {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 20, "max_total_bytes never enforced");
    };
    assert_eq!(err.kind(), ErrorKind::LimitExceeded);
    assert!(err.to_string().contains("max_total_bytes (8192)"), "{err}");
    assert!(stored >= 6, "{stored}");
    assert_eq!(a.cache(&format!("big{stored}")).count().await.unwrap(), 0);
    let err = a.atomic(&long).add(1).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded);
    let err = a.locker().lock(&long, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded);
    let err = a.cache("").get("k").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

async fn blocking_api_and_guards(w: &impl World) {
    let make = w.blocking();
    // Blocking clients run their own runtime: use them off the test's.
    tokio::task::spawn_blocking(move || {
        let a = make();
        let b = make();
        a.cache("blk").set("k", "v", None).unwrap();
        assert_eq!(
            b.cache("blk").get_string("k").unwrap().as_deref(),
            Some("v")
        );
        b.cache("blk").set_json("j", &[1, 2, 3], None).unwrap();
        assert_eq!(
            a.cache("blk").get_json::<Vec<u8>>("j").unwrap(),
            Some(vec![1, 2, 3])
        );
        assert_eq!(a.atomic("blk").add(2).unwrap(), 2);
        assert_eq!(b.atomic("blk").swap(5).unwrap(), 2);
        let g = a.locker().lock("blk", None).unwrap();
        assert_eq!(g.name(), "blk");
        assert!(b.locker().try_lock("blk").unwrap().is_none());
        drop(g);
        let g2 = b
            .locker()
            .try_lock("blk")
            .unwrap()
            .expect("free as soon as the blocking guard is dropped");
        assert_eq!(
            a.locker().unlock("blk").unwrap_err().kind(),
            ErrorKind::NotOwner
        );
        g2.unlock().unwrap();
        let r1 = a
            .locker()
            .rlock("blk", Some(Duration::from_secs(1)))
            .unwrap();
        let r2 = b.locker().try_rlock("blk").unwrap().expect("readers share");
        assert_eq!(a.locker().queues("blk").unwrap().holders.len(), 2);
        drop((r1, r2));
        assert!(a.locker().queues("blk").unwrap().holders.is_empty());
    })
    .await
    .unwrap();
}
