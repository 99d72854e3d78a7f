//! A [`Store`] shared by concurrent callers, with waiting for locks: the one piece of
//! the state that is not pure. The broker serves one; simulate mode keeps one per
//! [`Simulation`](crate::Simulation).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Acquire, Cancel, Effects, Limits, Mode, Owner, StateError, Store, Ticket};

#[derive(Debug, Default)]
struct Inner {
    store: Store,
    /// Woken with `true` when granted, `false` when the wait was removed.
    waiters: HashMap<Ticket, oneshot::Sender<bool>>,
}

impl Inner {
    fn apply(&mut self, effects: Effects) {
        for ticket in effects.granted {
            if let Some(tx) = self.waiters.remove(&ticket) {
                let _ = tx.send(true);
            }
        }
        for ticket in effects.cancelled {
            if let Some(tx) = self.waiters.remove(&ticket) {
                let _ = tx.send(false);
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct SharedStore {
    inner: Mutex<Inner>,
    /// Woken (with a permit kept) whenever the store is taken to be changed or
    /// read: how the broker knows a snapshot may be due.
    touched: tokio::sync::Notify,
}

impl SharedStore {
    pub fn new(limits: Limits) -> SharedStore {
        SharedStore::from_store(Store::new(limits))
    }

    /// Shares `store`, with nobody waiting yet.
    pub fn from_store(store: Store) -> SharedStore {
        SharedStore {
            inner: Mutex::new(Inner {
                store,
                waiters: HashMap::new(),
            }),
            touched: tokio::sync::Notify::new(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.touched.notify_one();
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once the store was used after the last time it resolved.
    pub async fn touched(&self) {
        self.touched.notified().await
    }

    /// Runs `f` on the store, with the current time.
    pub fn with<R>(&self, f: impl FnOnce(&mut Store, Instant) -> R) -> R {
        f(&mut self.inner().store, Instant::now())
    }

    /// Takes `name` in `mode` for `owner` through connection `conn`, waiting up to
    /// `timeout` (`None`: for ever; zero: not at all). Whether it was granted; `false`
    /// also when the wait was removed because its owner or connection went away.
    ///
    /// Dropping the future gives up the wait (and any hold granted meanwhile).
    pub async fn lock(
        &self,
        name: &str,
        owner: Owner,
        conn: u64,
        mode: Mode,
        timeout: Option<Duration>,
    ) -> Result<bool, StateError> {
        let wait = timeout != Some(Duration::ZERO);
        let (ticket, rx) = {
            let mut inner = self.inner();
            match inner
                .store
                .locker
                .acquire(name, owner, conn, mode, wait, Instant::now())?
            {
                Acquire::Granted => return Ok(true),
                Acquire::Busy => return Ok(false),
                Acquire::Queued(ticket) => {
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.insert(ticket, tx);
                    (ticket, rx)
                }
            }
        };
        let mut wait = Wait {
            shared: self,
            name,
            ticket,
            rx,
            done: false,
        };
        let outcome = match timeout {
            None => (&mut wait.rx).await.ok(),
            Some(t) => tokio::time::timeout(t, &mut wait.rx)
                .await
                .ok()
                .and_then(Result::ok),
        };
        if let Some(granted) = outcome {
            wait.done = true;
            return Ok(granted);
        }
        let mut inner = self.inner();
        match inner.store.locker.cancel(ticket, Instant::now()) {
            Cancel::Cancelled(effects) => {
                inner.waiters.remove(&ticket);
                inner.apply(effects);
                wait.done = true;
                Ok(false)
            }
            // Granted (or removed) just as the timeout ran out: the answer is on its way.
            Cancel::NotWaiting => {
                drop(inner);
                let granted = wait.rx.try_recv().unwrap_or(false);
                wait.done = true;
                Ok(granted)
            }
        }
    }

    /// `Unlock` (write) or `RUnlock` (read).
    pub fn unlock(&self, name: &str, owner: Owner, mode: Mode) -> Result<(), StateError> {
        let mut inner = self.inner();
        let effects = inner
            .store
            .locker
            .release(name, owner, mode, Instant::now())?;
        inner.apply(effects);
        Ok(())
    }

    /// Releases every hold and wait of `owner`.
    pub fn release_owner(&self, owner: Owner) {
        let mut inner = self.inner();
        let effects = inner.store.locker.release_owner(owner, Instant::now());
        inner.apply(effects);
    }

    /// Releases every hold and wait taken through `conn`.
    pub fn release_conn(&self, conn: u64) {
        let mut inner = self.inner();
        let effects = inner.store.locker.release_conn(conn, Instant::now());
        inner.apply(effects);
    }

    /// Drops every holder of `name`; how many there were.
    pub fn force_release(&self, name: &str) -> Result<u32, StateError> {
        let mut inner = self.inner();
        let (n, effects) = inner.store.locker.force_release(name, Instant::now())?;
        inner.apply(effects);
        Ok(n)
    }
}

/// A wait in progress; dropped before it is `done`, it gives the wait up.
struct Wait<'a> {
    shared: &'a SharedStore,
    name: &'a str,
    ticket: Ticket,
    rx: oneshot::Receiver<bool>,
    done: bool,
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = self.shared.inner();
        let now = Instant::now();
        let effects = match inner.store.locker.cancel(self.ticket, now) {
            Cancel::Cancelled(effects) => {
                inner.waiters.remove(&self.ticket);
                effects
            }
            Cancel::NotWaiting if self.rx.try_recv() == Ok(true) => inner
                .store
                .locker
                .release_ticket(self.name, self.ticket, now),
            Cancel::NotWaiting => Effects::default(),
        };
        inner.apply(effects);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns once `n` requests wait for `name`; fails past a deadline.
    async fn queued(s: &SharedStore, name: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.with(|st, _| st.locker.queues(name)).unwrap().1.len() < n {
            assert!(
                Instant::now() < deadline,
                "{n} request(s) never queued for {name:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Owner 2 (connection 2) asks for a write lock on "x" that owner 1 holds,
    /// and is queued.
    async fn second_owner_waiting(
        s: &std::sync::Arc<SharedStore>,
    ) -> tokio::task::JoinHandle<Result<bool, StateError>> {
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.lock("x", 2, 2, Mode::Write, None).await })
        };
        queued(s, "x", 1).await;
        waiter
    }

    #[tokio::test]
    async fn a_wait_is_granted_when_the_holder_leaves() {
        let s = std::sync::Arc::new(SharedStore::new(Limits::default()));
        assert!(s.lock("x", 1, 1, Mode::Write, None).await.unwrap());
        assert!(
            !s.lock("x", 2, 2, Mode::Write, Some(Duration::ZERO))
                .await
                .unwrap()
        );
        let t0 = Instant::now();
        assert!(
            !s.lock("x", 2, 2, Mode::Write, Some(Duration::from_millis(50)))
                .await
                .unwrap()
        );
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let waiter = second_owner_waiting(&s).await;
        assert!(!waiter.is_finished());
        s.unlock("x", 1, Mode::Write).unwrap();
        assert!(waiter.await.unwrap().unwrap());
        let (holders, _) = s.with(|st, _| st.locker.queues("x")).unwrap();
        assert_eq!(holders[0].owner, 2);
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_nothing_behind() {
        let s = std::sync::Arc::new(SharedStore::new(Limits::default()));
        assert!(s.lock("x", 1, 1, Mode::Write, None).await.unwrap());
        let waiter = second_owner_waiting(&s).await;
        waiter.abort();
        let _ = waiter.await;
        s.unlock("x", 1, Mode::Write).unwrap();
        assert!(s.with(|st, _| st.locker.names()).is_empty());
    }

    #[tokio::test]
    async fn a_wait_of_a_departed_owner_ends_false() {
        let s = std::sync::Arc::new(SharedStore::new(Limits::default()));
        assert!(s.lock("x", 1, 1, Mode::Write, None).await.unwrap());
        let waiter = second_owner_waiting(&s).await;
        s.release_conn(2);
        assert!(!waiter.await.unwrap().unwrap());
    }
}
