//! Named 64-bit signed counters, starting at 0.
//!
//! Arithmetic wraps on overflow (two's complement, like `i64::wrapping_add`, Go's
//! `sync/atomic` and the original Ally): `Add(i64::MAX, 1)` gives `i64::MIN`. `Add`
//! therefore never fails for a counter that exists. Loading a counter that was never
//! written returns 0 and creates nothing.

use std::collections::HashMap;

use super::{Limits, StateError};

#[derive(Debug, Default)]
pub struct Atomics {
    limits: Limits,
    values: HashMap<String, i64>,
}

impl Atomics {
    pub fn new(limits: Limits) -> Atomics {
        Atomics {
            limits,
            values: HashMap::new(),
        }
    }

    fn slot(&mut self, name: &str) -> Result<&mut i64, StateError> {
        self.limits.check_name("counter name", name)?;
        if !self.values.contains_key(name) {
            let n = self.values.len() as u64;
            if n >= self.limits.max_keys_per_namespace {
                return Err(StateError::LimitExceeded(format!(
                    "there are already {n} counters (max_keys_per_namespace)"
                )));
            }
            self.values.insert(name.to_string(), 0);
        }
        Ok(self.values.get_mut(name).expect("inserted"))
    }

    /// Adds `delta` (wrapping) and returns the new value.
    pub fn add(&mut self, name: &str, delta: i64) -> Result<i64, StateError> {
        let slot = self.slot(name)?;
        *slot = slot.wrapping_add(delta);
        Ok(*slot)
    }

    pub fn load(&self, name: &str) -> Result<i64, StateError> {
        self.limits.check_name("counter name", name)?;
        Ok(self.values.get(name).copied().unwrap_or(0))
    }

    pub fn store(&mut self, name: &str, value: i64) -> Result<(), StateError> {
        *self.slot(name)? = value;
        Ok(())
    }

    /// Stores `value` and returns the previous one.
    pub fn swap(&mut self, name: &str, value: i64) -> Result<i64, StateError> {
        let slot = self.slot(name)?;
        Ok(std::mem::replace(slot, value))
    }

    /// Stores `new` if the value is `old`; whether it did.
    pub fn compare_and_swap(&mut self, name: &str, old: i64, new: i64) -> Result<bool, StateError> {
        if self.load(name)? != old {
            return Ok(false);
        }
        *self.slot(name)? = new;
        Ok(true)
    }

    /// Every counter, sorted by name.
    pub fn list(&self) -> Vec<(String, i64)> {
        let mut all: Vec<(String, i64)> =
            self.values.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_start_at_zero_and_add_store_swap_cas() {
        let mut a = Atomics::new(Limits::default());
        assert_eq!(a.load("n").unwrap(), 0);
        assert!(a.list().is_empty(), "load creates nothing");
        assert_eq!(a.add("n", 5).unwrap(), 5);
        assert_eq!(a.add("n", -7).unwrap(), -2);
        a.store("n", 10).unwrap();
        assert_eq!(a.swap("n", 11).unwrap(), 10);
        assert!(!a.compare_and_swap("n", 10, 12).unwrap());
        assert!(a.compare_and_swap("n", 11, 12).unwrap());
        assert_eq!(a.load("n").unwrap(), 12);
        assert!(a.compare_and_swap("fresh", 0, 1).unwrap(), "absent is 0");
        assert_eq!(a.list(), vec![("fresh".into(), 1), ("n".into(), 12)]);
    }

    #[test]
    fn overflow_wraps() {
        let mut a = Atomics::new(Limits::default());
        a.store("n", i64::MAX).unwrap();
        assert_eq!(a.add("n", 1).unwrap(), i64::MIN);
        assert_eq!(a.add("n", -1).unwrap(), i64::MAX);
    }

    #[test]
    fn the_number_of_counters_is_limited() {
        let mut a = Atomics::new(Limits {
            max_keys_per_namespace: 2,
            ..Limits::default()
        });
        a.add("a", 1).unwrap();
        a.add("b", 1).unwrap();
        assert!(matches!(a.add("c", 1), Err(StateError::LimitExceeded(_))));
        assert!(matches!(
            a.compare_and_swap("c", 0, 1),
            Err(StateError::LimitExceeded(_))
        ));
        assert_eq!(a.add("a", 1).unwrap(), 2, "existing counters still work");
        assert_eq!(a.list().len(), 2);
    }
}
