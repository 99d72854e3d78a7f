//! Limits on shared state (`[limits]` in the broker's configuration).
//!
//! * `max_key_bytes` bounds every name: cache namespaces and keys, counter names, lock names.
//! * `max_value_bytes` bounds one cache value.
//! * `max_keys_per_namespace` bounds the live keys of one cache namespace, the number of
//!   counters, and the number of locks held or waited for at once.
//! * `max_total_bytes` bounds the cache: the sum of namespace, key and value lengths of
//!   every live entry.
//! * `max_lock_waiters_per_connection` bounds the lock requests waiting at once that were
//!   made through one connection, `max_lock_waiters_per_lock` those waiting for one lock.
//!
//! A call that would pass a limit fails with `LimitExceeded` and changes nothing.

use super::StateError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_key_bytes: u64,
    pub max_value_bytes: u64,
    pub max_keys_per_namespace: u64,
    pub max_total_bytes: u64,
    pub max_lock_waiters_per_connection: u64,
    pub max_lock_waiters_per_lock: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_keys_per_namespace: 100_000,
            max_total_bytes: 64 << 20,
            max_lock_waiters_per_connection: 128,
            max_lock_waiters_per_lock: 1024,
        }
    }
}

impl Limits {
    /// Checks a name: not empty, not longer than `max_key_bytes`.
    pub fn check_name(&self, what: &str, name: &str) -> Result<(), StateError> {
        if name.is_empty() {
            return Err(StateError::InvalidArgument(format!(
                "the {what} must not be empty"
            )));
        }
        if name.len() as u64 > self.max_key_bytes {
            return Err(StateError::LimitExceeded(format!(
                "the {what} is {} bytes, more than max_key_bytes ({})",
                name.len(),
                self.max_key_bytes
            )));
        }
        Ok(())
    }

    pub fn check_value(&self, value: &[u8]) -> Result<(), StateError> {
        if value.len() as u64 > self.max_value_bytes {
            return Err(StateError::LimitExceeded(format!(
                "the value is {} bytes, more than max_value_bytes ({})",
                value.len(),
                self.max_value_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_non_empty_and_short_enough() {
        let limits = Limits {
            max_key_bytes: 3,
            ..Limits::default()
        };
        assert!(limits.check_name("key", "abc").is_ok());
        assert!(matches!(
            limits.check_name("key", ""),
            Err(StateError::InvalidArgument(_))
        ));
        let err = limits.check_name("key", "abcd").unwrap_err();
        assert_eq!(
            err,
            StateError::LimitExceeded("the key is 4 bytes, more than max_key_bytes (3)".into())
        );
    }
}
