//! Blocking I/O on shared sockets.
//!
//! A socket from the broker is a duplicate: it shares one open file description, and so
//! one `O_NONBLOCK` flag, with the same socket in every other instance (and with the
//! broker). An async instance of another generation turns the flag on, after which a
//! plain `accept()` or `recv_from()` here fails with [`io::ErrorKind::WouldBlock`]
//! instead of waiting. Turning the flag off again would make that other instance block
//! where it must not, so this module waits with `poll(2)` and retries instead. Two
//! instances racing for one connection behave the same way: the loser sees `WouldBlock`
//! and waits again.
//!
//! Connections accepted this way are blocking, whatever the listening socket's flag:
//! Linux does not pass `O_NONBLOCK` on to them.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// Waits until `fd` is readable (or has a pending connection), or `timeout` passes.
/// Returns whether it is readable; `None` waits forever.
pub fn wait_readable(fd: impl AsFd, timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let millis = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Round up so a short timeout is not a busy loop.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, borrowed for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, millis) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n > 0 {
            return Ok(true);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
    }
}

/// Runs `op` until it does not fail with `WouldBlock` (or `Interrupted`), waiting for
/// `fd` to become readable in between.
pub fn retry_would_block<T>(fd: impl AsFd, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(fd.as_fd(), None)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// `listener.accept()` that waits whatever the shared `O_NONBLOCK` flag says.
pub fn accept_tcp(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    retry_would_block(listener, || listener.accept())
}

/// `listener.accept()` that waits whatever the shared `O_NONBLOCK` flag says.
pub fn accept_unix(
    listener: &UnixListener,
) -> io::Result<(UnixStream, std::os::unix::net::SocketAddr)> {
    retry_would_block(listener, || listener.accept())
}

/// `socket.recv_from()` that waits whatever the shared `O_NONBLOCK` flag says.
pub fn recv_from_udp(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    retry_would_block(socket, || socket.recv_from(buf))
}

/// `socket.recv_from()` that waits whatever the shared `O_NONBLOCK` flag says.
pub fn recv_from_unix(
    socket: &UnixDatagram,
    buf: &mut [u8],
) -> io::Result<(usize, std::os::unix::net::SocketAddr)> {
    retry_would_block(socket, || socket.recv_from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_waits_on_a_non_blocking_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        assert_eq!(
            listener.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            TcpStream::connect(addr).unwrap()
        });
        let (stream, _) = accept_tcp(&listener).unwrap();
        let client = client.join().unwrap();
        assert_eq!(stream.peer_addr().unwrap(), client.local_addr().unwrap());
        // Accepted connections do not inherit O_NONBLOCK.
        let flags = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn wait_readable_times_out() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let start = Instant::now();
        assert!(!wait_readable(&socket, Some(Duration::from_millis(30))).unwrap());
        assert!(start.elapsed() >= Duration::from_millis(30));
        socket.send_to(b"x", socket.local_addr().unwrap()).unwrap();
        assert!(wait_readable(&socket, Some(Duration::from_secs(5))).unwrap());
    }
}
