//! Namespaced byte-string cache with per-entry TTL.
//!
//! Expiry is exact: every operation first drops the entries whose deadline has passed
//! (an ordered index makes that cost proportional to what expired), so an expired key
//! is never returned, counted or listed, and its memory is reclaimed. [`Cache::expire`]
//! lets an idle owner reclaim memory too.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::{Limits, StateError};

#[derive(Debug)]
struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct Cache {
    limits: Limits,
    spaces: HashMap<String, HashMap<String, Entry>>,
    deadlines: BTreeSet<(Instant, String, String)>,
    total_bytes: u64,
}

fn entry_bytes(ns: &str, key: &str, value: &[u8]) -> u64 {
    (ns.len() + key.len() + value.len()) as u64
}

/// A TTL in milliseconds as a deadline; 0 (and a deadline past the clock's range) is none.
pub fn deadline(now: Instant, ttl_ms: u64) -> Option<Instant> {
    if ttl_ms == 0 {
        None
    } else {
        now.checked_add(Duration::from_millis(ttl_ms))
    }
}

impl Cache {
    pub fn new(limits: Limits) -> Cache {
        Cache {
            limits,
            ..Cache::default()
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Live bytes, as `max_total_bytes` counts them.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Drops every entry whose deadline is at or before `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        while let Some(first) = self.deadlines.first() {
            if first.0 > now {
                break;
            }
            let (_, ns, key) = self.deadlines.pop_first().expect("not empty");
            self.remove_entry(&ns, &key);
            dropped += 1;
        }
        dropped
    }

    fn remove_entry(&mut self, ns: &str, key: &str) -> Option<Entry> {
        let space = self.spaces.get_mut(ns)?;
        let entry = space.remove(key)?;
        if space.is_empty() {
            self.spaces.remove(ns);
        }
        self.total_bytes -= entry_bytes(ns, key, &entry.value);
        if let Some(at) = entry.expires {
            self.deadlines
                .remove(&(at, ns.to_string(), key.to_string()));
        }
        Some(entry)
    }

    /// Every entry, live or not yet expired away: namespace, key, value, deadline.
    pub(super) fn entries(&self) -> impl Iterator<Item = (&str, &str, &[u8], Option<Instant>)> {
        self.spaces.iter().flat_map(|(ns, space)| {
            space
                .iter()
                .map(move |(key, e)| (ns.as_str(), key.as_str(), e.value.as_slice(), e.expires))
        })
    }

    fn check_key(&self, ns: &str, key: &str) -> Result<(), StateError> {
        self.limits.check_name("namespace", ns)?;
        self.limits.check_name("key", key)
    }

    /// Checks that storing `value` under (ns, key) stays within the limits.
    fn check_store(&self, ns: &str, key: &str, value: &[u8]) -> Result<(), StateError> {
        self.check_key(ns, key)?;
        self.limits.check_value(value)?;
        let space = self.spaces.get(ns);
        let old = space.and_then(|s| s.get(key));
        if old.is_none() {
            let keys = space.map_or(0, |s| s.len()) as u64;
            if keys >= self.limits.max_keys_per_namespace {
                return Err(StateError::LimitExceeded(format!(
                    "namespace {ns:?} already has {keys} keys (max_keys_per_namespace)"
                )));
            }
        }
        let freed = old.map_or(0, |e| entry_bytes(ns, key, &e.value));
        let total = self.total_bytes - freed + entry_bytes(ns, key, value);
        if total > self.limits.max_total_bytes {
            return Err(StateError::LimitExceeded(format!(
                "the cache would hold {total} bytes, more than max_total_bytes ({})",
                self.limits.max_total_bytes
            )));
        }
        Ok(())
    }

    fn store(&mut self, ns: &str, key: &str, value: Vec<u8>, ttl_ms: u64, now: Instant) {
        self.remove_entry(ns, key);
        let expires = deadline(now, ttl_ms);
        if let Some(at) = expires {
            self.deadlines.insert((at, ns.to_string(), key.to_string()));
        }
        self.total_bytes += entry_bytes(ns, key, &value);
        self.spaces
            .entry(ns.to_string())
            .or_default()
            .insert(key.to_string(), Entry { value, expires });
    }

    fn live(&self, ns: &str, key: &str) -> Option<&Entry> {
        self.spaces.get(ns)?.get(key)
    }

    /// Stores `value`, replacing any value and TTL; `ttl_ms` 0 never expires.
    pub fn set(
        &mut self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        ttl_ms: u64,
        now: Instant,
    ) -> Result<(), StateError> {
        self.expire(now);
        self.check_store(ns, key, &value)?;
        self.store(ns, key, value, ttl_ms, now);
        Ok(())
    }

    pub fn get(
        &mut self,
        ns: &str,
        key: &str,
        now: Instant,
    ) -> Result<Option<Vec<u8>>, StateError> {
        self.check_key(ns, key)?;
        self.expire(now);
        Ok(self.live(ns, key).map(|e| e.value.clone()))
    }

    /// Removes the key; whether it existed.
    pub fn delete(&mut self, ns: &str, key: &str, now: Instant) -> Result<bool, StateError> {
        self.check_key(ns, key)?;
        self.expire(now);
        Ok(self.remove_entry(ns, key).is_some())
    }

    pub fn exists(&mut self, ns: &str, key: &str, now: Instant) -> Result<bool, StateError> {
        self.check_key(ns, key)?;
        self.expire(now);
        Ok(self.live(ns, key).is_some())
    }

    /// The live keys of a namespace, sorted.
    pub fn keys(&mut self, ns: &str, now: Instant) -> Result<Vec<String>, StateError> {
        self.limits.check_name("namespace", ns)?;
        self.expire(now);
        let mut keys: Vec<String> = self
            .spaces
            .get(ns)
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        Ok(keys)
    }

    pub fn count(&mut self, ns: &str, now: Instant) -> Result<u64, StateError> {
        self.limits.check_name("namespace", ns)?;
        self.expire(now);
        Ok(self.spaces.get(ns).map_or(0, |s| s.len() as u64))
    }

    /// Removes every key of a namespace; how many there were.
    pub fn flush(&mut self, ns: &str, now: Instant) -> Result<u64, StateError> {
        self.limits.check_name("namespace", ns)?;
        self.expire(now);
        let Some(space) = self.spaces.remove(ns) else {
            return Ok(0);
        };
        for (key, entry) in &space {
            self.total_bytes -= entry_bytes(ns, key, &entry.value);
            if let Some(at) = entry.expires {
                self.deadlines.remove(&(at, ns.to_string(), key.clone()));
            }
        }
        Ok(space.len() as u64)
    }

    /// Stores `value` only if the key is absent (or expired); whether it did.
    pub fn set_if_absent(
        &mut self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        ttl_ms: u64,
        now: Instant,
    ) -> Result<bool, StateError> {
        self.expire(now);
        self.check_key(ns, key)?;
        if self.live(ns, key).is_some() {
            return Ok(false);
        }
        self.check_store(ns, key, &value)?;
        self.store(ns, key, value, ttl_ms, now);
        Ok(true)
    }

    /// Replaces the value with `new` (and the TTL with `ttl_ms`) only if the key exists
    /// with exactly `old`; whether it did. An absent key never matches: use
    /// [`set_if_absent`](Self::set_if_absent) to create.
    pub fn compare_and_swap(
        &mut self,
        ns: &str,
        key: &str,
        old: &[u8],
        new: Vec<u8>,
        ttl_ms: u64,
        now: Instant,
    ) -> Result<bool, StateError> {
        self.expire(now);
        self.check_key(ns, key)?;
        self.limits.check_value(&new)?;
        if self.live(ns, key).is_none_or(|e| e.value != old) {
            return Ok(false);
        }
        self.check_store(ns, key, &new)?;
        self.store(ns, key, new, ttl_ms, now);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn set_get_delete_exists() {
        let now = Instant::now();
        let mut c = Cache::new(Limits::default());
        assert_eq!(c.get("ns", "k", now).unwrap(), None);
        c.set("ns", "k", b"v".to_vec(), 0, now).unwrap();
        assert_eq!(c.get("ns", "k", now).unwrap(), Some(b"v".to_vec()));
        assert!(c.exists("ns", "k", now).unwrap());
        assert_eq!(
            c.get("other", "k", now).unwrap(),
            None,
            "namespaces are apart"
        );
        c.set("ns", "k", b"w".to_vec(), 0, now).unwrap();
        assert_eq!(c.get("ns", "k", now).unwrap(), Some(b"w".to_vec()));
        assert!(c.delete("ns", "k", now).unwrap());
        assert!(!c.delete("ns", "k", now).unwrap());
        assert!(!c.exists("ns", "k", now).unwrap());
        assert_eq!(c.total_bytes(), 0);
    }

    #[test]
    fn expired_entries_are_never_seen_and_are_reclaimed() {
        let t0 = Instant::now();
        let mut c = Cache::new(Limits::default());
        c.set("ns", "short", b"1".to_vec(), 100, t0).unwrap();
        c.set("ns", "long", b"2".to_vec(), 1000, t0).unwrap();
        c.set("ns", "forever", b"3".to_vec(), 0, t0).unwrap();
        assert_eq!(c.count("ns", t0 + ms(99)).unwrap(), 3);
        assert_eq!(c.get("ns", "short", t0 + ms(100)).unwrap(), None);
        assert_eq!(c.keys("ns", t0 + ms(100)).unwrap(), vec!["forever", "long"]);
        assert_eq!(c.count("ns", t0 + ms(1000)).unwrap(), 1);
        assert_eq!(c.total_bytes(), entry_bytes("ns", "forever", b"3"));
        assert!(c.deadlines.is_empty());
    }

    #[test]
    fn overwriting_replaces_the_ttl() {
        let t0 = Instant::now();
        let mut c = Cache::new(Limits::default());
        c.set("ns", "k", b"1".to_vec(), 100, t0).unwrap();
        c.set("ns", "k", b"2".to_vec(), 0, t0 + ms(50)).unwrap();
        assert_eq!(c.get("ns", "k", t0 + ms(500)).unwrap(), Some(b"2".to_vec()));
        c.set("ns", "k", b"3".to_vec(), 10, t0 + ms(500)).unwrap();
        assert_eq!(c.deadlines.len(), 1);
        assert_eq!(c.expire(t0 + ms(510)), 1);
        assert_eq!(c.count("ns", t0 + ms(510)).unwrap(), 0);
    }

    #[test]
    fn a_huge_ttl_never_expires() {
        let t0 = Instant::now();
        let mut c = Cache::new(Limits::default());
        c.set("ns", "k", b"1".to_vec(), u64::MAX, t0).unwrap();
        assert!(
            c.exists("ns", "k", t0 + Duration::from_secs(1 << 20))
                .unwrap()
        );
    }

    #[test]
    fn keys_count_and_flush_see_one_namespace() {
        let now = Instant::now();
        let mut c = Cache::new(Limits::default());
        for k in ["b", "a", "c"] {
            c.set("one", k, k.as_bytes().to_vec(), 0, now).unwrap();
        }
        c.set("two", "x", b"x".to_vec(), 50, now).unwrap();
        assert_eq!(c.keys("one", now).unwrap(), vec!["a", "b", "c"]);
        assert_eq!(c.count("two", now).unwrap(), 1);
        assert_eq!(c.flush("one", now).unwrap(), 3);
        assert_eq!(c.count("one", now).unwrap(), 0);
        assert_eq!(c.flush("two", now).unwrap(), 1);
        assert_eq!(c.total_bytes(), 0);
        assert!(c.deadlines.is_empty());
    }

    #[test]
    fn set_if_absent_and_compare_and_swap() {
        let t0 = Instant::now();
        let mut c = Cache::new(Limits::default());
        assert!(c.set_if_absent("ns", "k", b"1".to_vec(), 100, t0).unwrap());
        assert!(!c.set_if_absent("ns", "k", b"2".to_vec(), 0, t0).unwrap());
        assert!(
            !c.compare_and_swap("ns", "k", b"x", b"3".to_vec(), 0, t0)
                .unwrap()
        );
        assert!(
            c.compare_and_swap("ns", "k", b"1", b"3".to_vec(), 0, t0)
                .unwrap()
        );
        assert_eq!(
            c.get("ns", "k", t0 + ms(200)).unwrap(),
            Some(b"3".to_vec()),
            "CAS set TTL 0"
        );
        assert!(
            !c.compare_and_swap("ns", "absent", b"", b"1".to_vec(), 0, t0)
                .unwrap()
        );
        c.set("ns", "e", b"1".to_vec(), 10, t0).unwrap();
        assert!(
            c.set_if_absent("ns", "e", b"2".to_vec(), 0, t0 + ms(10))
                .unwrap(),
            "expired is absent"
        );
    }

    #[test]
    fn limits_refuse_and_change_nothing() {
        let now = Instant::now();
        let limits = Limits {
            max_key_bytes: 8,
            max_value_bytes: 10,
            max_keys_per_namespace: 2,
            max_total_bytes: 30,
            ..Limits::default()
        };
        let mut c = Cache::new(limits);
        let limited = |r: Result<_, StateError>| matches!(r, Err(StateError::LimitExceeded(_)));
        assert!(limited(c.set("ns", "123456789", vec![], 0, now)));
        assert!(limited(c.set("123456789", "k", vec![], 0, now)));
        assert!(limited(c.set("ns", "k", vec![0; 11], 0, now)));
        c.set("ns", "a", vec![0; 10], 0, now).unwrap();
        c.set("ns", "b", vec![0; 2], 0, now).unwrap();
        assert!(limited(c.set("ns", "c", vec![], 0, now)), "third key");
        c.set("ns", "b", vec![1; 3], 0, now).unwrap();
        assert_eq!(c.total_bytes(), 13 + 6);
        assert!(limited(c.set("xx", "c", vec![0; 10], 0, now)), "total");
        assert!(limited(
            c.compare_and_swap("ns", "b", &[1; 3], vec![0; 11], 0, now)
                .map(drop)
        ));
        assert_eq!(
            c.get("ns", "b", now).unwrap(),
            Some(vec![1; 3]),
            "unchanged"
        );
        assert_eq!(c.keys("ns", now).unwrap(), vec!["a", "b"]);
        assert!(matches!(
            c.get("", "k", now),
            Err(StateError::InvalidArgument(_))
        ));
    }
}
