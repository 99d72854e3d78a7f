//! The example programs, run as processes in simulate mode.
//!
//! The kit builds the workspace's examples once per run, so `cargo test --test
//! examples` alone never runs stale binaries.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod greeter;

use ally_testkit::example;
use ally_testkit::http::Response;
use ally_testkit::process::{Pipe, Spawned};
use greeter::HelloReply;
use nix::sys::signal::Signal;

struct Program {
    process: Spawned,
    first_line: String,
}

impl Program {
    fn start(name: &str, args: &[&str]) -> Program {
        let mut cmd = Command::new(example(name));
        cmd.args(args)
            .env_remove("ALLY_ADDRESS")
            .env_remove("ALLY_STOP_SIGNAL")
            .env_remove("HELLO_VERSION")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let process = Spawned::start(cmd, Pipe::Stderr);
        let first_line = process
            .next_line(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{name} printed nothing: {e}"));
        Program {
            process,
            first_line,
        }
    }

    /// The `host:port` after `word` in the first line.
    fn addr_after(&self, word: &str) -> SocketAddr {
        let rest = self
            .first_line
            .split_once(word)
            .unwrap_or_else(|| panic!("no {word:?} in {:?}", self.first_line))
            .1;
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Waits for a line of stderr containing `needle`, skipping the lines before it.
    fn wait_for_line(&self, needle: &str, within: Duration) -> String {
        self.process.expect_line(needle, within)
    }

    fn stderr_lines(&self) -> Vec<String> {
        self.process.lines_so_far()
    }
}

impl std::ops::Deref for Program {
    type Target = Spawned;

    fn deref(&self) -> &Spawned {
        &self.process
    }
}

impl std::ops::DerefMut for Program {
    fn deref_mut(&mut self) -> &mut Spawned {
        &mut self.process
    }
}

/// Reads one response; `None` on a clean end of stream before any byte.
fn read_response(stream: &mut TcpStream) -> Option<Response> {
    let response = ally_testkit::http::read_response(stream)
        .unwrap_or_else(|e| panic!("reading response: {e}"))?;
    assert!(
        response.header("Content-Length").is_some(),
        "every response has Content-Length: {:?}",
        response.head
    );
    Some(response)
}

fn get(stream: &mut TcpStream, extra: &str) -> Response {
    write!(stream, "GET / HTTP/1.1\r\nHost: test\r\n{extra}\r\n").unwrap();
    read_response(stream).expect("a response")
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A keep-alive connection left idle is closed about a second (the drain's idle
/// time) after the stop at `stopped_at`, not at once.
fn assert_closed_once_idle(stream: &mut TcpStream, stopped_at: Instant) {
    assert_closed(stream);
    let idle_for = stopped_at.elapsed();
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(5),
        "idle connection closed after {idle_for:?}"
    );
}

fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected end of stream, got {:?}", &buf[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected end of stream: {e}"),
    }
}

#[test]
fn hello_keeps_alive_then_drains_on_sigterm() {
    let mut hello = Program::start("hello", &["--listen", "127.0.0.1:0", "--version", "7"]);
    assert!(
        hello.first_line.contains(&format!("pid={}", hello.pid())),
        "{}",
        hello.first_line
    );
    let addr = hello.addr_after("listening on ");
    let expected = format!("hello version=7 pid={} generation=1\n", hello.pid());

    let mut busy = connect(addr);
    for _ in 0..2 {
        let r = get(&mut busy, "");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, expected);
        assert_eq!(r.header("Connection"), None, "HTTP/1.1 keeps alive");
    }
    let mut idle = connect(addr);
    assert_eq!(get(&mut idle, "").header("Connection"), None);
    let mut old = connect(addr);
    let keep_alive_10 = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    old.write_all(keep_alive_10.as_bytes()).unwrap();
    let r = read_response(&mut old).unwrap();
    assert_eq!(r.header("Connection"), Some("keep-alive"));

    hello.signal(Signal::SIGTERM);
    let stopped_at = Instant::now();
    hello.wait_for_line("stopping", Duration::from_secs(10));

    // An HTTP/1.0 client is told plainly to close (not `close, keep-alive`).
    old.write_all(keep_alive_10.as_bytes()).unwrap();
    let r = read_response(&mut old).unwrap();
    assert_eq!(r.header("Connection"), Some("close"));
    assert_closed(&mut old);

    // A request on a kept-alive connection after the stop is answered, then closed.
    let r = get(&mut busy, "");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, expected);
    assert_eq!(r.header("Connection"), Some("close"));
    assert_closed(&mut busy);

    // The idle connection is closed about a second after the stop.
    assert_closed_once_idle(&mut idle, stopped_at);

    let status = hello.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
    let lines = hello.stderr_lines();
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:?}");
}

#[test]
fn hello_speaks_enough_http() {
    let hello = Program::start("hello", &["--listen", "127.0.0.1:0"]);
    let addr = hello.addr_after("listening on ");
    let expected = format!("hello version=1 pid={} generation=1\n", hello.pid());

    // Two pipelined requests, one with a body, in a single write.
    let mut stream = connect(addr);
    stream
        .write_all(
            b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .unwrap();
    for _ in 0..2 {
        let r = read_response(&mut stream).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, expected);
    }

    // Connection: close is honoured.
    let r = get(&mut stream, "Connection: close\r\n");
    assert_eq!(r.header("Connection"), Some("close"));
    assert_eq!(r.body, expected);
    assert_closed(&mut stream);

    // HTTP/1.0 closes unless asked to keep alive.
    let mut stream = connect(addr);
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let r = read_response(&mut stream).unwrap();
    assert_ne!(r.header("Connection"), Some("keep-alive"));
    assert_closed(&mut stream);
    let mut stream = connect(addr);
    stream
        .write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let r = read_response(&mut stream).unwrap();
    assert_eq!(r.header("Connection"), Some("keep-alive"));

    // HEAD has the length but no body.
    let mut stream = connect(addr);
    stream
        .write_all(b"HEAD / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut all = String::new();
    stream.read_to_string(&mut all).unwrap();
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    assert!(
        all.contains(&format!("Content-Length: {}", expected.len())),
        "{all}"
    );
    assert!(all.ends_with("\r\n\r\n"), "{all:?}");

    // Garbage gets a 400 and a close.
    let mut stream = connect(addr);
    stream.write_all(b"NONSENSE\r\n\r\n").unwrap();
    let r = read_response(&mut stream).unwrap();
    assert_eq!(r.status, 400);
    assert_closed(&mut stream);
}

#[test]
fn hello_version_comes_from_the_environment_too() {
    let mut cmd = Command::new(example("hello"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("HELLO_VERSION", "42")
        .env_remove("ALLY_ADDRESS")
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("version=42"), "{line}");
}

#[test]
fn hello_ignore_stop_keeps_serving() {
    let mut hello = Program::start("hello", &["--listen", "127.0.0.1:0", "--ignore-stop"]);
    let addr = hello.addr_after("listening on ");
    let mut stream = connect(addr);
    assert_eq!(get(&mut stream, "").status, 200);
    hello.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(hello.child.try_wait().unwrap().is_none(), "hello exited");
    let r = get(&mut stream, "");
    assert_eq!(r.header("Connection"), None, "still keeps alive");
    assert_eq!(get(&mut connect(addr), "").status, 200);
    hello.signal(Signal::SIGKILL);
    let status = hello.wait(Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
}

#[test]
fn hello_reports_a_busy_address() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let mut hello = Program::start("hello", &["--listen", &addr]);
    assert!(
        hello.first_line.contains("already in use"),
        "{}",
        hello.first_line
    );
    assert_eq!(hello.wait(Duration::from_secs(10)).code(), Some(1));
}

#[test]
fn datagram_echoes_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let mut program = Program::start(
        "datagram",
        &["--udp", "127.0.0.1:0", "--unix", path.to_str().unwrap()],
    );
    let pid = program.pid();
    let udp_addr = program.addr_after("udp on ");

    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    udp.send_to(b"ping", udp_addr).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(from, udp_addr);
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        format!("pid={pid} ping")
    );

    let mut unix = UnixStream::connect(&path).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    unix.write_all(b"one\ntwo\n").unwrap();
    let mut reader = BufReader::new(unix.try_clone().unwrap());
    for word in ["one", "two"] {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, format!("pid={pid} {word}\n"));
    }

    program.signal(Signal::SIGTERM);
    program.wait_for_line("stopping", Duration::from_secs(10));
    // The open connection is still served until it has been idle for a second.
    unix.write_all(b"three\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("pid={pid} three\n"));
    line.clear();
    assert_eq!(reader.read_line(&mut line).unwrap(), 0, "{line:?}");

    let status = program.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// The connections an HTTP example's drain is checked with: one busy (a request
/// answered), one idle after a request, and one accepted whose request is not
/// sent yet when the stop comes.
struct DrainConnections {
    busy: TcpStream,
    idle: TcpStream,
    late: TcpStream,
}

impl DrainConnections {
    fn open(addr: SocketAddr, expected: &str) -> DrainConnections {
        let mut busy = connect(addr);
        let r = get(&mut busy, "");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, expected);
        assert_eq!(r.header("Connection"), None, "HTTP/1.1 keeps alive");
        let mut idle = connect(addr);
        assert_eq!(get(&mut idle, "").status, 200);
        let late = connect(addr);
        // In simulate mode nobody else holds the socket: a connection still queued at
        // the stop would be reset, so the stop waits until it was accepted.
        ally_testkit::wait_until(
            "the late connection accepted",
            Duration::from_secs(10),
            || ally_testkit::procfs::accept_queue(addr.port()) == Some(0),
        );
        DrainConnections { busy, idle, late }
    }

    /// Sends the stop; returns when it came.
    fn stop(app: &Program) -> Instant {
        app.signal(Signal::SIGTERM);
        let stopped_at = Instant::now();
        app.wait_for_line("stopping", Duration::from_secs(10));
        stopped_at
    }

    /// The late and the busy connection are answered after the stop, told to close,
    /// and closed.
    fn answered_then_closed(&mut self, expected: &str) {
        for stream in [&mut self.late, &mut self.busy] {
            let r = get(stream, "");
            assert_eq!(r.body, expected);
            assert_eq!(r.header("Connection"), Some("close"));
            assert_closed(stream);
        }
    }

    /// The idle connection closes about the drain's idle time after the stop, and the
    /// program then exits 0.
    fn finish(mut self, app: &mut Program, stopped_at: Instant) {
        assert_closed_once_idle(&mut self.idle, stopped_at);
        let status = app.wait(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{status:?}");
        let lines = app.stderr_lines();
        assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:?}");
    }
}

#[test]
fn axum_server_serves_then_drains_without_cutting_requests() {
    let mut app = Program::start("axum_server", &["--listen", "127.0.0.1:0"]);
    let addr = app.addr_after("listening on ");
    let expected = format!("hello from axum pid={} generation=1\n", app.pid());
    let mut connections = DrainConnections::open(addr, &expected);
    let stopped_at = DrainConnections::stop(&app);
    connections.answered_then_closed(&expected);
    connections.finish(&mut app, stopped_at);
}

#[test]
fn actix_server_serves_then_drains_without_cutting_requests() {
    let mut app = Program::start("actix_server", &["--listen", "127.0.0.1:0"]);
    let addr = app.addr_after("listening on ");
    let expected = format!("hello from actix pid={} generation=1\n", app.pid());
    let keep_alive_10 = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let mut old = connect(addr);
    old.write_all(keep_alive_10.as_bytes()).unwrap();
    let r = read_response(&mut old).unwrap();
    assert_eq!(r.header("Connection"), Some("keep-alive"));
    let mut connections = DrainConnections::open(addr, &expected);

    let stopped_at = DrainConnections::stop(&app);
    connections.answered_then_closed(&expected);
    // To HTTP/1.0, actix says `close` by not saying `keep-alive`.
    old.write_all(keep_alive_10.as_bytes()).unwrap();
    let r = read_response(&mut old).unwrap();
    assert_eq!(r.body, expected);
    assert_eq!(r.header("Connection"), None, "{:?}", r.head);
    assert_closed(&mut old);
    connections.finish(&mut app, stopped_at);
}

async fn say_hello(addr: SocketAddr, name: &str) -> HelloReply {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    greeter::hello(channel, name).await.unwrap()
}

#[test]
fn tonic_server_answers_and_stops() {
    let mut app = Program::start("tonic_server", &["--listen", "127.0.0.1:0"]);
    let addr = app.addr_after("listening on ");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reply = runtime.block_on(say_hello(addr, "ally"));
    assert_eq!(reply.message, "hello ally");
    assert_eq!(reply.pid, app.pid());
    assert_eq!(reply.generation, 1);
    // The channel's connection lives on the runtime: the client goes away.
    drop(runtime);

    app.signal(Signal::SIGTERM);
    let status = app.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
    let lines = app.stderr_lines();
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:?}");
}

#[test]
fn std_server_echoes_then_drains() {
    let mut app = Program::start("std_server", &["--listen", "127.0.0.1:0"]);
    let addr = app.addr_after("listening on ");
    let prefix = format!("pid={} generation=1 ", app.pid());
    let mut stream = connect(addr);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    stream.write_all(b"one\ntwo\n").unwrap();
    for word in ["one", "two"] {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{prefix}{word}\n"));
    }

    app.signal(Signal::SIGTERM);
    let stopped_at = Instant::now();
    app.wait_for_line("stopping", Duration::from_secs(10));
    // New connections go to the next generation; this one is still served...
    stream.write_all(b"three\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("{prefix}three\n"));
    // ...until it has been idle for a second.
    line.clear();
    assert_eq!(reader.read_line(&mut line).unwrap(), 0, "{line:?}");
    let idle_for = stopped_at.elapsed();
    assert!(
        idle_for >= Duration::from_millis(900),
        "closed after {idle_for:?}"
    );

    let status = app.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
}
