//! `metrics_address`: `GET /metrics` over plain HTTP/1, for a Prometheus
//! scraper. Anyone who can reach the address reads the metrics, so it is an
//! IP address and port (no path to follow), and what a client can cost the
//! broker is bounded: a few connections at once, each with a short time to send
//! a small request, answered once and closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::broker::Broker;
use crate::metrics::CONTENT_TYPE;

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 8;
/// The whole request head must arrive within this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A request head larger than this is refused.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` (close-on-exec, so no instance inherits it).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| format!("metrics_address {addr}: cannot create a socket: {e}"))?;
    let bound = (|| {
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(64)?;
        socket.set_nonblocking(true)
    })();
    bound.map_err(|e| format!("metrics_address {addr}: cannot listen: {e}"))?;
    Ok(socket.into())
}

pub fn spawn(listener: std::net::TcpListener, broker: Arc<Broker>) -> Result<(), String> {
    let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
    tokio::spawn(serve(listener, broker));
    Ok(())
}

async fn serve(listener: TcpListener, broker: Arc<Broker>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("metrics_address: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            answer(stream, &broker).await;
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, broker: &Broker) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(Refused::TooLarge)) => {
            return respond(&mut stream, "431 Request Header Fields Too Large", None).await;
        }
        Ok(Err(Refused::Closed)) | Err(_) => return,
    };
    let (status, body) = match route(&head) {
        Route::Metrics => ("200 OK", Some(broker.metrics_text())),
        Route::NotFound => ("404 Not Found", None),
        Route::NotAllowed => ("405 Method Not Allowed", None),
        Route::Bad => ("400 Bad Request", None),
    };
    respond(&mut stream, status, body).await;
}

enum Refused {
    TooLarge,
    Closed,
}

/// Reads up to the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, Refused> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.map_err(|_| Refused::Closed)?;
        if n == 0 {
            return Err(Refused::Closed);
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Err(Refused::TooLarge);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    NotAllowed,
    Bad,
}

/// What a request head asks for: only `GET /metrics` (a query string is
/// ignored, as scrapers may add one) is served.
fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Route::Bad;
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::Bad;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Route::Bad;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        (_, "/metrics") => Route::NotAllowed,
        _ => Route::NotFound,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: Option<String>) {
    let (content_type, body) = match body {
        Some(body) => (CONTENT_TYPE, body),
        None => (
            "text/plain; charset=utf-8",
            format!("{status}: only GET /metrics is served here\n"),
        ),
    };
    let allow = if status.starts_with("405") {
        "Allow: GET\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metrics/x HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::NotAllowed);
        assert_eq!(route(b"HEAD /metrics HTTP/1.1\r\n\r\n"), Route::NotAllowed);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::Bad);
        assert_eq!(route(b"GET metrics HTTP/1.1\r\n\r\n"), Route::Bad);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::Bad);
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), Route::Bad);
    }
}
