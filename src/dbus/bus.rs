//! Registration on the system or session bus as `org.ally.<app>`.

use std::sync::Arc;

use super::broker1::{Access, Broker1, Peer};
use super::state1::{Atomic1, Cache1, Locker1};
use super::{OBJECT_PATH, bus_name};
use crate::broker::Broker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusChoice {
    /// The system bus when root and it is reachable, else the session bus when
    /// one is set, else none; a bus that refuses the name is only a warning.
    Auto,
    System,
    Session,
    None,
}

/// Connects to the chosen bus and takes the app's name. With `Auto`, failures
/// are logged and the broker goes on with its private socket only.
pub async fn register(
    choice: BusChoice,
    broker: Arc<Broker>,
) -> Result<Option<zbus::Connection>, String> {
    let kind = match choice {
        BusChoice::None => return Ok(None),
        BusChoice::System | BusChoice::Session => choice,
        BusChoice::Auto => {
            if nix::unistd::geteuid().is_root()
                && std::path::Path::new("/run/dbus/system_bus_socket").exists()
            {
                BusChoice::System
            } else if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some() {
                BusChoice::Session
            } else {
                return Ok(None);
            }
        }
    };
    let name = bus_name(broker.app());
    let builder = if kind == BusChoice::System {
        zbus::connection::Builder::system()
    } else {
        zbus::connection::Builder::session()
    };
    let which = if kind == BusChoice::System {
        "system"
    } else {
        "session"
    };
    let access = Access::new(broker.clone(), Peer::Bus);
    let result = builder
        .name(name.as_str())
        .serve_at(OBJECT_PATH, Broker1::new(access.clone()))
        .serve_at(OBJECT_PATH, Cache1::new(access.clone()))
        .serve_at(OBJECT_PATH, Atomic1::new(access.clone()))
        .serve_at(OBJECT_PATH, Locker1::new(access))
        .build()
        .await;
    match result {
        Ok(conn) => {
            tracing::info!("serving {name} on the {which} bus");
            let events = conn.clone();
            let departures = conn.clone();
            let state_broker = broker.clone();
            tokio::spawn(async move { super::server::forward_events(&events, &broker).await });
            tokio::spawn(async move { release_departed(&departures, &state_broker).await });
            Ok(Some(conn))
        }
        Err(e) => {
            let message = format!("cannot serve {name} on the {which} bus: {e}");
            if choice == BusChoice::Auto {
                tracing::warn!("{message}; serving the private socket only");
                Ok(None)
            } else {
                Err(message)
            }
        }
    }
}

/// Locks taken by a bus client that is not an instance end when it leaves the bus.
async fn release_departed(conn: &zbus::Connection, broker: &Broker) {
    use futures_util::StreamExt;
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else {
        return;
    };
    let Ok(mut changes) = dbus.receive_name_owner_changed().await else {
        tracing::warn!("cannot watch bus clients leave: their locks stay until released");
        return;
    };
    while let Some(change) = changes.next().await {
        let Ok(args) = change.args() else { continue };
        if args.name().as_str().starts_with(':') && args.new_owner().is_none() {
            broker.state().sender_gone(args.name().as_str());
        }
    }
}
