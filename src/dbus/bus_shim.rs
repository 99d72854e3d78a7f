//! Just enough of `org.freedesktop.DBus` on the private socket for sd-bus
//! clients (`busctl --address=...`), which greet every connection with `Hello`
//! as if it were a bus. zbus and other peer-to-peer clients never call it.

use std::sync::atomic::{AtomicU64, Ordering};

use zbus::interface;

pub const PATH: &str = "/org/freedesktop/DBus";

static NEXT_PEER: AtomicU64 = AtomicU64::new(1);

pub struct BusShim;

#[interface(name = "org.freedesktop.DBus", introspection_docs = false)]
impl BusShim {
    fn hello(&self) -> String {
        format!(":1.{}", NEXT_PEER.fetch_add(1, Ordering::Relaxed))
    }

    /// Signals reach every peer anyway; match rules need no bookkeeping here.
    fn add_match(&self, _rule: &str) {}

    fn remove_match(&self, _rule: &str) {}
}
