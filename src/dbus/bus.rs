//! Registration on the system or session bus as `org.ally.<app>`, kept up for
//! the broker's life: a bus that restarts (`systemctl restart dbus`) drops the
//! connection, and the broker connects, takes its name and serves again.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::backoff::Backoff;
use super::broker1::{Access, Broker1, Peer};
use super::state1::{Atomic1, Cache1, Locker1};
use super::{OBJECT_PATH, bus_name};
use crate::broker::Broker;

/// The first wait after a failed reconnect attempt, doubling up to
/// [`RECONNECT_MAX_WAIT`]: a bus back after a long outage is served again within
/// a second of it.
const RECONNECT_FIRST_WAIT: Duration = Duration::from_millis(50);
const RECONNECT_MAX_WAIT: Duration = Duration::from_secs(1);
/// How long the bus may stay away before the broker says so again.
const LONG_OUTAGE: Duration = Duration::from_secs(10);
/// One attempt may connect to a socket whose daemon is still starting (systemd
/// holds `dbus.socket` across the restart); it is given this long to answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusChoice {
    /// The system bus when root and it is reachable, else the session bus when
    /// one is set, else none; a bus that refuses the name is only a warning.
    Auto,
    System,
    Session,
    None,
}

/// Connects to the chosen bus, takes the app's name and keeps serving it there,
/// reconnecting whenever the connection drops. With `Auto`, a first failure is
/// logged and the broker goes on with its private socket only; with `System` or
/// `Session` it is the error returned.
pub async fn register(choice: BusChoice, broker: Arc<Broker>) -> Result<(), String> {
    let Some(bus) = Bus::chosen(choice) else {
        return Ok(());
    };
    let name = bus_name(broker.app());
    match bus.connect(&name, &broker).await {
        Ok(conn) => {
            tracing::info!("serving {name} on the {} bus", bus.which());
            tokio::spawn(bus.stay_on(name, conn, broker));
            Ok(())
        }
        Err(e) => {
            let message = format!("cannot serve {name} on the {} bus: {e}", bus.which());
            if choice == BusChoice::Auto {
                tracing::warn!("{message}; serving the private socket only");
                Ok(())
            } else {
                Err(message)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bus {
    System,
    Session,
}

impl Bus {
    fn chosen(choice: BusChoice) -> Option<Bus> {
        match choice {
            BusChoice::None => None,
            BusChoice::System => Some(Bus::System),
            BusChoice::Session => Some(Bus::Session),
            BusChoice::Auto => {
                if nix::unistd::geteuid().is_root()
                    && std::path::Path::new("/run/dbus/system_bus_socket").exists()
                {
                    Some(Bus::System)
                } else if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some() {
                    Some(Bus::Session)
                } else {
                    None
                }
            }
        }
    }

    fn which(self) -> &'static str {
        match self {
            Bus::System => "system",
            Bus::Session => "session",
        }
    }

    /// A connection to this bus owning `name` and serving the broker's objects.
    async fn connect(self, name: &str, broker: &Arc<Broker>) -> zbus::Result<zbus::Connection> {
        let builder = match self {
            Bus::System => zbus::connection::Builder::system(),
            Bus::Session => zbus::connection::Builder::session(),
        };
        let access = Access::new(broker.clone(), Peer::Bus);
        builder
            .name(name)
            .serve_at(OBJECT_PATH, Broker1::new(access.clone()))
            .serve_at(OBJECT_PATH, Cache1::new(access.clone()))
            .serve_at(OBJECT_PATH, Atomic1::new(access.clone()))
            .serve_at(OBJECT_PATH, Locker1::new(access))
            .build()
            .await
    }

    /// Serves `conn` until it drops, then connects again, forever.
    async fn stay_on(self, name: String, mut conn: zbus::Connection, broker: Arc<Broker>) {
        loop {
            let reason = serve(&conn, &broker).await;
            drop(conn);
            // A new bus gives out the same unique names again: the old bus's
            // clients are gone, and so are the locks they held.
            broker.state().bus_lost();
            tracing::warn!(
                "lost the {} bus connection: {reason}; reconnecting",
                self.which()
            );
            let attempts;
            (conn, attempts) = self.reconnect(&name, &broker).await;
            tracing::info!(
                "serving {name} on the {} bus again after {attempts} attempt{}",
                self.which(),
                if attempts == 1 { "" } else { "s" }
            );
        }
    }

    /// Connects until it works; the connection and the attempts it took. An
    /// outage longer than [`LONG_OUTAGE`] is logged once, with the last error.
    async fn reconnect(self, name: &str, broker: &Arc<Broker>) -> (zbus::Connection, u32) {
        let mut backoff = Backoff::new(RECONNECT_FIRST_WAIT, RECONNECT_MAX_WAIT);
        let lost = tokio::time::Instant::now();
        let mut told = false;
        loop {
            let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, self.connect(name, broker)).await;
            let error = match attempt {
                Ok(Ok(conn)) => return (conn, backoff.attempts()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {ATTEMPT_TIMEOUT:?}"),
            };
            tracing::debug!("reconnecting to the {} bus: {error}", self.which());
            if !told && lost.elapsed() >= LONG_OUTAGE {
                told = true;
                tracing::warn!(
                    "still cannot serve {name} on the {} bus after {} attempts ({error}); \
                     trying again every {RECONNECT_MAX_WAIT:?}",
                    self.which(),
                    backoff.attempts()
                );
            }
            tokio::time::sleep(backoff.failed()).await;
        }
    }
}

/// Emits the broker's events on `conn` and releases the locks of the bus
/// clients that leave, until `conn` closes; why it closed.
async fn serve(conn: &zbus::Connection, broker: &Arc<Broker>) -> String {
    let (events, events_broker) = (conn.clone(), broker.clone());
    tokio::spawn(async move { super::server::forward_events(&events, &events_broker).await });
    let reason = release_departed(conn, broker).await;
    conn.closed().await;
    reason.unwrap_or_else(|| "the bus closed it".to_string())
}

/// Locks taken by a bus client that is not an instance end when it leaves the
/// bus. Watches until the connection ends; the error that ended it, when known.
async fn release_departed(conn: &zbus::Connection, broker: &Broker) -> Option<String> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.DBus")
        .interface("org.freedesktop.DBus")
        .member("NameOwnerChanged")
        .build()
        .ok()?;
    let mut changes = match zbus::MessageStream::for_match_rule(rule, conn, None).await {
        Ok(changes) => changes,
        Err(e) => {
            if !conn.is_closed() {
                tracing::warn!(
                    "cannot watch bus clients leave ({e}): their locks stay until released"
                );
            }
            return None;
        }
    };
    while let Some(message) = changes.next().await {
        let message = match message {
            Ok(message) => message,
            Err(e) => return Some(e.to_string()),
        };
        let Some(change) = zbus::fdo::NameOwnerChanged::from_message(message) else {
            continue;
        };
        let Ok(args) = change.args() else { continue };
        if args.name().as_str().starts_with(':') && args.new_owner().is_none() {
            broker.state().sender_gone(args.name().as_str());
        }
    }
    None
}
