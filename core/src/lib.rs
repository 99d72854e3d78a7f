//! What the Ally broker (`ally`) and the app-side binding (`ally-client`) share.
//!
//! Nothing here talks to a broker or spawns anything: these are the names, formats
//! and pure data structures both sides must agree on, so a change to one of them
//! is a change to the protocol.
//!
//! - [`net`]: listening addresses (Go's network names), their normalisation and binding.
//! - [`error`]: the one error value, its kinds and their `org.ally.Error.*` names.
//! - [`proxy`]: the D-Bus interfaces as zbus proxies, and the names of the broker.
//! - [`report`]: what an instance reports about itself (`Report`), validated and merged.
//! - [`wire`] and [`sasl`]: the D-Bus framing and `EXTERNAL` handshake of the state socket.
//! - [`state`]: the shared-state stores (cache, atomics, locks).
//! - [`busy_poll`]: the adaptive spin-then-sleep of state-socket waits.

pub mod busy_poll;
pub mod error;
pub mod net;
pub mod proxy;
pub mod report;
pub mod sasl;
pub mod state;
pub mod wire;

pub use error::{Error, ErrorKind};
