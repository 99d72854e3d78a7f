//! The listener registry: which sockets the broker holds, who references them,
//! and when an unreferenced one may be closed. Pure bookkeeping, generic over the
//! socket type so it is tested without I/O.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ally_core::net::ListenAddr;

use crate::generations::InstanceId;

/// One held socket.
#[derive(Debug)]
struct Entry<S> {
    socket: S,
    /// The address the kernel reports, e.g. the real port of a port-0 request.
    bound: String,
    refs: BTreeMap<InstanceId, u32>,
    /// Configured in `[[listen]]`: kept for the broker's whole life.
    pinned: bool,
    unreferenced_since: Option<Instant>,
}

/// A listener as a broker image carries it across a re-exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried<S> {
    pub key: ListenAddr,
    pub aliases: Vec<ListenAddr>,
    pub socket: S,
    pub bound: String,
    pub refs: Vec<(InstanceId, u32)>,
    pub pinned: bool,
    /// How long nobody has held it, if nobody does.
    pub unreferenced_for: Option<Duration>,
}

/// What `Status` reports of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    pub network: String,
    pub address: String,
    pub refs: u32,
}

#[derive(Debug)]
pub struct Registry<S> {
    entries: BTreeMap<ListenAddr, Entry<S>>,
    /// Bound address → requested key, so `:0` and the port it got are one listener.
    aliases: BTreeMap<ListenAddr, ListenAddr>,
}

impl<S> Default for Registry<S> {
    fn default() -> Self {
        Registry {
            entries: BTreeMap::new(),
            aliases: BTreeMap::new(),
        }
    }
}

impl<S> Registry<S> {
    fn resolve<'a>(&'a self, key: &'a ListenAddr) -> &'a ListenAddr {
        self.aliases.get(key).unwrap_or(key)
    }

    pub fn get(&self, key: &ListenAddr) -> Option<&S> {
        self.entries.get(self.resolve(key)).map(|e| &e.socket)
    }

    /// Adds a newly bound socket. `aliases` are other keys naming the same
    /// socket: the address the kernel chose for a port-0 request, or `tcp` for an
    /// adopted IPv4-only socket that is also `tcp4`.
    pub fn insert(
        &mut self,
        key: ListenAddr,
        aliases: Vec<ListenAddr>,
        socket: S,
        bound: String,
        pinned: bool,
        now: Instant,
    ) {
        for alias in aliases.into_iter().filter(|a| *a != key) {
            self.aliases.insert(alias, key.clone());
        }
        self.entries.insert(
            key,
            Entry {
                socket,
                bound,
                refs: BTreeMap::new(),
                pinned,
                unreferenced_since: Some(now),
            },
        );
    }

    /// Records that `instance` holds the listener. Returns false if there is none.
    pub fn add_ref(&mut self, key: &ListenAddr, instance: InstanceId) -> bool {
        let key = self.resolve(key).clone();
        match self.entries.get_mut(&key) {
            Some(entry) => {
                *entry.refs.entry(instance).or_default() += 1;
                entry.unreferenced_since = None;
                true
            }
            None => false,
        }
    }

    /// Drops every reference `instance` has to the listener. Returns whether it had any.
    pub fn release(&mut self, key: &ListenAddr, instance: InstanceId, now: Instant) -> bool {
        let key = self.resolve(key).clone();
        self.entries
            .get_mut(&key)
            .is_some_and(|entry| Self::drop_refs(entry, instance, now))
    }

    /// Drops every reference of an instance that exited.
    pub fn release_instance(&mut self, instance: InstanceId, now: Instant) {
        for entry in self.entries.values_mut() {
            Self::drop_refs(entry, instance, now);
        }
    }

    fn drop_refs(entry: &mut Entry<S>, instance: InstanceId, now: Instant) -> bool {
        let had = entry.refs.remove(&instance).is_some();
        if had && entry.refs.is_empty() {
            entry.unreferenced_since = Some(now);
        }
        had
    }

    /// Removes and returns the listeners unreferenced for at least `linger`.
    ///
    /// While `paused` (the application is down and being restarted) nothing expires
    /// and the clocks start again, so a crash-restart finds its sockets still open.
    pub fn take_expired(
        &mut self,
        now: Instant,
        linger: Duration,
        paused: bool,
    ) -> Vec<(ListenAddr, S)> {
        if paused {
            for entry in self.entries.values_mut() {
                if entry.unreferenced_since.is_some() {
                    entry.unreferenced_since = Some(now);
                }
            }
            return Vec::new();
        }
        let expired: Vec<ListenAddr> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                !e.pinned
                    && e.unreferenced_since
                        .is_some_and(|since| now.duration_since(since) >= linger)
            })
            .map(|(k, _)| k.clone())
            .collect();
        self.aliases.retain(|_, target| !expired.contains(target));
        expired
            .into_iter()
            .filter_map(|k| self.entries.remove(&k).map(|e| (k, e.socket)))
            .collect()
    }

    /// Keeps the listener for the broker's life, or (`pinned` false) lets it
    /// close like any other once no instance used it for the linger, counted
    /// from `now` if none holds it. Returns whether it was pinned before, or
    /// `None` if there is no such listener.
    pub fn set_pinned(&mut self, key: &ListenAddr, pinned: bool, now: Instant) -> Option<bool> {
        let key = self.resolve(key).clone();
        let entry = self.entries.get_mut(&key)?;
        let was = std::mem::replace(&mut entry.pinned, pinned);
        if !pinned && was && entry.refs.is_empty() {
            entry.unreferenced_since = Some(now);
        }
        Some(was)
    }

    pub fn list(&self) -> Vec<ListenerInfo> {
        self.entries
            .iter()
            .map(|(key, e)| ListenerInfo {
                network: key.network.to_string(),
                address: e.bound.clone(),
                refs: e.refs.values().sum(),
            })
            .collect()
    }

    /// Every listener as an image carries it, its socket mapped by `socket`.
    pub fn carried<T>(&self, now: Instant, socket: impl Fn(&S) -> T) -> Vec<Carried<T>> {
        self.entries
            .iter()
            .map(|(key, e)| Carried {
                key: key.clone(),
                aliases: self
                    .aliases
                    .iter()
                    .filter(|(_, target)| *target == key)
                    .map(|(alias, _)| alias.clone())
                    .collect(),
                socket: socket(&e.socket),
                bound: e.bound.clone(),
                refs: e.refs.iter().map(|(id, n)| (*id, *n)).collect(),
                pinned: e.pinned,
                unreferenced_for: e.unreferenced_since.map(|since| now.duration_since(since)),
            })
            .collect()
    }

    /// The registry an image carried.
    pub fn from_carried(listeners: Vec<Carried<S>>, now: Instant) -> Registry<S> {
        let mut registry = Registry::default();
        for l in listeners {
            for alias in l.aliases.into_iter().filter(|a| *a != l.key) {
                registry.aliases.insert(alias, l.key.clone());
            }
            registry.entries.insert(
                l.key,
                Entry {
                    socket: l.socket,
                    bound: l.bound,
                    refs: l.refs.into_iter().filter(|(_, n)| *n > 0).collect(),
                    pinned: l.pinned,
                    unreferenced_since: l
                        .unreferenced_for
                        .map(|d| now.checked_sub(d).unwrap_or(now)),
                },
            );
        }
        registry
    }

    pub fn contains(&self, key: &ListenAddr) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carried_registry_is_the_same_registry() {
        let t0 = Instant::now();
        let mut r: Registry<u32> = Registry::default();
        r.insert(
            key("127.0.0.1:0"),
            vec![key("127.0.0.1:4242")],
            7,
            "127.0.0.1:4242".into(),
            false,
            t0,
        );
        r.insert(
            key("127.0.0.1:81"),
            vec![],
            8,
            "127.0.0.1:81".into(),
            true,
            t0,
        );
        r.add_ref(&key("127.0.0.1:4242"), 3);
        r.add_ref(&key("127.0.0.1:4242"), 3);
        let now = t0 + Duration::from_secs(5);
        let carried = r.carried(now, |s| s + 100);
        let back = Registry::from_carried(carried, now);
        assert_eq!(back.get(&key("127.0.0.1:4242")), Some(&107));
        assert_eq!(back.list(), r.list());
        let mut back = back;
        // The unreferenced one keeps its age: it expires when it would have.
        assert!(
            back.take_expired(now, Duration::from_secs(6), false)
                .is_empty()
        );
        assert!(back.release(&key("127.0.0.1:0"), 3, now));
        assert_eq!(
            back.take_expired(now + Duration::from_secs(6), Duration::from_secs(6), false),
            vec![(key("127.0.0.1:0"), 107)]
        );
        assert!(back.contains(&key("127.0.0.1:81")), "pinned stays");
    }

    fn key(a: &str) -> ListenAddr {
        ListenAddr::parse("tcp", a).unwrap()
    }

    const LINGER: Duration = Duration::from_secs(10);

    #[test]
    fn references_are_counted_per_instance() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        reg.insert(
            key("127.0.0.1:80"),
            vec![],
            "sock",
            "127.0.0.1:80".into(),
            false,
            t0,
        );
        assert!(reg.add_ref(&key("localhost:80"), 1));
        assert!(reg.add_ref(&key("127.0.0.1:80"), 1));
        assert!(reg.add_ref(&key("127.0.0.1:80"), 2));
        assert_eq!(reg.list()[0].refs, 3);
        assert!(reg.release(&key("127.0.0.1:80"), 1, t0));
        assert!(!reg.release(&key("127.0.0.1:80"), 1, t0));
        assert_eq!(reg.list()[0].refs, 1);
        assert!(!reg.add_ref(&key("127.0.0.1:81"), 1));
    }

    #[test]
    fn unreferenced_listeners_close_after_the_linger() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        reg.insert(
            key("127.0.0.1:80"),
            vec![],
            "a",
            "127.0.0.1:80".into(),
            false,
            t0,
        );
        reg.add_ref(&key("127.0.0.1:80"), 1);
        reg.release_instance(1, t0);
        assert!(reg.take_expired(t0 + LINGER / 2, LINGER, false).is_empty());
        let closed = reg.take_expired(t0 + LINGER, LINGER, false);
        assert_eq!(closed, vec![(key("127.0.0.1:80"), "a")]);
        assert!(reg.is_empty());
    }

    #[test]
    fn a_held_listener_never_expires() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        reg.insert(key("127.0.0.1:80"), vec![], "a", "x".into(), false, t0);
        reg.add_ref(&key("127.0.0.1:80"), 7);
        assert!(
            reg.take_expired(t0 + LINGER * 100, LINGER, false)
                .is_empty()
        );
    }

    #[test]
    fn nothing_expires_while_the_app_restarts() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        reg.insert(key("127.0.0.1:80"), vec![], "a", "x".into(), false, t0);
        reg.add_ref(&key("127.0.0.1:80"), 1);
        reg.release_instance(1, t0);
        assert!(reg.take_expired(t0 + LINGER * 3, LINGER, true).is_empty());
        // The clock restarted when the pause was seen.
        assert!(
            reg.take_expired(t0 + LINGER * 3 + LINGER / 2, LINGER, false)
                .is_empty()
        );
        assert_eq!(reg.take_expired(t0 + LINGER * 4, LINGER, false).len(), 1);
    }

    #[test]
    fn pinned_listeners_stay() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        reg.insert(key("127.0.0.1:80"), vec![], "a", "x".into(), true, t0);
        assert!(reg.take_expired(t0 + LINGER * 10, LINGER, false).is_empty());
    }

    #[test]
    fn an_unpinned_listener_lingers_from_then() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        reg.insert(key("127.0.0.1:80"), vec![], "a", "x".into(), true, t0);
        reg.insert(key("127.0.0.1:81"), vec![], "b", "y".into(), true, t0);
        reg.add_ref(&key("127.0.0.1:81"), 1);
        let t1 = t0 + LINGER * 10;
        assert_eq!(reg.set_pinned(&key("127.0.0.1:80"), false, t1), Some(true));
        assert_eq!(reg.set_pinned(&key("127.0.0.1:81"), false, t1), Some(true));
        assert_eq!(reg.set_pinned(&key("127.0.0.1:82"), false, t1), None);
        assert!(reg.take_expired(t1 + LINGER / 2, LINGER, false).is_empty());
        let closed = reg.take_expired(t1 + LINGER, LINGER, false);
        assert_eq!(closed, vec![(key("127.0.0.1:80"), "a")]);
        // The one an instance holds stays until it lets go, then lingers.
        reg.release_instance(1, t1 + LINGER * 2);
        assert!(reg.take_expired(t1 + LINGER * 2, LINGER, false).is_empty());
        assert_eq!(reg.take_expired(t1 + LINGER * 3, LINGER, false).len(), 1);
        // Pinning again keeps one for good.
        reg.insert(key("127.0.0.1:83"), vec![], "c", "z".into(), false, t0);
        assert_eq!(reg.set_pinned(&key("127.0.0.1:83"), true, t1), Some(false));
        assert!(reg.take_expired(t1 + LINGER, LINGER, false).is_empty());
    }

    #[test]
    fn port_zero_and_its_bound_port_are_one_listener() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        reg.insert(
            key("127.0.0.1:0"),
            vec![key("127.0.0.1:40001")],
            "a",
            "127.0.0.1:40001".into(),
            false,
            t0,
        );
        assert_eq!(reg.get(&key("127.0.0.1:0")), Some(&"a"));
        assert_eq!(reg.get(&key("127.0.0.1:40001")), Some(&"a"));
        reg.add_ref(&key("127.0.0.1:40001"), 1);
        reg.add_ref(&key("127.0.0.1:0"), 2);
        let list = reg.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].address, "127.0.0.1:40001");
        assert_eq!(list[0].refs, 2);
        reg.release_instance(1, t0);
        reg.release_instance(2, t0);
        assert_eq!(reg.take_expired(t0 + LINGER, LINGER, false).len(), 1);
        assert_eq!(reg.get(&key("127.0.0.1:40001")), None);
    }
}
