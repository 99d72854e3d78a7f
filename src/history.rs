//! The last reloads and restarts, oldest first: a ring of at most `history`
//! entries (config), for `History()` and `ally history`. Pure.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

/// At most this many entries may be kept (config `history`).
pub const MAX_HISTORY: usize = 10_000;
pub const DEFAULT_HISTORY: usize = 100;

/// What started a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    FirstStart,
    Reload,
    Restart,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::FirstStart => "first start",
            Kind::Reload => "reload",
            Kind::Restart => "restart",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1 for the broker's first entry; a gap before the oldest kept one says
    /// how many were dropped.
    pub sequence: u64,
    pub kind: Kind,
    /// The generation it started; 0 when none was started (e.g. the config no
    /// longer read).
    pub generation: u64,
    pub started: SystemTime,
    pub duration: Duration,
    pub success: bool,
    /// The result line, as `ally reload` prints it, or why it failed.
    pub message: String,
    /// Who asked for it, when known: a D-Bus caller, `SIGHUP`, a crash; empty
    /// when unknown.
    pub requested_by: String,
}

/// What is recorded: an [`Entry`] but for its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub generation: u64,
    pub started: SystemTime,
    pub duration: Duration,
    pub success: bool,
    pub message: String,
    pub requested_by: String,
}

#[derive(Debug)]
pub struct History {
    capacity: usize,
    entries: VecDeque<Entry>,
    recorded: u64,
}

impl History {
    /// Keeps at most `capacity` entries, itself at most [`MAX_HISTORY`].
    pub fn new(capacity: usize) -> Self {
        History {
            capacity: capacity.min(MAX_HISTORY),
            entries: VecDeque::new(),
            recorded: 0,
        }
    }

    pub fn push(&mut self, record: Record) {
        self.recorded += 1;
        let entry = Entry {
            sequence: self.recorded,
            kind: record.kind,
            generation: record.generation,
            started: record.started,
            duration: record.duration,
            success: record.success,
            message: record.message,
            requested_by: record.requested_by,
        };
        self.entries.push_back(entry);
        self.trim();
    }

    /// A reload that changed `history` keeps the newest entries that fit.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.min(MAX_HISTORY);
        self.trim();
    }

    fn trim(&mut self) {
        while self.entries.len() > self.capacity {
            self.entries.pop_front();
        }
    }

    /// Oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// How many were ever recorded, kept or not.
    pub fn recorded(&self) -> u64 {
        self.recorded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(generation: u64, success: bool) -> Record {
        Record {
            kind: Kind::Reload,
            generation,
            started: SystemTime::UNIX_EPOCH + Duration::from_secs(generation),
            duration: Duration::from_millis(5),
            success,
            message: format!("g{generation}"),
            requested_by: String::new(),
        }
    }

    fn generations(h: &History) -> Vec<u64> {
        h.entries().map(|e| e.generation).collect()
    }

    #[test]
    fn keeps_the_newest_entries_in_order() {
        let mut h = History::new(3);
        for g in 1..=5 {
            h.push(record(g, g != 4));
        }
        assert_eq!(generations(&h), vec![3, 4, 5]);
        assert_eq!(
            h.entries().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(h.recorded(), 5);
        assert!(!h.entries().nth(1).unwrap().success);
    }

    #[test]
    fn shrinking_drops_the_oldest_and_growing_keeps_all() {
        let mut h = History::new(4);
        for g in 1..=4 {
            h.push(record(g, true));
        }
        h.set_capacity(2);
        assert_eq!(generations(&h), vec![3, 4]);
        h.set_capacity(10);
        h.push(record(5, true));
        assert_eq!(generations(&h), vec![3, 4, 5]);
    }

    #[test]
    fn zero_keeps_nothing_but_counts() {
        let mut h = History::new(0);
        h.push(record(1, true));
        assert_eq!(h.entries().count(), 0);
        assert_eq!(h.recorded(), 1);
    }

    #[test]
    fn capacity_is_bounded() {
        let mut h = History::new(usize::MAX);
        for g in 0..(MAX_HISTORY as u64 + 5) {
            h.push(record(g, true));
        }
        assert_eq!(h.entries().count(), MAX_HISTORY);
        assert_eq!(h.entries().next().unwrap().generation, 5);
    }
}
