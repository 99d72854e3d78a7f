//! A minimal HTTP/1.1 client for the load generator, with the retry rule of real
//! HTTP clients, and the request parser of the bench server (the same minimal
//! HTTP/1.1 the bench server speaks).

use std::net::SocketAddr;
use std::time::Duration;

use ally_testkit::http::{head_end, parse_head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `connect` failed (refused, timed out, ...).
    Connect(String),
    /// The server closed or reset a *reused* connection before sending a single byte
    /// of the response (or before our request could be written). The server never
    /// processed the request, so clients retry it on a new connection.
    Unanswered(String),
    /// Closed, reset or failed after part of the response, or on a fresh connection.
    Broken(String),
    /// No complete response in time.
    Timeout,
    /// A response that is not the bench server's `200`.
    WrongAnswer(String),
}

impl Failure {
    /// Whether a client may send the request again: only when it was never processed.
    pub fn retryable(&self) -> bool {
        matches!(self, Failure::Unanswered(_))
    }

    /// A short class for error counts.
    pub fn class(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {e}"),
            Failure::Unanswered(e) => format!("unanswered: {e}"),
            Failure::Broken(e) => format!("broken: {e}"),
            Failure::Timeout => "timeout".into(),
            Failure::WrongAnswer(a) => format!("wrong answer: {a}"),
        }
    }
}

fn io_class(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused".into(),
        ConnectionReset => "reset".into(),
        BrokenPipe => "broken pipe".into(),
        UnexpectedEof => "closed".into(),
        TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// A response of the bench server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub body: String,
    /// The server keeps the connection open.
    pub keep_alive: bool,
}

/// One client connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Requests answered on this connection so far.
    pub answered: u64,
}

impl Conn {
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, Failure> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(e)) => return Err(Failure::Connect(io_class(&e))),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(512),
            answered: 0,
        })
    }

    /// `GET /`; `close` asks the server to close after answering.
    pub async fn get(&mut self, close: bool, timeout: Duration) -> Result<Response, Failure> {
        match tokio::time::timeout(timeout, self.exchange(close)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(r) => r,
        }
    }

    async fn exchange(&mut self, close: bool) -> Result<Response, Failure> {
        let reused = self.answered > 0;
        let request: &[u8] = if close {
            b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        } else {
            b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
        };
        // Failing before any byte of the response came back on a reused connection
        // means the server closed it without taking the request.
        let early = |e: String| {
            if reused {
                Failure::Unanswered(e)
            } else {
                Failure::Broken(e)
            }
        };
        if let Err(e) = self.stream.write_all(request).await {
            return Err(early(io_class(&e)));
        }
        self.buf.clear();
        loop {
            if let Some(response) = parse_response(&self.buf)? {
                self.answered += 1;
                return Ok(response);
            }
            let before = self.buf.len();
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) if before == 0 => return Err(early("closed".into())),
                Ok(0) => return Err(Failure::Broken("closed inside the response".into())),
                Ok(_) => {}
                Err(e) if before == 0 => return Err(early(io_class(&e))),
                Err(e) => return Err(Failure::Broken(io_class(&e))),
            }
            if self.buf.len() > 64 * 1024 {
                return Err(Failure::WrongAnswer("response too long".into()));
            }
        }
    }
}

/// A complete response in `buf`, `None` while partial.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, Failure> {
    let Some(end) = head_end(buf) else {
        return Ok(None);
    };
    let head = parse_head(&buf[..end]).map_err(Failure::WrongAnswer)?;
    if head.version != "HTTP/1.1" || head.status != 200 {
        return Err(Failure::WrongAnswer(format!(
            "status {} {}",
            head.version, head.status
        )));
    }
    let Some(length) = head.content_length() else {
        return Err(Failure::WrongAnswer("no content-length".into()));
    };
    if buf.len() < end + 4 + length {
        return Ok(None);
    }
    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
    // `hello `: the apps of tests/fixtures/unmodified (the `unmodified` bench).
    if !body.starts_with("bench ") && !body.starts_with("hello ") {
        return Err(Failure::WrongAnswer(format!("body {body:?}")));
    }
    let keep_alive = !head
        .header("Connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    Ok(Some(Response { body, keep_alive }))
}

/// What the server made of the start of its buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Partial,
    Bad(&'static str),
    Request {
        /// Bytes of the request, head and body.
        len: usize,
        keep_alive: bool,
    },
}

/// The bench server's request parser.
pub fn parse_request(buf: &[u8]) -> Parsed {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let Some(end) = head_end(&buf[start..]) else {
        return Parsed::Partial;
    };
    let Ok(head) = std::str::from_utf8(&buf[start..start + end]) else {
        return Parsed::Bad("400 Bad Request");
    };
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let (Some(_method), Some(_target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Bad("400 Bad Request");
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Parsed::Bad("505 HTTP Version Not Supported"),
    };
    let mut content_length = 0usize;
    let mut close = false;
    let mut keep_alive_token = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Bad("400 Bad Request");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse() {
                Ok(n) => content_length = n,
                Err(_) => return Parsed::Bad("400 Bad Request"),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Bad("501 Not Implemented");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    let len = start + end + 4 + content_length;
    if buf.len() < len {
        return Parsed::Partial;
    }
    Parsed::Request {
        len,
        keep_alive: !close && (http11 || keep_alive_token),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nbench pid=1\n";

    #[test]
    fn parses_responses() {
        assert_eq!(parse_response(&OK[..20]), Ok(None));
        assert_eq!(parse_response(&OK[..OK.len() - 1]), Ok(None));
        let r = parse_response(OK).unwrap().unwrap();
        assert!(r.keep_alive);
        assert_eq!(r.body, "bench pid=1\n");
        let close = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nbench ";
        assert!(!parse_response(close).unwrap().unwrap().keep_alive);
        assert!(matches!(
            parse_response(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"),
            Err(Failure::WrongAnswer(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            Err(Failure::WrongAnswer(_))
        ));
    }

    #[test]
    fn parses_requests() {
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost: x"), Parsed::Partial);
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET"),
            Parsed::Request {
                len: 27,
                keep_alive: true
            }
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"),
            Parsed::Request {
                len: 37,
                keep_alive: false
            }
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.0\r\n\r\n"),
            Parsed::Request {
                len: 18,
                keep_alive: false
            }
        );
        assert_eq!(
            parse_request(b"GET /\r\n\r\n"),
            Parsed::Bad("400 Bad Request")
        );
    }

    /// A server that answers `answers` requests on its first connection, then does
    /// `then` with the next request; later connections are answered normally.
    async fn server(answers: usize, then: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let limit = if first { answers } else { usize::MAX };
                first = false;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    loop {
                        while let Parsed::Request { len, .. } = parse_request(&buf) {
                            buf.drain(..len);
                            if served == limit {
                                match then {
                                    "close" => return,
                                    "partial" => {
                                        let _ = s.write_all(&OK[..10]).await;
                                        return;
                                    }
                                    _ => std::future::pending::<()>().await,
                                }
                            }
                            served += 1;
                            s.write_all(OK).await.unwrap();
                        }
                        if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    const T: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn a_reused_connection_closed_unanswered_is_retryable() {
        let addr = server(1, "close").await;
        let mut conn = Conn::connect(addr, T).await.unwrap();
        conn.get(false, T).await.unwrap();
        let failure = conn.get(false, T).await.unwrap_err();
        assert!(failure.retryable(), "{failure:?}");
        // The retry goes to a new connection, which is answered.
        let mut fresh = Conn::connect(addr, T).await.unwrap();
        assert!(fresh.get(false, T).await.is_ok());
    }

    #[tokio::test]
    async fn a_fresh_connection_closed_unanswered_is_a_failure() {
        let addr = server(0, "close").await;
        let mut conn = Conn::connect(addr, T).await.unwrap();
        let failure = conn.get(false, T).await.unwrap_err();
        assert!(!failure.retryable(), "{failure:?}");
    }

    #[tokio::test]
    async fn a_partial_response_is_never_retried() {
        let addr = server(1, "partial").await;
        let mut conn = Conn::connect(addr, T).await.unwrap();
        conn.get(false, T).await.unwrap();
        let failure = conn.get(false, T).await.unwrap_err();
        assert!(!failure.retryable(), "{failure:?}");
        assert!(matches!(failure, Failure::Broken(_)), "{failure:?}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let addr = server(0, "hang").await;
        let mut conn = Conn::connect(addr, T).await.unwrap();
        let failure = conn
            .get(false, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(failure, Failure::Timeout);
        assert!(!failure.retryable());
    }
}
