//! The state socket, `$RUNTIME/state`: `org.ally.Cache1` and `org.ally.Atomic1`
//! for the app's instances (and admins), peer-to-peer D-Bus like the private socket,
//! but each call is answered in the task that reads it. Through zbus a call crosses
//! tasks twice before its reply is written; at a few microseconds a call, those
//! thread wake-ups are most of its cost.
//!
//! Who may call what is decided as on the private socket (the peer pinned at
//! connect time and its process ancestry, `super::peer`); a caller that may call
//! nothing here is closed once it has authenticated, before anything else of it is
//! read. The [`Gate`] admits each connection; it must authenticate within
//! `handshake_timeout`, and a message that declares more than `max_message_bytes`
//! ends it before it is read. Locks and everything of `org.ally.Broker1` stay on the
//! private socket, where a connection's end releases its locks.

use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use ally_core::busy_poll::BusyPoll;
use ally_core::wire::{self, FIXED_HEADER};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use super::broker1::{Access, Peer};
use super::gate::Gate;
use super::peer::Identity;
use super::state_calls::StateCalls;
use super::{framing, unreadable};
use crate::broker::Broker;
use ally_core::sasl::{self, Handshake, Step};

/// Serves the state socket on a thread of its own, which does nothing else: its
/// connections' tasks then run where their reads wake up, with no scheduler between.
/// After a reply, a connection whose calls come quickly is polled for up to
/// `busy_poll` before the thread sleeps (`state_busy_poll` in the config).
pub fn spawn(
    listener: std::os::unix::net::UnixListener,
    broker: Arc<Broker>,
    busy_poll: Duration,
    gate: Arc<Gate>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("state-socket".into())
        .spawn(move || {
            runtime.block_on(async move {
                match UnixListener::from_std(listener) {
                    Ok(listener) => serve(listener, broker, busy_poll, gate).await,
                    Err(e) => tracing::error!("the state socket cannot be served: {e}"),
                }
            })
        })?;
    Ok(())
}

async fn serve(listener: UnixListener, broker: Arc<Broker>, busy_poll: Duration, gate: Arc<Gate>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(admitted) = gate.admit(stream, "state socket") else {
                    continue;
                };
                let (broker, gate) = (broker.clone(), gate.clone());
                tokio::spawn(async move {
                    let (stream, identity) = (admitted.stream, admitted.identity);
                    serve_connection(stream, identity, broker, busy_poll, &gate).await;
                    drop(admitted.permit);
                });
            }
            Err(e) => {
                tracing::warn!("accepting on the state socket: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(
    stream: UnixStream,
    identity: Identity,
    broker: Arc<Broker>,
    busy_poll: Duration,
    gate: &Gate,
) {
    let (pid, uid) = (identity.pid, identity.uid);
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let guid = zbus::Guid::generate().to_string();
    let conversation = Handshake::new(uid, guid);
    let limits = gate.limits();
    match tokio::time::timeout(
        limits.handshake_timeout,
        handshake(&mut read, &mut write, conversation),
    )
    .await
    {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return tracing::debug!("state socket: pid {pid} failed to authenticate"),
        Ok(Err(e)) => return tracing::debug!("state socket handshake with pid {pid}: {e}"),
        Err(_) => {
            let refusal = gate.timed_out("state socket", &format!("pid {pid} (uid {uid})"));
            let _ = write.try_write(refusal.as_bytes());
            return;
        }
    };
    let connection = broker.state().new_conn();
    let access = Access::new(broker, Peer::private(identity, connection));
    access.settled_private_role().await;
    let calls = StateCalls::new(access, connection);
    // Nothing of a caller that may call nothing is read.
    if calls.denied() {
        return gate.denied("state socket", &format!("pid {pid} (uid {uid})"));
    }
    let busy_poll = BusyPoll::new(busy_poll);
    let mut answered = Instant::now();
    loop {
        if read.buffer().is_empty() {
            poll_for_call(read.get_ref(), busy_poll.budget()).await;
        }
        let bytes = match read_message(&mut read, limits.max_message_bytes).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return gate.oversized("state socket", &format!("pid {pid} (uid {uid})"), &e);
            }
            Err(e) => return tracing::debug!("state socket, pid {pid}: {e}"),
        };
        busy_poll.waited(answered.elapsed());
        let fixed: [u8; FIXED_HEADER] = *bytes.first_chunk().expect("a whole message");
        let reply = reply_to(&calls, bytes).unwrap_or_else(|reason| {
            gate.unreadable("state socket", &format!("pid {pid} (uid {uid})"), &reason);
            unreadable::reply(&fixed, &reason)
        });
        if let Some(reply) = reply
            && let Err(e) = write.write_all(reply.data()).await
        {
            return tracing::debug!("state socket, pid {pid}: {e}");
        }
        answered = Instant::now();
    }
}

/// Returns once `read` is readable or `budget` has passed. Each round yields to the
/// thread's other connections and lets the runtime poll for readiness without
/// sleeping (Tokio wakes a yielded task only after polling its I/O driver).
async fn poll_for_call(read: &OwnedReadHalf, budget: Duration) {
    let start = Instant::now();
    while start.elapsed() < budget {
        let readable =
            std::future::poll_fn(|cx| Poll::Ready(read.as_ref().poll_read_ready(cx).is_ready()))
                .await;
        if readable {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// The reply to one whole message as read from a client (`bytes` as long as
/// [`wire::message_len`] measured it); an error says why it cannot be read.
pub fn reply_to(calls: &StateCalls, bytes: Vec<u8>) -> Result<Option<zbus::Message>, String> {
    let message = wire::decode(bytes).map_err(|e| e.to_string())?;
    Ok(calls.answer(&message))
}

/// Runs the authentication conversation; whether the client began.
async fn handshake(
    read: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
    mut conversation: Handshake,
) -> io::Result<bool> {
    if read.read_u8().await? != 0 {
        return Ok(false);
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = read
            .take(sasl::MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 || !line.ends_with(b"\r\n") {
            return Ok(false);
        }
        let text = String::from_utf8_lossy(&line[..line.len() - 2]);
        match conversation.line(&text) {
            Step::Reply(answer) => write.write_all(format!("{answer}\r\n").as_bytes()).await?,
            Step::Begin => return Ok(true),
            Step::Close => return Ok(false),
        }
    }
}

/// The next message, whose length is checked against `max` before it is read.
async fn read_message(read: &mut BufReader<OwnedReadHalf>, max: u64) -> io::Result<Vec<u8>> {
    let mut fixed = [0u8; FIXED_HEADER];
    read.read_exact(&mut fixed).await?;
    let mut bytes = vec![0u8; framing::declared_len(&fixed, max)?];
    bytes[..FIXED_HEADER].copy_from_slice(&fixed);
    read.read_exact(&mut bytes[FIXED_HEADER..]).await?;
    Ok(bytes)
}
