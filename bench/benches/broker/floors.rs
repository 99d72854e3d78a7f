//! What the kernel alone costs: the floors a `Listen` round trip is held to.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use ally_testkit::stats::Distribution;

use crate::{CALLS, WARMUP, time_ns};

/// `CALLS` timed round trips after `WARMUP` untimed ones, ns.
fn measure(mut round_trip: impl FnMut()) -> Distribution {
    for _ in 0..WARMUP {
        round_trip();
    }
    Distribution::new((0..CALLS).map(|_| time_ns(&mut round_trip) as f64))
}

/// Request/response of 16 bytes over a unix stream socket between two threads.
pub fn pingpong_floor() -> Distribution {
    let (mut client, mut server) = UnixStream::pair().expect("socketpair");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        while server.read_exact(&mut buf).is_ok() {
            if server.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let round_trip = || {
        let mut buf = [7u8; 16];
        client.write_all(&buf).expect("ping");
        client.read_exact(&mut buf).expect("pong");
    };
    let durations = measure(round_trip);
    drop(client);
    echo.join().expect("echo thread");
    durations
}

/// Sends `data` with a duplicate of `fd` (SCM_RIGHTS).
fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> std::io::Result<()> {
    // u64 words: aligned for `cmsghdr`, and room for one header and one fd.
    let mut control = [0u64; 4];
    // SAFETY: plain C structs and macros, on buffers that outlive the call; the
    // control buffer is large enough for CMSG_SPACE(sizeof(int)) and aligned.
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize;
        assert!(space <= size_of_val(&control));
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives into `buf` and the descriptor that came with it.
fn recv_with_fd(sock: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    let mut control = [0u64; 4];
    // SAFETY: as in `send_with_fd`; a descriptor the kernel hands over is ours.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control) as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut fd = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, fd))
    }
}

/// The same, but each answer carries a duplicate of a listening socket
/// (SCM_RIGHTS), which the asker closes: the kernel's share of a `Listen`.
pub fn fd_pingpong_floor() -> Distribution {
    let (mut client, mut server) = UnixStream::pair().expect("socketpair");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let server_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        while server.read_exact(&mut buf).is_ok() {
            if send_with_fd(server.as_raw_fd(), &buf, listener.as_raw_fd()).is_err() {
                break;
            }
        }
    });
    let round_trip = || {
        client.write_all(&[7u8; 16]).expect("ask");
        let mut buf = [0u8; 16];
        let (n, fd) = recv_with_fd(client.as_raw_fd(), &mut buf).expect("answer");
        assert_eq!(n, 16, "short answer");
        drop(fd.expect("no descriptor in the answer"));
    };
    let durations = measure(round_trip);
    drop(client);
    server_thread.join().expect("server thread");
    durations
}
