//! Graceful stop for servers that shut down through a future, such as tonic's
//! `serve_with_incoming_shutdown` (and hyper or axum servers built the same way).
//!
//! Handing such a server [`Ally::stopped`](crate::Ally::stopped) as its shutdown
//! future loses requests on a reload. The moment the future resolves the server
//! stops accepting *and* starts its graceful shutdown at once; a connection it
//! accepted a moment earlier has not finished its HTTP/2 handshake yet, and hyper
//! closes a connection still in its handshake instead of draining it. The client
//! sees `connection closed before server preface received` (the failure users of
//! the Go Ally reported with gRPC servers).
//!
//! The remedy is to separate the two steps:
//!
//! 1. stop accepting: [`incoming`] yields accepted connections until the stop is
//!    requested, then drops its listener (the broker's socket stays open, so the
//!    next generation accepts what is queued) and yields nothing more;
//! 2. settle: let the connections already accepted finish their handshake;
//! 3. shut down gracefully: [`shutdown_after`] resolves `settle` after the stop,
//!    and the server then sends `GOAWAY` and finishes the streams in flight.
//!
//! ```no_run
//! # async fn run(server: impl FnOnce(ally_client::drain::Incoming, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>)) -> ally_client::Result<()> {
//! use ally_client::drain;
//! let ally = ally_client::Ally::from_env().await?;
//! let listener = ally.tcp_listener("127.0.0.1:50051").await?;
//! ally.ready().await?;
//! let stop = ally.stop_handle();
//! let incoming = drain::incoming(listener, stop.clone());
//! let shutdown = Box::pin(drain::shutdown_after(stop, drain::DEFAULT_SETTLE));
//! // tonic::transport::Server::builder().add_service(svc)
//! //     .serve_with_incoming_shutdown(incoming, shutdown).await?;
//! server(incoming, shutdown);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::stop::StopHandle;

/// How long [`shutdown_after`] lets accepted connections settle by default: well
/// above a handshake's round trips on a loaded machine, well below any
/// `stop_timeout`.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(500);

/// Accepted connections of `listener` until `stop` is requested; see the module docs.
///
/// Accepted streams get `TCP_NODELAY`, as tonic's own listener sets by default.
/// An accept error is passed on (servers log it and go on).
pub fn incoming(listener: TcpListener, stop: StopHandle) -> Incoming {
    Incoming {
        listener: Some(listener),
        stop: Box::pin(async move { stop.stopped().await }),
    }
}

/// Resolves `settle` after `stop` is requested: the shutdown future to give a server
/// fed by [`incoming`].
pub async fn shutdown_after(stop: StopHandle, settle: Duration) {
    stop.stopped().await;
    tokio::time::sleep(settle).await;
}

/// The stream of [`incoming`].
pub struct Incoming {
    listener: Option<TcpListener>,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("accepting", &self.listener.is_some())
            .finish()
    }
}

impl Incoming {
    /// Whether it still accepts (the stop was not seen yet).
    pub fn is_accepting(&self) -> bool {
        self.listener.is_some()
    }
}

impl futures_core::Stream for Incoming {
    type Item = std::io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(listener) = &this.listener else {
            // Not the end of the stream: servers take the end for a shutdown signal.
            return Poll::Pending;
        };
        if this.stop.as_mut().poll(cx).is_ready() {
            this.listener = None;
            return Poll::Pending;
        }
        match listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => {
                let _ = stream.set_nodelay(true);
                Poll::Ready(Some(Ok(stream)))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_core::Stream;

    fn next(incoming: &mut Incoming) -> Poll<Option<std::io::Result<TcpStream>>> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(incoming).poll_next(&mut cx)
    }

    #[tokio::test]
    async fn stops_accepting_on_stop_and_leaves_the_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A second handle on the same socket stands for the next generation.
        let other = socket2::SockRef::from(&listener).try_clone().unwrap();
        let stop = StopHandle::new();
        let mut incoming = incoming(listener, stop.clone());

        let _a = std::net::TcpStream::connect(addr).unwrap();
        let mut got = None;
        for _ in 0..200 {
            if let Poll::Ready(item) = next(&mut incoming) {
                got = item;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(got.unwrap().unwrap().nodelay().unwrap());

        stop.stop();
        let _b = std::net::TcpStream::connect(addr).unwrap();
        assert!(next(&mut incoming).is_pending());
        assert!(!incoming.is_accepting());
        // The connection stayed in the shared queue for the other holder.
        other.set_nonblocking(false).unwrap();
        let (queued, _) = other.accept().unwrap();
        drop(queued);
    }

    #[tokio::test]
    async fn shutdown_waits_for_stop_then_settle() {
        let stop = StopHandle::new();
        let task = tokio::spawn(shutdown_after(stop.clone(), Duration::from_millis(300)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!task.is_finished());
        let stopped = std::time::Instant::now();
        stop.stop();
        task.await.unwrap();
        let waited = stopped.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
    }
}
