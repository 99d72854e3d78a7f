//! Cache and counter calls straight to the broker's state socket.
//!
//! A call through zbus crosses tasks on both ends (the connection's reader task, the
//! object server), and each crossing costs a thread wake-up that is larger than the
//! call itself. The state socket (`$RUNTIME/state`, `ALLY_STATE_ADDRESS`) serves
//! `org.ally.Cache1` and `org.ally.Atomic1` with the same D-Bus messages, answered in
//! the task that reads them. Here each call writes its message on a connection of its
//! own (taken from a small pool) and reads the reply in the calling task, or, for the
//! blocking client, on the calling thread with blocking I/O.
//!
//! The blocking client can wait for each reply, while it calls in sequence, by polling
//! the socket before sleeping on it: off by default, on for as long as
//! `ALLY_STATE_BUSY_POLL` says (e.g. `50us`; see [`ally_core::busy_poll`]). Never when
//! other state calls are in flight in the process:
//! their callers would poll against each other for the same CPUs. The async client
//! waits in its runtime: a worker that polled would hold up the app's other tasks,
//! and measured side by side it was not reliably faster (on busy vCPUs, at times
//! several times slower).
//!
//! When the socket cannot be reached (an older broker, or none at that path) the
//! client says so once and keeps using its D-Bus connection. Once it was reached,
//! failing to connect means the broker is restarting: the call connects again with
//! back-off, as `crate::reconnect` says.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zbus::Message;
use zbus::message::Type as MessageType;
use zbus::wire::Type;

use crate::error::{Error, Result};
use crate::reconnect::{self, Backoff, Broke, Method};
use ally_core::busy_poll::{BusyPoll, CLIENT_BUDGET_ENV, parse_budget};
use ally_core::proxy::PATH;
use ally_core::state::calls::Call;
use ally_core::wire::{self, FIXED_HEADER};

/// Connections kept open between calls; more are opened when more calls overlap.
const IDLE_CONNECTIONS: usize = 16;

thread_local! {
    static BLOCKING_IO: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (a `block_on` of the blocking client) with direct calls made by blocking
/// I/O on this thread, which spares the wake-up of the runtime's I/O driver.
pub(crate) fn blocking_io<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            BLOCKING_IO.set(self.0);
        }
    }
    let _reset = Reset(BLOCKING_IO.replace(true));
    f()
}

/// How cache and counter calls reach the broker ([`Ally::connect_with`](crate::Ally::connect_with)).
/// Either way the calls, their results and errors are the same; the state socket only
/// makes them cheaper. Locks always go over the D-Bus connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StateSocket {
    /// `ALLY_STATE_ADDRESS` when set (set but empty: [`Off`](Self::Off)), else the
    /// `state` socket beside a private socket named `bus`. A bus address has none.
    #[default]
    Auto,
    /// Over the D-Bus connection.
    Off,
    /// The state socket at this D-Bus address (`unix:path=...`).
    At(String),
}

impl StateSocket {
    /// The state socket's path for a client of the broker at `address`, if any.
    pub(crate) fn path_for(&self, address: &str) -> Option<PathBuf> {
        match self {
            StateSocket::Off => None,
            StateSocket::At(state) => unix_path(state),
            StateSocket::Auto => match std::env::var("ALLY_STATE_ADDRESS") {
                Ok(state) if state.is_empty() => None,
                Ok(state) => unix_path(&state),
                Err(_) => {
                    let private = unix_path(address)?;
                    (private.file_name()? == "bus").then(|| private.with_file_name("state"))
                }
            },
        }
    }
}

fn unix_path(address: &str) -> Option<PathBuf> {
    use zbus::address::transport::{Transport, UnixSocket};
    let address: zbus::Address = address.parse().ok()?;
    match address.transport() {
        Transport::Unix(unix) => match unix.path() {
            UnixSocket::File(path) => Some(path.clone()),
            _ => None,
        },
        _ => None,
    }
}

#[derive(Debug)]
pub(crate) struct Direct {
    path: PathBuf,
    unreachable: AtomicBool,
    /// A connection was made once: failing to connect now is the broker restarting.
    reached: AtomicBool,
    /// How long to try connecting again when the connection breaks.
    timeout: Duration,
    idle: Mutex<Vec<tokio::net::UnixStream>>,
    idle_blocking: Mutex<Vec<std::os::unix::net::UnixStream>>,
    busy_poll: BusyPoll,
}

enum Failure {
    /// No connection could be made.
    Connect,
    /// The connection broke, before the call was written or after.
    Broke(Broke),
    /// No connection could be made again within the timeout: why.
    GaveUp(String),
    /// The call may or may not have been carried out.
    Io(io::Error),
}

/// A failed read of the reply: the connection closing, or a broken reply.
fn reading(e: io::Error) -> Failure {
    if reconnect::read_broke(&e) {
        Failure::Broke(Broke::InFlight)
    } else {
        Failure::Io(e)
    }
}

impl Direct {
    pub(crate) fn new(path: PathBuf, timeout: Duration) -> Direct {
        Direct {
            path,
            unreachable: AtomicBool::new(false),
            reached: AtomicBool::new(false),
            timeout,
            idle: Mutex::new(Vec::new()),
            idle_blocking: Mutex::new(Vec::new()),
            busy_poll: BusyPoll::new(client_budget()),
        }
    }

    /// Makes the call `C`; `None` when the state socket is unreachable and the caller
    /// should use its D-Bus connection.
    ///
    /// A pooled connection whose broker went away fails the write, which is then
    /// made again on a new connection; a connection that breaks after the write is
    /// replaced too, but the call is made again only if [`Method::may_repeat`].
    pub(crate) async fn call<C: Call>(&self, args: &C::Args<'_>) -> Option<Result<C::Reply>> {
        if self.unreachable.load(Ordering::Relaxed) {
            return None;
        }
        let method = Method {
            interface: C::INTERFACE,
            member: C::MEMBER,
        };
        let member = C::MEMBER;
        let request = match Message::method_call(PATH, member)
            .interface(C::INTERFACE)
            .build(args)
        {
            Ok(request) => request,
            Err(e) => return Some(Err(Error::call(member, e))),
        };
        let blocking = BLOCKING_IO.get().then(|| {
            let in_flight = InFlight::enter();
            let budget = if in_flight.alone() {
                self.busy_poll.budget()
            } else {
                Duration::ZERO
            };
            (in_flight, budget)
        });
        let budget = blocking.as_ref().map(|(_, budget)| *budget);
        let broke = match self.exchange(&request, budget, false).await {
            Ok(bytes) => return Some(parse_reply(member, &request, bytes)),
            Err(Failure::Connect) if !self.reached.load(Ordering::Relaxed) => {
                self.unreachable.store(true, Ordering::Relaxed);
                return None;
            }
            Err(Failure::Connect) => Broke::BeforeSending,
            Err(Failure::Broke(broke)) => broke,
            Err(Failure::GaveUp(why)) => {
                return Some(Err(Error::disconnected(reconnect::reconnect_failed(
                    member, why,
                ))));
            }
            Err(Failure::Io(e)) => return Some(Err(self.io_error(member, e))),
        };
        if !method.may_repeat(broke) {
            return Some(Err(Error::disconnected(reconnect::not_repeated(member))));
        }
        Some(match self.exchange(&request, budget, true).await {
            Ok(bytes) => parse_reply(member, &request, bytes),
            Err(Failure::GaveUp(why)) => Err(Error::disconnected(reconnect::reconnect_failed(
                member, why,
            ))),
            Err(Failure::Connect | Failure::Broke(_)) => {
                Err(Error::disconnected(reconnect::not_repeated(member)))
            }
            Err(Failure::Io(e)) => Err(self.io_error(member, e)),
        })
    }

    fn io_error(&self, member: &str, e: io::Error) -> Error {
        Error::io(
            format!("{member} on the state socket {}", self.path.display()),
            e,
        )
    }

    /// One round trip, on a pooled or new connection, or `again` on a new one made
    /// with back-off (the others pooled are let go: their broker is likely gone).
    /// `budget` is the blocking client's, which does its I/O on this thread.
    async fn exchange(
        &self,
        request: &Message,
        budget: Option<Duration>,
        again: bool,
    ) -> Result<Vec<u8>, Failure> {
        match budget {
            Some(budget) => self.round_trip_blocking(request, budget, again),
            None => self.round_trip(request, again).await,
        }
    }

    async fn round_trip(&self, request: &Message, again: bool) -> Result<Vec<u8>, Failure> {
        let pooled = if again {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
            None
        } else {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
        };
        let mut stream = match pooled {
            Some(stream) => stream,
            None if again => self.reconnect().await?,
            None => match tokio::time::timeout(self.timeout, self.connect()).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(_)) | Err(_) => return Err(Failure::Connect),
            },
        };
        stream
            .write_all(request.data())
            .await
            .map_err(|_| Failure::Broke(Broke::BeforeSending))?;
        let mut reply = ReplyBuffer::default();
        loop {
            let room = reply.room().map_err(Failure::Io)?;
            let n = stream.read(room).await.map_err(reading)?;
            if let Some(done) = reply.received(n).map_err(reading)? {
                give_back(&self.idle, stream);
                return Ok(done);
            }
        }
    }

    fn round_trip_blocking(
        &self,
        request: &Message,
        budget: Duration,
        again: bool,
    ) -> Result<Vec<u8>, Failure> {
        let pooled = if again {
            self.idle_blocking
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            None
        } else {
            self.idle_blocking
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
        };
        let mut stream = match pooled {
            Some(stream) => stream,
            None if again => self.reconnect_blocking()?,
            None => self
                .connect_blocking(self.timeout)
                .map_err(|_| Failure::Connect)?,
        };
        stream
            .write_all(request.data())
            .map_err(|_| Failure::Broke(Broke::BeforeSending))?;
        let sent = Instant::now();
        let mut reply = ReplyBuffer::default();
        loop {
            let room = reply.room().map_err(Failure::Io)?;
            let n = match recv_now(&stream, room).map_err(reading)? {
                Some(n) => n,
                None if sent.elapsed() < budget => {
                    std::hint::spin_loop();
                    continue;
                }
                None => stream.read(room).map_err(reading)?,
            };
            if let Some(done) = reply.received(n).map_err(reading)? {
                self.busy_poll.waited(sent.elapsed());
                give_back(&self.idle_blocking, stream);
                return Ok(done);
            }
        }
    }

    /// A new connection, tried with back-off for up to the timeout.
    async fn reconnect(&self) -> Result<tokio::net::UnixStream, Failure> {
        let mut backoff = Backoff::new(Instant::now(), self.timeout);
        loop {
            let left = backoff.remaining(Instant::now());
            let last = match tokio::time::timeout(left, self.connect()).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the connection was not answered".to_string(),
            };
            match backoff.delay(Instant::now()) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(self.gave_up(last)),
            }
        }
    }

    fn reconnect_blocking(&self) -> Result<std::os::unix::net::UnixStream, Failure> {
        let mut backoff = Backoff::new(Instant::now(), self.timeout);
        loop {
            let left = backoff.remaining(Instant::now());
            let last = match self.connect_blocking(left) {
                Ok(stream) => return Ok(stream),
                Err(e) => e.to_string(),
            };
            match backoff.delay(Instant::now()) {
                Some(delay) => std::thread::sleep(delay),
                None => return Err(self.gave_up(last)),
            }
        }
    }

    fn gave_up(&self, last: String) -> Failure {
        Failure::GaveUp(reconnect::gave_up(self.path.display(), self.timeout, last))
    }

    async fn connect(&self) -> io::Result<tokio::net::UnixStream> {
        let mut stream = tokio::net::UnixStream::connect(&self.path).await?;
        stream.write_all(&handshake()).await?;
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            let mut chunk = [0u8; 128];
            let n = stream.read(&mut chunk).await?;
            handshake_bytes(&mut line, &chunk[..n])?;
        }
        check_line(&line)?;
        self.reached.store(true, Ordering::Relaxed);
        Ok(stream)
    }

    /// Connects, waiting for the handshake's reply up to `limit`: a broker
    /// re-executing itself answers once it serves again.
    fn connect_blocking(&self, limit: Duration) -> io::Result<std::os::unix::net::UnixStream> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.path)?;
        // Zero would mean no limit.
        stream.set_read_timeout(Some(limit.max(Duration::from_millis(1))))?;
        stream.write_all(&handshake())?;
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            let mut chunk = [0u8; 128];
            let n = stream.read(&mut chunk)?;
            handshake_bytes(&mut line, &chunk[..n])?;
        }
        check_line(&line)?;
        stream.set_read_timeout(None)?;
        self.reached.store(true, Ordering::Relaxed);
        Ok(stream)
    }
}

/// How long the blocking client polls for a reply: off unless [`CLIENT_BUDGET_ENV`]
/// says how long.
fn client_budget() -> Duration {
    std::env::var(CLIENT_BUDGET_ENV)
        .ok()
        .and_then(|v| parse_budget(&v))
        .unwrap_or(Duration::ZERO)
}

/// Blocking state calls in flight in this process, on any connection.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts a call in [`IN_FLIGHT`] for as long as it lives.
struct InFlight {
    alone: bool,
}

impl InFlight {
    fn enter() -> InFlight {
        let before = IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        InFlight { alone: before == 0 }
    }

    /// Whether no other call was in flight when this one began.
    fn alone(&self) -> bool {
        self.alone
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads what has arrived without waiting: `None` when nothing has. Straight to the
/// socket, not through Tokio's readiness, which only its I/O driver updates.
fn recv_now(stream: &impl AsFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match recv(stream.as_fd().as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
        Ok(n) => Ok(Some(n)),
        Err(Errno::EAGAIN) => Ok(None),
        Err(Errno::EINTR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn handshake() -> Vec<u8> {
    wire::client_handshake(nix::unistd::geteuid().as_raw())
}

fn check_line(line: &[u8]) -> io::Result<()> {
    wire::check_handshake_reply(String::from_utf8_lossy(line).trim_end())
}

fn give_back<S>(pool: &Mutex<Vec<S>>, stream: S) {
    let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < IDLE_CONNECTIONS {
        pool.push(stream);
    }
}

fn handshake_bytes(line: &mut Vec<u8>, read: &[u8]) -> io::Result<()> {
    if read.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the state socket closed during the handshake",
        ));
    }
    line.extend_from_slice(read);
    if line.len() > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the state socket's handshake reply is too long",
        ));
    }
    Ok(())
}

/// One reply, assembled from reads. The broker answers one call at a time on a
/// connection, so anything past the reply is a broken stream.
#[derive(Default)]
struct ReplyBuffer {
    bytes: Vec<u8>,
    filled: usize,
}

impl ReplyBuffer {
    /// Room for the next read: the fixed header first, then what it says is left.
    fn room(&mut self) -> io::Result<&mut [u8]> {
        if self.bytes.len() == self.filled {
            let want = self.expected_len()?.unwrap_or(512);
            self.bytes.resize(want.max(self.filled + 1), 0);
        }
        Ok(&mut self.bytes[self.filled..])
    }

    /// Counts a read of `n` bytes into [`room`](Self::room); the reply once whole.
    fn received(&mut self, n: usize) -> io::Result<Option<Vec<u8>>> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the broker closed the state socket connection",
            ));
        }
        self.filled += n;
        let Some(len) = self.expected_len()? else {
            return Ok(None);
        };
        match self.filled.cmp(&len) {
            std::cmp::Ordering::Less => Ok(None),
            std::cmp::Ordering::Equal => {
                self.bytes.truncate(len);
                Ok(Some(std::mem::take(&mut self.bytes)))
            }
            std::cmp::Ordering::Greater => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the broker sent more than one reply",
            )),
        }
    }

    /// The whole reply's length, once its fixed header is in.
    fn expected_len(&self) -> io::Result<Option<usize>> {
        if self.filled < FIXED_HEADER {
            return Ok(None);
        }
        let fixed: &[u8; FIXED_HEADER] = self.bytes[..FIXED_HEADER].try_into().expect("16 bytes");
        wire::message_len(fixed).map(Some)
    }
}

fn parse_reply<R: DeserializeOwned + Type>(
    member: &'static str,
    request: &Message,
    bytes: Vec<u8>,
) -> Result<R> {
    let reply = wire::decode(bytes).map_err(|e| Error::call(member, e))?;
    let header = reply.header();
    if header.reply_serial() != Some(request.primary_header().serial_num()) {
        return Err(Error::call(member, zbus::Error::InvalidReply));
    }
    match header.message_type() {
        MessageType::MethodReturn => reply
            .body()
            .deserialize::<R>()
            .map_err(|e| Error::call(member, e)),
        MessageType::Error => Err(Error::call(member, zbus::Error::from(reply.clone()))),
        _ => Err(Error::call(member, zbus::Error::InvalidReply)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_socket_sits_beside_the_private_one() {
        let auto = |address| StateSocket::Auto.path_for(address);
        assert_eq!(
            auto("unix:path=/run/ally/web/bus"),
            Some(PathBuf::from("/run/ally/web/state"))
        );
        assert_eq!(auto("unix:path=/tmp/other.sock"), None);
        assert_eq!(auto("unix:abstract=foo"), None);
        assert_eq!(auto("tcp:host=localhost,port=1"), None);
        assert_eq!(
            StateSocket::Off.path_for("unix:path=/run/ally/web/bus"),
            None
        );
        assert_eq!(
            StateSocket::At("unix:path=/x/y".into()).path_for("unix:path=/run/ally/web/bus"),
            Some(PathBuf::from("/x/y"))
        );
    }

    #[test]
    fn a_reply_is_whole_only_at_its_exact_length() {
        let msg = Message::method_call("/org/ally", "Add")
            .interface(ally_core::state::calls::ATOMIC)
            .build(&("n", 1i64))
            .unwrap();
        let bytes = msg.data().to_vec();
        // Fed in pieces of `chunk` bytes: what each read makes of the reply.
        let feed = |input: &[u8], chunk: usize| -> io::Result<Option<Vec<u8>>> {
            let mut reply = ReplyBuffer::default();
            let mut rest = input;
            loop {
                let room = reply.room()?;
                let n = room.len().min(chunk).min(rest.len());
                room[..n].copy_from_slice(&rest[..n]);
                rest = &rest[n..];
                match reply.received(n)? {
                    Some(done) => return Ok(Some(done)),
                    None if rest.is_empty() => return Ok(None),
                    None => {}
                }
            }
        };
        assert!(feed(&bytes[..10], 10).unwrap().is_none());
        assert_eq!(feed(&bytes, bytes.len()).unwrap().unwrap(), bytes);
        assert_eq!(feed(&bytes, 7).unwrap().unwrap(), bytes);
        let mut longer = bytes.clone();
        longer.extend_from_slice(&bytes);
        assert!(feed(&longer, longer.len()).is_err());
        assert!(feed(&[], 1).is_err());
    }
}
