//! Which processes are instances: the lookups every call makes to tell its
//! caller apart, kept apart from the broker's other bookkeeping so that a call
//! never waits for a reload, a spawn or a socket bind.
//!
//! A child may connect before the broker has recorded it (the spawn returns
//! after the exec). A lookup that finds no instance while a spawn is in flight
//! is therefore not final: [`Roster::settled`] waits for the spawn to end.

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::watch;

use crate::generations::InstanceId;

#[derive(Debug)]
pub struct Roster {
    inner: RwLock<Inner>,
    /// True while no spawn is in flight.
    settled: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Inner {
    by_pid: HashMap<u32, InstanceId>,
    spawning: bool,
}

/// The instances by main pid, and whether a spawn not yet recorded was in
/// flight when they were read.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub by_pid: HashMap<u32, InstanceId>,
    pub spawning: bool,
}

impl Default for Roster {
    fn default() -> Self {
        Roster {
            inner: RwLock::default(),
            settled: watch::channel(true).0,
        }
    }
}

impl Roster {
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a spawn in flight until the guard is dropped.
    pub fn spawning(&self) -> Spawning<'_> {
        self.write().spawning = true;
        self.settled.send_replace(false);
        Spawning(self)
    }

    pub fn record(&self, pid: u32, id: InstanceId) {
        self.write().by_pid.insert(pid, id);
    }

    pub fn remove(&self, id: InstanceId) {
        self.write().by_pid.retain(|_, i| *i != id);
    }

    pub fn alive(&self, id: InstanceId) -> bool {
        self.read().by_pid.values().any(|i| *i == id)
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.read();
        Snapshot {
            by_pid: inner.by_pid.clone(),
            spawning: inner.spawning,
        }
    }

    /// Resolves once no spawn is in flight.
    pub async fn settled(&self) {
        let mut settled = self.settled.subscribe();
        let _ = settled.wait_for(|s| *s).await;
    }
}

/// A spawn in flight; dropped once its child is recorded, or it failed.
pub struct Spawning<'a>(&'a Roster);

impl Drop for Spawning<'_> {
    fn drop(&mut self) {
        self.0.write().spawning = false;
        self.0.settled.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lookup_during_a_spawn_is_not_final_until_it_is_recorded() {
        let roster = Roster::default();
        assert!(!roster.snapshot().spawning);
        let spawning = roster.spawning();
        let snapshot = roster.snapshot();
        assert!(snapshot.spawning && snapshot.by_pid.is_empty());
        let waiter = async {
            roster.settled().await;
            roster.snapshot()
        };
        let record = async {
            tokio::task::yield_now().await;
            roster.record(300, 7);
            drop(spawning);
        };
        let (seen, ()) = tokio::join!(waiter, record);
        assert_eq!(seen.by_pid.get(&300), Some(&7));
        assert!(!seen.spawning);
        assert!(roster.alive(7));
        roster.remove(7);
        assert!(!roster.alive(7));
    }
}
