//! The application's shared state as the broker keeps it: one
//! [`SharedStore`](ally_core::state::SharedStore) (the pure stores of
//! `ally_core::state`, with lock waiting), who owns which locks, and the sweep that
//! reclaims expired cache entries while nobody calls.
//!
//! Lock owners: an instance owns what it locks, through any connection. A caller that
//! is not an instance (an admin) owns what it locks through one connection — on the
//! private socket the connection, on a bus its unique name — and its owner id is
//! [`CONNECTION_OWNER`](ally_core::state::calls::CONNECTION_OWNER) plus that connection's number. Whatever is taken through a
//! connection is released when it closes; whatever an instance owns, when it exits.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ally_core::state::SharedStore;

use crate::config;

const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub struct State {
    pub store: SharedStore,
    next_conn: AtomicU64,
    /// Connection numbers of bus senders, by unique name.
    senders: Mutex<HashMap<String, u64>>,
}

impl State {
    pub fn new(limits: &config::Limits) -> State {
        State {
            store: SharedStore::new(*limits),
            next_conn: AtomicU64::new(1),
            senders: Mutex::new(HashMap::new()),
        }
    }

    /// The state a re-exec carried.
    pub fn with_store(store: SharedStore) -> State {
        State {
            store,
            next_conn: AtomicU64::new(1),
            senders: Mutex::new(HashMap::new()),
        }
    }

    /// A number for a new connection.
    pub fn new_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The connection number of a bus sender (a unique name such as `:1.42`).
    pub fn sender_conn(&self, sender: &str) -> u64 {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        *senders
            .entry(sender.to_string())
            .or_insert_with(|| self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// A bus sender disconnected.
    pub fn sender_gone(&self, sender: &str) {
        let conn = self
            .senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sender);
        if let Some(conn) = conn {
            self.store.release_conn(conn);
        }
    }

    /// The bus connection was lost: every bus sender went with it.
    pub fn bus_lost(&self) {
        let gone: Vec<u64> = self
            .senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, conn)| conn)
            .collect();
        for conn in gone {
            self.store.release_conn(conn);
        }
    }

    pub fn connection_closed(&self, conn: u64) {
        self.store.release_conn(conn);
    }

    pub fn instance_exited(&self, instance: u64) {
        self.store.release_owner(instance);
    }

    /// Reclaims expired cache entries every second, so memory goes back even when
    /// nobody touches the cache (every access expires entries on its own).
    pub async fn sweep(&self) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            let dropped = self.store.with(|s, now| s.cache.expire(now));
            if dropped > 0 {
                tracing::debug!("{dropped} cache entries expired");
            }
        }
    }
}
