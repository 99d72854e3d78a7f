//! Serving an axum app under Ally without losing a request on reload.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let ally = ally_client::Ally::from_env().await?;
//! let listener: tokio::net::TcpListener = ally.listen("0.0.0.0:8080").await?;
//! let app = Router::new().route("/", get(|| async { "hello\n" }));
//! ally.ready().await?;
//! // Returns once the stop has come and every connection is done.
//! ally_client::axum::serve(listener, app, ally.drain()).await?;
//! # Ok(()) }
//! ```
//!
//! Why not `axum::serve(listener, app).with_graceful_shutdown(ally.stopped())`? It
//! compiles, but every reload then fails some requests of clients that do not retry:
//! the moment the stop comes, hyper closes the connections it accepted whose request
//! has not arrived yet, and every idle keep-alive connection on which a client may be
//! sending its next request at that very moment. [`serve`] is `axum::serve` with the
//! three things that make the drain lossless (see [`crate::hyper`] for each step):
//!
//! * a [`Listener`] that stops accepting at the stop and closes nothing the broker
//!   shares (the next generation accepts what is queued);
//! * [`CloseWhileStoppingLayer`] on the router: while stopping, every HTTP/1 response
//!   says `Connection: close`, so a client that keeps sending moves to a new
//!   connection on its next request;
//! * the graceful shutdown only [`Drain::idle`] after the stop ([`Drain::idled`]): by
//!   then the connections still open have been idle that long, and the accepted ones
//!   have had that long to send their request.
//!
//! An app that needs `axum::serve` itself (connection info, its own make-service) writes
//! the same three pieces out:
//!
//! ```no_run
//! # use axum::{Router, extract::ConnectInfo, routing::get};
//! # use std::net::SocketAddr;
//! # async fn run(app: Router) -> Result<(), Box<dyn std::error::Error>> {
//! let ally = ally_client::Ally::from_env().await?;
//! let drain = ally.drain();
//! let listener = ally_client::axum::Listener::new(ally.listen("0.0.0.0:8080").await?, &drain);
//! let app = app.layer(ally_client::axum::CloseWhileStoppingLayer::new(drain.stop_handle().clone()));
//! ally.ready().await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
//!     .with_graceful_shutdown(drain.idled())
//!     .await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use axum::Router;
use tokio::net::{TcpListener, TcpStream};

use crate::drain::Drain;
pub use crate::hyper::{CloseWhileStopping, CloseWhileStoppingLayer};

/// Serves `app` on `listener` until the stop, then drains losing nothing; returns once
/// every connection is done. See the module docs.
pub async fn serve(listener: TcpListener, app: Router, drain: Drain) -> io::Result<()> {
    let listener = Listener::new(listener, &drain);
    let app = app.layer(CloseWhileStoppingLayer::new(drain.stop_handle().clone()));
    axum::serve(listener, app)
        .with_graceful_shutdown(drain.idled())
        .await
}

/// Ally's listener for `axum::serve`: accepts until the stop, then drops its socket (the
/// broker keeps it for the next generation) and accepts nothing more.
pub struct Listener {
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local_addr", &self.local_addr)
            .field("accepting", &self.listener.is_some())
            .finish()
    }
}

impl Listener {
    /// Wraps `listener`, which stops accepting when `drain`'s stop comes.
    ///
    /// # Panics
    ///
    /// If `listener` has no local address (it always has, once bound).
    pub fn new(listener: TcpListener, drain: &Drain) -> Listener {
        let local_addr = listener
            .local_addr()
            .expect("a bound TCP listener has a local address");
        Listener {
            listener: Some(listener),
            local_addr,
            stopped: Box::pin(drain.stopped()),
        }
    }

    /// Whether it still accepts (the stop was not seen yet).
    pub fn is_accepting(&self) -> bool {
        self.listener.is_some()
    }
}

impl axum::serve::Listener for Listener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some(listener) = &self.listener else {
                return std::future::pending().await;
            };
            tokio::select! {
                biased;
                () = self.stopped.as_mut() => self.listener = None,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let _ = stream.set_nodelay(true);
                        return (stream, addr);
                    }
                    Err(e) => crate::hyper::pause_after_accept_error(&e).await,
                },
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StopHandle;
    use axum::serve::Listener as _;
    use std::time::Duration;

    #[tokio::test]
    async fn stops_accepting_at_the_stop_and_leaves_the_queue() {
        let tokio_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tokio_listener.local_addr().unwrap();
        // A second handle on the same socket stands for the next generation.
        let other = socket2::SockRef::from(&tokio_listener).try_clone().unwrap();
        let stop = StopHandle::new();
        let drain = Drain::new(stop.clone());
        let mut listener = Listener::new(tokio_listener, &drain);

        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_, peer) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap();
        assert_eq!(peer.ip(), addr.ip());

        stop.stop();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let more = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(more.is_err(), "accepted after the stop");
        assert!(!listener.is_accepting());
        assert_eq!(listener.local_addr().unwrap(), addr);
        other.set_nonblocking(false).unwrap();
        let (queued, _) = other.accept().unwrap();
        drop(queued);
    }
}
