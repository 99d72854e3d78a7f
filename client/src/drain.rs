//! Graceful stop without losing requests.
//!
//! # Servers that shut down through a future (tonic, HTTP/2)
//!
//! Handing such a server [`Ally::stopped`](crate::Ally::stopped) as its shutdown
//! future loses requests on a reload. The moment the future resolves the server
//! stops accepting *and* shuts down every connection at once; a connection it
//! accepted a moment earlier has not sent its first request yet, the `GOAWAY` reaches
//! its client first, and the client fails the request (or, with an older hyper,
//! sees `connection closed before server preface received`: the failure users of the
//! Go Ally reported with gRPC servers).
//!
//! The remedy is to separate the steps:
//!
//! 1. stop accepting: [`incoming`] yields accepted connections until the stop is
//!    requested, then drops its listener (the broker's socket stays open, so the
//!    next generation accepts what is queued) and yields nothing more;
//! 2. settle: let the connections already accepted send their first request;
//! 3. shut down gracefully: the server sends `GOAWAY` and finishes the streams in
//!    flight.
//!
//! `ally_client::tonic` (feature `tonic`) does this for tonic, its settle ending as soon as every connection
//! accepted before the stop has sent its first request. With only this module,
//! [`shutdown_after`] settles for a fixed time:
//!
//! ```no_run
//! # async fn run(server: impl FnOnce(ally_client::drain::Incoming, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>)) -> ally_client::Result<()> {
//! use ally_client::drain;
//! let ally = ally_client::Ally::from_env().await?;
//! let listener: tokio::net::TcpListener = ally.listen("127.0.0.1:50051").await?;
//! ally.ready().await?;
//! let stop = ally.stop_handle();
//! let incoming = drain::incoming(listener, stop.clone());
//! let shutdown = Box::pin(drain::shutdown_after(stop, drain::DEFAULT_SETTLE));
//! server(incoming, shutdown);
//! # Ok(()) }
//! ```
//!
//! # HTTP/1.1 keep-alive connections
//!
//! An HTTP/1.1 server must not close an idle keep-alive connection the moment the
//! stop comes, as hyper's `graceful_shutdown` (and so `axum::serve(..)
//! .with_graceful_shutdown(..)`) does: the client may be sending its next request
//! on it at that very moment, and it fails (a client that does not retry reports an
//! error). Nor may it close a connection it accepted whose first request has not
//! arrived yet. The drain that loses nothing but that inherent race:
//!
//! 1. stop accepting (the next generation takes what is queued);
//! 2. keep serving the connections already open, answering each request with
//!    `Connection: close` so the client moves to a new connection;
//! 3. close a connection only once it has been idle for a while after the stop:
//!    [`track`] times a connection's reads, and [`Activity::idle_after_stop`]
//!    resolves when it is time to shut that connection down gracefully.
//!
//! ```no_run
//! # async fn serve(stream: tokio::net::TcpStream, stop: ally_client::StopHandle) {
//! use ally_client::drain;
//! let (stream, activity) = drain::track(stream);
//! // let conn = hyper::server::conn::http1::Builder::new()
//! //     .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
//! // let mut conn = std::pin::pin!(conn);
//! // tokio::select! {
//! //     _ = conn.as_mut() => return,
//! //     _ = activity.idle_after_stop(stop, drain::DEFAULT_IDLE) => conn.as_mut().graceful_shutdown(),
//! // }
//! // let _ = conn.await;
//! # drop((stream, activity, stop));
//! # }
//! ```
//!
//! The framework integrations are built from these pieces: the modules `hyper` and
//! `axum` (both HTTP/1 steps, and `GOAWAY` for HTTP/2), `tonic` and `actix`, each
//! behind the cargo feature of its framework. A [`Drain`] carries the stop and the two times; an app gets one
//! with the operator's `drain_idle` from [`Ally::drain`](crate::Ally::drain).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::stop::StopHandle;

/// How long [`shutdown_after`] lets accepted connections settle by default: well
/// above a handshake's round trips on a loaded machine, well below any
/// `stop_timeout`.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(500);

/// How long [`Activity::idle_after_stop`] waits, by default, for a connection to stay
/// idle after the stop: well above the gap between a busy client's requests and a
/// handshake's round trips, well below any `stop_timeout`.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(1);

/// The environment variable through which the broker passes the app's `drain_idle`
/// (whole milliseconds) to every instance.
pub const DRAIN_IDLE_ENV: &str = "ALLY_DRAIN_IDLE";

/// How a server drains once the stop comes: the stop itself, how long a keep-alive
/// connection must stay idle before it is closed ([`idle`](Self::idle)), and how long
/// connections accepted just before the stop may take to send their first bytes
/// ([`settle`](Self::settle)). [`Ally::drain`](crate::Ally::drain) gives one with the
/// app's configured `drain_idle`; the framework integrations take one.
#[derive(Debug, Clone)]
pub struct Drain {
    stop: StopHandle,
    idle: Duration,
    settle: Duration,
}

impl Drain {
    /// A drain on `stop` with the default times ([`DEFAULT_IDLE`], [`DEFAULT_SETTLE`]).
    pub fn new(stop: StopHandle) -> Drain {
        Drain {
            stop,
            idle: DEFAULT_IDLE,
            settle: DEFAULT_SETTLE,
        }
    }

    /// A drain on `stop` whose idle time comes from `ALLY_DRAIN_IDLE` (milliseconds)
    /// when it is set to a positive number, else [`DEFAULT_IDLE`].
    pub fn from_env(stop: StopHandle) -> Drain {
        let idle = std::env::var(DRAIN_IDLE_ENV)
            .ok()
            .and_then(|v| parse_millis(&v))
            .unwrap_or(DEFAULT_IDLE);
        Drain::new(stop).with_idle(idle)
    }

    /// The same drain with another idle time.
    pub fn with_idle(mut self, idle: Duration) -> Drain {
        self.idle = idle;
        self
    }

    /// The same drain with another settle time.
    pub fn with_settle(mut self, settle: Duration) -> Drain {
        self.settle = settle;
        self
    }

    /// How long a connection must stay idle after the stop before it is closed.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// How long connections accepted just before the stop get to send their first bytes
    /// before a server that shuts down all at once (tonic) starts its shutdown.
    pub fn settle(&self) -> Duration {
        self.settle
    }

    /// The stop this drain follows.
    pub fn stop_handle(&self) -> &StopHandle {
        &self.stop
    }

    /// Whether the stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_stopping()
    }

    /// Resolves when the stop is requested.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        self.stop.stopped()
    }

    /// Resolves [`settle`](Self::settle) after the stop: the shutdown future for a server
    /// that stops accepting through [`incoming`] and then shuts every connection down at
    /// once.
    pub fn settled(&self) -> impl Future<Output = ()> + Send + 'static {
        shutdown_after(self.stop.clone(), self.settle)
    }

    /// Resolves [`idle`](Self::idle) after the stop: the shutdown future for a server
    /// (`axum::serve`) that answers with `Connection: close` while stopping and then
    /// closes whatever connections are left at once — by then, idle ones.
    pub fn idled(&self) -> impl Future<Output = ()> + Send + 'static {
        shutdown_after(self.stop.clone(), self.idle)
    }

    /// Resolves when the connection `activity` tracks should be shut down gracefully:
    /// see [`Activity::idle_after_stop`].
    pub fn connection_done(
        &self,
        activity: &Activity,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (activity, stop, idle) = (activity.clone(), self.stop.clone(), self.idle);
        async move { activity.idle_after_stop(stop, idle).await }
    }
}

fn parse_millis(text: &str) -> Option<Duration> {
    match text.trim().parse::<u64>() {
        Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
        _ => None,
    }
}

/// `io` with its reads timed, and the handle that reads the time; see the module docs.
pub fn track<S>(io: S) -> (Tracked<S>, Activity) {
    let activity = Activity {
        inner: Arc::new(ActivityInner {
            born: Instant::now(),
            last_read_us: AtomicU64::new(0),
            http2: AtomicU8::new(UNKNOWN),
        }),
    };
    let tracked = Tracked {
        io,
        activity: activity.clone(),
    };
    (tracked, activity)
}

/// A connection whose reads are timed by [`track`]; reads and writes pass through.
#[derive(Debug)]
pub struct Tracked<S> {
    io: S,
    activity: Activity,
}

impl<S> Tracked<S> {
    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

/// When a [`Tracked`] connection last read something.
#[derive(Debug, Clone)]
pub struct Activity {
    inner: Arc<ActivityInner>,
}

#[derive(Debug)]
struct ActivityInner {
    born: Instant,
    /// Microseconds after `born`; 0: nothing read yet.
    last_read_us: AtomicU64,
    /// Whether the first bytes read were HTTP/2's connection preface.
    http2: AtomicU8,
}

const UNKNOWN: u8 = 0;
const NOT_HTTP2: u8 = 1;
const HTTP2: u8 = 2;
/// The start of HTTP/2's client connection preface (RFC 9113, 3.4), which no HTTP/1
/// request starts with.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl Activity {
    fn touch(&self, first_bytes: &[u8]) {
        let us = self.inner.born.elapsed().as_micros().max(1) as u64;
        let first = self.inner.last_read_us.swap(us, Ordering::Relaxed) == 0;
        if first {
            let n = first_bytes.len().min(HTTP2_PREFACE.len());
            let http2 = first_bytes[..n] == HTTP2_PREFACE[..n];
            self.inner
                .http2
                .store(if http2 { HTTP2 } else { NOT_HTTP2 }, Ordering::Relaxed);
        }
    }

    /// Whether the connection speaks HTTP/2 (its first bytes were the HTTP/2 preface);
    /// `None` until it has read something.
    pub fn is_http2(&self) -> Option<bool> {
        match self.inner.http2.load(Ordering::Relaxed) {
            HTTP2 => Some(true),
            NOT_HTTP2 => Some(false),
            _ => None,
        }
    }

    /// When the connection last read a byte, if it has.
    pub fn last_read(&self) -> Option<Instant> {
        match self.inner.last_read_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.inner.born + Duration::from_micros(us)),
        }
    }

    /// Resolves once `stop` has been requested and the connection has then read nothing
    /// for `idle` (counting from the later of the stop and its last read): the moment to
    /// shut it down gracefully. A connection accepted just before the stop gets `idle`
    /// to send its first request.
    ///
    /// An HTTP/2 connection that has sent its preface resolves at the stop (or when the
    /// preface arrives): its graceful shutdown is a `GOAWAY`, after which the client
    /// opens no new stream on it while those in flight finish.
    pub async fn idle_after_stop(&self, stop: StopHandle, idle: Duration) {
        stop.stopped().await;
        let stopped_at = stop.stopping_since().unwrap_or_else(Instant::now);
        loop {
            if self.is_http2() == Some(true) {
                return;
            }
            let quiet_since = self.last_read().map_or(stopped_at, |r| r.max(stopped_at));
            let deadline = quiet_since + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch(&buf.filled()[before..]);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

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
    async fn idle_counts_from_the_stop_or_the_last_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let (mut server, activity) = track(server);
        assert_eq!(activity.last_read(), None);
        let stop = StopHandle::new();
        let idle = Duration::from_millis(300);
        let waiter = {
            let (activity, stop) = (activity.clone(), stop.clone());
            tokio::spawn(async move { activity.idle_after_stop(stop, idle).await })
        };
        // No stop, no end however long it is idle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished());

        stop.stop();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // A read into the drain restarts the clock.
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 3];
        server.read_exact(&mut buf).await.unwrap();
        let read_at = activity.last_read().unwrap();
        // Writes do not count as activity.
        server.write_all(b"200").await.unwrap();
        assert_eq!(activity.last_read(), Some(read_at));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "closed 200 ms after a read");
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap();
        let waited = read_at.elapsed();
        assert!(waited >= idle, "closed {waited:?} after the last read");
    }

    #[test]
    fn drain_idle_comes_in_whole_milliseconds() {
        assert_eq!(parse_millis("2500"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_millis(" 1 "), Some(Duration::from_millis(1)));
        for bad in ["0", "", "1s", "-5", "1.5"] {
            assert_eq!(parse_millis(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn an_http2_connection_is_done_at_the_stop_once_it_spoke() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stop = StopHandle::new();
        let drain = Drain::new(stop.clone()).with_idle(Duration::from_secs(30));

        let (mut h2_client, h2_server) = tokio::io::duplex(64);
        let (mut h2_server, h2) = track(h2_server);
        h2_client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut buf = [0u8; 16];
        let _ = h2_server.read(&mut buf).await.unwrap();
        assert_eq!(h2.is_http2(), Some(true));

        let (mut h1_client, h1_server) = tokio::io::duplex(64);
        let (mut h1_server, h1) = track(h1_server);
        assert_eq!(h1.is_http2(), None);
        h1_client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let _ = h1_server.read(&mut buf).await.unwrap();
        assert_eq!(h1.is_http2(), Some(false));

        let h2_done = tokio::spawn(drain.connection_done(&h2));
        let h1_done = tokio::spawn(drain.connection_done(&h1));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!h2_done.is_finished(), "done before the stop");
        stop.stop();
        tokio::time::timeout(Duration::from_secs(5), h2_done)
            .await
            .expect("HTTP/2 waits for no idle time: its shutdown is a GOAWAY")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!h1_done.is_finished(), "HTTP/1 waits for its idle time");
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
