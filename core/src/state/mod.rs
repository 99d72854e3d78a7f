//! The shared-state stores — cache, atomic counters and read/write locks — as pure data
//! structures: no I/O, no D-Bus, no clock of their own (every call is given `now`).
//!
//! The broker keeps one [`Store`] for its application and serves it over D-Bus; simulate
//! mode keeps one in the process. Both run this code, so both behave the same.

pub mod atomic;
pub mod cache;
pub mod calls;
mod error;
pub mod image;
pub mod limits;
pub mod locker;
pub mod shared;

pub use atomic::Atomics;
pub use cache::Cache;
pub use error::StateError;
pub use image::{Dropped, Restored, StoreImage};
pub use limits::Limits;
pub use locker::{Acquire, Cancel, Effects, Hold, Locker, Mode, Owner, Ticket};
pub use shared::SharedStore;

/// All the state of one application.
#[derive(Debug, Default)]
pub struct Store {
    pub cache: Cache,
    pub atomics: Atomics,
    pub locker: Locker,
}

impl Store {
    pub fn new(limits: Limits) -> Store {
        Store {
            cache: Cache::new(limits),
            atomics: Atomics::new(limits),
            locker: Locker::new(limits),
        }
    }
}
