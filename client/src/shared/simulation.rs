//! Simulate mode's broker state: one store in the process, shared by the clients made
//! from one [`Simulation`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use ally_core::state::calls::CONNECTION_OWNER;
use ally_core::state::{Limits, SharedStore};

use super::Backend;
use crate::Ally;
use crate::error::Result;

/// A simulated broker's state: [`Simulation::ally`] makes clients that share it.
/// [`Ally::simulate`] uses one for the whole process.
#[derive(Debug, Clone)]
pub struct Simulation {
    store: Arc<SharedStore>,
}

impl Default for Simulation {
    fn default() -> Self {
        Simulation::new(Limits::default())
    }
}

impl Simulation {
    /// Fresh, empty state with these limits (the broker's defaults with `Limits::default()`).
    pub fn new(limits: Limits) -> Simulation {
        Simulation {
            store: Arc::new(SharedStore::new(limits)),
        }
    }

    /// The process-wide simulation [`Ally::simulate`] uses.
    pub fn process() -> Simulation {
        static PROCESS: OnceLock<Simulation> = OnceLock::new();
        PROCESS.get_or_init(Simulation::default).clone()
    }

    /// A simulate-mode client on this state (see [`Ally::simulate`]).
    pub async fn ally(&self) -> Result<Ally> {
        Ally::simulate_on(self).await
    }

    /// A blocking simulate-mode client on this state. Not from inside an async runtime.
    pub fn blocking_ally(&self) -> Result<crate::blocking::Ally> {
        crate::blocking::Ally::simulate_on(self)
    }

    /// A new client's state: a lock owner of its own, as a connection to a broker is.
    pub(crate) fn backend(&self) -> Backend {
        static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);
        Backend::Simulated {
            store: self.store.clone(),
            owner: CONNECTION_OWNER + NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
        }
    }
}
