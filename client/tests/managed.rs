//! Managed mode over a real peer-to-peer D-Bus connection.
//!
//! The server here is a minimal `org.ally.Broker1` written for the test (the real broker
//! lives in the `ally` package, which depends on this crate). It checks what this crate
//! relies on: the p2p handshake, the destination the proxy sends, fd passing, and how
//! `org.ally.Error.*` replies come out as [`ErrorKind`]s.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use ally_client::{Ally, ErrorKind};
use ally_core::net::{self, ListenAddr, ListenOptions};
use zbus::{OwnedVariant, Variant};

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.ally.Error")]
enum BrokerError {
    #[zbus(error)]
    ZBus(zbus::Error),
    InvalidArgument(String),
    AddressInUse(String),
    ReloadFailed(String),
}

#[derive(Default)]
struct Seen {
    ready: u32,
    options: Vec<HashMap<String, String>>,
}

struct TestBroker {
    sockets: Mutex<HashMap<ListenAddr, socket2::Socket>>,
    seen: Arc<Mutex<Seen>>,
}

impl TestBroker {
    fn listen_inner(
        &self,
        network: &str,
        address: &str,
        options: &ListenOptions,
    ) -> Result<zbus::OwnedFd, BrokerError> {
        let key = ListenAddr::parse(network, address)
            .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        let mut sockets = self.sockets.lock().unwrap();
        if !sockets.contains_key(&key) {
            let socket = net::bind(&key, options).map_err(|e| match e.kind() {
                ErrorKind::AddressInUse => BrokerError::AddressInUse(e.to_string()),
                _ => BrokerError::InvalidArgument(e.to_string()),
            })?;
            sockets.insert(key.clone(), socket);
        }
        let dup = sockets[&key]
            .try_clone()
            .map_err(|e| BrokerError::ZBus(zbus::Error::InputOutput(Arc::new(e))))?;
        Ok(std::os::fd::OwnedFd::from(dup).into())
    }
}

#[zbus::interface(name = "org.ally.Broker1")]
impl TestBroker {
    async fn listen(&self, network: &str, address: &str) -> Result<zbus::OwnedFd, BrokerError> {
        self.listen_inner(network, address, &ListenOptions::default())
    }

    async fn listen_with(
        &self,
        network: &str,
        address: &str,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<zbus::OwnedFd, BrokerError> {
        let mut parsed = ListenOptions::default();
        let mut seen = HashMap::new();
        for (key, value) in options {
            seen.insert(key.clone(), format!("{value:?}"));
            match key.as_str() {
                "backlog" => parsed.backlog = Some(u32::try_from(value)?),
                "reuse_port" => parsed.reuse_port = bool::try_from(value)?,
                "mode" => parsed.mode = Some(u32::try_from(value)?),
                other => {
                    return Err(BrokerError::InvalidArgument(format!(
                        "unknown option {other}"
                    )));
                }
            }
        }
        self.seen.lock().unwrap().options.push(seen);
        self.listen_inner(network, address, &parsed)
    }

    async fn ready(&self) {
        self.seen.lock().unwrap().ready += 1;
    }

    async fn reload(&self) -> Result<u64, BrokerError> {
        Err(BrokerError::ReloadFailed(
            "generation 2 exited with status 1 before it was ready".into(),
        ))
    }

    async fn status(&self) -> HashMap<String, OwnedVariant> {
        let mut status = HashMap::new();
        status.insert("app".to_string(), Variant::from("web").try_into().unwrap());
        status.insert(
            "generation".to_string(),
            Variant::from(1u64).try_into().unwrap(),
        );
        status
    }

    #[zbus(property)]
    async fn generation(&self) -> u64 {
        1
    }
}

/// Serves every connection on a fresh socket; returns its D-Bus address.
async fn serve(seen: Arc<Mutex<Seen>>) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let mut connections = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let broker = TestBroker {
                sockets: Mutex::new(HashMap::new()),
                seen: seen.clone(),
            };
            let conn = zbus::connection::Builder::unix_stream(stream.into_std().unwrap())
                .server(zbus::Guid::generate())
                .p2p()
                .serve_at("/org/ally", broker)
                .build()
                .await
                .unwrap();
            // Keep the connections alive for the test's duration.
            connections.push(conn);
        }
    });
    (format!("unix:path={}", path.display()), dir)
}

fn inode(fd: impl AsFd) -> u64 {
    nix::sys::stat::fstat(fd.as_fd()).unwrap().st_ino
}

#[tokio::test]
async fn a_managed_instance_talks_to_its_broker() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (address, _dir) = serve(seen.clone()).await;
    let ally = Ally::connect(&address).await.unwrap();
    assert!(ally.is_managed());

    // Sockets arrive as file descriptors, duplicates of the broker's one socket.
    let listener: tokio::net::TcpListener = ally.listen("127.0.0.9:0").await.unwrap();
    let again: std::net::TcpListener = ally.listen("127.0.0.9:0").await.unwrap();
    assert_eq!(listener.local_addr().unwrap(), again.local_addr().unwrap());
    assert_eq!(inode(&listener), inode(&again));
    let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());

    // Options go over the wire with their D-Bus types.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    ally.listen_with::<std::os::unix::net::UnixListener>(
        path.to_str().unwrap(),
        &ally_client::ListenOptions {
            backlog: Some(8),
            reuse_port: false,
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    {
        let seen = seen.lock().unwrap();
        let options = &seen.options[0];
        assert_eq!(options.len(), 2, "{options:?}");
        assert!(options.contains_key("backlog") && options.contains_key("mode"));
    }

    // Broker errors keep their kind and message.
    let err = ally
        .listen::<std::net::TcpListener>("nonsense")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().starts_with("Listen failed: "), "{err}");
    assert!(
        err.to_string()
            .ends_with("(org.ally.Error.InvalidArgument)"),
        "{err}"
    );

    let holder = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    let err = ally
        .listen::<std::net::TcpListener>(&taken)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddressInUse);

    let err = ally.reload().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReloadFailed);
    assert_eq!(
        err.to_string(),
        "Reload failed: generation 2 exited with status 1 before it was ready (org.ally.Error.ReloadFailed)"
    );

    ally.ready().await.unwrap();
    ally.ready().await.unwrap();
    assert_eq!(seen.lock().unwrap().ready, 2);

    let status = ally.status().await.unwrap();
    assert_eq!(status.app, "web");
    assert_eq!(status.generation, 1);

    // Methods the server does not have come back as broker errors, not hangs.
    let err = ally.close("tcp", "127.0.0.9:0").await.unwrap_err();
    assert!(err.to_string().contains("Close"), "{err}");
    let broker = ally_core::proxy::connect(&address, None).await.unwrap();
    assert_eq!(broker.generation().await.unwrap(), 1);
}

#[tokio::test]
async fn connecting_to_nothing_is_a_transport_error() {
    let err = Ally::connect("unix:path=/nonexistent/ally/bus")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport);
    assert!(err.to_string().contains("/nonexistent/ally/bus"), "{err}");
}
