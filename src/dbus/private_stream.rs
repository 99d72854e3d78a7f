//! A private-socket connection as zbus gets it: authenticated here, then handed over
//! as a socket of ours.
//!
//! zbus's own server handshake is not given a stranger's bytes: in zbus 6.2.1 a line
//! that starts with `\n` panics it (`handshake/common.rs`, `recv_buffer[lf_index - 1]`;
//! see `docs/notes/zbus-handshake-panic.md`) and it buffers a line of any length. The
//! conversation runs through [`sasl`] instead, reading no byte past
//! `BEGIN`, and the connection is built with `Builder::authenticated_socket`.
//!
//! zbus reads any message up to the D-Bus limit of 128 MiB before it looks at it; the
//! socket's read half refuses one whose fixed header declares more than
//! `max_message_bytes` before zbus allocates for it. It passes file descriptors out (for
//! `Listen`) but takes none in: no method of the broker's takes one, and the kernel
//! closes those a peer sends.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::socket::{ControlMessage, MsgFlags, Shutdown};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use zbus::connection::socket::{ReadHalf, Socket, Split, WriteHalf};
use zbus::export::async_trait::async_trait;

use super::gate::Gate;
use super::{framing, unreadable};
use ally_core::sasl::{self, Handshake, Step};
use ally_core::wire::{self, FIXED_HEADER};

/// A client that authenticated and began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begun {
    /// Whether it negotiated file descriptor passing (`NEGOTIATE_UNIX_FD`).
    pub unix_fds: bool,
}

/// Runs the authentication conversation on `stream` for a peer whose socket
/// credentials say `uid`; `None` when the client did not authenticate and begin.
pub async fn authenticate(
    stream: &mut UnixStream,
    uid: u32,
    guid: &str,
) -> io::Result<Option<Begun>> {
    let mut conversation = Handshake::new(uid, guid.to_string()).passing_fds();
    let mut line = Vec::with_capacity(64);
    let mut first = true;
    loop {
        if !read_line(stream, &mut line).await? {
            return Ok(None);
        }
        let mut text = &line[..];
        if first {
            // The credentials byte comes first, before the first line.
            match text.split_first() {
                Some((0, rest)) => text = rest,
                _ => return Ok(None),
            }
            first = false;
        }
        let Some(text) = text.strip_suffix(b"\r\n") else {
            return Ok(None);
        };
        match conversation.line(&String::from_utf8_lossy(text)) {
            Step::Reply(answer) => stream.write_all(format!("{answer}\r\n").as_bytes()).await?,
            Step::Begin => {
                return Ok(Some(Begun {
                    unix_fds: conversation.agreed_unix_fds(),
                }));
            }
            Step::Close => return Ok(None),
        }
    }
}

/// Reads one line, through its `\n` and not a byte further (what follows `BEGIN` is
/// zbus's to read); false for a line longer than [`sasl::MAX_LINE`].
async fn read_line(stream: &UnixStream, line: &mut Vec<u8>) -> io::Result<bool> {
    line.clear();
    let mut buf = [0u8; sasl::MAX_LINE + 1];
    loop {
        let room = sasl::MAX_LINE + 1 - line.len();
        if room == 0 {
            return Ok(false);
        }
        let fd = stream.as_raw_fd();
        let peeked = stream
            .async_io(Interest::READABLE, || {
                recv(fd, &mut buf[..room], MsgFlags::MSG_PEEK)
            })
            .await?;
        if peeked == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let wanted = buf[..peeked]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(peeked, |i| i + 1);
        let got = stream
            .async_io(Interest::READABLE, || {
                recv(fd, &mut buf[..wanted], MsgFlags::empty())
            })
            .await?;
        line.extend_from_slice(&buf[..got]);
        if line.ends_with(b"\n") {
            return Ok(true);
        }
    }
}

fn recv(fd: RawFd, buf: &mut [u8], flags: MsgFlags) -> io::Result<usize> {
    Ok(nix::sys::socket::recv(fd, buf, flags)?)
}

/// An authenticated private-socket connection, for `Builder::authenticated_socket`.
#[derive(Debug)]
pub struct PrivateStream {
    stream: Arc<UnixStream>,
    gate: Arc<Gate>,
    /// Who is at the other end, for the log.
    peer: String,
}

impl PrivateStream {
    /// `stream`, its messages held to the gate's `max_message_bytes`.
    pub fn new(stream: UnixStream, gate: Arc<Gate>, peer: String) -> PrivateStream {
        PrivateStream {
            stream: Arc::new(stream),
            gate,
            peer,
        }
    }
}

impl Socket for PrivateStream {
    type ReadHalf = Reader;
    type WriteHalf = Writer;

    fn split(self) -> Split<Reader, Writer> {
        let writing = Arc::new(Mutex::new(()));
        Split::new(
            Reader {
                stream: self.stream.clone(),
                writing: writing.clone(),
                max: self.gate.limits().max_message_bytes,
                gate: self.gate,
                peer: self.peer,
                incoming: Vec::new(),
                checked: Vec::new(),
                handed: 0,
            },
            Writer {
                stream: self.stream,
                writing,
            },
        )
    }
}

/// What zbus reads: whole messages, each checked first. One the broker cannot read,
/// and a call that names no interface, is answered here (see `super::unreadable`)
/// instead of reaching zbus, which would end the connection without a word, or
/// answer only "Missing interface".
#[derive(Debug)]
pub struct Reader {
    stream: Arc<UnixStream>,
    /// Held while a message is written, so that an answer from here never lands
    /// inside one of zbus's.
    writing: Arc<Mutex<()>>,
    max: u64,
    gate: Arc<Gate>,
    peer: String,
    /// Bytes read that do not yet make a whole message.
    incoming: Vec<u8>,
    /// Whole messages checked, of which zbus has read `handed` bytes.
    checked: Vec<u8>,
    handed: usize,
}

/// How much is read at a time when a message is incomplete.
const READ_CHUNK: usize = 16 * 1024;

impl Reader {
    /// The length of the whole message at the start of `incoming`, once its fixed
    /// header is there; an error if it declares too much.
    fn next_len(&self) -> io::Result<Option<usize>> {
        let Some(fixed) = self.incoming.first_chunk::<FIXED_HEADER>() else {
            return Ok(None);
        };
        framing::declared_len(fixed, self.max).map(Some)
    }

    /// Moves the whole message of `len` bytes from `incoming` to `checked`, or
    /// answers it if it cannot be read.
    async fn check(&mut self, len: usize) -> io::Result<()> {
        let rest = self.incoming.split_off(len);
        let bytes = std::mem::replace(&mut self.incoming, rest);
        let fixed: [u8; FIXED_HEADER] = *bytes.first_chunk().expect("a whole message");
        let reply = match wire::decode(bytes) {
            Ok(message) => match unreadable::missing_interface(&message) {
                Some(reply) => reply,
                None => {
                    self.checked.extend_from_slice(message.data());
                    return Ok(());
                }
            },
            Err(e) => {
                let reason = e.to_string();
                self.gate.unreadable("private socket", &self.peer, &reason);
                unreadable::reply(&fixed, &reason)
            }
        };
        if let Some(reply) = reply {
            let _writing = self.writing.lock().await;
            write_all(&self.stream, reply.data()).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ReadHalf for Reader {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        loop {
            if self.handed < self.checked.len() {
                let n = buf.len().min(self.checked.len() - self.handed);
                buf[..n].copy_from_slice(&self.checked[self.handed..self.handed + n]);
                self.handed += n;
                if self.handed == self.checked.len() {
                    self.checked.clear();
                    self.handed = 0;
                }
                return Ok((n, vec![]));
            }
            let len = match self.next_len() {
                Ok(len) => len,
                Err(e) => {
                    self.gate.oversized("private socket", &self.peer, &e);
                    return Err(e);
                }
            };
            if let Some(len) = len.filter(|len| self.incoming.len() >= *len) {
                self.check(len).await?;
                continue;
            }
            self.incoming.reserve(READ_CHUNK);
            let n = loop {
                self.stream.readable().await?;
                match self.stream.try_read_buf(&mut self.incoming) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => break other?,
                }
            };
            if n == 0 {
                return Ok((0, vec![]));
            }
        }
    }

    /// Says so because zbus lets a connection send descriptors only when its read
    /// half can pass them.
    fn can_pass_unix_fd(&self) -> bool {
        true
    }
}

async fn write_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[derive(Debug)]
pub struct Writer {
    stream: Arc<UnixStream>,
    writing: Arc<Mutex<()>>,
}

#[async_trait]
impl WriteHalf for Writer {
    async fn sendmsg(&mut self, buffer: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        let fd = self.stream.as_raw_fd();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // The whole buffer (the rest of one message) goes out under the lock.
        let _writing = self.writing.lock().await;
        let sent = self
            .stream
            .async_io(Interest::WRITABLE, || {
                let rights = [ControlMessage::ScmRights(&raw)];
                let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
                Ok(nix::sys::socket::sendmsg::<()>(
                    fd,
                    &[IoSlice::new(buffer)],
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )?)
            })
            .await?;
        write_all(&self.stream, &buffer[sent..]).await?;
        Ok(buffer.len())
    }

    async fn close(&mut self) -> io::Result<()> {
        match nix::sys::socket::shutdown(self.stream.as_raw_fd(), Shutdown::Both) {
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }
}
