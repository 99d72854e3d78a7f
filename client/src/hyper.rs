//! Serving a hyper (or tower) service under Ally without losing a request on reload.
//!
//! ```no_run
//! use std::convert::Infallible;
//! use http_body_util::Full;
//! use hyper::body::{Bytes, Incoming};
//! use hyper::{Request, Response};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let ally = ally_client::Ally::from_env().await?;
//! let listener: tokio::net::TcpListener = ally.listen("0.0.0.0:8080").await?;
//! ally.ready().await?;
//! let service = hyper::service::service_fn(|_: Request<Incoming>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello\n"))))
//! });
//! // Returns once the stop has come and every connection is done.
//! ally_client::hyper::serve(listener, service, ally.drain()).await?;
//! # Ok(()) }
//! ```
//!
//! [`serve`] speaks HTTP/1 and HTTP/2 (hyper-util's `auto` builder; [`serve_with`]
//! takes your own builder) and drains as [`crate::drain`] explains, each step for a
//! failure a client would otherwise see:
//!
//! 1. **Stop accepting, leave the socket open.** At the stop the listener is dropped
//!    in this process only; the broker holds the socket, so connections in its queue
//!    are accepted by the next generation instead of being refused.
//! 2. **Serve what was accepted.** A connection accepted just before the stop may not
//!    have sent its request yet; closing it then (what hyper's graceful shutdown does
//!    to a connection with nothing in flight) fails that request. It gets the drain's
//!    idle time to send it.
//! 3. **`Connection: close` on every HTTP/1 response while stopping.** A keep-alive
//!    client that keeps sending is told, on its very next response, to move to a new
//!    connection, which the next generation accepts; it never sees a closed socket.
//!    (To an HTTP/1.0 keep-alive client, as `ab -k` is, the response goes out as
//!    HTTP/1.0 so that hyper closes it as told.)
//! 4. **Close an idle keep-alive connection only after it stayed idle.** A connection
//!    is shut down gracefully once it has read nothing for [`Drain::idle`] after the
//!    stop, never the instant the stop comes: a client may be sending its next request
//!    at that instant. What remains is HTTP/1.1's own race, present without any
//!    reload: a client that sends on a connection idle that long just as the server
//!    closes it sees the close.
//! 5. **HTTP/2: `GOAWAY`.** An HTTP/2 connection is shut down gracefully as soon as it
//!    has sent its preface: hyper sends `GOAWAY` (twice, a ping apart, so no stream the
//!    client opened meanwhile is refused), finishes the streams in flight, and the
//!    client opens its next stream on a new connection.
//!
//! [`CloseWhileStopping`] (a tower [`Layer`](tower_layer::Layer) and a hyper
//! [`Service`](::hyper::service::Service)) is step 3 alone, for servers that are not
//! run through [`serve`].

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::hyper::body::{Body, Incoming};
use ::hyper::{Request, Response, Version};
use http::HeaderValue;
use http::header::CONNECTION;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::drain::{self, Drain};
use crate::stop::StopHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `service` on `listener` (HTTP/1 and HTTP/2) until the stop, then drains as the
/// module docs say; returns once every connection is done.
pub async fn serve<S, B>(listener: TcpListener, service: S, drain: Drain) -> io::Result<()>
where
    S: ::hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_with(Builder::new(TokioExecutor::new()), listener, service, drain).await
}

/// [`serve`] with hyper-util's connection builder configured by you (HTTP/1 only,
/// header read timeout, HTTP/2 window sizes, ...).
pub async fn serve_with<S, B>(
    builder: Builder<TokioExecutor>,
    listener: TcpListener,
    service: S,
    drain: Drain,
) -> io::Result<()>
where
    S: ::hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = Arc::new(builder);
    let mut connections = JoinSet::new();
    let mut stopped = pin!(drain.stopped());
    loop {
        tokio::select! {
            biased;
            () = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (builder, service, drain) = (builder.clone(), service.clone(), drain.clone());
                    connections.spawn(serve_connection(builder, stream, service, drain));
                }
                Err(e) => pause_after_accept_error(&e).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Step 1: this process stops accepting; the broker keeps the socket.
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn serve_connection<S, B>(
    builder: Arc<Builder<TokioExecutor>>,
    stream: TcpStream,
    service: S,
    drain: Drain,
) where
    S: ::hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let _ = stream.set_nodelay(true);
    let (stream, activity) = drain::track(stream);
    let service = CloseWhileStopping::new(service, drain.stop_handle().clone());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut conn = pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = drain.connection_done(&activity) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// Out of file descriptors and the like: wait rather than spin. A connection that was
/// reset before it was accepted is no reason to wait.
pub(crate) async fn pause_after_accept_error(e: &io::Error) {
    use io::ErrorKind::*;
    if !matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A service whose HTTP/1 responses say `Connection: close` once the stop is requested
/// (step 3 of the module docs), as a hyper service and as a tower service; its
/// [`CloseWhileStoppingLayer`] wraps a tower stack (`Router::layer` in axum).
#[derive(Debug, Clone)]
pub struct CloseWhileStopping<S> {
    inner: S,
    stop: StopHandle,
}

impl<S> CloseWhileStopping<S> {
    pub fn new(inner: S, stop: StopHandle) -> Self {
        CloseWhileStopping { inner, stop }
    }
}

/// The tower layer of [`CloseWhileStopping`].
#[derive(Debug, Clone)]
pub struct CloseWhileStoppingLayer {
    stop: StopHandle,
}

impl CloseWhileStoppingLayer {
    pub fn new(stop: StopHandle) -> Self {
        CloseWhileStoppingLayer { stop }
    }
}

impl<S> tower_layer::Layer<S> for CloseWhileStoppingLayer {
    type Service = CloseWhileStopping<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CloseWhileStopping::new(inner, self.stop.clone())
    }
}

impl<S, ReqB, ResB> ::hyper::service::Service<Request<ReqB>> for CloseWhileStopping<S>
where
    S: ::hyper::service::Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = CloseFuture<S::Future>;

    fn call(&self, request: Request<ReqB>) -> Self::Future {
        let version = request.version();
        CloseFuture {
            inner: self.inner.call(request),
            stop: self.stop.clone(),
            version,
        }
    }
}

impl<S, ReqB, ResB> tower_service::Service<Request<ReqB>> for CloseWhileStopping<S>
where
    S: tower_service::Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = CloseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let version = request.version();
        CloseFuture {
            inner: self.inner.call(request),
            stop: self.stop.clone(),
            version,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`CloseWhileStopping`].
    pub struct CloseFuture<F> {
        #[pin]
        inner: F,
        stop: StopHandle,
        version: Version,
    }
}

impl<F, B, E> Future for CloseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if this.stop.is_stopping() {
            close_connection(*this.version, &mut response);
        }
        Poll::Ready(Ok(response))
    }
}

/// Makes `response` to a request of `version` close its HTTP/1 connection.
pub(crate) fn close_connection<B>(version: Version, response: &mut Response<B>) {
    match version {
        Version::HTTP_11 => {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        // To an HTTP/1.0 client that asked for keep-alive, hyper adds `keep-alive` to a
        // 1.1 response's `close`; a 1.0 response it closes as told.
        Version::HTTP_10 | Version::HTTP_09 => {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            *response.version_mut() = Version::HTTP_10;
        }
        // HTTP/2 and 3 have no `Connection` header: they are drained with GOAWAY.
        _ => {}
    }
}
