//! The broker's D-Bus face: the `org.ally.Broker1` interface, who may call it,
//! and the two transports that serve it (the private socket and a bus).

pub mod backoff;
pub mod broker1;
pub mod bus;
pub mod bus_shim;
pub mod caller;
pub mod errors;
pub mod framing;
pub mod gate;
pub mod peer;
pub mod private_stream;
pub mod server;
pub mod state1;
pub mod state_calls;
pub mod state_socket;
pub mod unreadable;

pub const OBJECT_PATH: &str = "/org/ally";

pub use ally_core::proxy::bus_name;
