//! Where a connection to the private or the state socket is admitted, or refused with
//! a reason the caller is told: the connection limits of [`Admission`], and the
//! config's other limits on a connection.
//!
//! A refused caller gets one SASL line, `ERROR` and the reason, which zbus clients
//! report as "Received error from server: ERROR …" and the state socket's client as
//! a refused handshake; then the connection is closed. Refusals are answered by a bounded number
//! of tasks at once (each waits briefly for the client's first bytes, so that closing
//! does not reset the connection before it reads the answer); past that, a refused
//! connection is closed at once. The log gets one line a second about them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use super::peer::Identity;
use crate::admission::{Admission, Caps, Permit};
use crate::config::ConnectionLimits;
use crate::throttle::{self, Throttle};

/// Refusals answered at once; more are closed without an answer.
const ANSWERING: usize = 64;
/// How long an answered refusal waits for the client's first bytes.
const ANSWER_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Gate {
    admission: Arc<Admission>,
    limits: ConnectionLimits,
    answering: Arc<Semaphore>,
    refusals: Throttle,
    timeouts: Throttle,
    oversized: Throttle,
    unreadable: Throttle,
}

/// A connection let in: its stream, its peer, and its place (freed when dropped).
pub struct Admitted {
    pub stream: UnixStream,
    pub identity: Identity,
    pub permit: Permit,
}

impl Gate {
    /// For a process that may open `nofile` file descriptors; `broker_uid` is the
    /// broker's own user.
    pub fn new(limits: ConnectionLimits, nofile: u64, broker_uid: u32) -> Arc<Gate> {
        let asked = Caps {
            total: limits.max_connections,
            per_uid: limits.max_connections_per_uid,
        };
        let caps = asked.within_fd_limit(nofile);
        if caps.total < asked.total {
            tracing::warn!(
                "max_connections = {} would need more file descriptors than RLIMIT_NOFILE ({nofile}) allows: admitting at most {} connections",
                asked.total,
                caps.total
            );
        }
        Arc::new(Gate {
            admission: Admission::new(caps, broker_uid),
            limits,
            answering: Arc::new(Semaphore::new(ANSWERING)),
            refusals: Throttle::new(Duration::from_secs(1)),
            timeouts: Throttle::new(Duration::from_secs(1)),
            oversized: Throttle::new(Duration::from_secs(1)),
            unreadable: Throttle::new(Duration::from_secs(1)),
        })
    }

    /// For this process, with its own `RLIMIT_NOFILE` and user.
    pub fn for_this_process(limits: ConnectionLimits) -> Arc<Gate> {
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        Gate::new(limits, nofile, nix::unistd::geteuid().as_raw())
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// The connection just accepted on `socket` (named for the log), its peer pinned
    /// (see `super::peer`) and a place for it; `None` once it has been refused.
    pub fn admit(&self, stream: UnixStream, socket: &str) -> Option<Admitted> {
        let identity = match Identity::of(&stream) {
            Ok(identity) => identity,
            Err(e) => {
                tracing::warn!("{socket}: cannot read peer credentials: {e}");
                return None;
            }
        };
        let (uid, pid) = (identity.uid, identity.pid);
        let refusal = match self.admission.admit(uid) {
            Ok(permit) => {
                return Some(Admitted {
                    stream,
                    identity,
                    permit,
                });
            }
            Err(refusal) => refusal,
        };
        if let Some(suppressed) = self.refusals.allow(Instant::now()) {
            tracing::warn!(
                "{socket}: refused a connection of pid {pid} (uid {uid}): {refusal}{}",
                throttle::more(suppressed)
            );
        }
        if let Ok(answering) = self.answering.clone().try_acquire_owned() {
            tokio::spawn(async move {
                answer(stream, &format!("ERROR {refusal}\r\n")).await;
                drop(answering);
            });
        }
        None
    }

    /// Logs a peer that did not authenticate within `handshake_timeout`; the line
    /// that tells it so.
    pub fn timed_out(&self, socket: &str, peer: &str) -> String {
        let timeout = humantime::format_duration(self.limits.handshake_timeout);
        if let Some(suppressed) = self.timeouts.allow(Instant::now()) {
            tracing::warn!(
                "{socket}: closed the connection of {peer}: no handshake within {timeout} (handshake_timeout){}",
                throttle::more(suppressed)
            );
        }
        format!("ERROR no handshake within {timeout} (handshake_timeout)\r\n")
    }

    /// Logs a peer whose message declared more than `max_message_bytes` (`error`
    /// says so); its connection is then closed.
    pub fn oversized(&self, socket: &str, peer: &str, error: &std::io::Error) {
        if let Some(suppressed) = self.oversized.allow(Instant::now()) {
            tracing::warn!(
                "{socket}: closing the connection of {peer}: {error}{}",
                throttle::more(suppressed)
            );
        }
    }

    /// Logs a message of `peer` the broker could not read (`reason`), which was
    /// answered with an error if it wanted a reply and otherwise dropped.
    pub fn unreadable(&self, socket: &str, peer: &str, reason: &str) {
        if let Some(suppressed) = self.unreadable.allow(Instant::now()) {
            tracing::warn!(
                "{socket}: a message of {peer} could not be read and was answered with an error: {reason}{}",
                throttle::more(suppressed)
            );
        }
    }

    /// Logs a peer turned away because it may call nothing here.
    pub fn denied(&self, socket: &str, peer: &str) {
        if let Some(suppressed) = self.refusals.allow(Instant::now()) {
            tracing::warn!(
                "{socket}: closed the connection of {peer}: it is neither root, the broker's user, nor a process of an instance{}",
                throttle::more(suppressed)
            );
        }
    }
}

/// Sends `line` to a refused client and closes once it has spoken or waited enough.
async fn answer(mut stream: UnixStream, line: &str) {
    if stream.write_all(line.as_bytes()).await.is_err() {
        return;
    }
    let mut first = [0u8; 256];
    let _ = tokio::time::timeout(ANSWER_WAIT, stream.read(&mut first)).await;
}
