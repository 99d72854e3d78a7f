//! Named read/write locks, fair: requests are served strictly in arrival order.
//!
//! A request is granted at once only if nobody waits and it is compatible with the
//! holders (a writer needs no holders; a reader needs no writer). Otherwise it queues;
//! whenever holders leave, the queue is granted from its front for as long as the front
//! is compatible — a run of readers together, or one writer. So a writer that waits
//! behind readers is never overtaken by readers that come after it.
//!
//! Holds and waits belong to an [`Owner`] (the broker: an instance, or a connection
//! that is not an instance) and are made through a connection. `Unlock` checks the
//! owner; everything an owner or a connection holds or waits for can be dropped at once
//! when it goes away. Locks are not reentrant: an owner that asks for a write lock it
//! already holds waits like anyone else (its threads exclude each other).
//!
//! The store does not wait. A request that must wait gets a [`Ticket`]; operations
//! report in [`Effects`] which tickets they granted (and which waits they removed), and
//! the caller wakes those waiters.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Limits, StateError};

pub type Owner = u64;
pub type Ticket = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Read,
    Write,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Read => "read",
            Mode::Write => "write",
        }
    }
}

/// One hold of a lock, or one waiting request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub owner: Owner,
    /// The connection it was taken through; `None` for a hold restored from an
    /// image (see [`image`](super::image)), which no connection's end releases.
    pub conn: Option<u64>,
    pub mode: Mode,
    /// When it was granted (a hold) or asked for (a wait).
    pub since: Instant,
    pub ticket: Ticket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    Granted,
    /// Must wait; the ticket shows up in some later [`Effects::granted`] or
    /// [`Effects::cancelled`], unless the wait is given up with [`Locker::cancel`].
    Queued(Ticket),
    /// Would have to wait, and the request was not to.
    Busy,
}

/// What an operation did to waiters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// Waits that now hold their lock.
    pub granted: Vec<Ticket>,
    /// Waits removed because their owner or connection went away.
    pub cancelled: Vec<Ticket>,
}

#[derive(Debug, Default)]
struct Lock {
    holders: Vec<Hold>,
    queue: VecDeque<Hold>,
}

impl Lock {
    fn compatible(&self, mode: Mode) -> bool {
        match mode {
            Mode::Write => self.holders.is_empty(),
            Mode::Read => self.holders.iter().all(|h| h.mode == Mode::Read),
        }
    }

    /// Grants from the front of the queue while it is compatible.
    fn advance(&mut self, now: Instant, granted: &mut Vec<Ticket>) {
        while let Some(front) = self.queue.front() {
            if !self.compatible(front.mode) {
                break;
            }
            let mut hold = self.queue.pop_front().expect("front");
            hold.since = now;
            granted.push(hold.ticket);
            self.holders.push(hold);
        }
    }

    fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.queue.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct Locker {
    limits: Limits,
    locks: HashMap<String, Lock>,
    /// Lock name and connection of every queued ticket.
    waiting: HashMap<Ticket, (String, u64)>,
    /// How many requests made through each connection wait.
    waits_by_conn: HashMap<u64, u64>,
    next_ticket: Ticket,
}

/// What became of a wait given up with [`Locker::cancel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// It was still waiting and is gone now.
    Cancelled(Effects),
    /// It is not waiting: it was granted, or removed, before.
    NotWaiting,
}

impl Locker {
    pub fn new(limits: Limits) -> Locker {
        Locker {
            limits,
            ..Locker::default()
        }
    }

    /// Asks for `name` in `mode`. With `wait` false a request that cannot be granted at
    /// once is [`Acquire::Busy`] and leaves no trace.
    pub fn acquire(
        &mut self,
        name: &str,
        owner: Owner,
        conn: u64,
        mode: Mode,
        wait: bool,
        now: Instant,
    ) -> Result<Acquire, StateError> {
        self.limits.check_name("lock name", name)?;
        if !self.locks.contains_key(name) {
            let n = self.locks.len() as u64;
            if n >= self.limits.max_keys_per_namespace {
                return Err(StateError::LimitExceeded(format!(
                    "{n} locks are already held or waited for (max_keys_per_namespace)"
                )));
            }
        }
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        let hold = Hold {
            owner,
            conn: Some(conn),
            mode,
            since: now,
            ticket,
        };
        let lock = self.locks.entry(name.to_string()).or_default();
        if lock.queue.is_empty() && lock.compatible(mode) {
            lock.holders.push(hold);
            return Ok(Acquire::Granted);
        }
        if !wait {
            if lock.is_idle() {
                self.locks.remove(name);
            }
            return Ok(Acquire::Busy);
        }
        let waiting_here = lock.queue.len() as u64;
        let waiting_through_conn = self.waits_by_conn.get(&conn).copied().unwrap_or(0);
        let refusal = if waiting_here >= self.limits.max_lock_waiters_per_lock {
            Some(format!(
                "{waiting_here} requests already wait for lock {name:?} (max_lock_waiters_per_lock)"
            ))
        } else if waiting_through_conn >= self.limits.max_lock_waiters_per_connection {
            Some(format!(
                "{waiting_through_conn} lock requests made through this connection already wait (max_lock_waiters_per_connection)"
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            if lock.is_idle() {
                self.locks.remove(name);
            }
            return Err(StateError::LimitExceeded(message));
        }
        lock.queue.push_back(hold);
        self.waiting.insert(ticket, (name.to_string(), conn));
        *self.waits_by_conn.entry(conn).or_default() += 1;
        Ok(Acquire::Queued(ticket))
    }

    /// Forgets a queued ticket that no longer waits.
    fn stop_waiting(&mut self, ticket: Ticket) -> Option<String> {
        let (name, conn) = self.waiting.remove(&ticket)?;
        if let Some(n) = self.waits_by_conn.get_mut(&conn) {
            *n -= 1;
            if *n == 0 {
                self.waits_by_conn.remove(&conn);
            }
        }
        Some(name)
    }

    /// Gives up a wait (its timeout ran out). Waiters behind it may now be granted.
    pub fn cancel(&mut self, ticket: Ticket, now: Instant) -> Cancel {
        let Some(name) = self.stop_waiting(ticket) else {
            return Cancel::NotWaiting;
        };
        let mut effects = Effects::default();
        if let Some(lock) = self.locks.get_mut(&name) {
            lock.queue.retain(|w| w.ticket != ticket);
            lock.advance(now, &mut effects.granted);
        }
        self.forget_granted(&effects);
        self.drop_if_idle(&name);
        Cancel::Cancelled(effects)
    }

    /// Releases one hold of `owner` in `mode`: `Unlock` (write) or `RUnlock` (read).
    pub fn release(
        &mut self,
        name: &str,
        owner: Owner,
        mode: Mode,
        now: Instant,
    ) -> Result<Effects, StateError> {
        self.limits.check_name("lock name", name)?;
        let verb = match mode {
            Mode::Write => "unlock",
            Mode::Read => "read-unlock",
        };
        let Some(lock) = self.locks.get_mut(name) else {
            return Err(StateError::NotOwner(format!(
                "cannot {verb} {name:?}: it is not locked"
            )));
        };
        let Some(i) = lock
            .holders
            .iter()
            .position(|h| h.owner == owner && h.mode == mode)
        else {
            let message = if lock.holders.iter().any(|h| h.owner == owner) {
                format!(
                    "cannot {verb} {name:?}: the caller holds it for {}",
                    match mode {
                        Mode::Write => "reading (use RUnlock)",
                        Mode::Read => "writing (use Unlock)",
                    }
                )
            } else if lock.holders.is_empty() {
                format!("cannot {verb} {name:?}: it is not locked")
            } else {
                format!("cannot {verb} {name:?}: the caller does not hold it")
            };
            return Err(StateError::NotOwner(message));
        };
        lock.holders.remove(i);
        let mut effects = Effects::default();
        lock.advance(now, &mut effects.granted);
        self.forget_granted(&effects);
        self.drop_if_idle(name);
        Ok(effects)
    }

    /// Releases the hold granted to `ticket`, if it still exists (a waiter that was
    /// granted the lock but gave up before it learned so).
    pub fn release_ticket(&mut self, name: &str, ticket: Ticket, now: Instant) -> Effects {
        let mut effects = Effects::default();
        if let Some(lock) = self.locks.get_mut(name)
            && let Some(i) = lock.holders.iter().position(|h| h.ticket == ticket)
        {
            lock.holders.remove(i);
            lock.advance(now, &mut effects.granted);
        }
        self.forget_granted(&effects);
        self.drop_if_idle(name);
        effects
    }

    /// Drops every hold and wait matching `pred` (an owner or a connection going away).
    fn release_where(&mut self, now: Instant, pred: impl Fn(&Hold) -> bool) -> Effects {
        let mut effects = Effects::default();
        let mut idle = Vec::new();
        for (name, lock) in &mut self.locks {
            let before = (lock.holders.len(), lock.queue.len());
            lock.holders.retain(|h| !pred(h));
            lock.queue.retain(|w| {
                let gone = pred(w);
                if gone {
                    effects.cancelled.push(w.ticket);
                }
                !gone
            });
            if before != (lock.holders.len(), lock.queue.len()) {
                lock.advance(now, &mut effects.granted);
            }
            if lock.is_idle() {
                idle.push(name.clone());
            }
        }
        for name in idle {
            self.locks.remove(&name);
        }
        for t in &effects.cancelled {
            self.stop_waiting(*t);
        }
        self.forget_granted(&effects);
        effects
    }

    /// Everything `owner` holds or waits for goes (its instance exited).
    pub fn release_owner(&mut self, owner: Owner, now: Instant) -> Effects {
        self.release_where(now, |h| h.owner == owner)
    }

    /// Everything taken through connection `conn` goes (the connection closed).
    pub fn release_conn(&mut self, conn: u64, now: Instant) -> Effects {
        self.release_where(now, |h| h.conn == Some(conn))
    }

    /// Repair: drops every hold of `name`, whoever the owner; returns how many.
    pub fn force_release(
        &mut self,
        name: &str,
        now: Instant,
    ) -> Result<(u32, Effects), StateError> {
        self.limits.check_name("lock name", name)?;
        let Some(lock) = self.locks.get_mut(name) else {
            return Ok((0, Effects::default()));
        };
        let n = lock.holders.len() as u32;
        lock.holders.clear();
        let mut effects = Effects::default();
        lock.advance(now, &mut effects.granted);
        self.forget_granted(&effects);
        self.drop_if_idle(name);
        Ok((n, effects))
    }

    /// Holders (in the order they were granted) and waiters (in the order they will be).
    pub fn queues(&self, name: &str) -> Result<(Vec<Hold>, Vec<Hold>), StateError> {
        self.limits.check_name("lock name", name)?;
        Ok(self.locks.get(name).map_or_else(Default::default, |l| {
            (l.holders.clone(), l.queue.iter().cloned().collect())
        }))
    }

    /// Names of the locks held or waited for, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.locks.keys().cloned().collect();
        names.sort();
        names
    }

    /// Puts back a hold carried in an image, detached from any connection. Not bound
    /// by the limits: a hold dropped for them would let a second owner into what the
    /// first still holds.
    pub(super) fn restore_hold(
        &mut self,
        name: &str,
        owner: Owner,
        mode: Mode,
        since: Instant,
    ) -> Result<(), String> {
        if name.is_empty() {
            return Err("a lock has an empty name".into());
        }
        let lock = self.locks.entry(name.to_string()).or_default();
        if !lock.compatible(mode) {
            return Err(format!(
                "lock {name:?} is held for {} beside another hold",
                mode.as_str()
            ));
        }
        self.next_ticket += 1;
        lock.holders.push(Hold {
            owner,
            conn: None,
            mode,
            since,
            ticket: self.next_ticket,
        });
        Ok(())
    }

    fn forget_granted(&mut self, effects: &Effects) {
        for t in &effects.granted {
            self.stop_waiting(*t);
        }
    }

    fn drop_if_idle(&mut self, name: &str) {
        if self.locks.get(name).is_some_and(Lock::is_idle) {
            self.locks.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Mode::{Read, Write};

    fn locker() -> (Locker, Instant) {
        (Locker::new(Limits::default()), Instant::now())
    }

    fn queued(a: Acquire) -> Ticket {
        match a {
            Acquire::Queued(t) => t,
            other => panic!("expected to queue, got {other:?}"),
        }
    }

    #[test]
    fn readers_share_writers_exclude() {
        let (mut l, now) = locker();
        assert_eq!(
            l.acquire("x", 1, 1, Read, true, now).unwrap(),
            Acquire::Granted
        );
        assert_eq!(
            l.acquire("x", 2, 2, Read, true, now).unwrap(),
            Acquire::Granted
        );
        assert_eq!(
            l.acquire("x", 3, 3, Write, false, now).unwrap(),
            Acquire::Busy
        );
        let w = queued(l.acquire("x", 3, 3, Write, true, now).unwrap());
        assert!(l.release("x", 1, Read, now).unwrap().granted.is_empty());
        assert_eq!(l.release("x", 2, Read, now).unwrap().granted, vec![w]);
        assert_eq!(
            l.acquire("x", 1, 1, Read, false, now).unwrap(),
            Acquire::Busy
        );
        assert!(l.release("x", 3, Write, now).unwrap().granted.is_empty());
        assert!(l.names().is_empty(), "an idle lock is forgotten");
    }

    #[test]
    fn a_waiting_writer_goes_before_later_readers() {
        let (mut l, now) = locker();
        l.acquire("x", 1, 1, Read, true, now).unwrap();
        let w = queued(l.acquire("x", 2, 2, Write, true, now).unwrap());
        let r1 = queued(l.acquire("x", 3, 3, Read, true, now).unwrap());
        let r2 = queued(l.acquire("x", 4, 4, Read, true, now).unwrap());
        assert_eq!(
            l.acquire("x", 5, 5, Read, false, now).unwrap(),
            Acquire::Busy
        );
        assert_eq!(l.release("x", 1, Read, now).unwrap().granted, vec![w]);
        assert_eq!(l.release("x", 2, Write, now).unwrap().granted, vec![r1, r2]);
        let (holders, waiters) = l.queues("x").unwrap();
        assert_eq!(
            holders.iter().map(|h| h.owner).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert!(waiters.is_empty());
    }

    #[test]
    fn only_the_owner_unlocks() {
        let (mut l, now) = locker();
        l.acquire("x", 1, 1, Write, true, now).unwrap();
        assert!(matches!(
            l.release("x", 2, Write, now),
            Err(StateError::NotOwner(_))
        ));
        let e = l.release("x", 1, Read, now).unwrap_err();
        assert!(e.to_string().contains("holds it for writing"), "{e}");
        assert!(matches!(
            l.release("y", 1, Write, now),
            Err(StateError::NotOwner(_))
        ));
        l.release("x", 1, Write, now).unwrap();
        assert!(matches!(
            l.release("x", 1, Write, now),
            Err(StateError::NotOwner(_))
        ));
    }

    #[test]
    fn a_cancelled_wait_lets_the_ones_behind_it_in() {
        let (mut l, now) = locker();
        l.acquire("x", 1, 1, Read, true, now).unwrap();
        let w = queued(l.acquire("x", 2, 2, Write, true, now).unwrap());
        let r = queued(l.acquire("x", 3, 3, Read, true, now).unwrap());
        assert_eq!(
            l.cancel(w, now),
            Cancel::Cancelled(Effects {
                granted: vec![r],
                cancelled: vec![]
            })
        );
        assert_eq!(l.cancel(w, now), Cancel::NotWaiting);
        assert_eq!(l.cancel(r, now), Cancel::NotWaiting, "granted, not waiting");
    }

    #[test]
    fn an_owner_going_away_releases_its_holds_and_waits_in_order() {
        let (mut l, now) = locker();
        l.acquire("a", 7, 70, Write, true, now).unwrap();
        l.acquire("b", 7, 71, Read, true, now).unwrap();
        let w1 = queued(l.acquire("a", 8, 80, Write, true, now).unwrap());
        let w2 = queued(l.acquire("a", 9, 90, Write, true, now).unwrap());
        let mine = queued(l.acquire("a", 7, 70, Read, true, now).unwrap());
        let e = l.release_owner(7, now);
        assert_eq!(e.granted, vec![w1], "the next waiter, only");
        assert_eq!(e.cancelled, vec![mine]);
        assert_eq!(l.names(), vec!["a"]);
        assert_eq!(l.release("a", 8, Write, now).unwrap().granted, vec![w2]);
    }

    #[test]
    fn a_connection_going_away_releases_what_it_took() {
        let (mut l, now) = locker();
        l.acquire("a", 7, 70, Write, true, now).unwrap();
        l.acquire("b", 7, 71, Write, true, now).unwrap();
        let e = l.release_conn(70, now);
        assert!(e.granted.is_empty());
        assert_eq!(
            l.names(),
            vec!["b"],
            "the owner's other connection keeps its lock"
        );
    }

    #[test]
    fn force_release_drops_every_holder() {
        let (mut l, now) = locker();
        l.acquire("a", 1, 1, Read, true, now).unwrap();
        l.acquire("a", 2, 2, Read, true, now).unwrap();
        let w = queued(l.acquire("a", 3, 3, Write, true, now).unwrap());
        let (n, e) = l.force_release("a", now).unwrap();
        assert_eq!((n, e.granted), (2, vec![w]));
    }

    #[test]
    fn the_number_of_locks_is_limited() {
        let mut l = Locker::new(Limits {
            max_keys_per_namespace: 1,
            ..Limits::default()
        });
        let now = Instant::now();
        l.acquire("a", 1, 1, Write, true, now).unwrap();
        assert!(matches!(
            l.acquire("b", 1, 1, Write, true, now),
            Err(StateError::LimitExceeded(_))
        ));
        assert!(queued(l.acquire("a", 2, 2, Write, true, now).unwrap()) > 0);
    }

    fn refusal(result: Result<Acquire, StateError>) -> String {
        match result {
            Err(StateError::LimitExceeded(m)) => m,
            other => panic!("expected LimitExceeded, got {other:?}"),
        }
    }

    #[test]
    fn waiters_are_limited_per_connection() {
        let mut l = Locker::new(Limits {
            max_lock_waiters_per_connection: 2,
            ..Limits::default()
        });
        let now = Instant::now();
        for name in ["a", "b", "c"] {
            l.acquire(name, 1, 1, Write, true, now).unwrap();
        }
        let a = queued(l.acquire("a", 2, 20, Write, true, now).unwrap());
        queued(l.acquire("b", 2, 20, Write, true, now).unwrap());
        let m = refusal(l.acquire("c", 2, 20, Write, true, now));
        assert!(m.contains("(max_lock_waiters_per_connection)"), "{m}");
        assert!(
            l.queues("c").unwrap().1.is_empty(),
            "the refused request left no trace"
        );
        assert_eq!(
            l.acquire("c", 2, 20, Write, false, now).unwrap(),
            Acquire::Busy,
            "a request that does not wait is not a waiter"
        );
        queued(l.acquire("c", 3, 30, Write, true, now).unwrap());

        // A wait that ends, however it ends, frees its place.
        assert_eq!(l.release("a", 1, Write, now).unwrap().granted, vec![a]);
        let b2 = queued(l.acquire("c", 2, 20, Write, true, now).unwrap());
        assert!(matches!(l.cancel(b2, now), Cancel::Cancelled(_)));
        queued(l.acquire("c", 2, 20, Write, true, now).unwrap());
        l.release_conn(20, now);
        assert!(!l.waits_by_conn.contains_key(&20));
        queued(l.acquire("b", 2, 20, Write, true, now).unwrap());
        queued(l.acquire("c", 2, 20, Write, true, now).unwrap());
        refusal(l.acquire("b", 2, 20, Read, true, now));
    }

    #[test]
    fn waiters_are_limited_per_lock() {
        let mut l = Locker::new(Limits {
            max_lock_waiters_per_lock: 2,
            ..Limits::default()
        });
        let now = Instant::now();
        l.acquire("a", 1, 1, Write, true, now).unwrap();
        queued(l.acquire("a", 2, 2, Write, true, now).unwrap());
        queued(l.acquire("a", 3, 3, Read, true, now).unwrap());
        let m = refusal(l.acquire("a", 4, 4, Read, true, now));
        assert_eq!(
            m,
            "2 requests already wait for lock \"a\" (max_lock_waiters_per_lock)"
        );
        assert_eq!(
            l.acquire("b", 4, 4, Write, true, now).unwrap(),
            Acquire::Granted,
            "another lock has room"
        );
        l.release_owner(3, now);
        queued(l.acquire("a", 4, 4, Read, true, now).unwrap());
    }
}
