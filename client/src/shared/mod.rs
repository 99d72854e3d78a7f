//! Shared state for the app's instances: [`Cache`], [`Atomic`] counters and [`Locker`]
//! read/write locks, kept by the broker so it survives reloads and crashes.
//!
//! Every call is an entry of `ally_core::state::calls`: [`call`] and [`call_held`] send
//! it to the broker (cache and counters over its state socket when they can, else the
//! D-Bus connection) or, in simulate mode, apply that same entry to the
//! [`Simulation`]'s store in the process, where each [`Ally`] is one lock owner, like
//! one connection to a broker.

mod atomic;
mod cache;
mod locker;
mod simulation;

use std::sync::Arc;
use std::time::Duration;

use ally_core::state::calls::{Apply, ApplyHeld, Call, Holder, on_state_socket};
use ally_core::state::{SharedStore, StateError};

use crate::Ally;
use crate::direct::Direct;
use crate::error::{Error, Result};
use crate::link::{Link, Session};
use crate::reconnect::Method;

pub use atomic::Atomic;
pub use cache::Cache;
pub use locker::{LockGuard, Locker, Queues};
pub use simulation::Simulation;

/// Where the state lives for one [`Ally`].
#[derive(Debug)]
pub(crate) enum Backend {
    Broker {
        link: Arc<Link>,
        /// The state socket, for cache and counter calls.
        direct: Option<Direct>,
    },
    Simulated {
        store: Arc<SharedStore>,
        /// This client's lock owner and connection number.
        owner: u64,
    },
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Like a connection to the broker closing.
        if let Backend::Simulated { store, owner } = self {
            store.release_conn(*owner);
        }
    }
}

/// Makes a call that is answered at once.
pub(crate) async fn call<C: Apply>(ally: &Ally, args: C::Args<'_>) -> Result<C::Reply> {
    match ally.backend() {
        Backend::Broker { link, direct } => {
            if let Some(direct) = direct
                && on_state_socket(C::INTERFACE)
                && let Some(result) = direct.call::<C>(&args).await
            {
                return result;
            }
            over_dbus::<C>(link, args).await
        }
        Backend::Simulated { store, .. } => C::apply(store, args).map_err(local),
    }
}

/// Makes a call for this client's lock owner.
pub(crate) async fn call_held<'a, C: ApplyHeld>(
    ally: &'a Ally,
    args: C::Args<'a>,
) -> Result<C::Reply> {
    match ally.backend() {
        Backend::Broker { link, .. } => over_dbus::<C>(link, args).await,
        Backend::Simulated { store, owner } => {
            let holder = Holder {
                owner: *owner,
                conn: *owner,
            };
            C::apply_held(store, holder, args).await.map_err(local)
        }
    }
}

async fn over_dbus<C: Call>(link: &Link, args: C::Args<'_>) -> Result<C::Reply> {
    let method = Method {
        interface: C::INTERFACE,
        member: C::MEMBER,
    };
    let args = &args;
    link.call(method, |s: Arc<Session>| async move {
        s.state.call_ref::<C>(args).await
    })
    .await
}

fn local(e: StateError) -> Error {
    ally_core::Error::from(e).into()
}

/// A TTL on the wire: 0 is none; anything shorter than a millisecond is one.
fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}
