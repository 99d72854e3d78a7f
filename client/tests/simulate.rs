//! Simulate mode end to end: real sockets, no broker.
//!
//! The sockets of simulate mode are shared by the whole process, like the broker's, so
//! every test here uses addresses of its own (a different loopback address or path).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use ally_client::{Ally, ErrorKind, ListenOptions, SeqpacketListener, stdnet};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn inode(fd: impl AsFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd.as_fd()).unwrap();
    (st.st_dev, st.st_ino)
}

fn nonblocking(fd: impl AsFd) -> bool {
    let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
    flags & libc::O_NONBLOCK != 0
}

fn ipv6() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

async fn simulate() -> Ally {
    let ally = Ally::simulate().await.unwrap();
    assert!(!ally.is_managed());
    ally
}

#[tokio::test]
async fn every_network_listens_and_serves() {
    let ally = simulate().await;
    let dir = tempfile::tempdir().unwrap();

    for network in ["tcp", "tcp4"] {
        let listener = ally
            .listen_with::<tokio::net::TcpListener>("127.0.0.2:0", &ListenOptions::network(network))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(addr.ip().to_string(), "127.0.0.2");
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        server.write_all(network.as_bytes()).await.unwrap();
        let mut got = vec![0; network.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, network.as_bytes());
    }
    for network in ["udp", "udp4"] {
        let socket = ally
            .listen_with::<tokio::net::UdpSocket>("127.0.0.2:0", &ListenOptions::network(network))
            .await
            .unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"ping", socket.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from, peer.local_addr().unwrap());
    }
    if ipv6() {
        let listener = ally
            .listen_with::<tokio::net::TcpListener>("[::1]:0", &ListenOptions::network("tcp6"))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(addr.is_ipv6());
        let _client = TcpStream::connect(addr).unwrap();
        listener.accept().await.unwrap();
        let socket = ally
            .listen_with::<std::net::UdpSocket>("[::1]:0", &ListenOptions::network("udp6"))
            .await
            .unwrap();
        assert!(socket.local_addr().unwrap().is_ipv6());
    }

    let path = dir.path().join("stream.sock");
    let listener = ally
        .listen::<tokio::net::UnixListener>(path.to_str().unwrap())
        .await
        .unwrap();
    let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    client.write_all(b"unix").await.unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"unix");

    let path = dir.path().join("dgram.sock");
    let socket = ally
        .listen::<tokio::net::UnixDatagram>(path.to_str().unwrap())
        .await
        .unwrap();
    let peer = UnixDatagram::unbound().unwrap();
    peer.send_to(b"gram", &path).unwrap();
    let mut buf = [0u8; 16];
    let n = socket.recv(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"gram");

    let path = dir.path().join("packet.sock");
    let fd = ally
        .listen::<SeqpacketListener>(path.to_str().unwrap())
        .await
        .unwrap();
    let listener = Socket::from(OwnedFd::from(fd));
    assert_eq!(listener.r#type().unwrap(), Type::SEQPACKET);
    let client = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    client.connect(&SockAddr::unix(&path).unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.send(b"one").unwrap();
    client.send(b"two").unwrap();
    let mut buf = [std::mem::MaybeUninit::new(0u8); 16];
    // Message boundaries are kept: the first read gets only the first message.
    assert_eq!(server.recv(&mut buf).unwrap(), 3);

    let name = format!("@ally-client-test-{}", std::process::id());
    let listener = ally
        .listen::<std::os::unix::net::UnixListener>(&name)
        .await
        .unwrap();
    let mut raw = vec![0u8];
    raw.extend_from_slice(&name.as_bytes()[1..]);
    let client = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    let path = std::ffi::OsStr::from_bytes(&raw);
    client.connect(&SockAddr::unix(path).unwrap()).unwrap();
    let (_server, _) = stdnet::accept_unix(&listener).unwrap();
}

#[tokio::test]
async fn equal_addresses_share_one_kernel_socket() {
    let ally = simulate().await;
    let first = ally
        .listen::<std::net::TcpListener>("127.0.0.3:0")
        .await
        .unwrap();
    // Another spelling of the same address, from another client of the same process.
    let other = Ally::simulate().await.unwrap();
    let second = other
        .listen::<std::net::TcpListener>("[::ffff:127.0.0.3]:0")
        .await
        .unwrap();

    assert_ne!(first.as_raw_fd(), second.as_raw_fd());
    let addr = first.local_addr().unwrap();
    assert_eq!(addr, second.local_addr().unwrap());
    assert_eq!(inode(&first), inode(&second));

    // A connection made to the first is accepted on the second.
    let mut client = TcpStream::connect(addr).unwrap();
    let (mut server, peer) = stdnet::accept_tcp(&second).unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    client.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    server.read_exact(&mut byte).unwrap();

    // After close, the address is bound anew: port 0 picks another port.
    ally.close("tcp", "127.0.0.3:0").await.unwrap();
    let third = ally
        .listen::<std::net::TcpListener>("127.0.0.3:0")
        .await
        .unwrap();
    assert_ne!(third.local_addr().unwrap(), addr);
    assert_ne!(inode(&third), inode(&first));
}

#[tokio::test]
async fn unix_paths_are_normalised_before_sharing() {
    let ally = simulate().await;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("n.sock");
    let messy = format!("{}//./n.sock", dir.path().display());
    let a = ally
        .listen::<std::os::unix::net::UnixListener>(plain.to_str().unwrap())
        .await
        .unwrap();
    let b = ally
        .listen::<std::os::unix::net::UnixListener>(&messy)
        .await
        .unwrap();
    assert_eq!(inode(&a), inode(&b));
}

#[tokio::test]
async fn o_nonblock_is_shared_between_duplicates() {
    let ally = simulate().await;
    let std_listener = ally
        .listen::<std::net::TcpListener>("127.0.0.4:0")
        .await
        .unwrap();
    assert!(!nonblocking(&std_listener));
    let tokio_listener = ally
        .listen::<tokio::net::TcpListener>("127.0.0.4:0")
        .await
        .unwrap();
    assert!(nonblocking(&tokio_listener));
    // The tokio helper turned the flag on for the std duplicate too...
    assert!(nonblocking(&std_listener));
    assert_eq!(
        std_listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    // ...which the stdnet helpers wait through.
    let addr = std_listener.local_addr().unwrap();
    let accept = std::thread::spawn(move || stdnet::accept_tcp(&std_listener).map(|(s, _)| s));
    std::thread::sleep(Duration::from_millis(50));
    let client = TcpStream::connect(addr).unwrap();
    let server = accept.join().unwrap().unwrap();
    assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
}

#[tokio::test]
async fn errors_have_kinds_and_say_what_is_wrong() {
    let ally = simulate().await;

    let err = ally
        .listen_with::<OwnedFd>("127.0.0.5:1", &ListenOptions::network("sctp"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("unknown network"), "{err}");

    let err = ally
        .listen::<std::net::TcpListener>("127.0.0.5")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("missing port"), "{err}");

    let holder = std::net::TcpListener::bind("127.0.0.5:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    let err = ally
        .listen::<tokio::net::TcpListener>(&taken)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddressInUse);
    assert!(err.to_string().contains(&taken), "{err}");

    let err = ally
        .listen_with::<tokio::net::TcpListener>("127.0.0.5:0", &ListenOptions::network("udp"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("not a TCP network"), "{err}");

    let err = ally.reload().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotManaged);

    let err = ally
        .listen_with::<std::net::TcpListener>(
            "127.0.0.5:0",
            &ListenOptions {
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn listen_with_applies_options() {
    let ally = simulate().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mode.sock");
    let _fd = ally
        .listen_with::<std::os::unix::net::UnixListener>(
            path.to_str().unwrap(),
            &ListenOptions {
                mode: Some(0o600),
                backlog: Some(16),
                reuse_port: false,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let a = ally
        .listen_with::<std::net::UdpSocket>(
            "127.0.0.6:0",
            &ListenOptions {
                reuse_port: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(SockRef::from(&a).reuse_port().unwrap());
}

#[tokio::test]
async fn status_follows_the_instance() {
    let ally = simulate().await;
    let _l = ally
        .listen::<std::net::TcpListener>("127.0.0.7:0")
        .await
        .unwrap();
    let status = ally.status().await.unwrap();
    assert_eq!(status.state, "starting");
    assert_eq!(status.generation, 0);
    assert_eq!(status.pid, std::process::id());
    assert_eq!(status.instances.len(), 1);
    assert_eq!(status.instances[0].ready_usec, 0);
    assert!(
        status
            .listeners
            .iter()
            .any(|l| l.network == "tcp" && l.address.starts_with("127.0.0.7:")),
        "{:?}",
        status.listeners
    );

    ally.ready().await.unwrap();
    let status = ally.status().await.unwrap();
    assert_eq!(status.state, "running");
    assert_eq!(status.generation, ally.generation());
    assert_eq!(status.instances[0].state, "ready");
    assert!(status.instances[0].ready_usec >= status.instances[0].started_usec);
}

#[test]
fn blocking_client_hands_out_std_types() {
    let ally = ally_client::blocking::Ally::simulate().unwrap();
    assert!(!ally.is_managed());
    let listener = ally.listen::<std::net::TcpListener>("127.0.0.8:0").unwrap();
    let again = ally
        .listen_with::<OwnedFd>("127.0.0.8:0", &ListenOptions::network("tcp"))
        .unwrap();
    assert_eq!(inode(&listener), inode(&again));
    let addr: SocketAddr = listener.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).unwrap();
    let (mut server, _) = stdnet::accept_tcp(&listener).unwrap();
    server.write_all(b"ok").unwrap();
    let mut got = [0u8; 2];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ok");

    let udp = ally.listen::<std::net::UdpSocket>("127.0.0.8:0").unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.send_to(b"u", udp.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 4];
    let (n, _) = stdnet::recv_from_udp(&udp, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"u");

    ally.ready().unwrap();
    assert_eq!(ally.status().unwrap().state, "running");
    assert_eq!(ally.reload().unwrap_err().kind(), ErrorKind::NotManaged);

    let stop = ally.stop_handle();
    assert!(!stop.wait_timeout(Duration::from_millis(10)));
    stop.stop();
    assert!(ally.is_stopping());
    ally.wait_stopped();
}

#[tokio::test]
async fn reports_and_task_counts_are_kept_without_a_broker() {
    let ally = simulate().await;
    ally.report(ally_client::Report::new().version("1.4.2").commit("abc"))
        .await
        .unwrap();
    ally.report(ally_client::Report::new().description("warm"))
        .await
        .unwrap();
    let first = ally.task();
    let second = ally.clone().task();
    assert_eq!(ally.tasks(), 2);
    drop(first);
    assert_eq!(ally.tasks(), 1);
    let reported = ally.reported();
    assert_eq!(reported.version.as_deref(), Some("1.4.2"));
    assert_eq!(reported.commit.as_deref(), Some("abc"));
    assert_eq!(reported.description.as_deref(), Some("warm"));
    assert_eq!(reported.tasks, Some(1));
    drop(second);
    ally.set_tasks(7);
    assert_eq!(ally.reported().tasks, Some(7));

    let err = ally
        .report(ally_client::Report::new().version("v".repeat(257)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded, "{err}");
    assert!(err.to_string().contains("at most 256 bytes"), "{err}");
    assert_eq!(ally.reported().version.as_deref(), Some("1.4.2"));
}
