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
use zbus::connection::socket::{ReadHalf, Socket, Split, WriteHalf};
use zbus::export::async_trait::async_trait;

use super::framing::Framing;
use super::gate::Gate;
use ally_core::sasl::{self, Handshake, Step};

/// Runs the authentication conversation on `stream` for a peer whose socket
/// credentials say `uid`; whether the client authenticated and began.
pub async fn authenticate(stream: &mut UnixStream, uid: u32, guid: &str) -> io::Result<bool> {
    let mut conversation = Handshake::new(uid, guid.to_string()).passing_fds();
    let mut line = Vec::with_capacity(64);
    let mut first = true;
    loop {
        if !read_line(stream, &mut line).await? {
            return Ok(false);
        }
        let mut text = &line[..];
        if first {
            // The credentials byte comes first, before the first line.
            match text.split_first() {
                Some((0, rest)) => text = rest,
                _ => return Ok(false),
            }
            first = false;
        }
        let Some(text) = text.strip_suffix(b"\r\n") else {
            return Ok(false);
        };
        match conversation.line(&String::from_utf8_lossy(text)) {
            Step::Reply(answer) => stream.write_all(format!("{answer}\r\n").as_bytes()).await?,
            Step::Begin => return Ok(true),
            Step::Close => return Ok(false),
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
    framing: Framing,
    gate: Arc<Gate>,
    /// Who is at the other end, for the log.
    peer: String,
}

impl PrivateStream {
    /// `stream`, its messages held to the gate's `max_message_bytes`.
    pub fn new(stream: UnixStream, gate: Arc<Gate>, peer: String) -> PrivateStream {
        PrivateStream {
            stream: Arc::new(stream),
            framing: Framing::new(gate.limits().max_message_bytes),
            gate,
            peer,
        }
    }
}

impl Socket for PrivateStream {
    type ReadHalf = Reader;
    type WriteHalf = Writer;

    fn split(self) -> Split<Reader, Writer> {
        Split::new(
            Reader {
                stream: self.stream.clone(),
                framing: self.framing,
                gate: self.gate,
                peer: self.peer,
            },
            Writer {
                stream: self.stream,
            },
        )
    }
}

#[derive(Debug)]
pub struct Reader {
    stream: Arc<UnixStream>,
    framing: Framing,
    gate: Arc<Gate>,
    peer: String,
}

#[async_trait]
impl ReadHalf for Reader {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let n = loop {
            self.stream.readable().await?;
            match self.stream.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other?,
            }
        };
        if let Err(e) = self.framing.advance(&buf[..n]) {
            self.gate.oversized("private socket", &self.peer, &e);
            return Err(e);
        }
        Ok((n, vec![]))
    }

    /// Says so because zbus lets a connection send descriptors only when its read
    /// half can pass them.
    fn can_pass_unix_fd(&self) -> bool {
        true
    }
}

#[derive(Debug)]
pub struct Writer {
    stream: Arc<UnixStream>,
}

#[async_trait]
impl WriteHalf for Writer {
    async fn sendmsg(&mut self, buffer: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        let fd = self.stream.as_raw_fd();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.stream
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
            .await
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
