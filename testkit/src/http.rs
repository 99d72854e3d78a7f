//! A minimal blocking HTTP/1.1 client for tests, and the response-head parser
//! the benchmark's async client uses too.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The status line and headers of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `HTTP/1.1`, `HTTP/1.0`.
    pub version: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn content_length(&self) -> Option<usize> {
        self.header("Content-Length")?.parse().ok()
    }

    /// Whether the server says it closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.header("Connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
    }
}

/// Parses a response head: the bytes before the blank line that ends it.
pub fn parse_head(head: &[u8]) -> Result<Head, String> {
    let head = std::str::from_utf8(head).map_err(|_| "head is not UTF-8".to_string())?;
    let mut lines = head.trim_end_matches("\r\n").split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(status)) = (parts.next(), parts.next()) else {
        return Err(format!("status {status_line:?}"));
    };
    let status = status
        .parse()
        .map_err(|_| format!("status {status_line:?}"))?;
    let headers = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("header {line:?}"))?;
            Ok((name.trim().to_string(), value.trim().to_string()))
        })
        .collect::<Result<_, String>>()?;
    Ok(Head {
        version: version.to_string(),
        status,
        headers,
    })
}

/// Where the head of `buf` ends: the index of its blank line's `\r\n\r\n`.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// A response read by [`read_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub head: Head,
    pub body: String,
}

/// `response.status`, `response.header(..)`: the head's.
impl std::ops::Deref for Response {
    type Target = Head;

    fn deref(&self) -> &Head {
        &self.head
    }
}

/// Reads one response, taking no byte past it (the head byte by byte), so the
/// caller can go on reading the stream. `Ok(None)` on a clean end of stream
/// before any byte; a response without `Content-Length` has an empty body.
pub fn read_response(stream: &mut impl Read) -> std::io::Result<Option<Response>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte)? {
            0 if head.is_empty() => return Ok(None),
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed inside the headers",
                ));
            }
            _ => head.push(byte[0]),
        }
    }
    let head = parse_head(&head).map_err(std::io::Error::other)?;
    let mut body = vec![0; head.content_length().unwrap_or(0)];
    stream.read_exact(&mut body)?;
    Ok(Some(Response {
        head,
        body: String::from_utf8_lossy(&body).to_string(),
    }))
}

/// One HTTP/1.1 GET; returns the body.
pub fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut conn = HttpConnection::connect(addr)?;
    conn.request(true).map(|(body, _)| body)
}

pub struct HttpConnection {
    reader: BufReader<TcpStream>,
    pub requests: u64,
}

impl HttpConnection {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection {
            reader: BufReader::new(stream),
            requests: 0,
        })
    }

    /// Sends `GET /` and reads the response: (body, server keeps the
    /// connection). Anything but a `200` is an error.
    pub fn request(&mut self, close: bool) -> std::io::Result<(String, bool)> {
        let request = if close {
            "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        } else {
            "GET / HTTP/1.1\r\nHost: test\r\n\r\n"
        };
        self.reader.get_mut().write_all(request.as_bytes())?;
        self.requests += 1;
        let Some(response) = read_response(&mut self.reader)? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before any response",
            ));
        };
        if response.head.version != "HTTP/1.1" || response.status != 200 {
            return Err(std::io::Error::other(format!(
                "bad status {} {}",
                response.head.version, response.status
            )));
        }
        let keep = !close && !response.head.closes();
        Ok((response.body, keep))
    }
}

/// The server closed a kept-alive connection without answering: the request
/// was never processed, so clients may retry it.
pub fn is_unanswered(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    ) && e.to_string() != "connection closed inside the headers"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads() {
        let head =
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nconnection: Close\r\n\r\n")
                .unwrap();
        assert_eq!((head.version.as_str(), head.status), ("HTTP/1.1", 200));
        assert_eq!(head.content_length(), Some(12));
        assert_eq!(head.header("CONNECTION"), Some("Close"));
        assert!(head.closes());
        let head = parse_head(b"HTTP/1.1 503 Busy\r\nConnection: keep-alive").unwrap();
        assert_eq!(head.status, 503);
        assert!(!head.closes());
        assert_eq!(head.content_length(), None);
        assert!(parse_head(b"HTTP/1.1 2xx OK").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nno colon").is_err());
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\n\r\nbody"), Some(15));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\n"), None);
    }

    #[test]
    fn reads_one_response_and_not_a_byte_more() {
        let mut input: &[u8] =
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n";
        let first = read_response(&mut input).unwrap().unwrap();
        assert_eq!((first.status, first.body.as_str()), (200, "ok"));
        let second = read_response(&mut input).unwrap().unwrap();
        assert_eq!((second.status, second.body.as_str()), (400, ""));
        assert_eq!(read_response(&mut input).unwrap(), None);
        let mut cut: &[u8] = b"HTTP/1.1 200 OK\r\nContent-";
        let err = read_response(&mut cut).unwrap_err();
        assert!(!is_unanswered(&err), "{err}");
    }
}
