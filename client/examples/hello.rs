//! A small HTTP/1.1 server that says which version, process and generation answered.
//!
//! ```text
//! hello [--listen ADDR] [--version V] [--ready-delay MS] [--ignore-stop]
//! ```
//!
//! Every request gets `200 OK` with the body `hello version=V pid=P generation=G`.
//! Under `ally run` it takes its socket from the broker; alone (`cargo run -p ally-client
//! --example hello`) it binds the socket itself. On the stop signal it stops accepting,
//! answers a request still arriving on a kept-alive connection with `Connection: close`,
//! closes connections idle for a second, and exits once every connection is done.
//! `--ignore-stop` ignores the stop signal, to exercise the broker's `stop_timeout`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ally_client::{Ally, StopHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};

const IDLE_AFTER_STOP: Duration = Duration::from_secs(1);
const MAX_HEADER_BYTES: usize = 64 * 1024;

struct Args {
    listen: String,
    version: String,
    ready_delay: Option<Duration>,
    ignore_stop: bool,
}

const USAGE: &str = "usage: hello [--listen ADDR] [--version V] [--ready-delay MS] [--ignore-stop]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:8080".into(),
        version: std::env::var("HELLO_VERSION")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "1".into()),
        ready_delay: None,
        ignore_stop: false,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--listen" => args.listen = value()?,
            "--version" => args.version = value()?,
            "--ready-delay" => {
                let v = value()?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("--ready-delay: {v:?} is not a number of milliseconds"))?;
                args.ready_delay = Some(Duration::from_millis(ms));
            }
            "--ignore-stop" => args.ignore_stop = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("hello: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let ally = Ally::from_env().await?;
    let listener = ally.tcp_listener(&args.listen).await?;
    let pid = std::process::id();
    eprintln!(
        "hello: listening on {} version={} pid={pid} generation={} ({})",
        listener.local_addr()?,
        args.version,
        ally.generation(),
        if ally.is_managed() {
            "managed"
        } else {
            "simulate mode"
        },
    );
    if let Some(delay) = args.ready_delay {
        sleep(delay).await;
    }
    ally.ready().await?;

    // With --ignore-stop the signal is still caught (so it does not kill us) but nothing
    // listens to it: a handle of our own that never fires stands in.
    let stop = if args.ignore_stop {
        StopHandle::new()
    } else {
        ally.stop_handle()
    };
    let body: Arc<str> = format!(
        "hello version={} pid={pid} generation={}\n",
        args.version,
        ally.generation()
    )
    .into();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, body.clone(), stop.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    eprintln!("hello: accept: {e}");
                    sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    eprintln!(
        "hello: stopping pid={pid}, {} connection(s) open",
        connections.len()
    );
    while connections.join_next().await.is_some() {}
    eprintln!("hello: stopped pid={pid}");
    Ok(())
}

async fn serve(mut stream: TcpStream, body: Arc<str>, stop: StopHandle) {
    let mut buf = Vec::with_capacity(4096);
    let mut last_activity = Instant::now();
    loop {
        loop {
            match parse_request(&buf) {
                Parsed::Partial if buf.len() > MAX_HEADER_BYTES => {
                    let _ = respond_error(&mut stream, "431 Request Header Fields Too Large").await;
                    return close(stream).await;
                }
                Parsed::Partial => break,
                Parsed::Bad(status) => {
                    let _ = respond_error(&mut stream, status).await;
                    return close(stream).await;
                }
                Parsed::Request {
                    len,
                    keep_alive,
                    head,
                } => {
                    buf.drain(..len);
                    let keep_alive = keep_alive && !stop.is_stopping();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{}",
                        body.len(),
                        if keep_alive { "keep-alive" } else { "close" },
                        if head { "" } else { &body },
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() {
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
            // Wakes the loop up to start the idle clock.
            _ = stop.stopped(), if idle_deadline.is_none() => {}
            _ = sleep_until(idle_deadline.unwrap_or_else(Instant::now)), if idle_deadline.is_some() => {
                return close(stream).await;
            }
        }
    }
}

/// Half-closes, then reads until the peer closes too: closing with unread data would
/// reset the connection and could destroy the response still in flight.
async fn close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = timeout(Duration::from_millis(500), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn respond_error(stream: &mut TcpStream, status: &str) -> std::io::Result<()> {
    let body = format!("{status}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await
}

enum Parsed {
    Partial,
    Bad(&'static str),
    Request {
        /// Bytes of the request, head and body.
        len: usize,
        keep_alive: bool,
        head: bool,
    },
}

fn parse_request(buf: &[u8]) -> Parsed {
    // Tolerate empty lines before a request (RFC 9112 §2.2).
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let Some(end) = find(&buf[start..], b"\r\n\r\n") else {
        return Parsed::Partial;
    };
    let Ok(head) = std::str::from_utf8(&buf[start..start + end]) else {
        return Parsed::Bad("400 Bad Request");
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(_target), Some(version), None) =
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
        head: method == "HEAD",
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
