//! Images of a [`Store`]: the shared state as plain data, which the broker writes
//! before it re-executes itself (and into its snapshot, for a restart after a crash)
//! and restores in the new process. JSON through serde; no I/O here.
//!
//! What an image keeps:
//! * every cache entry still live at the time of the image, its value (base64) and the
//!   time it had left; restored, it expires once that time has passed again. Entries
//!   that had expired are left out.
//! * every counter and its value.
//! * every hold of a lock whose owner is an instance (an owner below
//!   [`CONNECTION_OWNER`]): its mode, its owner and how long it has been held. A read
//!   lock keeps every hold, one owner's several holds included (each `RUnlock` releases
//!   one).
//!
//! What it does not keep:
//! * lock waiters: their calls came over connections the exec closes, so nobody would
//!   receive the grant.
//! * holds of a caller that is not an instance (an admin): they belong to a connection
//!   the exec closes, whose end releases them anyway.
//!
//! A restored hold is detached from any connection ([`Hold::conn`](super::Hold) is
//! `None`): closing a connection never releases it, only its owner's unlock or
//! [`release_owner`](super::Locker::release_owner) when the instance exits. A broker
//! restarted after a crash must therefore `release_owner` every owner it does not
//! adopt. Connection numbers and lock tickets need no carrying: restored holds get
//! fresh tickets, and no ticket or connection of the old process is referred to again.
//!
//! The image is restored into the limits in force now, which may be lower than those it
//! was taken under. Cache entries and counters that do not fit are left out and counted
//! in [`Dropped`]; the limits then hold as always. Lock holds are always restored,
//! because dropping one would let a second instance into what the first still holds: if
//! they are more than `max_keys_per_namespace` locks, new lock names are refused until
//! enough are released.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::calls::CONNECTION_OWNER;
use super::{Limits, Mode, Owner, SharedStore, StateError, Store};

/// The format written by [`Store::image`]; [`Store::restore`] refuses any other.
pub const IMAGE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StoreImage {
    pub version: u32,
    /// Sorted by namespace, then key.
    pub cache: Vec<CacheEntryImage>,
    /// Counters and their values, sorted by name.
    pub atomics: Vec<(String, i64)>,
    /// Locks held by instances, sorted by name.
    pub locks: Vec<LockImage>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CacheEntryImage {
    pub namespace: String,
    pub key: String,
    #[serde(with = "base64_bytes")]
    pub value: Vec<u8>,
    /// Milliseconds left before it expires, rounded up; `None`: it never expires.
    pub ttl_left_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LockImage {
    pub name: String,
    /// `"read"` or `"write"`; a write lock has one holder.
    pub mode: Mode,
    /// In the order they were granted.
    pub holders: Vec<HolderImage>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct HolderImage {
    /// An instance id.
    pub owner: Owner,
    /// Milliseconds it had been held at the time of the image.
    pub held_ms: u64,
}

/// What an image held that the limits now in force left out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub cache_entries: usize,
    pub counters: usize,
    /// Why the first of them was left out.
    pub first_reason: Option<String>,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.cache_entries == 0 && self.counters == 0
    }

    fn count(&mut self, n: fn(&mut Dropped) -> &mut usize, why: StateError) {
        *n(self) += 1;
        self.first_reason.get_or_insert_with(|| why.to_string());
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cache entries and {} counters of the image do not fit the limits and were left out",
            self.cache_entries, self.counters
        )?;
        if let Some(why) = &self.first_reason {
            write!(f, " (the first: {why})")?;
        }
        Ok(())
    }
}

/// A restored store, and what did not fit in it.
#[derive(Debug)]
pub struct Restored<S = Store> {
    pub store: S,
    pub dropped: Dropped,
}

/// Milliseconds from `now` to `deadline`, rounded up; `None` once it has passed.
fn ms_left(deadline: Instant, now: Instant) -> Option<u64> {
    let left = deadline.saturating_duration_since(now);
    if left.is_zero() {
        return None;
    }
    Some(u64::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX))
}

impl Store {
    /// What of the store survives a re-exec, as it is at `now`.
    pub fn image(&self, now: Instant) -> StoreImage {
        let mut cache: Vec<CacheEntryImage> = self
            .cache
            .entries()
            .filter_map(|(ns, key, value, expires)| {
                let ttl_left_ms = match expires {
                    None => None,
                    Some(at) => Some(ms_left(at, now)?),
                };
                Some(CacheEntryImage {
                    namespace: ns.to_string(),
                    key: key.to_string(),
                    value: value.to_vec(),
                    ttl_left_ms,
                })
            })
            .collect();
        cache.sort_by(|a, b| (&a.namespace, &a.key).cmp(&(&b.namespace, &b.key)));
        let locks = self
            .locker
            .names()
            .into_iter()
            .filter_map(|name| {
                let (holds, _waiters) = self.locker.queues(&name).ok()?;
                let holds: Vec<_> = holds
                    .into_iter()
                    .filter(|h| h.owner < CONNECTION_OWNER)
                    .collect();
                Some(LockImage {
                    mode: holds.first()?.mode,
                    holders: holds
                        .iter()
                        .map(|h| HolderImage {
                            owner: h.owner,
                            held_ms: now.saturating_duration_since(h.since).as_millis() as u64,
                        })
                        .collect(),
                    name,
                })
            })
            .collect();
        StoreImage {
            version: IMAGE_VERSION,
            cache,
            atomics: self.atomics.list(),
            locks,
        }
    }

    /// A store under `limits` holding what `image` held, as of `now`. Fails, naming
    /// what is wrong, on an image this code did not write: another version, a name
    /// twice, a lock held in contradiction (two writers), a holder that is not an
    /// instance.
    pub fn restore(limits: Limits, image: StoreImage, now: Instant) -> Result<Restored, String> {
        if image.version != IMAGE_VERSION {
            return Err(format!(
                "the state image is version {}, this broker reads version {IMAGE_VERSION}",
                image.version
            ));
        }
        let mut store = Store::new(limits);
        let mut dropped = Dropped::default();

        let mut seen = HashSet::new();
        for e in image.cache {
            if !seen.insert((e.namespace.clone(), e.key.clone())) {
                return Err(format!(
                    "the state image has cache key {:?} of namespace {:?} twice",
                    e.key, e.namespace
                ));
            }
            let ttl_ms = match e.ttl_left_ms {
                None => 0,
                Some(0) => continue,
                Some(ms) => ms,
            };
            if let Err(why) = store.cache.set(&e.namespace, &e.key, e.value, ttl_ms, now) {
                dropped.count(|d| &mut d.cache_entries, why);
            }
        }

        let mut seen = HashSet::new();
        for (name, value) in image.atomics {
            if !seen.insert(name.clone()) {
                return Err(format!("the state image has counter {name:?} twice"));
            }
            if let Err(why) = store.atomics.store(&name, value) {
                dropped.count(|d| &mut d.counters, why);
            }
        }

        let mut seen = HashSet::new();
        for lock in image.locks {
            if !seen.insert(lock.name.clone()) {
                return Err(format!("the state image has lock {:?} twice", lock.name));
            }
            for h in lock.holders {
                if h.owner >= CONNECTION_OWNER {
                    return Err(format!(
                        "the state image has lock {:?} held by {}, which is not an instance",
                        lock.name, h.owner
                    ));
                }
                let since = now
                    .checked_sub(Duration::from_millis(h.held_ms))
                    .unwrap_or(now);
                store
                    .locker
                    .restore_hold(&lock.name, h.owner, lock.mode, since)
                    .map_err(|why| format!("the state image is inconsistent: {why}"))?;
            }
        }
        Ok(Restored { store, dropped })
    }
}

impl SharedStore {
    /// [`Store::image`] now.
    pub fn image(&self) -> StoreImage {
        self.with(|store, now| store.image(now))
    }

    /// [`Store::restore`] now, shared.
    pub fn from_image(limits: Limits, image: StoreImage) -> Result<Restored<SharedStore>, String> {
        let Restored { store, dropped } = Store::restore(limits, image, Instant::now())?;
        Ok(Restored {
            store: SharedStore::from_store(store),
            dropped,
        })
    }
}

/// Bytes as one base64 string: a third larger than the bytes, where a JSON array of
/// numbers is up to four times as large.
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text)
            .map_err(|e| de::Error::custom(format!("a cache value is not base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Acquire, Effects};
    use Mode::{Read, Write};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Through JSON and back, as the broker carries it.
    fn carried(image: &StoreImage) -> StoreImage {
        serde_json::from_str(&serde_json::to_string(image).unwrap()).unwrap()
    }

    fn restored(image: &StoreImage, limits: Limits, now: Instant) -> Restored {
        Store::restore(limits, carried(image), now).unwrap()
    }

    fn queued(a: Acquire) -> u64 {
        match a {
            Acquire::Queued(t) => t,
            other => panic!("expected to queue, got {other:?}"),
        }
    }

    #[test]
    fn the_cache_keeps_its_values_and_the_time_they_had_left() {
        let t0 = Instant::now();
        let mut s = Store::new(Limits::default());
        let every_byte: Vec<u8> = (0..=255).collect();
        s.cache
            .set("ns", "forever", every_byte.clone(), 0, t0)
            .unwrap();
        s.cache.set("ns", "long", b"l".to_vec(), 1000, t0).unwrap();
        s.cache.set("ns", "soon", b"s".to_vec(), 10, t0).unwrap();
        s.cache.set("ns", "gone", b"g".to_vec(), 5, t0).unwrap();
        s.cache.set("other", "x", vec![], 0, t0).unwrap();

        let image = s.image(t0 + ms(5));
        let left: Vec<_> = image
            .cache
            .iter()
            .map(|e| (e.namespace.as_str(), e.key.as_str(), e.ttl_left_ms))
            .collect();
        assert_eq!(
            left,
            vec![
                ("ns", "forever", None),
                ("ns", "long", Some(995)),
                ("ns", "soon", Some(5)),
                ("other", "x", None),
            ],
            "the expired entry is left out"
        );
        let json = serde_json::to_string(&image).unwrap();
        assert!(json.contains("\"AAECAwQF"), "values are base64: {json}");

        // The new process's clock reads something else entirely.
        let t1 = t0 + Duration::from_secs(3600);
        let Restored { mut store, dropped } = restored(&image, Limits::default(), t1);
        assert!(dropped.is_empty());
        let c = &mut store.cache;
        assert_eq!(c.get("ns", "forever", t1).unwrap(), Some(every_byte));
        assert_eq!(c.get("other", "x", t1).unwrap(), Some(vec![]));
        assert_eq!(
            c.get("ns", "soon", t1 + ms(4)).unwrap(),
            Some(b"s".to_vec())
        );
        assert_eq!(c.get("ns", "soon", t1 + ms(5)).unwrap(), None);
        assert_eq!(
            c.get("ns", "long", t1 + ms(994)).unwrap(),
            Some(b"l".to_vec())
        );
        assert_eq!(c.get("ns", "long", t1 + ms(995)).unwrap(), None);
        assert_eq!(c.get("ns", "gone", t1).unwrap(), None);
        assert_eq!(
            c.total_bytes(),
            ("nsforever".len() + 256 + "otherx".len()) as u64,
            "usage is recounted"
        );
    }

    #[test]
    fn less_than_a_millisecond_left_is_rounded_up_not_to_never() {
        let t0 = Instant::now();
        let mut s = Store::new(Limits::default());
        s.cache.set("ns", "k", b"v".to_vec(), 1, t0).unwrap();
        let image = s.image(t0 + Duration::from_micros(999));
        assert_eq!(image.cache[0].ttl_left_ms, Some(1));
        let t1 = t0 + Duration::from_secs(1);
        let mut store = restored(&image, Limits::default(), t1).store;
        assert!(store.cache.exists("ns", "k", t1).unwrap());
        assert!(!store.cache.exists("ns", "k", t1 + ms(1)).unwrap());
    }

    #[test]
    fn counters_keep_their_values() {
        let mut s = Store::new(Limits::default());
        s.atomics.store("max", i64::MAX).unwrap();
        s.atomics.store("min", i64::MIN).unwrap();
        s.atomics.add("n", -3).unwrap();
        let now = Instant::now();
        let mut store = restored(&s.image(now), Limits::default(), now).store;
        assert_eq!(store.atomics.list(), s.atomics.list());
        assert_eq!(store.atomics.add("max", 1).unwrap(), i64::MIN);
    }

    const ADMIN: Owner = CONNECTION_OWNER + 5;

    /// Instance 1 holds "w" for writing; instances 2 (twice) and 3 hold "r" for
    /// reading, and so does the admin; the admin holds "a" for writing. Instance 4
    /// waits for "w", instance 5 and the admin for "a", the admin for "w".
    fn locked(t0: Instant) -> Store {
        let mut s = Store::new(Limits::default());
        let l = &mut s.locker;
        let granted = |a: Result<Acquire, StateError>| assert_eq!(a.unwrap(), Acquire::Granted);
        granted(l.acquire("w", 1, 10, Write, true, t0));
        granted(l.acquire("r", 2, 20, Read, true, t0));
        granted(l.acquire("r", 3, 30, Read, true, t0 + ms(50)));
        granted(l.acquire("r", 2, 21, Read, true, t0 + ms(60)));
        granted(l.acquire("r", ADMIN, 5, Read, true, t0));
        granted(l.acquire("a", ADMIN, 5, Write, true, t0));
        queued(l.acquire("w", 4, 40, Write, true, t0).unwrap());
        queued(l.acquire("a", 5, 50, Write, true, t0).unwrap());
        queued(l.acquire("w", ADMIN, 5, Read, true, t0).unwrap());
        s
    }

    fn owners(s: &Store, name: &str) -> (Vec<Owner>, Vec<Owner>) {
        let (holders, waiters) = s.locker.queues(name).unwrap();
        (
            holders.iter().map(|h| h.owner).collect(),
            waiters.iter().map(|h| h.owner).collect(),
        )
    }

    #[test]
    fn instance_holds_survive_detached_and_nothing_else_does() {
        let t0 = Instant::now();
        let image = locked(t0).image(t0 + ms(100));
        assert_eq!(
            image.locks,
            vec![
                LockImage {
                    name: "r".into(),
                    mode: Read,
                    holders: vec![
                        HolderImage {
                            owner: 2,
                            held_ms: 100
                        },
                        HolderImage {
                            owner: 3,
                            held_ms: 50
                        },
                        HolderImage {
                            owner: 2,
                            held_ms: 40
                        },
                    ],
                },
                LockImage {
                    name: "w".into(),
                    mode: Write,
                    holders: vec![HolderImage {
                        owner: 1,
                        held_ms: 100
                    }],
                },
            ],
            "no admin hold, no waiter, no lock held by the admin alone"
        );
        assert!(
            serde_json::to_string(&image)
                .unwrap()
                .contains("\"mode\":\"read\"")
        );

        let t1 = t0 + Duration::from_secs(7200);
        let mut s = restored(&image, Limits::default(), t1).store;
        assert_eq!(s.locker.names(), vec!["r", "w"]);
        assert_eq!(owners(&s, "w"), (vec![1], vec![]));
        assert_eq!(owners(&s, "r"), (vec![2, 3, 2], vec![]));
        let (holders, _) = s.locker.queues("w").unwrap();
        assert_eq!((holders[0].conn, holders[0].mode), (None, Write));
        assert_eq!(t1 - holders[0].since, ms(100), "held for as long as before");

        for conn in [0, 1, 5, 10, 20, 21, 30, 40, 50, u64::MAX] {
            assert_eq!(s.locker.release_conn(conn, t1), Effects::default());
        }
        assert_eq!(
            owners(&s, "w"),
            (vec![1], vec![]),
            "no connection releases it"
        );
        assert_eq!(
            s.locker.acquire("a", 5, 1, Write, false, t1).unwrap(),
            Acquire::Granted,
            "the admin's lock is free"
        );

        assert!(matches!(
            s.locker.release("w", 2, Write, t1),
            Err(StateError::NotOwner(_))
        ));
        let t = queued(s.locker.acquire("w", 6, 1, Write, true, t1).unwrap());
        assert_eq!(
            s.locker.release("w", 1, Write, t1).unwrap().granted,
            vec![t]
        );
        assert_eq!(owners(&s, "w"), (vec![6], vec![]));

        let w = queued(s.locker.acquire("r", 7, 1, Write, true, t1).unwrap());
        assert!(s.locker.release_owner(2, t1).granted.is_empty());
        assert_eq!(owners(&s, "r"), (vec![3], vec![7]));
        assert_eq!(s.locker.release_owner(3, t1).granted, vec![w]);
    }

    #[test]
    fn restored_holds_take_fresh_tickets_and_new_ones_follow() {
        let t0 = Instant::now();
        let image = locked(t0).image(t0);
        let mut s = restored(&image, Limits::default(), t0).store;
        let mut tickets: Vec<_> = ["r", "w"]
            .iter()
            .flat_map(|n| s.locker.queues(n).unwrap().0)
            .map(|h| h.ticket)
            .collect();
        tickets.push(queued(s.locker.acquire("w", 8, 1, Read, true, t0).unwrap()));
        let mut unique = tickets.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), tickets.len(), "{tickets:?}");
    }

    #[test]
    fn what_no_longer_fits_the_limits_is_left_out_and_counted() {
        let now = Instant::now();
        let mut s = Store::new(Limits::default());
        for k in ["a", "b", "c"] {
            s.cache.set("ns", k, vec![0; 10], 0, now).unwrap();
        }
        s.cache.set("toolongname", "k", vec![], 0, now).unwrap();
        for c in ["x", "y", "z"] {
            s.atomics.store(c, 1).unwrap();
        }
        for (name, owner) in [("l1", 1), ("l2", 2), ("l3", 3)] {
            s.locker
                .acquire(name, owner, owner, Write, true, now)
                .unwrap();
        }
        let limits = Limits {
            max_key_bytes: 8,
            max_keys_per_namespace: 2,
            ..Limits::default()
        };
        let Restored { mut store, dropped } = restored(&s.image(now), limits, now);
        assert_eq!((dropped.cache_entries, dropped.counters), (2, 1));
        assert!(
            dropped
                .to_string()
                .starts_with("2 cache entries and 1 counters"),
            "{dropped}"
        );
        assert!(
            dropped
                .first_reason
                .unwrap()
                .contains("max_keys_per_namespace")
        );
        assert_eq!(store.cache.keys("ns", now).unwrap(), vec!["a", "b"]);
        assert_eq!(store.cache.total_bytes(), 2 * 13);
        assert!(matches!(
            store.cache.set("ns", "d", vec![], 0, now),
            Err(StateError::LimitExceeded(_))
        ));
        assert!(matches!(
            store.atomics.add("w", 1),
            Err(StateError::LimitExceeded(_))
        ));
        assert_eq!(store.locker.names(), vec!["l1", "l2", "l3"], "every hold");
        assert!(matches!(
            store.locker.acquire("l4", 4, 4, Write, true, now),
            Err(StateError::LimitExceeded(_))
        ));

        let small = Limits {
            max_total_bytes: 20,
            ..Limits::default()
        };
        let Restored { store, dropped } = restored(&s.image(now), small, now);
        assert_eq!(dropped.cache_entries, 3);
        assert!(store.cache.total_bytes() <= 20);
    }

    #[tokio::test]
    async fn a_shared_store_restored_wakes_who_waits_behind_a_restored_hold() {
        let old = SharedStore::new(Limits::default());
        assert!(old.lock("x", 1, 10, Write, None).await.unwrap());
        old.with(|s, now| s.cache.set("ns", "k", b"v".to_vec(), 0, now))
            .unwrap();
        let image = carried(&old.image());
        let shared = std::sync::Arc::new(
            SharedStore::from_image(Limits::default(), image)
                .unwrap()
                .store,
        );
        assert_eq!(
            shared.with(|s, now| s.cache.get("ns", "k", now)).unwrap(),
            Some(b"v".to_vec())
        );
        shared.release_conn(10);
        let waiter = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.lock("x", 2, 1, Write, None).await })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared
            .with(|s, _| s.locker.queues("x"))
            .unwrap()
            .1
            .is_empty()
        {
            assert!(Instant::now() < deadline, "the request never queued");
            tokio::time::sleep(ms(1)).await;
        }
        assert!(!waiter.is_finished());
        shared.unlock("x", 1, Write).unwrap();
        assert!(waiter.await.unwrap().unwrap());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "",
            "garbage",
            "{}",
            "[1,2,3]",
            r#"{"version":1,"cache":[],"atomics":[["n","x"]],"locks":[]}"#,
            r#"{"version":1,"cache":[{"namespace":"n","key":"k","value":"@@@","ttl_left_ms":null}],"atomics":[],"locks":[]}"#,
            r#"{"version":1,"cache":[],"atomics":[],"locks":[{"name":"x","mode":"exclusive","holders":[]}]}"#,
            r#"{"version":1,"cache":[],"atomics":[],"locks":[{"name":"x","mode":"read","holders":[{"owner":-1,"held_ms":0}]}]}"#,
        ] {
            assert!(serde_json::from_str::<StoreImage>(bad).is_err(), "{bad}");
        }
    }

    fn restore_error(json: &str) -> String {
        let image: StoreImage = serde_json::from_str(json).unwrap();
        Store::restore(Limits::default(), image, Instant::now()).unwrap_err()
    }

    #[test]
    fn an_image_this_code_did_not_write_is_refused_naming_why() {
        assert_eq!(
            restore_error(r#"{"version":2,"cache":[],"atomics":[],"locks":[]}"#),
            "the state image is version 2, this broker reads version 1"
        );
        assert_eq!(
            restore_error(
                r#"{"version":1,"cache":[],"atomics":[],"locks":[{"name":"x","mode":"write","holders":[{"owner":1,"held_ms":0},{"owner":2,"held_ms":0}]}]}"#
            ),
            "the state image is inconsistent: lock \"x\" is held for write beside another hold"
        );
        assert_eq!(
            restore_error(&format!(
                r#"{{"version":1,"cache":[],"atomics":[],"locks":[{{"name":"x","mode":"read","holders":[{{"owner":{ADMIN},"held_ms":0}}]}}]}}"#
            )),
            format!("the state image has lock \"x\" held by {ADMIN}, which is not an instance")
        );
        assert_eq!(
            restore_error(r#"{"version":1,"cache":[],"atomics":[["n",1],["n",2]],"locks":[]}"#),
            "the state image has counter \"n\" twice"
        );
        assert!(
            restore_error(
                r#"{"version":1,"cache":[{"namespace":"n","key":"k","value":"","ttl_left_ms":null},{"namespace":"n","key":"k","value":"","ttl_left_ms":5}],"atomics":[],"locks":[]}"#
            )
            .contains("twice")
        );
        assert!(
            restore_error(
                r#"{"version":1,"cache":[],"atomics":[],"locks":[{"name":"","mode":"read","holders":[{"owner":1,"held_ms":0}]}]}"#
            )
            .contains("empty name")
        );
    }

    /// How long a full default cache (64 MiB in 1 KiB values) takes to image, write
    /// as JSON, read back and restore: the part of a re-exec's gap the state costs.
    #[test]
    #[ignore = "a measurement: cargo test -p ally-core --release --lib full_cache -- --ignored --nocapture"]
    fn a_full_cache_round_trip_takes() {
        let now = Instant::now();
        let mut s = Store::new(Limits::default());
        let mut n = 0u32;
        while s
            .cache
            .set(
                "sessions",
                &format!("{n:08}"),
                vec![n as u8; 1024],
                60_000,
                now,
            )
            .is_ok()
        {
            n += 1;
        }
        let t = Instant::now();
        let image = s.image(now);
        let imaged = t.elapsed();
        let json = serde_json::to_vec(&image).unwrap();
        let written = t.elapsed();
        let t = Instant::now();
        let image: StoreImage = serde_json::from_slice(&json).unwrap();
        let parsed = t.elapsed();
        let mut back = Store::restore(Limits::default(), image, now).unwrap().store;
        let read = t.elapsed();
        println!(
            "{n} entries, {} MiB of cache, {} MiB of JSON: image {imaged:?}, +write {written:?}; read {parsed:?}, +restore {read:?}",
            s.cache.total_bytes() >> 20,
            json.len() >> 20
        );
        assert_eq!(back.cache.total_bytes(), s.cache.total_bytes());
        assert_eq!(back.cache.count("sessions", now).unwrap(), u64::from(n));
    }
}
