//! `org.ally.Cache1`, `org.ally.Atomic1` and `org.ally.Locker1`: the application's
//! shared state (see `crate::state` and `docs/dbus-api.md`).
//!
//! What each method takes, returns, requires and does is its entry in
//! `ally_core::state::calls`; zbus's `#[interface]` needs one Rust method per D-Bus
//! method, so each here is a one-line shim that hands its arguments to the entry.
//! `tests/dbus.rs` checks what these serve against `dbus/*.xml`, and the table's own
//! tests check it against the same files.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ally_core::state::StateError;
use ally_core::state::calls::{
    Apply, ApplyHeld, CONNECTION_OWNER, QueueEntry, atomic, cache, locker,
};
use zbus::message::Header;
use zbus::{Connection, interface};

use super::broker1::Access;
use super::errors::Result;
use crate::throttle::{self, Throttle};

static REFUSED_LOCKS: Throttle = Throttle::new(Duration::from_secs(1));

/// Answers a call from the table, once the caller may make it.
async fn now<C: Apply>(
    access: &Access,
    header: &Header<'_>,
    conn: &Connection,
    args: C::Args<'_>,
) -> Result<C::Reply> {
    access
        .require(Some(header), conn, C::REQUIRES, C::MEMBER)
        .await?;
    Ok(C::apply(&access.broker().state().store, args)?)
}

/// Answers a call made for the caller's lock owner; a refusal for a limit is logged.
async fn held<'a, C: ApplyHeld>(
    access: &'a Access,
    header: &Header<'_>,
    conn: &Connection,
    args: C::Args<'a>,
) -> Result<C::Reply> {
    let holder = access.lock_owner(Some(header), conn, C::MEMBER).await?;
    let store = &access.broker().state().store;
    let name = C::lock_name(&args);
    let result = C::apply_held(store, holder, args).await;
    if let Err(StateError::LimitExceeded(why)) = &result
        && let Some(suppressed) = REFUSED_LOCKS.allow(Instant::now())
    {
        let who = match holder.owner.checked_sub(CONNECTION_OWNER) {
            Some(conn) => format!("connection {conn}"),
            None => format!("instance {}", holder.owner),
        };
        tracing::warn!(
            "refused {} of {name:?} for {who}: {why}{}",
            C::MEMBER,
            throttle::more(suppressed)
        );
    }
    Ok(result?)
}

pub struct Cache1(Arc<Access>);
pub struct Atomic1(Arc<Access>);
pub struct Locker1(Arc<Access>);

impl Cache1 {
    pub fn new(access: Arc<Access>) -> Self {
        Cache1(access)
    }
}

impl Atomic1 {
    pub fn new(access: Arc<Access>) -> Self {
        Atomic1(access)
    }
}

impl Locker1 {
    pub fn new(access: Arc<Access>) -> Self {
        Locker1(access)
    }
}

// Every method answers at once: run them in the dispatcher, without a task each.
#[interface(name = "org.ally.Cache1", introspection_docs = false, spawn = false)]
impl Cache1 {
    async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl_ms: u64,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<()> {
        now::<cache::Set>(&self.0, &h, c, (namespace, key, value, ttl_ms)).await
    }

    #[zbus(out_args("found", "value"))]
    async fn get(
        &self,
        namespace: &str,
        key: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<(bool, Vec<u8>)> {
        now::<cache::Get>(&self.0, &h, c, (namespace, key)).await
    }

    #[zbus(out_args("deleted"))]
    async fn delete(
        &self,
        namespace: &str,
        key: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<bool> {
        now::<cache::Delete>(&self.0, &h, c, (namespace, key)).await
    }

    #[zbus(out_args("exists"))]
    async fn exists(
        &self,
        namespace: &str,
        key: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<bool> {
        now::<cache::Exists>(&self.0, &h, c, (namespace, key)).await
    }

    #[zbus(out_args("keys"))]
    async fn keys(
        &self,
        namespace: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<Vec<String>> {
        now::<cache::Keys>(&self.0, &h, c, (namespace,)).await
    }

    #[zbus(out_args("count"))]
    async fn count(
        &self,
        namespace: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<u64> {
        now::<cache::Count>(&self.0, &h, c, (namespace,)).await
    }

    #[zbus(out_args("removed"))]
    async fn flush(
        &self,
        namespace: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<u64> {
        now::<cache::Flush>(&self.0, &h, c, (namespace,)).await
    }

    #[zbus(out_args("stored"))]
    async fn set_if_absent(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl_ms: u64,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<bool> {
        now::<cache::SetIfAbsent>(&self.0, &h, c, (namespace, key, value, ttl_ms)).await
    }

    #[zbus(out_args("swapped"))]
    #[allow(clippy::too_many_arguments)]
    async fn compare_and_swap(
        &self,
        namespace: &str,
        key: &str,
        old: &[u8],
        new: &[u8],
        ttl_ms: u64,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<bool> {
        now::<cache::CompareAndSwap>(&self.0, &h, c, (namespace, key, old, new, ttl_ms)).await
    }
}

#[interface(name = "org.ally.Atomic1", introspection_docs = false, spawn = false)]
impl Atomic1 {
    #[zbus(out_args("value"))]
    async fn add(
        &self,
        name: &str,
        delta: i64,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<i64> {
        now::<atomic::Add>(&self.0, &h, c, (name, delta)).await
    }

    #[zbus(out_args("value"))]
    async fn load(
        &self,
        name: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<i64> {
        now::<atomic::Load>(&self.0, &h, c, (name,)).await
    }

    async fn store(
        &self,
        name: &str,
        value: i64,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<()> {
        now::<atomic::Store>(&self.0, &h, c, (name, value)).await
    }

    #[zbus(out_args("old"))]
    async fn swap(
        &self,
        name: &str,
        value: i64,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<i64> {
        now::<atomic::Swap>(&self.0, &h, c, (name, value)).await
    }

    #[zbus(out_args("swapped"))]
    async fn compare_and_swap(
        &self,
        name: &str,
        old: i64,
        new: i64,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<bool> {
        now::<atomic::CompareAndSwap>(&self.0, &h, c, (name, old, new)).await
    }

    #[zbus(out_args("counters"))]
    async fn list(
        &self,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<Vec<(String, i64)>> {
        now::<atomic::List>(&self.0, &h, c, ()).await
    }
}

// Lock calls may wait: each runs in a task of its own.
#[interface(name = "org.ally.Locker1", introspection_docs = false)]
impl Locker1 {
    #[zbus(out_args("acquired"))]
    async fn lock(
        &self,
        name: &str,
        timeout_ms: u64,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<bool> {
        held::<locker::Lock>(&self.0, &h, c, (name, timeout_ms)).await
    }

    #[zbus(out_args("acquired"))]
    async fn r_lock(
        &self,
        name: &str,
        timeout_ms: u64,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<bool> {
        held::<locker::RLock>(&self.0, &h, c, (name, timeout_ms)).await
    }

    async fn unlock(
        &self,
        name: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<()> {
        held::<locker::Unlock>(&self.0, &h, c, (name,)).await
    }

    #[zbus(name = "RUnlock")]
    async fn r_unlock(
        &self,
        name: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<()> {
        held::<locker::RUnlock>(&self.0, &h, c, (name,)).await
    }

    #[zbus(out_args("holders", "waiters"))]
    async fn queues(
        &self,
        name: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<(Vec<QueueEntry>, Vec<QueueEntry>)> {
        now::<locker::Queues>(&self.0, &h, c, (name,)).await
    }

    #[zbus(out_args("names"))]
    async fn names(
        &self,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<Vec<String>> {
        now::<locker::Names>(&self.0, &h, c, ()).await
    }

    #[zbus(out_args("released"))]
    async fn force_unlock(
        &self,
        name: &str,
        #[zbus(header)] h: Header<'_>,
        #[zbus(connection)] c: &Connection,
    ) -> Result<u32> {
        now::<locker::ForceUnlock>(&self.0, &h, c, (name,)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Broker;
    use crate::config::Config;
    use crate::dbus::broker1::Peer;
    use crate::dbus::peer::Identity;
    use ally_core::state::calls::{ATOMIC, CACHE, LOCKER, disagreements};
    use zbus::object_server::Interface;

    fn served(interface: &dyn Interface) -> String {
        let mut xml = String::new();
        interface.introspect_to_writer(&mut xml, 0);
        xml
    }

    /// A shim missing here, or one that differs from its entry, fails this (and
    /// `tests/dbus.rs` checks the same against a live broker and `dbus/*.xml`).
    #[test]
    fn every_entry_of_the_table_is_served_as_it_says() {
        let config = Config::defaults(vec!["/bin/true".into()]);
        let run_as = crate::identity::RunAs::resolve(&config).expect("our own ids");
        let broker = Broker::new(
            "shims",
            config,
            run_as,
            "unix:path=/nonexistent".into(),
            String::new(),
        )
        .expect("a broker without listeners");
        let access = Access::new(broker, Peer::private(Identity::uid_only(0), 1));
        let interfaces: [(&str, Box<dyn Interface>); 3] = [
            (CACHE, Box::new(Cache1::new(access.clone()))),
            (ATOMIC, Box::new(Atomic1::new(access.clone()))),
            (LOCKER, Box::new(Locker1::new(access))),
        ];
        for (name, interface) in interfaces {
            assert_eq!(
                disagreements(name, &served(&*interface)),
                Vec::<String>::new()
            );
        }
    }
}
