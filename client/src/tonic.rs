//! Serving a tonic (gRPC) server under Ally without losing a call on a reload.
//!
//! ```no_run
//! # async fn run(greeter: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
//! let ally = ally_client::Ally::from_env().await?;
//! let listener: tokio::net::TcpListener = ally.listen("127.0.0.1:50051").await?;
//! ally.ready().await?;
//!
//! let incoming = ally_client::tonic::incoming(listener, &ally.drain());
//! let shutdown = incoming.shutdown();
//! tonic::transport::Server::builder()
//!     .add_routes(greeter)
//!     .serve_with_incoming_shutdown(incoming, shutdown)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Why not `serve_with_incoming_shutdown(TcpIncoming::from(listener), ally.stopped())`
//!
//! On a reload the old generation gets its stop while the new one already accepts
//! from the same socket. Connections keep arriving at that very moment, and tonic's
//! own shutdown does everything at once: when its shutdown future resolves it stops
//! accepting *and* tells every connection it accepted to shut down gracefully, which
//! for HTTP/2 means a `GOAWAY` frame (sent as soon as the connection's handshake is
//! done, if it was not yet). A connection accepted a moment earlier has sent, at
//! most, its connection preface; its client has not sent its first call yet, or the
//! server has not read it. The `GOAWAY` reaches the client first, so the client
//! refuses to send the call on that connection and fails it (tonic's client does not
//! retry; with an older hyper, which closed a connection still in its handshake, the
//! client saw `connection closed before server preface received`, the failure users
//! of the original Go Ally met with gRPC servers). Measured with a new connection per
//! call, 8 clients, 20 reloads (`client/tests/reload_tonic.rs`): 8 to 18 failed calls
//! per run that way (with `TCP_NODELAY`, as tonic's own listener sets it), 7 to 20
//! when only the accepting stops first, 0 with this module.
//!
//! # What this module does instead
//!
//! 1. **Stop accepting, keep the socket.** [`incoming`] yields the accepted
//!    connections until the stop, then drops its listener and yields nothing more
//!    (without ending the stream, which tonic would take for a shutdown). Dropping it
//!    closes only this instance's duplicate: the broker's socket stays open and the
//!    next generation accepts whatever is queued.
//! 2. **Settle.** The [`Incoming::shutdown`] future resolves once every connection
//!    accepted before the stop has sent its first request (for HTTP/2, its first
//!    `HEADERS` frame has been read) or has closed, and at the latest
//!    [`Drain::settle`] after the stop, so a client that connects and says nothing
//!    cannot hold the old generation. When every connection has spoken it resolves
//!    at once: no fixed wait. (Behind tonic's TLS the first bytes are the client's
//!    TLS hello, which ends the settle for that connection: the settle then covers
//!    the TCP connection, not the first call.)
//! 3. **GOAWAY, then finish the calls in flight.** tonic then shuts each connection
//!    down gracefully: h2 sends a first `GOAWAY` that admits every stream, and a
//!    `PING`; once the client has answered it, a second `GOAWAY` names the last
//!    stream the server will serve. Every call the client sent before it saw the
//!    first `GOAWAY` is served, and the client opens its next calls on a new
//!    connection, which the next generation accepts. tonic waits for the
//!    connections to close, and then `serve_with_incoming_shutdown` returns.
//!
//! # What a client that keeps its connection may still see
//!
//! A client that keeps one connection and calls back to back races the `GOAWAY`:
//! tonic's client (hyper's, underneath) learns that the connection is gone only when
//! the connection ends, and a call it makes between the `GOAWAY` and that end fails
//! (`Cancelled`, `connection closed`, or a `GOAWAY` error) instead of going to a new
//! connection (<https://github.com/grpc/grpc-rust/issues/2185>). The call never
//! reached the server, so it is safe to retry, and gRPC clients in other languages
//! do so transparently. To make the window rarer, a [`Connection`] turns
//! `TCP_NODELAY` off once the stop comes: the kernel then tends to send the client's
//! last answer together with the final `GOAWAY` and the end of the connection, so
//! the client sees the connection end as it reads its
//! answer. Measured as above with 8 kept channels: 0 to 4 refused calls per run
//! (mean about 2), against 2 to 16 (mean about 9) with `TCP_NODELAY` left on. The
//! price is paid only by the answers a stopping instance still sends: a small write
//! may wait for the acknowledgement of the one before, which the client's answer to
//! the `PING` brings about a round trip later.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_core::Stream;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::StopHandle;
use crate::drain::{self, Drain};

/// The connections of `listener` for tonic's `serve_with_incoming_shutdown`, until
/// the stop of `drain`; [`Incoming::shutdown`] gives the shutdown future to pass with
/// it. See the module docs.
pub fn incoming(listener: TcpListener, drain: &Drain) -> Incoming {
    Incoming {
        accepted: drain::incoming(listener, drain.stop_handle().clone()),
        unheard: Arc::new(watch::Sender::new(0)),
        drain: drain.clone(),
    }
}

/// The stream of [`incoming`]: [`Connection`]s.
#[derive(Debug)]
pub struct Incoming {
    accepted: drain::Incoming,
    /// How many connections it yielded have neither spoken nor closed.
    unheard: Arc<watch::Sender<usize>>,
    drain: Drain,
}

impl Incoming {
    /// The shutdown future to give tonic with this stream: resolves once the stop was
    /// requested and every connection accepted before it has sent its first request or
    /// closed, or [`Drain::settle`] after the stop, whichever comes first.
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        let stop = self.drain.stopped();
        let settle = self.drain.settle();
        let mut unheard = self.unheard.subscribe();
        async move {
            stop.await;
            // An error means every connection and the stream are gone: nothing to wait for.
            let _ = tokio::time::timeout(settle, unheard.wait_for(|&n| n == 0)).await;
        }
    }

    /// Whether it still accepts (the stop was not seen yet).
    pub fn is_accepting(&self) -> bool {
        self.accepted.is_accepting()
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let accepted = match ready!(Pin::new(&mut this.accepted).poll_next(cx)) {
            Some(Ok(stream)) => stream,
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => return Poll::Ready(None),
        };
        this.unheard.send_modify(|n| *n += 1);
        Poll::Ready(Some(Ok(Connection {
            stream: accepted,
            first_request: FirstRequest::default(),
            unheard: Some(this.unheard.clone()),
            nodelay_until: Some(this.drain.stop_handle().clone()),
        })))
    }
}

/// An accepted connection that counts as unheard, for [`Incoming::shutdown`], until
/// its first request arrives or it closes.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    first_request: FirstRequest,
    /// Until it is heard from: the count it is part of.
    unheard: Option<Arc<watch::Sender<usize>>>,
    /// Until its first write after the stop: the stop.
    nodelay_until: Option<StopHandle>,
}

impl Connection {
    /// The TCP connection.
    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    /// From the stop on, lets the kernel hold back a small write while an earlier one
    /// is unacknowledged (Nagle), so a client's last answer tends to arrive together
    /// with the final `GOAWAY` and the end of the connection; see the module docs.
    fn coalesce_once_stopping(&mut self) {
        if self
            .nodelay_until
            .as_ref()
            .is_some_and(StopHandle::is_stopping)
        {
            self.nodelay_until = None;
            let _ = self.stream.set_nodelay(false);
        }
    }

    fn heard(&mut self) {
        if let Some(unheard) = self.unheard.take() {
            unheard.send_modify(|n| *n -= 1);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.heard();
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.unheard.is_some() {
            let heard = match &poll {
                Poll::Ready(Ok(())) => {
                    let read = &buf.filled()[before..];
                    // Nothing read is the end of the stream.
                    read.is_empty() || this.first_request.read(read)
                }
                Poll::Ready(Err(_)) => true,
                Poll::Pending => false,
            };
            if heard {
                this.heard();
            }
        }
        poll
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.coalesce_once_stopping();
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.coalesce_once_stopping();
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// HTTP/2's client connection preface (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS_FRAME: u8 = 0x1;

/// Watches the first bytes a client sends for the start of its first request: in
/// HTTP/2, the first `HEADERS` frame after the preface (and the `SETTINGS` and
/// `WINDOW_UPDATE` frames clients send before it); anything but the HTTP/2 preface is
/// an HTTP/1 request from its first byte on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FirstRequest {
    /// How many bytes of the preface it read.
    Preface(usize),
    /// The frame header read so far.
    FrameHeader([u8; FRAME_HEADER_LEN], usize),
    /// Payload bytes of a frame before the first request left to skip.
    Payload(usize),
    Started,
}

impl Default for FirstRequest {
    fn default() -> Self {
        FirstRequest::Preface(0)
    }
}

impl FirstRequest {
    /// Feeds the next bytes the client sent; true once its first request has started.
    fn read(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match self {
                FirstRequest::Preface(seen) => {
                    let n = (PREFACE.len() - *seen).min(bytes.len());
                    if bytes[..n] != PREFACE[*seen..*seen + n] {
                        *self = FirstRequest::Started;
                        continue;
                    }
                    *seen += n;
                    bytes = &bytes[n..];
                    if *seen == PREFACE.len() {
                        *self = FirstRequest::FrameHeader([0; FRAME_HEADER_LEN], 0);
                    }
                }
                FirstRequest::FrameHeader(header, filled) => {
                    let n = (FRAME_HEADER_LEN - *filled).min(bytes.len());
                    header[*filled..*filled + n].copy_from_slice(&bytes[..n]);
                    *filled += n;
                    bytes = &bytes[n..];
                    if *filled == FRAME_HEADER_LEN {
                        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]);
                        *self = match (header[3], len) {
                            (HEADERS_FRAME, _) => FirstRequest::Started,
                            (_, 0) => FirstRequest::FrameHeader([0; FRAME_HEADER_LEN], 0),
                            (_, len) => FirstRequest::Payload(len as usize),
                        };
                    }
                }
                FirstRequest::Payload(left) => {
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        *self = FirstRequest::FrameHeader([0; FRAME_HEADER_LEN], 0);
                    }
                }
                FirstRequest::Started => break,
            }
        }
        *self == FirstRequest::Started
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A client's first bytes: the preface, then `SETTINGS` and `WINDOW_UPDATE` frames.
    fn greeting() -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]);
        // An empty SETTINGS acknowledgement.
        bytes.extend_from_slice(&[0, 0, 0, 0x4, 1, 0, 0, 0, 0]);
        bytes
    }

    /// The header of a `HEADERS` frame on stream 1.
    const HEADERS: [u8; 9] = [0, 0, 12, HEADERS_FRAME, 4, 0, 0, 0, 1];

    #[test]
    fn the_first_request_is_the_first_headers_frame() {
        let mut whole = greeting();
        whole.extend_from_slice(&HEADERS);
        // However the bytes are split, the request starts with the HEADERS frame.
        for chunk in [1, 2, 5, 9, 24, 100] {
            let mut first = FirstRequest::default();
            let chunks: Vec<_> = whole.chunks(chunk).collect();
            let (last, before) = chunks.split_last().unwrap();
            for bytes in before {
                assert!(!first.read(bytes), "chunks of {chunk}: {first:?}");
            }
            assert!(first.read(last), "chunks of {chunk}: {first:?}");
            assert!(first.read(b"more"));
        }
        let mut first = FirstRequest::default();
        assert!(!first.read(&greeting()));
        assert_eq!(first, FirstRequest::FrameHeader([0; 9], 0));
    }

    #[test]
    fn anything_but_the_http2_preface_is_a_request() {
        assert!(FirstRequest::default().read(b"GET / HTTP/1.1\r\n"));
        // Partly the preface, then not.
        let mut first = FirstRequest::default();
        assert!(!first.read(b"PRI * HTTP/2"));
        assert!(first.read(b".1"));
    }

    /// Accepts one connection from `incoming` and reads it until it closes, as a
    /// server would; returns what the client sent.
    async fn accept_and_read(incoming: &mut Incoming) -> tokio::task::JoinHandle<Vec<u8>> {
        let mut connection = std::future::poll_fn(|cx| Pin::new(&mut *incoming).poll_next(cx))
            .await
            .unwrap()
            .unwrap();
        tokio::spawn(async move {
            let mut got = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut connection, &mut got).await;
            got
        })
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_first_request_of_each_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = StopHandle::new();
        let drain = Drain::new(stop.clone()).with_settle(Duration::from_secs(30));
        let mut incoming = incoming(listener, &drain);
        let shutdown = tokio::spawn(incoming.shutdown());

        let mut spoke = TcpStream::connect(addr).await.unwrap();
        let _spoke = accept_and_read(&mut incoming).await;
        let mut late = TcpStream::connect(addr).await.unwrap();
        let _late = accept_and_read(&mut incoming).await;
        let closed = TcpStream::connect(addr).await.unwrap();
        let _closed = accept_and_read(&mut incoming).await;
        spoke.write_all(&greeting()).await.unwrap();
        spoke.write_all(&HEADERS).await.unwrap();

        stop.stop();
        let stopped = Instant::now();
        drop(closed);
        late.write_all(&greeting()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !shutdown.is_finished(),
            "shut down before the late connection's first request"
        );
        late.write_all(&HEADERS).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), shutdown)
            .await
            .expect("the shutdown did not follow the last first request")
            .unwrap();
        let waited = stopped.elapsed();
        assert!(waited < Duration::from_secs(10), "{waited:?}");
    }

    #[tokio::test]
    async fn a_silent_connection_holds_the_shutdown_for_settle_at_most() {
        let settle = Duration::from_millis(500);
        let stop = StopHandle::new();
        let drain = Drain::new(stop.clone()).with_settle(settle);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = incoming(listener, &drain);
        let silent = TcpStream::connect(addr).await.unwrap();
        let _reader = accept_and_read(&mut incoming).await;
        let held = tokio::spawn(incoming.shutdown());
        // An instance that accepted nothing.
        let unused = super::incoming(TcpListener::bind("127.0.0.1:0").await.unwrap(), &drain);
        let free = tokio::spawn(unused.shutdown());
        // Nothing resolves before the stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!held.is_finished() && !free.is_finished());

        stop.stop();
        let stopped = Instant::now();
        free.await.unwrap();
        assert!(!held.is_finished(), "{:?}", stopped.elapsed());
        held.await.unwrap();
        let waited = stopped.elapsed();
        assert!(waited >= settle, "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        drop(silent);
    }

    #[tokio::test]
    async fn writes_coalesce_from_the_stop_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = StopHandle::new();
        let mut incoming = incoming(listener, &Drain::new(stop.clone()));
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut connection = std::future::poll_fn(|cx| Pin::new(&mut incoming).poll_next(cx))
            .await
            .unwrap()
            .unwrap();
        connection.write_all(b"before").await.unwrap();
        assert!(connection.get_ref().nodelay().unwrap());
        stop.stop();
        connection.write_all(b"after").await.unwrap();
        assert!(!connection.get_ref().nodelay().unwrap());
    }

    /// A gRPC service whose one method, `/Ping/Ping`, answers `()` with `()`.
    #[derive(Clone)]
    struct Ping;

    impl tonic::server::NamedService for Ping {
        const NAME: &'static str = "Ping";
    }

    impl tonic::server::UnaryService<()> for Ping {
        type Response = ();
        type Future = std::future::Ready<Result<tonic::Response<()>, tonic::Status>>;

        fn call(&mut self, _: tonic::Request<()>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new(())))
        }
    }

    impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Ping {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Ping, request).await)
            })
        }
    }

    /// Connects a tonic channel over `stream`, a TCP connection already open.
    async fn channel_over(stream: TcpStream) -> tonic::transport::Channel {
        let stream = std::sync::Mutex::new(Some(stream));
        let connector = tower::service_fn(move |_: http::Uri| {
            let stream = stream.lock().unwrap().take();
            async move {
                let stream = stream.ok_or_else(|| io::Error::other("connected once already"))?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        tonic::transport::Endpoint::from_static("http://ping")
            .connect_with_connector(connector)
            .await
            .unwrap()
    }

    async fn ping(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static("/Ping/Ping");
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        grpc.unary(tonic::Request::new(()), path, codec)
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn tonic_serves_a_call_sent_after_the_stop_on_a_connection_accepted_before() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = StopHandle::new();
        let drain = Drain::new(stop.clone()).with_settle(Duration::from_secs(30));
        let incoming = incoming(listener, &drain);
        let mut unheard = incoming.unheard.subscribe();
        let shutdown = incoming.shutdown();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(Ping)
                .serve_with_incoming_shutdown(incoming, shutdown),
        );
        let early = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), unheard.wait_for(|&n| n == 1))
            .await
            .expect("the server never accepted")
            .unwrap();

        stop.stop();
        let stopped = Instant::now();
        // The client starts its HTTP/2 connection after the stop, and calls a moment
        // after that (a channel connected ahead of its first call).
        let channel = channel_over(early).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!server.is_finished());
        ping(channel.clone()).await.expect("the call was lost");
        drop(channel);
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server did not stop once its one call was served")
            .unwrap()
            .unwrap();
        let waited = stopped.elapsed();
        assert!(waited < Duration::from_secs(10), "{waited:?}");
    }
}
