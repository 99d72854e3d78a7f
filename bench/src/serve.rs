//! The one server logic of every scenario: a minimal hand-written HTTP/1.1
//! (keep-alive, graceful drain; see `bin/bench-server.rs` for why not a
//! framework) and the gRPC `Echo` service (tonic).

use std::sync::Arc;
use std::time::Duration;

use ally_client::StopHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::http::{Parsed, parse_request};

/// A connection idle this long after the stop request is closed.
pub const IDLE_AFTER_STOP: Duration = Duration::from_secs(1);

/// Serves HTTP/1.1 until `stop`, then stops accepting (drops the listener) and
/// finishes every connection: a request still arriving on a kept-alive
/// connection is answered with `Connection: close`, idle ones are closed.
pub async fn serve_http(listener: TcpListener, stop: StopHandle, body: Arc<str>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, body.clone(), stop.clone()));
                }
                Err(e) => {
                    eprintln!("bench-server: accept: {e}");
                    sleep(Duration::from_millis(20)).await;
                }
            },
            _ = stop.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(mut stream: TcpStream, body: Arc<str>, stop: StopHandle) {
    let mut buf = Vec::with_capacity(1024);
    let mut last_activity = Instant::now();
    let mut out = Vec::with_capacity(256);
    loop {
        loop {
            match parse_request(&buf) {
                Parsed::Partial if buf.len() > 64 * 1024 => return close(stream).await,
                Parsed::Partial => break,
                Parsed::Bad(_) => return close(stream).await,
                Parsed::Request { len, keep_alive } => {
                    buf.drain(..len);
                    let keep_alive = keep_alive && !stop.is_stopping();
                    out.clear();
                    out.extend_from_slice(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ",
                    );
                    out.extend_from_slice(body.len().to_string().as_bytes());
                    out.extend_from_slice(if keep_alive {
                        b"\r\nConnection: keep-alive\r\n\r\n".as_slice()
                    } else {
                        b"\r\nConnection: close\r\n\r\n".as_slice()
                    });
                    out.extend_from_slice(body.as_bytes());
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                    if !keep_alive {
                        return close(stream).await;
                    }
                }
            }
        }
        let idle_deadline = stop
            .stopping_since()
            .map(|since| Instant::from_std(since).max(last_activity) + IDLE_AFTER_STOP);
        tokio::select! {
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => last_activity = Instant::now(),
            },
            _ = stop.stopped(), if idle_deadline.is_none() => {}
            _ = sleep_until(idle_deadline.unwrap_or_else(Instant::now)), if idle_deadline.is_some() => {
                return close(stream).await;
            }
        }
    }
}

/// Half-closes, then reads until the peer closes too: closing with unread data
/// would reset the connection and could destroy the response in flight.
async fn close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = timeout(Duration::from_millis(500), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// How the gRPC server stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcStop {
    /// tonic's graceful shutdown straight on the stop request (what most programs do).
    Plain,
    /// `ally_client::drain`: stop accepting, settle this long, then shut down gracefully.
    Drain(Duration),
}

/// Serves `bench.Echo` until `stop`, then shuts down as `how` says.
pub async fn serve_grpc(listener: TcpListener, stop: StopHandle, how: GrpcStop) {
    let server = tonic::transport::Server::builder();
    let result = match how {
        GrpcStop::Plain => {
            let incoming = tokio_stream_listener(listener);
            let s = stop.clone();
            server
                .serve_with_incoming_shutdown(crate::grpc::EchoService, incoming, async move {
                    s.stopped().await
                })
                .await
        }
        GrpcStop::Drain(settle) => {
            let incoming = ally_client::drain::incoming(listener, stop.clone());
            server
                .serve_with_incoming_shutdown(
                    crate::grpc::EchoService,
                    incoming,
                    ally_client::drain::shutdown_after(stop, settle),
                )
                .await
        }
    };
    if let Err(e) = result {
        eprintln!("bench-server: grpc: {e}");
    }
}

/// The listener as a stream of connections, as `tonic`'s `TcpIncoming` would give.
fn tokio_stream_listener(
    listener: TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((accepted, listener))
    })
}
