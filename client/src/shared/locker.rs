//! [`Locker`]: the app's named read/write locks, and the [`LockGuard`] of one held.

use std::time::Duration;

use ally_core::state::Mode;
use ally_core::state::calls::locker::{Lock, Queues as QueuesCall, RLock, RUnlock, Unlock};
use ally_core::state::calls::{QueueEntry, WAIT_FOREVER};
use serde::{Deserialize, Serialize};

use super::{Backend, call, call_held};
use crate::Ally;
use crate::error::{Error, ErrorKind, Result};

/// Holders and waiters of a lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queues {
    /// In the order they were granted.
    pub holders: Vec<QueueEntry>,
    /// In the order they will be granted.
    pub waiters: Vec<QueueEntry>,
}

/// A wait on the wire: [`WAIT_FOREVER`] for none.
fn timeout_ms(timeout: Option<Duration>) -> u64 {
    timeout.map_or(WAIT_FOREVER, |d| {
        u64::try_from(d.as_millis())
            .unwrap_or(WAIT_FOREVER - 1)
            .min(WAIT_FOREVER - 1)
    })
}

/// Named fair read/write locks: [`Ally::locker`].
///
/// Locks belong to the instance (in simulate mode, to the [`Ally`]): any task of it may
/// release them, and they are released when it exits or its connection closes. A
/// writer that waits is never overtaken by readers that come after it.
#[derive(Debug, Clone)]
pub struct Locker {
    ally: Ally,
}

impl Locker {
    pub(crate) fn new(ally: Ally) -> Locker {
        Locker { ally }
    }

    async fn acquire(&self, name: &str, mode: Mode, timeout: Option<Duration>) -> Result<bool> {
        let args = (name, timeout_ms(timeout));
        match mode {
            Mode::Write => call_held::<Lock>(&self.ally, args).await,
            Mode::Read => call_held::<RLock>(&self.ally, args).await,
        }
    }

    async fn guarded(
        &self,
        name: &str,
        mode: Mode,
        timeout: Option<Duration>,
    ) -> Result<LockGuard> {
        if self.acquire(name, mode, timeout).await? {
            return Ok(LockGuard::new(self.clone(), name, mode));
        }
        let verb = match mode {
            Mode::Write => "Lock",
            Mode::Read => "RLock",
        };
        Err(Error::local(
            ErrorKind::Timeout,
            match timeout {
                Some(d) if d.is_zero() => format!("{verb} {name:?}: it is taken"),
                Some(d) => format!("{verb} {name:?}: not acquired within {d:?}"),
                None => format!("{verb} {name:?}: the wait was ended (the connection closed)"),
            },
        ))
    }

    /// Takes the write lock, waiting up to `timeout` (`None`: for ever); past it, an
    /// error of kind [`ErrorKind::Timeout`].
    pub async fn lock(&self, name: &str, timeout: Option<Duration>) -> Result<LockGuard> {
        self.guarded(name, Mode::Write, timeout).await
    }

    /// Takes a read lock, waiting up to `timeout` (`None`: for ever).
    pub async fn rlock(&self, name: &str, timeout: Option<Duration>) -> Result<LockGuard> {
        self.guarded(name, Mode::Read, timeout).await
    }

    /// The write lock if it is free now (and nobody waits for it).
    pub async fn try_lock(&self, name: &str) -> Result<Option<LockGuard>> {
        Ok(self
            .acquire(name, Mode::Write, Some(Duration::ZERO))
            .await?
            .then(|| LockGuard::new(self.clone(), name, Mode::Write)))
    }

    /// A read lock if one can be had now (no writer holds or waits).
    pub async fn try_rlock(&self, name: &str) -> Result<Option<LockGuard>> {
        Ok(self
            .acquire(name, Mode::Read, Some(Duration::ZERO))
            .await?
            .then(|| LockGuard::new(self.clone(), name, Mode::Read)))
    }

    /// Releases a write lock this owner holds without its guard (e.g. one taken by
    /// another connection of the same instance); [`ErrorKind::NotOwner`] otherwise.
    pub async fn unlock(&self, name: &str) -> Result<()> {
        self.release(name, Mode::Write).await
    }

    /// Releases a read lock this owner holds without its guard.
    pub async fn runlock(&self, name: &str) -> Result<()> {
        self.release(name, Mode::Read).await
    }

    async fn release(&self, name: &str, mode: Mode) -> Result<()> {
        match mode {
            Mode::Write => call_held::<Unlock>(&self.ally, (name,)).await,
            Mode::Read => call_held::<RUnlock>(&self.ally, (name,)).await,
        }
    }

    /// Who holds `name` and who waits for it.
    pub async fn queues(&self, name: &str) -> Result<Queues> {
        let (holders, waiters) = call::<QueuesCall>(&self.ally, (name,)).await?;
        Ok(Queues { holders, waiters })
    }
}

/// A held lock, released when dropped (from a task spawned on the runtime it was
/// taken on, for a broker) or with [`unlock`](Self::unlock), which reports errors.
#[derive(Debug)]
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard {
    locker: Locker,
    name: String,
    mode: Mode,
    runtime: Option<tokio::runtime::Handle>,
    held: bool,
}

impl LockGuard {
    fn new(locker: Locker, name: &str, mode: Mode) -> LockGuard {
        LockGuard {
            locker,
            name: name.to_string(),
            mode,
            runtime: tokio::runtime::Handle::try_current().ok(),
            held: true,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is a read lock (else the write lock).
    pub fn is_read(&self) -> bool {
        self.mode == Mode::Read
    }

    /// Releases the lock now.
    pub async fn unlock(mut self) -> Result<()> {
        self.held = false;
        self.locker.release(&self.name, self.mode).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        match self.locker.ally.backend() {
            Backend::Simulated { store, owner } => {
                let _ = store.unlock(&self.name, *owner, self.mode);
            }
            Backend::Broker { .. } => {
                let (locker, name, mode) = (self.locker.clone(), self.name.clone(), self.mode);
                if let Some(rt) = &self.runtime {
                    rt.spawn(async move { locker.release(&name, mode).await });
                }
            }
        }
    }
}
