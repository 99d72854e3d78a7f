//! Registration on the system or session bus as `org.ally.<app>`.

use std::sync::Arc;

use super::broker1::{Broker1, Peer};
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
    let result = builder
        .name(name.as_str())
        .serve_at(OBJECT_PATH, Broker1::new(broker.clone(), Peer::Bus))
        .build()
        .await;
    match result {
        Ok(conn) => {
            tracing::info!("serving {name} on the {which} bus");
            let events = conn.clone();
            tokio::spawn(async move { super::server::forward_events(&events, &broker).await });
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
