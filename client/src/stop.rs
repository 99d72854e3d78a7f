//! Graceful-stop notification.

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};

/// Tells the instance it has been asked to stop (the broker's stop signal arrived).
///
/// Cloning is cheap; every clone sees the same state. Once stopping, a handle stays
/// stopping. The handle works from async code ([`stopped`](Self::stopped)) and from plain
/// threads ([`wait`](Self::wait)) alike.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<Inner>,
}

struct Inner {
    stopping: Mutex<Option<Instant>>,
    cond: Condvar,
    tx: watch::Sender<bool>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("stopping", &self.is_stopping())
            .finish()
    }
}

impl Default for StopHandle {
    fn default() -> Self {
        StopHandle::new()
    }
}

impl StopHandle {
    /// A handle that stops only when [`stop`](Self::stop) is called; [`Ally`](crate::Ally)
    /// gives out one wired to the stop signal.
    pub fn new() -> StopHandle {
        StopHandle {
            inner: Arc::new(Inner {
                stopping: Mutex::new(None),
                cond: Condvar::new(),
                tx: watch::Sender::new(false),
            }),
        }
    }

    /// Whether the stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stopping_since().is_some()
    }

    /// When the stop was requested, if it was.
    pub fn stopping_since(&self) -> Option<Instant> {
        *self
            .inner
            .stopping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Requests the stop, as the signal would: every waiter wakes up.
    pub fn stop(&self) {
        let mut stopping = self
            .inner
            .stopping
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if stopping.is_none() {
            *stopping = Some(Instant::now());
            self.inner.tx.send_replace(true);
            self.inner.cond.notify_all();
        }
    }

    /// Resolves when the stop is requested (at once if it already was).
    ///
    /// The future owns a share of the handle (it is `'static`), so it can be given to a
    /// server's shutdown hook or a spawned task.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.tx.subscribe();
        let inner = self.inner.clone();
        async move {
            // `inner` holds the sender, so this cannot fail.
            let _ = rx.wait_for(|stopping| *stopping).await;
            drop(inner);
        }
    }

    /// Blocks the calling thread until the stop is requested.
    pub fn wait(&self) {
        let guard = self
            .inner
            .stopping
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let _guard = self
            .inner
            .cond
            .wait_while(guard, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Blocks until the stop is requested or `timeout` passes; returns whether it was requested.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let guard = self
            .inner
            .stopping
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .inner
            .cond
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.is_some()
    }

    /// Catches `signals` from now on and turns each into [`stop`](Self::stop).
    ///
    /// The handlers are installed before this returns, so a signal sent right after is not
    /// lost; waiting on it happens in tasks on the current Tokio runtime.
    pub(crate) fn install(&self, signals: &[Signal]) -> Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        for &sig in signals {
            // SIGKILL and SIGSTOP cannot be caught: a broker configured with them does not
            // ask for a graceful stop at all.
            if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
                continue;
            }
            let mut stream = signal(SignalKind::from_raw(sig as i32)).map_err(|e| {
                Error::local(
                    ErrorKind::InvalidArgument,
                    format!("cannot catch the stop signal {sig}: {e}"),
                )
            })?;
            let handle = self.clone();
            tokio::spawn(async move {
                if stream.recv().await.is_some() {
                    handle.stop();
                }
                // Keep the registration so further signals are swallowed, not fatal.
                std::future::pending::<()>().await;
                drop(stream);
            });
        }
        Ok(())
    }
}

/// Reads a signal name the way the broker writes it (`SIGTERM`), also accepting `TERM`
/// and a number.
pub fn parse_signal(name: &str) -> Result<Signal> {
    let name = name.trim();
    let parsed = if let Ok(n) = name.parse::<i32>() {
        Signal::try_from(n).ok()
    } else {
        let upper = name.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        full.parse::<Signal>().ok()
    };
    parsed.ok_or_else(|| {
        Error::local(
            ErrorKind::InvalidArgument,
            format!("ALLY_STOP_SIGNAL: {name:?} is not a signal name (expected e.g. SIGTERM)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("quit").unwrap(), Signal::SIGQUIT);
        assert_eq!(parse_signal("10").unwrap(), Signal::SIGUSR1);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("").is_err());
    }

    #[test]
    fn stop_wakes_blocking_and_async_waiters() {
        let handle = StopHandle::new();
        assert!(!handle.is_stopping());
        assert!(!handle.wait_timeout(Duration::from_millis(10)));
        let waiter = {
            let h = handle.clone();
            std::thread::spawn(move || h.wait())
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let h = handle.clone();
        let async_waiter = rt.spawn(async move { h.stopped().await });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        handle.stop();
        waiter.join().unwrap();
        rt.block_on(async_waiter).unwrap();
        assert!(handle.is_stopping());
        assert!(handle.wait_timeout(Duration::ZERO));
        // Resolves at once when already stopping.
        rt.block_on(handle.stopped());
    }

    #[test]
    fn the_stop_future_outlives_its_handle() {
        fn spawnable<F: Future<Output = ()> + Send + 'static>(f: F) -> F {
            f
        }
        let handle = StopHandle::new();
        let stopped = spawnable(handle.clone().stopped());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let task = rt.spawn(stopped);
        handle.stop();
        drop(handle);
        rt.block_on(task).unwrap();
    }
}
