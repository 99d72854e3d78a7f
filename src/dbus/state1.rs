//! `org.ally.Cache1`, `org.ally.Atomic1` and `org.ally.Locker1`: the application's
//! shared state (see `crate::state` and `docs/dbus-api.md`).
//!
//! Instances and admins may call everything; others (on a bus) only read: `Get`,
//! `Exists`, `Keys`, `Count`, `Load`, `List`, `Queues`, `Names`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ally_core::state::{Hold, Mode, StateError};
use zbus::message::Header;
use zbus::{Connection, interface};

use super::broker1::Access;
use super::errors::Result;
use crate::state::CONNECTION_OWNER;
use crate::throttle::{self, Throttle};

static REFUSED_LOCKS: Throttle = Throttle::new(Duration::from_secs(1));

/// `(t owner, s mode, t for_ms)`: who holds or waits, how, and for how long so far.
pub type QueueEntry = (u64, String, u64);

/// Timeout of `Lock`/`RLock`: 0 tries once, `u64::MAX` waits for ever.
pub const WAIT_FOREVER: u64 = u64::MAX;

pub struct Cache1 {
    access: Arc<Access>,
}

impl Cache1 {
    pub fn new(access: Arc<Access>) -> Self {
        Cache1 { access }
    }
}

macro_rules! store {
    ($self:ident) => {
        $self.access.broker().state().store
    };
}

// Every method answers at once: run them in the dispatcher, without a task each.
#[interface(name = "org.ally.Cache1", introspection_docs = false, spawn = false)]
impl Cache1 {
    async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        ttl_ms: u64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        self.access
            .require_admin(Some(&header), conn, "Set")
            .await?;
        Ok(store!(self).with(|s, now| s.cache.set(namespace, key, value, ttl_ms, now))?)
    }

    #[zbus(out_args("found", "value"))]
    async fn get(
        &self,
        namespace: &str,
        key: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(bool, Vec<u8>)> {
        self.access
            .require_reader(Some(&header), conn, "Get")
            .await?;
        let value = store!(self).with(|s, now| s.cache.get(namespace, key, now))?;
        Ok((value.is_some(), value.unwrap_or_default()))
    }

    #[zbus(out_args("deleted"))]
    async fn delete(
        &self,
        namespace: &str,
        key: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<bool> {
        self.access
            .require_admin(Some(&header), conn, "Delete")
            .await?;
        Ok(store!(self).with(|s, now| s.cache.delete(namespace, key, now))?)
    }

    #[zbus(out_args("exists"))]
    async fn exists(
        &self,
        namespace: &str,
        key: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<bool> {
        self.access
            .require_reader(Some(&header), conn, "Exists")
            .await?;
        Ok(store!(self).with(|s, now| s.cache.exists(namespace, key, now))?)
    }

    #[zbus(out_args("keys"))]
    async fn keys(
        &self,
        namespace: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>> {
        self.access
            .require_reader(Some(&header), conn, "Keys")
            .await?;
        Ok(store!(self).with(|s, now| s.cache.keys(namespace, now))?)
    }

    #[zbus(out_args("count"))]
    async fn count(
        &self,
        namespace: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u64> {
        self.access
            .require_reader(Some(&header), conn, "Count")
            .await?;
        Ok(store!(self).with(|s, now| s.cache.count(namespace, now))?)
    }

    #[zbus(out_args("removed"))]
    async fn flush(
        &self,
        namespace: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u64> {
        self.access
            .require_admin(Some(&header), conn, "Flush")
            .await?;
        Ok(store!(self).with(|s, now| s.cache.flush(namespace, now))?)
    }

    #[zbus(out_args("stored"))]
    async fn set_if_absent(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        ttl_ms: u64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<bool> {
        self.access
            .require_admin(Some(&header), conn, "SetIfAbsent")
            .await?;
        Ok(
            store!(self)
                .with(|s, now| s.cache.set_if_absent(namespace, key, value, ttl_ms, now))?,
        )
    }

    #[zbus(out_args("swapped"))]
    #[allow(clippy::too_many_arguments)]
    async fn compare_and_swap(
        &self,
        namespace: &str,
        key: &str,
        old: Vec<u8>,
        new: Vec<u8>,
        ttl_ms: u64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<bool> {
        self.access
            .require_admin(Some(&header), conn, "CompareAndSwap")
            .await?;
        Ok(store!(self).with(|s, now| {
            s.cache
                .compare_and_swap(namespace, key, &old, new, ttl_ms, now)
        })?)
    }
}

pub struct Atomic1 {
    access: Arc<Access>,
}

impl Atomic1 {
    pub fn new(access: Arc<Access>) -> Self {
        Atomic1 { access }
    }
}

#[interface(name = "org.ally.Atomic1", introspection_docs = false, spawn = false)]
impl Atomic1 {
    #[zbus(out_args("value"))]
    async fn add(
        &self,
        name: &str,
        delta: i64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<i64> {
        self.access
            .require_admin(Some(&header), conn, "Add")
            .await?;
        Ok(store!(self).with(|s, _| s.atomics.add(name, delta))?)
    }

    #[zbus(out_args("value"))]
    async fn load(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<i64> {
        self.access
            .require_reader(Some(&header), conn, "Load")
            .await?;
        Ok(store!(self).with(|s, _| s.atomics.load(name))?)
    }

    async fn store(
        &self,
        name: &str,
        value: i64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        self.access
            .require_admin(Some(&header), conn, "Store")
            .await?;
        Ok(store!(self).with(|s, _| s.atomics.store(name, value))?)
    }

    #[zbus(out_args("old"))]
    async fn swap(
        &self,
        name: &str,
        value: i64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<i64> {
        self.access
            .require_admin(Some(&header), conn, "Swap")
            .await?;
        Ok(store!(self).with(|s, _| s.atomics.swap(name, value))?)
    }

    #[zbus(out_args("swapped"))]
    async fn compare_and_swap(
        &self,
        name: &str,
        old: i64,
        new: i64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<bool> {
        self.access
            .require_admin(Some(&header), conn, "CompareAndSwap")
            .await?;
        Ok(store!(self).with(|s, _| s.atomics.compare_and_swap(name, old, new))?)
    }

    #[zbus(out_args("counters"))]
    async fn list(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, i64)>> {
        self.access
            .require_reader(Some(&header), conn, "List")
            .await?;
        Ok(store!(self).with(|s, _| s.atomics.list()))
    }
}

pub struct Locker1 {
    access: Arc<Access>,
}

impl Locker1 {
    pub fn new(access: Arc<Access>) -> Self {
        Locker1 { access }
    }

    async fn acquire(
        &self,
        name: &str,
        timeout_ms: u64,
        mode: Mode,
        header: &Header<'_>,
        conn: &Connection,
        method: &str,
    ) -> Result<bool> {
        let (owner, conn_id) = self.access.lock_owner(Some(header), conn, method).await?;
        let timeout = match timeout_ms {
            WAIT_FOREVER => None,
            ms => Some(Duration::from_millis(ms)),
        };
        let locked = store!(self).lock(name, owner, conn_id, mode, timeout).await;
        if let Err(StateError::LimitExceeded(why)) = &locked
            && let Some(suppressed) = REFUSED_LOCKS.allow(Instant::now())
        {
            let who = match owner.checked_sub(CONNECTION_OWNER) {
                Some(conn) => format!("connection {conn}"),
                None => format!("instance {owner}"),
            };
            tracing::warn!(
                "refused {method} of {name:?} for {who}: {why}{}",
                throttle::more(suppressed)
            );
        }
        Ok(locked?)
    }

    async fn release(
        &self,
        name: &str,
        mode: Mode,
        header: &Header<'_>,
        conn: &Connection,
        method: &str,
    ) -> Result<()> {
        let (owner, _) = self.access.lock_owner(Some(header), conn, method).await?;
        Ok(store!(self).unlock(name, owner, mode)?)
    }
}

fn entries(holds: &[Hold], now: Instant) -> Vec<QueueEntry> {
    holds
        .iter()
        .map(|h| {
            (
                h.owner,
                h.mode.as_str().to_string(),
                now.saturating_duration_since(h.since).as_millis() as u64,
            )
        })
        .collect()
}

#[interface(name = "org.ally.Locker1", introspection_docs = false)]
impl Locker1 {
    #[zbus(out_args("acquired"))]
    async fn lock(
        &self,
        name: &str,
        timeout_ms: u64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<bool> {
        self.acquire(name, timeout_ms, Mode::Write, &header, conn, "Lock")
            .await
    }

    #[zbus(out_args("acquired"))]
    async fn r_lock(
        &self,
        name: &str,
        timeout_ms: u64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<bool> {
        self.acquire(name, timeout_ms, Mode::Read, &header, conn, "RLock")
            .await
    }

    async fn unlock(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        self.release(name, Mode::Write, &header, conn, "Unlock")
            .await
    }

    #[zbus(name = "RUnlock")]
    async fn r_unlock(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        self.release(name, Mode::Read, &header, conn, "RUnlock")
            .await
    }

    #[zbus(out_args("holders", "waiters"))]
    async fn queues(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(Vec<QueueEntry>, Vec<QueueEntry>)> {
        self.access
            .require_reader(Some(&header), conn, "Queues")
            .await?;
        let (holders, waiters) = store!(self).with(|s, _| s.locker.queues(name))?;
        let now = Instant::now();
        Ok((entries(&holders, now), entries(&waiters, now)))
    }

    #[zbus(out_args("names"))]
    async fn names(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>> {
        self.access
            .require_reader(Some(&header), conn, "Names")
            .await?;
        Ok(store!(self).with(|s, _| s.locker.names()))
    }

    #[zbus(out_args("released"))]
    async fn force_unlock(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u32> {
        self.access
            .require_operator(Some(&header), conn, "ForceUnlock")
            .await?;
        Ok(store!(self).force_release(name)?)
    }
}
