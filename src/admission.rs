//! Who may open one more connection to the broker's sockets: every uid at most
//! `max_connections_per_uid` at once, everyone together at most `max_connections`.
//!
//! Root and the broker's own user (the admins) have [`ADMIN_RESERVE`] connections
//! each past both caps, so that an operator can still run `ally status` or
//! `ally reload` while strangers, or the app itself, hold every other one. They are
//! capped like anyone else otherwise: an app that runs as root is root's too.
//!
//! A connection holds its [`Permit`] while it is open; dropping it gives the place back.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Connections each admin may hold past the caps.
pub const ADMIN_RESERVE: usize = 4;
/// File descriptors counted for one connection: its socket and the pidfd pinning
/// its peer (`dbus::peer`), measured, and one more for what its calls hold open for
/// a while (the socket a `Listen` reply passes, until it is sent).
pub const FDS_PER_CONNECTION: u64 = 3;
/// File descriptors kept for everything else: listeners, instances' pipes, files.
pub const FDS_KEPT: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub total: usize,
    pub per_uid: usize,
}

impl Caps {
    /// `total` lowered, if need be, so that the connections cannot use up the file
    /// descriptors the process may open (`nofile`, its `RLIMIT_NOFILE`).
    pub fn within_fd_limit(self, nofile: u64) -> Caps {
        let admins = 2 * ADMIN_RESERVE as u64;
        let room = nofile.saturating_sub(FDS_KEPT) / FDS_PER_CONNECTION;
        let total = (self.total as u64).min(room.saturating_sub(admins).max(1)) as usize;
        Caps {
            total,
            per_uid: self.per_uid.min(total),
        }
    }
}

/// Why a connection was refused, as the caller is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    PerUid { uid: u32, max: usize },
    Total { max: usize },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::PerUid { uid, max } => write!(
                f,
                "too many connections from uid {uid} (max_connections_per_uid = {max})"
            ),
            Refusal::Total { max } => {
                write!(f, "too many connections (max_connections = {max})")
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_uid: HashMap<u32, usize>,
    reserved_by_uid: HashMap<u32, usize>,
}

#[derive(Debug)]
pub struct Admission {
    caps: Caps,
    admins: [u32; 2],
    counts: Mutex<Counts>,
}

impl Admission {
    /// `broker_uid` is the broker's own user, an admin like root.
    pub fn new(caps: Caps, broker_uid: u32) -> Arc<Admission> {
        Arc::new(Admission {
            caps,
            admins: [0, broker_uid],
            counts: Mutex::default(),
        })
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// A place for one more connection of `uid`, or why there is none.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Permit, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = counts.by_uid.get(&uid).copied().unwrap_or(0);
        let refusal = if mine >= self.caps.per_uid {
            Some(Refusal::PerUid {
                uid,
                max: self.caps.per_uid,
            })
        } else if counts.total >= self.caps.total {
            Some(Refusal::Total {
                max: self.caps.total,
            })
        } else {
            None
        };
        let reserved = match refusal {
            None => false,
            Some(refusal) => {
                let held = counts.reserved_by_uid.get(&uid).copied().unwrap_or(0);
                if !self.admins.contains(&uid) || held >= ADMIN_RESERVE {
                    return Err(refusal);
                }
                true
            }
        };
        if reserved {
            *counts.reserved_by_uid.entry(uid).or_default() += 1;
        } else {
            counts.total += 1;
            *counts.by_uid.entry(uid).or_default() += 1;
        }
        Ok(Permit {
            admission: self.clone(),
            uid,
            reserved,
        })
    }

    /// Connections held now, all uids together (admins' reserved ones included).
    pub fn held(&self) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total + counts.reserved_by_uid.values().sum::<usize>()
    }

    fn release(&self, uid: u32, reserved: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let map = if reserved {
            &mut counts.reserved_by_uid
        } else {
            &mut counts.by_uid
        };
        if let Some(n) = map.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&uid);
            }
        }
        if !reserved {
            counts.total -= 1;
        }
    }
}

/// One admitted connection's place.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    uid: u32,
    reserved: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.uid, self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKER: u32 = 990;

    fn admission(total: usize, per_uid: usize) -> Arc<Admission> {
        Admission::new(Caps { total, per_uid }, BROKER)
    }

    #[test]
    fn each_uid_has_its_share_and_gets_it_back() {
        let a = admission(10, 2);
        let first = a.admit(1000).unwrap();
        let _second = a.admit(1000).unwrap();
        assert_eq!(
            a.admit(1000).unwrap_err(),
            Refusal::PerUid { uid: 1000, max: 2 }
        );
        let _other = a.admit(1001).unwrap();
        drop(first);
        let _again = a.admit(1000).unwrap();
        assert_eq!(a.held(), 3);
    }

    #[test]
    fn everyone_together_has_the_total() {
        let a = admission(3, 2);
        let held: Vec<Permit> = [1, 1, 2].iter().map(|u| a.admit(*u).unwrap()).collect();
        assert_eq!(a.admit(3).unwrap_err(), Refusal::Total { max: 3 });
        drop(held);
        assert_eq!(a.held(), 0);
        assert!(a.admit(3).is_ok());
    }

    #[test]
    fn admins_have_a_reserve_past_both_caps_and_no_more() {
        let a = admission(2, 2);
        let strangers: Vec<Permit> = [5, 6].iter().map(|u| a.admit(*u).unwrap()).collect();
        for admin in [0, BROKER] {
            let reserve: Vec<Permit> = (0..ADMIN_RESERVE)
                .map(|_| {
                    a.admit(admin)
                        .expect("an admin gets in while the total is reached")
                })
                .collect();
            assert_eq!(a.admit(admin).unwrap_err(), Refusal::Total { max: 2 });
            drop(reserve);
        }
        drop(strangers);
        // Root at its own cap still has the reserve; the reserve is given back apart.
        let own: Vec<Permit> = (0..2).map(|_| a.admit(0).unwrap()).collect();
        let extra = a.admit(0).unwrap();
        assert_eq!(a.held(), 3);
        drop(extra);
        drop(own);
        assert_eq!(a.held(), 0);
        assert_eq!(a.counts.lock().unwrap().by_uid.len(), 0);
    }

    #[test]
    fn refusals_name_the_key() {
        assert_eq!(
            Refusal::PerUid {
                uid: 65534,
                max: 128
            }
            .to_string(),
            "too many connections from uid 65534 (max_connections_per_uid = 128)"
        );
        assert_eq!(
            Refusal::Total { max: 1024 }.to_string(),
            "too many connections (max_connections = 1024)"
        );
    }

    #[test]
    fn the_total_fits_the_fd_limit() {
        let caps = Caps {
            total: 1024,
            per_uid: 128,
        };
        assert_eq!(caps.within_fd_limit(65536), caps);
        assert_eq!(
            caps.within_fd_limit(1024),
            Caps {
                total: 248,
                per_uid: 128
            }
        );
        assert_eq!(caps.within_fd_limit(0).total, 1);
    }
}
