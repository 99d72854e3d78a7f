//! The last reloads and restarts, oldest first: a ring of at most `history`
//! entries (config), for `History()` and `ally history`. Pure.
//!
//! [`HistoryImage`] carries it across a re-exec or restart of the broker: every kept
//! entry with its sequence number, and how many were ever recorded, so numbering goes
//! on where it stopped. Times are unix microseconds there.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// At most this many entries may be kept (config `history`).
pub const MAX_HISTORY: usize = 10_000;
pub const DEFAULT_HISTORY: usize = 100;

/// What started a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

/// A [`History`] as plain data (JSON through serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryImage {
    pub recorded: u64,
    /// Oldest first.
    pub entries: Vec<EntryImage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryImage {
    pub sequence: u64,
    pub kind: Kind,
    pub generation: u64,
    /// Microseconds since the unix epoch; negative before it.
    pub started_unix_us: i64,
    pub duration_us: u64,
    pub success: bool,
    pub message: String,
    pub requested_by: String,
}

fn unix_us(t: SystemTime) -> i64 {
    let us = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => us(after),
        Err(before) => -us(before.duration()),
    }
}

fn from_unix_us(us: i64) -> SystemTime {
    let d = Duration::from_micros(us.unsigned_abs());
    let t = if us >= 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    };
    t.unwrap_or(UNIX_EPOCH)
}

impl History {
    pub fn image(&self) -> HistoryImage {
        HistoryImage {
            recorded: self.recorded,
            entries: self
                .entries
                .iter()
                .map(|e| EntryImage {
                    sequence: e.sequence,
                    kind: e.kind,
                    generation: e.generation,
                    started_unix_us: unix_us(e.started),
                    duration_us: u64::try_from(e.duration.as_micros()).unwrap_or(u64::MAX),
                    success: e.success,
                    message: e.message.clone(),
                    requested_by: e.requested_by.clone(),
                })
                .collect(),
        }
    }

    /// The history `image` held, keeping at most `capacity` entries (the newest). The
    /// entries are put in order of sequence number, one per number, and numbering goes
    /// on after the highest of `recorded` and those numbers.
    pub fn restore(capacity: usize, image: HistoryImage) -> History {
        let mut entries: Vec<Entry> = image
            .entries
            .into_iter()
            .map(|e| Entry {
                sequence: e.sequence,
                kind: e.kind,
                generation: e.generation,
                started: from_unix_us(e.started_unix_us),
                duration: Duration::from_micros(e.duration_us),
                success: e.success,
                message: e.message,
                requested_by: e.requested_by,
            })
            .collect();
        entries.sort_by_key(|e| e.sequence);
        entries.dedup_by_key(|e| e.sequence);
        let last = entries.last().map_or(0, |e| e.sequence);
        let mut history = History::new(capacity);
        history.recorded = image.recorded.max(last);
        history.entries = entries.into();
        history.trim();
        history
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

    #[test]
    fn an_image_carries_the_entries_and_numbering_goes_on() {
        let mut h = History::new(3);
        for g in 1..=4 {
            h.push(record(g, g != 2));
        }
        h.push(Record {
            kind: Kind::FirstStart,
            started: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            duration: Duration::from_micros(1_500_001),
            requested_by: "SIGHUP".into(),
            ..record(0, false)
        });
        let json = serde_json::to_string(&h.image()).unwrap();
        assert!(json.contains("\"kind\":\"first_start\""), "{json}");
        let image: HistoryImage = serde_json::from_str(&json).unwrap();

        let mut r = History::restore(3, image.clone());
        assert_eq!(
            r.entries().collect::<Vec<_>>(),
            h.entries().collect::<Vec<_>>()
        );
        assert_eq!(r.recorded(), 5);
        r.push(record(6, true));
        assert_eq!(
            r.entries().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );

        let smaller = History::restore(1, image);
        assert_eq!(
            smaller.entries().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![5]
        );
        assert_eq!(smaller.recorded(), 5);
    }

    #[test]
    fn times_before_the_epoch_and_odd_images_survive() {
        let before = UNIX_EPOCH - Duration::from_micros(1_000_001);
        assert_eq!(from_unix_us(unix_us(before)), before);
        assert_eq!(unix_us(before), -1_000_001);
        assert_eq!(
            from_unix_us(i64::MIN),
            UNIX_EPOCH - Duration::from_micros(1 << 63)
        );

        let entry = |sequence| EntryImage {
            sequence,
            kind: Kind::Restart,
            generation: sequence,
            started_unix_us: 0,
            duration_us: 0,
            success: true,
            message: String::new(),
            requested_by: String::new(),
        };
        let image = HistoryImage {
            recorded: 1,
            entries: vec![entry(9), entry(7), entry(9)],
        };
        let mut h = History::restore(10, image);
        assert_eq!(
            h.entries().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![7, 9]
        );
        h.push(record(1, true));
        assert_eq!(h.entries().last().unwrap().sequence, 10);

        assert!(serde_json::from_str::<HistoryImage>("{\"recorded\":-1}").is_err());
    }
}
