//! Shared state for the app's instances: [`Cache`], [`Atomic`] counters and [`Locker`]
//! read/write locks, kept by the broker so it survives reloads and crashes.
//!
//! In simulate mode the same stores (the very same code, `ally_core::state`) live in the
//! process: every [`Ally`] of a [`Simulation`] shares them, each `Ally` acting as one
//! lock owner, like one connection to a broker.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use zbus::wire::{DynamicType, Type};

use crate::Ally;
use crate::direct::{ATOMIC, CACHE, Direct};
use crate::error::{Error, ErrorKind, Result};
use ally_core::proxy::{QueueEntry, StateProxies, WAIT_FOREVER};
use ally_core::state::{Limits, Mode, SharedStore, StateError};

/// Where the state lives for one [`Ally`].
#[derive(Debug)]
pub(crate) enum Backend {
    Broker {
        proxies: StateProxies,
        /// The state socket, for cache and counter calls.
        direct: Option<Direct>,
    },
    Simulated {
        store: Arc<SharedStore>,
        /// This client's lock owner and connection number.
        owner: u64,
    },
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Like a connection to the broker closing.
        if let Backend::Simulated { store, owner } = self {
            store.release_conn(*owner);
        }
    }
}

/// A simulated broker's state: [`Simulation::ally`] makes clients that share it.
/// [`Ally::simulate`] uses one for the whole process.
#[derive(Debug, Clone)]
pub struct Simulation {
    store: Arc<SharedStore>,
}

impl Default for Simulation {
    fn default() -> Self {
        Simulation::new(Limits::default())
    }
}

impl Simulation {
    /// Fresh, empty state with these limits (the broker's defaults with `Limits::default()`).
    pub fn new(limits: Limits) -> Simulation {
        Simulation {
            store: Arc::new(SharedStore::new(limits)),
        }
    }

    /// The process-wide simulation [`Ally::simulate`] uses.
    pub fn process() -> Simulation {
        static PROCESS: OnceLock<Simulation> = OnceLock::new();
        PROCESS.get_or_init(Simulation::default).clone()
    }

    /// A simulate-mode client on this state (see [`Ally::simulate`]).
    pub async fn ally(&self) -> Result<Ally> {
        Ally::simulate_on(self).await
    }

    /// A blocking simulate-mode client on this state. Not from inside an async runtime.
    pub fn blocking_ally(&self) -> Result<crate::blocking::Ally> {
        crate::blocking::Ally::simulate_on(self)
    }

    pub(crate) fn backend(&self) -> Backend {
        static NEXT_OWNER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Backend::Simulated {
            store: self.store.clone(),
            owner: ally_core::proxy::CONNECTION_OWNER
                + NEXT_OWNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

fn local(e: StateError) -> Error {
    ally_core::Error::from(e).into()
}

/// A TTL on the wire: 0 is none; anything shorter than a millisecond is one.
fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

fn timeout_ms(timeout: Option<Duration>) -> u64 {
    timeout.map_or(WAIT_FOREVER, |d| {
        u64::try_from(d.as_millis())
            .unwrap_or(WAIT_FOREVER - 1)
            .min(WAIT_FOREVER - 1)
    })
}

/// A cache or counter call: to the broker (its state socket if it can, else the D-Bus
/// connection), or to the simulated store.
macro_rules! call {
    ($ally:expr, $interface:expr, $method:literal, ($($arg:expr),*) -> $ret:ty, |$s:ident, $now:ident| $sim:expr) => {
        match $ally.backend() {
            Backend::Broker { proxies, direct } => {
                remote::<_, $ret>(proxies, direct.as_ref(), $interface, $method, &($($arg,)*)).await
            }
            Backend::Simulated { store, .. } => store.with(|$s, $now| {
                let _ = $now;
                $sim.map_err(local)
            }),
        }
    };
}

async fn remote<B, R>(
    proxies: &StateProxies,
    direct: Option<&Direct>,
    interface: &'static str,
    method: &'static str,
    body: &B,
) -> Result<R>
where
    B: Serialize + DynamicType,
    R: DeserializeOwned + Type,
{
    if let Some(direct) = direct
        && let Some(result) = direct.call(interface, method, body).await
    {
        return result;
    }
    let proxy = if interface == CACHE {
        proxies.cache.inner()
    } else {
        proxies.atomic.inner()
    };
    let reply = proxy
        .call_method(method, body)
        .await
        .map_err(|e| Error::call(method, e))?;
    reply
        .body()
        .deserialize::<R>()
        .map_err(|e| Error::call(method, e))
}

/// One namespace of the cache: [`Ally::cache`].
#[derive(Debug, Clone)]
pub struct Cache {
    ally: Ally,
    namespace: String,
}

impl Cache {
    pub(crate) fn new(ally: Ally, namespace: &str) -> Cache {
        Cache {
            ally,
            namespace: namespace.to_string(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Stores `value` under `key`, replacing any value; `ttl` `None` never expires.
    pub async fn set(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let (ns, value, ttl) = (&self.namespace, value.as_ref(), ttl_ms(ttl));
        call!(
            self.ally,
            CACHE,
            "Set",
            (ns, key, value, ttl) -> (),
            |s, now| s.cache.set(ns, key, value.to_vec(), ttl, now)
        )
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let ns = &self.namespace;
        let found = call!(
            self.ally,
            CACHE,
            "Get",
            (ns, key) -> (bool, Vec<u8>),
            |s, now| s.cache.get(ns, key, now).map(|v| (v.is_some(), v.unwrap_or_default()))
        )?;
        Ok(found.0.then_some(found.1))
    }

    /// [`get`](Self::get) as UTF-8; a value that is not is `InvalidArgument`.
    pub async fn get_string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(bytes) => String::from_utf8(bytes).map(Some).map_err(|_| {
                Error::local(
                    ErrorKind::InvalidArgument,
                    format!("{}/{key} is not UTF-8", self.namespace),
                )
            }),
        }
    }

    /// Stores `value` as JSON.
    pub async fn set_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.set(key, to_json(value)?, ttl).await
    }

    /// Reads a JSON value; one that does not parse as `T` is `InvalidArgument`.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::local(
                    ErrorKind::InvalidArgument,
                    format!("{}/{key} is not the JSON expected: {e}", self.namespace),
                )
            }),
        }
    }

    /// Removes `key`; whether it was there.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let ns = &self.namespace;
        call!(
            self.ally,
            CACHE,
            "Delete",
            (ns, key) -> bool,
            |s, now| s.cache.delete(ns, key, now)
        )
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        let ns = &self.namespace;
        call!(
            self.ally,
            CACHE,
            "Exists",
            (ns, key) -> bool,
            |s, now| s.cache.exists(ns, key, now)
        )
    }

    /// The live keys, sorted.
    pub async fn keys(&self) -> Result<Vec<String>> {
        let ns = &self.namespace;
        call!(self.ally, CACHE, "Keys", (ns) -> Vec<String>, |s, now| s
            .cache
            .keys(ns, now))
    }

    pub async fn count(&self) -> Result<u64> {
        let ns = &self.namespace;
        call!(self.ally, CACHE, "Count", (ns) -> u64, |s, now| s
            .cache
            .count(ns, now))
    }

    /// Removes every key of the namespace; how many there were.
    pub async fn flush(&self) -> Result<u64> {
        let ns = &self.namespace;
        call!(self.ally, CACHE, "Flush", (ns) -> u64, |s, now| s
            .cache
            .flush(ns, now))
    }

    /// Stores `value` only if `key` is absent; whether it did.
    pub async fn set_if_absent(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let (ns, value, ttl) = (&self.namespace, value.as_ref(), ttl_ms(ttl));
        call!(
            self.ally,
            CACHE,
            "SetIfAbsent",
            (ns, key, value, ttl) -> bool,
            |s, now| s.cache.set_if_absent(ns, key, value.to_vec(), ttl, now)
        )
    }

    /// Replaces the value with `new` (and its TTL with `ttl`) only if it is `old`;
    /// whether it did. An absent key never matches.
    pub async fn compare_and_swap(
        &self,
        key: &str,
        old: impl AsRef<[u8]>,
        new: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let (ns, old, new, ttl) = (&self.namespace, old.as_ref(), new.as_ref(), ttl_ms(ttl));
        call!(
            self.ally,
            CACHE,
            "CompareAndSwap",
            (ns, key, old, new, ttl) -> bool,
            |s, now| s
                .cache
                .compare_and_swap(ns, key, old, new.to_vec(), ttl, now)
        )
    }
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| {
        Error::local(
            ErrorKind::InvalidArgument,
            format!("cannot encode JSON: {e}"),
        )
    })
}

/// A named i64 counter: [`Ally::atomic`]. Starts at 0; arithmetic wraps on overflow.
#[derive(Debug, Clone)]
pub struct Atomic {
    ally: Ally,
    name: String,
}

impl Atomic {
    pub(crate) fn new(ally: Ally, name: &str) -> Atomic {
        Atomic {
            ally,
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds `delta` (wrapping); the new value.
    pub async fn add(&self, delta: i64) -> Result<i64> {
        let n = &self.name;
        call!(self.ally, ATOMIC, "Add", (n, delta) -> i64, |s, now| s
            .atomics
            .add(n, delta))
    }

    pub async fn load(&self) -> Result<i64> {
        let n = &self.name;
        call!(self.ally, ATOMIC, "Load", (n) -> i64, |s, now| s
            .atomics
            .load(n))
    }

    pub async fn store(&self, value: i64) -> Result<()> {
        let n = &self.name;
        call!(
            self.ally,
            ATOMIC,
            "Store",
            (n, value) -> (),
            |s, now| s.atomics.store(n, value)
        )
    }

    /// Stores `value`; the previous value.
    pub async fn swap(&self, value: i64) -> Result<i64> {
        let n = &self.name;
        call!(self.ally, ATOMIC, "Swap", (n, value) -> i64, |s, now| s
            .atomics
            .swap(n, value))
    }

    /// Stores `new` if the value is `old`; whether it did.
    pub async fn compare_and_swap(&self, old: i64, new: i64) -> Result<bool> {
        let n = &self.name;
        call!(
            self.ally,
            ATOMIC,
            "CompareAndSwap",
            (n, old, new) -> bool,
            |s, now| s.atomics.compare_and_swap(n, old, new)
        )
    }
}

/// Holders and waiters of a lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Queues {
    /// In the order they were granted.
    pub holders: Vec<QueueEntry>,
    /// In the order they will be granted.
    pub waiters: Vec<QueueEntry>,
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
        match self.ally.backend() {
            Backend::Broker { proxies: p, .. } => {
                let ms = timeout_ms(timeout);
                match mode {
                    Mode::Write => p
                        .locker
                        .lock(name, ms)
                        .await
                        .map_err(|e| Error::call("Lock", e)),
                    Mode::Read => p
                        .locker
                        .rlock(name, ms)
                        .await
                        .map_err(|e| Error::call("RLock", e)),
                }
            }
            Backend::Simulated { store, owner } => store
                .lock(name, *owner, *owner, mode, timeout)
                .await
                .map_err(local),
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
        match self.ally.backend() {
            Backend::Broker { proxies: p, .. } => match mode {
                Mode::Write => p
                    .locker
                    .unlock(name)
                    .await
                    .map_err(|e| Error::call("Unlock", e)),
                Mode::Read => p
                    .locker
                    .runlock(name)
                    .await
                    .map_err(|e| Error::call("RUnlock", e)),
            },
            Backend::Simulated { store, owner } => store.unlock(name, *owner, mode).map_err(local),
        }
    }

    /// Who holds `name` and who waits for it.
    pub async fn queues(&self, name: &str) -> Result<Queues> {
        match self.ally.backend() {
            Backend::Broker { proxies: p, .. } => {
                let (holders, waiters) = p
                    .locker
                    .queues(name)
                    .await
                    .map_err(|e| Error::call("Queues", e))?;
                Ok(Queues { holders, waiters })
            }
            Backend::Simulated { store, .. } => {
                let (holders, waiters) = store.with(|s, _| s.locker.queues(name)).map_err(local)?;
                let now = std::time::Instant::now();
                let entries = |holds: Vec<ally_core::state::Hold>| {
                    holds
                        .into_iter()
                        .map(|h| QueueEntry {
                            owner: h.owner,
                            mode: h.mode.as_str().to_string(),
                            for_ms: now.saturating_duration_since(h.since).as_millis() as u64,
                        })
                        .collect()
                };
                Ok(Queues {
                    holders: entries(holders),
                    waiters: entries(waiters),
                })
            }
        }
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
