//! [`Atomic`]: one of the app's shared counters.

use ally_core::state::calls::atomic::{Add, CompareAndSwap, Load, Store, Swap};

use super::call;
use crate::Ally;
use crate::error::Result;

/// A named i64 counter: [`Ally::atomic`]. Starts at 0; arithmetic wraps on overflow.
#[derive(Debug, Clone)]
pub struct Atomic {
    ally: Ally,
    name: String,
}

impl Atomic {
    pub(crate) fn new(ally: Ally, name: &str) -> Atomic {
        Atomic {
            ally,
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds `delta` (wrapping); the new value.
    pub async fn add(&self, delta: i64) -> Result<i64> {
        call::<Add>(&self.ally, (&self.name, delta)).await
    }

    pub async fn load(&self) -> Result<i64> {
        call::<Load>(&self.ally, (&self.name,)).await
    }

    pub async fn store(&self, value: i64) -> Result<()> {
        call::<Store>(&self.ally, (&self.name, value)).await
    }

    /// Stores `value`; the previous value.
    pub async fn swap(&self, value: i64) -> Result<i64> {
        call::<Swap>(&self.ally, (&self.name, value)).await
    }

    /// Stores `new` if the value is `old`; whether it did.
    pub async fn compare_and_swap(&self, old: i64, new: i64) -> Result<bool> {
        call::<CompareAndSwap>(&self.ally, (&self.name, old, new)).await
    }
}
