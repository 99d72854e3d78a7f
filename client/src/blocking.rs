//! The client for programs without an async runtime.
//!
//! [`Ally`] owns a small private Tokio runtime (one worker thread) that carries the D-Bus
//! connection and the stop-signal handler; every method blocks the calling thread until
//! done. Do not use it from inside an async runtime: use [`crate::Ally`] there.
//!
//! Listeners are std types. They may be in non-blocking mode because another
//! generation's async code shares them: accept with [`crate::stdnet`].

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::stop::StopHandle;
use crate::{FromSharedStd, ListenOptions, Queues, Status};

/// Blocking twin of [`crate::Ally`].
#[derive(Debug)]
pub struct Ally {
    inner: crate::Ally,
    // Dropped last: the connection's tasks run on it.
    runtime: tokio::runtime::Runtime,
}

impl Ally {
    /// See [`crate::Ally::from_env`].
    pub fn from_env() -> Result<Ally> {
        Ally::start(crate::Ally::from_env())
    }

    /// See [`crate::Ally::connect`].
    pub fn connect(address: &str) -> Result<Ally> {
        Ally::start(crate::Ally::connect(address))
    }

    /// See [`crate::Ally::connect_with`].
    pub fn connect_with(address: &str, state_socket: crate::StateSocket) -> Result<Ally> {
        Ally::start(crate::Ally::connect_with(address, state_socket))
    }

    /// See [`crate::Ally::simulate`].
    pub fn simulate() -> Result<Ally> {
        Ally::start(crate::Ally::simulate())
    }

    pub(crate) fn simulate_on(simulation: &crate::Simulation) -> Result<Ally> {
        let simulation = simulation.clone();
        Ally::start(async move { crate::Ally::simulate_on(&simulation).await })
    }

    fn start(make: impl Future<Output = Result<crate::Ally>>) -> Result<Ally> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ally-client")
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the ally-client runtime", e))?;
        let inner = runtime.block_on(make)?;
        Ok(Ally { inner, runtime })
    }

    /// The async client this one wraps.
    pub fn as_async(&self) -> &crate::Ally {
        &self.inner
    }

    pub fn is_managed(&self) -> bool {
        self.inner.is_managed()
    }

    pub fn app(&self) -> &str {
        self.inner.app()
    }

    pub fn instance(&self) -> u64 {
        self.inner.instance()
    }

    pub fn generation(&self) -> u64 {
        self.inner.generation()
    }

    /// A handle on the stop request; [`StopHandle::wait`] blocks until it comes.
    pub fn stop_handle(&self) -> StopHandle {
        self.inner.stop_handle()
    }

    /// See [`crate::Ally::drain`].
    pub fn drain(&self) -> crate::drain::Drain {
        self.inner.drain()
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.is_stopping()
    }

    /// Blocks until the broker asks this instance to stop.
    pub fn wait_stopped(&self) {
        self.inner.stop_handle().wait()
    }

    /// See [`crate::Ally::listen`]; the types are std's:
    /// `ally.listen::<std::net::TcpListener>("127.0.0.1:8080")`.
    pub fn listen<L: FromSharedStd>(&self, address: &str) -> Result<L> {
        self.runtime.block_on(self.inner.listen(address))
    }

    /// See [`crate::Ally::listen_with`].
    pub fn listen_with<L: FromSharedStd>(
        &self,
        address: &str,
        options: &ListenOptions,
    ) -> Result<L> {
        self.runtime
            .block_on(self.inner.listen_with(address, options))
    }

    pub fn close(&self, network: &str, address: &str) -> Result<()> {
        self.runtime.block_on(self.inner.close(network, address))
    }

    pub fn ready(&self) -> Result<()> {
        self.runtime.block_on(self.inner.ready())
    }

    /// See [`crate::Ally::report`].
    pub fn report(&self, report: crate::Report) -> Result<()> {
        self.runtime.block_on(self.inner.report(report))
    }

    pub fn reported(&self) -> crate::Report {
        self.inner.reported()
    }

    /// See [`crate::Ally::task`]: counts are sent by this client's runtime.
    pub fn task(&self) -> crate::Task {
        self.inner.task()
    }

    pub fn set_tasks(&self, tasks: u32) {
        self.inner.set_tasks(tasks)
    }

    pub fn tasks(&self) -> u32 {
        self.inner.tasks()
    }

    pub fn reload(&self) -> Result<u64> {
        self.runtime.block_on(self.inner.reload())
    }

    pub fn status(&self) -> Result<Status> {
        self.runtime.block_on(self.inner.status())
    }
}

impl Ally {
    /// See [`crate::Ally::cache`].
    pub fn cache(&self, namespace: &str) -> Cache<'_> {
        Cache {
            inner: self.inner.cache(namespace),
            runtime: &self.runtime,
        }
    }

    /// See [`crate::Ally::atomic`].
    pub fn atomic(&self, name: &str) -> Atomic<'_> {
        Atomic {
            inner: self.inner.atomic(name),
            runtime: &self.runtime,
        }
    }

    /// See [`crate::Ally::locker`].
    pub fn locker(&self) -> Locker<'_> {
        Locker {
            inner: self.inner.locker(),
            runtime: &self.runtime,
        }
    }
}

/// `block_on` for cache and counter calls, whose state-socket I/O then happens on
/// this thread (see `crate::direct`).
fn run<F: Future>(runtime: &tokio::runtime::Runtime, call: F) -> F::Output {
    crate::direct::blocking_io(|| runtime.block_on(call))
}

/// Blocking twin of [`crate::Cache`].
#[derive(Debug)]
pub struct Cache<'a> {
    inner: crate::Cache,
    runtime: &'a tokio::runtime::Runtime,
}

impl Cache<'_> {
    pub fn set(&self, key: &str, value: impl AsRef<[u8]>, ttl: Option<Duration>) -> Result<()> {
        run(self.runtime, self.inner.set(key, value, ttl))
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        run(self.runtime, self.inner.get(key))
    }

    pub fn get_string(&self, key: &str) -> Result<Option<String>> {
        run(self.runtime, self.inner.get_string(key))
    }

    pub fn set_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<()> {
        run(self.runtime, self.inner.set_json(key, value, ttl))
    }

    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        run(self.runtime, self.inner.get_json(key))
    }

    pub fn delete(&self, key: &str) -> Result<bool> {
        run(self.runtime, self.inner.delete(key))
    }

    pub fn exists(&self, key: &str) -> Result<bool> {
        run(self.runtime, self.inner.exists(key))
    }

    pub fn keys(&self) -> Result<Vec<String>> {
        run(self.runtime, self.inner.keys())
    }

    pub fn count(&self) -> Result<u64> {
        run(self.runtime, self.inner.count())
    }

    pub fn flush(&self) -> Result<u64> {
        run(self.runtime, self.inner.flush())
    }

    pub fn set_if_absent(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        run(self.runtime, self.inner.set_if_absent(key, value, ttl))
    }

    pub fn compare_and_swap(
        &self,
        key: &str,
        old: impl AsRef<[u8]>,
        new: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        run(
            self.runtime,
            self.inner.compare_and_swap(key, old, new, ttl),
        )
    }
}

/// Blocking twin of [`crate::Atomic`].
#[derive(Debug)]
pub struct Atomic<'a> {
    inner: crate::Atomic,
    runtime: &'a tokio::runtime::Runtime,
}

impl Atomic<'_> {
    pub fn add(&self, delta: i64) -> Result<i64> {
        run(self.runtime, self.inner.add(delta))
    }

    pub fn load(&self) -> Result<i64> {
        run(self.runtime, self.inner.load())
    }

    pub fn store(&self, value: i64) -> Result<()> {
        run(self.runtime, self.inner.store(value))
    }

    pub fn swap(&self, value: i64) -> Result<i64> {
        run(self.runtime, self.inner.swap(value))
    }

    pub fn compare_and_swap(&self, old: i64, new: i64) -> Result<bool> {
        run(self.runtime, self.inner.compare_and_swap(old, new))
    }
}

/// Blocking twin of [`crate::Locker`].
#[derive(Debug)]
pub struct Locker<'a> {
    inner: crate::Locker,
    runtime: &'a tokio::runtime::Runtime,
}

impl<'a> Locker<'a> {
    fn guard(&self, guard: crate::LockGuard) -> LockGuard<'a> {
        LockGuard {
            inner: Some(guard),
            runtime: self.runtime,
        }
    }

    pub fn lock(&self, name: &str, timeout: Option<Duration>) -> Result<LockGuard<'a>> {
        let g = self.runtime.block_on(self.inner.lock(name, timeout))?;
        Ok(self.guard(g))
    }

    pub fn rlock(&self, name: &str, timeout: Option<Duration>) -> Result<LockGuard<'a>> {
        let g = self.runtime.block_on(self.inner.rlock(name, timeout))?;
        Ok(self.guard(g))
    }

    pub fn try_lock(&self, name: &str) -> Result<Option<LockGuard<'a>>> {
        let g = self.runtime.block_on(self.inner.try_lock(name))?;
        Ok(g.map(|g| self.guard(g)))
    }

    pub fn try_rlock(&self, name: &str) -> Result<Option<LockGuard<'a>>> {
        let g = self.runtime.block_on(self.inner.try_rlock(name))?;
        Ok(g.map(|g| self.guard(g)))
    }

    pub fn unlock(&self, name: &str) -> Result<()> {
        self.runtime.block_on(self.inner.unlock(name))
    }

    pub fn runlock(&self, name: &str) -> Result<()> {
        self.runtime.block_on(self.inner.runlock(name))
    }

    pub fn queues(&self, name: &str) -> Result<Queues> {
        self.runtime.block_on(self.inner.queues(name))
    }
}

/// A held lock, released (synchronously) when dropped.
#[derive(Debug)]
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard<'a> {
    inner: Option<crate::LockGuard>,
    runtime: &'a tokio::runtime::Runtime,
}

impl LockGuard<'_> {
    pub fn name(&self) -> &str {
        self.inner.as_ref().map_or("", |g| g.name())
    }

    /// Releases the lock now, reporting errors.
    pub fn unlock(mut self) -> Result<()> {
        match self.inner.take() {
            Some(g) => self.runtime.block_on(g.unlock()),
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.inner.take() {
            let _ = self.runtime.block_on(g.unlock());
        }
    }
}
