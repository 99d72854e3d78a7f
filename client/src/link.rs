//! The D-Bus connection to the broker, opened again when it breaks.
//!
//! Every call goes through [`Link::call`]: a connection known to be closed (the
//! broker re-executed itself or restarted while the client was idle) is replaced
//! before the call is sent; a call the connection breaks under is repeated once on a
//! new one when [`crate::reconnect`] says that is harmless, and otherwise fails with
//! [`ErrorKind::Disconnected`](crate::ErrorKind::Disconnected).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ally_core::proxy::{self, BrokerProxy, StateProxies};

use crate::error::{Error, Result};
use crate::reconnect::{self, Backoff, Method};

/// One connection to the broker and the proxies on it.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) broker: BrokerProxy<'static>,
    pub(crate) state: StateProxies,
}

impl Session {
    async fn open(address: &str, app: Option<&str>) -> zbus::Result<Session> {
        let broker = proxy::connect(address, app).await?;
        let state = StateProxies::on(broker.inner().connection(), app).await?;
        Ok(Session { broker, state })
    }

    fn is_closed(&self) -> bool {
        self.broker.inner().connection().is_closed()
    }
}

/// The broker's address and the connection to it now.
#[derive(Debug)]
pub(crate) struct Link {
    address: String,
    app: Option<String>,
    timeout: Duration,
    session: Mutex<Arc<Session>>,
    /// One reconnection at a time; the calls behind it take its outcome.
    reconnecting: tokio::sync::Mutex<()>,
    /// When reconnecting last gave up, and why.
    gave_up: Mutex<Option<(Instant, String)>>,
}

impl Link {
    /// Connects once: a broker that is not there now is an error of `connect`.
    pub(crate) async fn connect(
        address: &str,
        app: Option<&str>,
        timeout: Duration,
    ) -> Result<Link> {
        let session = Session::open(address, app).await.map_err(|e| {
            Error::transport(format!("cannot connect to the broker at {address}"), e)
        })?;
        Ok(Link {
            address: address.to_string(),
            app: app.map(str::to_string),
            timeout,
            session: Mutex::new(Arc::new(session)),
            reconnecting: tokio::sync::Mutex::new(()),
            gave_up: Mutex::new(None),
        })
    }

    /// Makes a call with `f` on the connection, repeating it on a new one if the
    /// connection breaks and [`Method::may_repeat`] allows.
    pub(crate) async fn call<T, F, Fut>(&self, method: Method, f: F) -> Result<T>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: Future<Output = zbus::Result<T>>,
    {
        let session = self.current();
        let session = if session.is_closed() {
            self.reconnect(&session, method).await?
        } else {
            session
        };
        let broke = match f(session.clone()).await {
            Err(e) => match reconnect::zbus_broke(&e) {
                Some(broke) => broke,
                None => return Err(Error::call(method.member, e)),
            },
            Ok(reply) => return Ok(reply),
        };
        if !method.may_repeat(broke) {
            return Err(Error::disconnected(reconnect::not_repeated(method.member)));
        }
        let session = self.reconnect(&session, method).await?;
        f(session)
            .await
            .map_err(|e| match reconnect::zbus_broke(&e) {
                Some(_) => Error::disconnected(reconnect::not_repeated(method.member)),
                None => Error::call(method.member, e),
            })
    }

    fn current(&self) -> Arc<Session> {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A connection other than `broken`: another caller's new one, or one opened now,
    /// trying with back-off for up to the timeout.
    async fn reconnect(&self, broken: &Arc<Session>, method: Method) -> Result<Arc<Session>> {
        let asked = Instant::now();
        let _one = self.reconnecting.lock().await;
        let current = self.current();
        if !Arc::ptr_eq(&current, broken) && !current.is_closed() {
            return Ok(current);
        }
        let failed =
            |why: String| Error::disconnected(reconnect::reconnect_failed(method.member, why));
        if let Some((when, why)) = &*self.gave_up.lock().unwrap_or_else(|p| p.into_inner())
            && *when >= asked
        {
            // Given up while this call waited its turn: not a whole timeout more.
            return Err(failed(why.clone()));
        }
        let mut backoff = Backoff::new(Instant::now(), self.timeout);
        loop {
            let left = backoff.remaining(Instant::now());
            let last = match self.open_within(left).await {
                Ok(session) => {
                    let session = Arc::new(session);
                    *self.session.lock().unwrap_or_else(|p| p.into_inner()) = session.clone();
                    return Ok(session);
                }
                Err(why) => why,
            };
            match backoff.delay(Instant::now()) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    let why = reconnect::gave_up(&self.address, self.timeout, last);
                    *self.gave_up.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), why.clone()));
                    return Err(failed(why));
                }
            }
        }
    }

    /// A new connection, if one is made within `limit`; else why not.
    async fn open_within(&self, limit: Duration) -> Result<Session, String> {
        match tokio::time::timeout(limit, Session::open(&self.address, self.app.as_deref())).await {
            Ok(Ok(session)) => Ok(session),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the connection was not answered".to_string()),
        }
    }
}
