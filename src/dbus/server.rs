//! The private socket: a D-Bus peer-to-peer server at `$RUNTIME/bus`, one
//! connection per client, each knowing its peer's credentials. The [`Gate`] admits
//! each connection; it must authenticate within `handshake_timeout`
//! ([`private_stream`] runs the handshake) before zbus serves it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use zbus::object_server::SignalEmitter;

use super::broker1::{Access, Broker1, Broker1Signals, Peer};
use super::gate::Gate;
use super::peer::Identity;
use super::private_stream::{self, PrivateStream};
use super::state1::{Atomic1, Cache1, Locker1};
use super::{OBJECT_PATH, bus_shim};
use crate::broker::{Broker, Event};

/// Binds the private socket in a directory made ready by `runtime_dir::prepare`.
/// A live socket at the path means another broker serves this app: that is an
/// error, not something to take over.
pub fn bind(path: &Path, owner: Option<(u32, u32)>) -> io::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use: another broker serves this app",
                path.display()
            ),
        ));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot remove stale {}: {e}", path.display()),
            ));
        }
        _ => {}
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {}: {e}", path.display())))?;
    // The app's user must reach the socket; everyone else is refused by the broker.
    crate::runtime_dir::set_socket_owner(path, owner)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, broker: Arc<Broker>, gate: Arc<Gate>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(admitted) = gate.admit(stream, "private socket") else {
                    continue;
                };
                let (broker, gate) = (broker.clone(), gate.clone());
                tokio::spawn(async move {
                    serve_connection(admitted.stream, admitted.identity, broker, gate).await;
                    drop(admitted.permit);
                });
            }
            Err(e) => {
                tracing::warn!("accepting on the private socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(
    stream: UnixStream,
    identity: Identity,
    broker: Arc<Broker>,
    gate: Arc<Gate>,
) {
    let conn_id = broker.state().new_conn();
    let Some(conn) = open(stream, identity, conn_id, broker.clone(), gate).await else {
        return;
    };
    forward_events(&conn, &broker).await;
    // Locks taken through this connection, and waits on it, end with it.
    broker.state().connection_closed(conn_id);
}

/// Authenticates the client, `identity`'s process, within `handshake_timeout`,
/// and serves the broker's objects to it as connection `conn_id`; `None` when it
/// did not authenticate.
async fn open(
    mut stream: UnixStream,
    identity: Identity,
    conn_id: u64,
    broker: Arc<Broker>,
    gate: Arc<Gate>,
) -> Option<zbus::Connection> {
    let (pid, uid) = (identity.pid, identity.uid);
    let who = format!("pid {pid} (uid {uid})");
    let guid = zbus::Guid::generate();
    let limits = gate.limits();
    let authenticated = tokio::time::timeout(
        limits.handshake_timeout,
        private_stream::authenticate(&mut stream, uid, guid.as_str()),
    )
    .await;
    let begun = match authenticated {
        Ok(Ok(Some(begun))) => begun,
        Ok(Ok(None)) => {
            tracing::debug!("private socket: {who} failed to authenticate");
            return None;
        }
        Ok(Err(e)) => {
            tracing::debug!("private socket handshake with {who} failed: {e}");
            return None;
        }
        Err(_) => {
            let _ = stream.try_write(gate.timed_out("private socket", &who).as_bytes());
            return None;
        }
    };
    let mut peer = Peer::private(identity, conn_id);
    if begun.unix_fds {
        peer = peer.with_unix_fds();
    }
    let access = Access::new(broker, peer);
    let socket = PrivateStream::new(stream, gate.clone(), who.clone());
    let conn = zbus::connection::Builder::authenticated_socket(socket, guid)
        .p2p()
        .serve_at(OBJECT_PATH, Broker1::new(access.clone()))
        .serve_at(OBJECT_PATH, Cache1::new(access.clone()))
        .serve_at(OBJECT_PATH, Atomic1::new(access.clone()))
        .serve_at(OBJECT_PATH, Locker1::new(access))
        .serve_at(bus_shim::PATH, bus_shim::BusShim)
        .build()
        .await;
    match conn {
        Ok(conn) => Some(conn),
        Err(e) => {
            tracing::debug!("private socket: cannot serve {who}: {e}");
            None
        }
    }
}

/// Emits the broker's events as signals on `conn` until it closes.
pub async fn forward_events(conn: &zbus::Connection, broker: &Broker) {
    let mut events = broker.subscribe();
    let Ok(emitter) = SignalEmitter::new(conn, OBJECT_PATH) else {
        return;
    };
    loop {
        tokio::select! {
            event = events.recv() => {
                let sent = match event {
                    Ok(Event::ReloadFinished { generation, success, message }) => {
                        emitter.reload_finished(generation, success, &message).await
                    }
                    Ok(Event::InstanceStateChanged { id, state }) => {
                        emitter.instance_state_changed(id, state.as_str()).await
                    }
                    Ok(Event::ReloadProgress { generation, progress }) => {
                        emitter.reload_progress(generation, progress.phase(), progress.detail()).await
                    }
                    Ok(Event::InstanceReported { id, generation, report }) => {
                        emitter.instance_reported(id, generation, report.to_dict()).await
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Ok(()),
                    Err(_) => return,
                };
                if sent.is_err() && conn.is_closed() {
                    return;
                }
            }
            _ = conn.closed() => return,
        }
    }
}

/// Removes the private socket file at exit, unless another broker has since
/// bound a socket of its own at the same path.
pub struct SocketFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl SocketFile {
    pub fn new(path: &Path) -> SocketFile {
        use std::os::unix::fs::MetadataExt;
        SocketFile {
            path: path.to_path_buf(),
            identity: std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino())),
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let current = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
