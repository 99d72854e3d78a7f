//! `ally history` and `ally metrics`: what a broker kept of its reloads, and
//! its metrics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::cli::{HistoryArgs, TargetArgs};
use crate::control::{Target, describe_error, printable, table, until};
use crate::dbus::broker1::HistoryEntry;

/// One reload or restart, as `ally history --json` prints it.
#[derive(Debug, Serialize, PartialEq)]
pub struct Entry {
    pub sequence: u64,
    pub kind: String,
    pub generation: u64,
    pub started_usec: u64,
    pub duration_usec: u64,
    /// "success", "failure", or "pending" for a crash restart waiting for its back-off.
    pub result: String,
    pub reason: String,
    pub requested_by: String,
    /// A pending restart's attempt number (1 for the first since the app last recovered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

impl From<HistoryEntry> for Entry {
    fn from(e: HistoryEntry) -> Self {
        let (sequence, kind, generation, started_usec, duration_usec, success, reason, by) = e;
        Entry {
            sequence,
            kind,
            generation,
            started_usec,
            duration_usec,
            result: if success { "success" } else { "failure" }.to_string(),
            reason,
            requested_by: by,
            attempt: None,
        }
    }
}

/// The crash restart `Status()` says is waiting, as the newest line.
fn pending(attempt: u32, at_usec: u64) -> Option<Entry> {
    (attempt > 0).then(|| Entry {
        sequence: 0,
        kind: "restart".to_string(),
        generation: 0,
        started_usec: at_usec,
        duration_usec: 0,
        result: "pending".to_string(),
        reason: format!("crash restart attempt {attempt}, waiting for its back-off"),
        requested_by: "crash".to_string(),
        attempt: Some(attempt),
    })
}

pub async fn history(args: HistoryArgs) -> Result<i32, String> {
    let target = Target::connect(&args.app, &args.connect).await?;
    let entries: Vec<HistoryEntry> = target
        .proxy()
        .inner()
        .call("History", &())
        .await
        .map_err(|e| format!("history of {}: {}", args.app, describe_error(e)))?;
    let status = target.status().await?;
    let mut entries: Vec<Entry> = entries.into_iter().map(Entry::from).collect();
    entries.extend(pending(status.restart_attempt, status.restart_usec));
    if args.json {
        let json = serde_json::to_string_pretty(&entries).map_err(|e| e.to_string())?;
        println!("{json}");
    } else {
        print!("{}", render(&entries, SystemTime::now()));
    }
    Ok(0)
}

/// The history as a person reads it, oldest first.
pub fn render(entries: &[Entry], now: SystemTime) -> String {
    if entries.is_empty() {
        return "no reloads or restarts yet\n".to_string();
    }
    let mut rows = vec![[
        "TIME".to_string(),
        "KIND".to_string(),
        "GENERATION".to_string(),
        "DURATION".to_string(),
        "RESULT".to_string(),
        "REASON".to_string(),
    ]];
    for e in entries {
        let time = time(e.started_usec);
        let (generation, duration, reason) = match e.attempt {
            Some(_) => (
                "-".to_string(),
                "-".to_string(),
                format!("{} ({})", e.reason, until(now, e.started_usec)),
            ),
            None => (
                if e.generation == 0 {
                    "-".to_string()
                } else {
                    e.generation.to_string()
                },
                format!("{:.1} ms", e.duration_usec as f64 / 1000.0),
                if e.requested_by.is_empty() {
                    e.reason.clone()
                } else {
                    format!("{} [by {}]", e.reason, e.requested_by)
                },
            ),
        };
        rows.push([
            time,
            e.kind.clone(),
            generation,
            duration,
            e.result.clone(),
            printable(&reason),
        ]);
    }
    table(&rows).into_iter().map(|l| l + "\n").collect()
}

fn time(usec: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(usec);
    humantime::format_rfc3339_millis(t).to_string()
}

pub async fn metrics(args: TargetArgs) -> Result<i32, String> {
    let target = Target::connect(&args.app, &args.connect).await?;
    let text: String = target
        .proxy()
        .inner()
        .call("Metrics", &())
        .await
        .map_err(|e| format!("metrics of {}: {}", args.app, describe_error(e)))?;
    print!("{text}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_oldest_first_with_a_pending_restart_last() {
        let start = 1_800_000_000_000_000;
        let mut entries = vec![
            Entry::from((
                1,
                "first start".into(),
                1,
                start,
                12_300,
                true,
                "generation 1 is ready (12.3 ms)".into(),
                String::new(),
            )),
            Entry::from((
                2,
                "reload".into(),
                0,
                start + 1_000_000,
                800,
                false,
                "config: bad".into(),
                "SIGHUP".into(),
            )),
        ];
        entries.extend(pending(2, start + 10_000_000));
        let now = UNIX_EPOCH + Duration::from_micros(start + 5_000_000);
        let text = render(&entries, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("TIME"), "{text}");
        assert!(lines[1].contains("first start") && lines[1].contains("12.3 ms"));
        assert!(lines[2].contains("failure") && lines[2].contains("config: bad [by SIGHUP]"));
        assert_eq!(lines[2].split_whitespace().nth(2), Some("-"), "{text}");
        assert!(lines[3].contains("pending") && lines[3].contains("attempt 2"));
        assert!(lines[3].contains("(in 5s)"), "{text}");
        assert_eq!(pending(0, 0), None);
    }
}
