//! The phases of a reload (or crash restart) as it happens, and how each reads
//! on D-Bus (`ReloadProgress(t generation, s phase, a{sv} detail)`), as a line
//! on a terminal and as JSON. Free of I/O: the broker emits, `ally reload` shows.

use std::collections::HashMap;
use std::time::Duration;

use zbus::{OwnedVariant, Variant};

/// One phase of generation `generation`'s launch, in the order they happen:
/// `Started`, any `Listening` and `Status`, `Ready`, a `Draining` for each
/// older generation, `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Its process runs. `reason` is `start`, `reload` or `restart`.
    Started { pid: u32, reason: String },
    /// It took a listening socket (its Listen call, or handed at spawn).
    Listening { network: String, address: String },
    /// It said `STATUS=` on its notification socket.
    Status { text: String },
    /// It is ready, `seconds` after the launch began.
    Ready { seconds: f64 },
    /// An older generation's instance was asked to stop; `tasks` is what it
    /// last reported (`Report`), if it did.
    Draining {
        generation: u64,
        instance: u64,
        pid: u32,
        tasks: Option<u32>,
    },
    /// The launch ended; `message` is `ReloadFinished`'s.
    Done { success: bool, message: String },
}

/// A detail dictionary that does not read as its phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ReloadProgress {phase}: {problem}")]
pub struct BadDetail {
    phase: String,
    problem: String,
}

impl Progress {
    pub fn phase(&self) -> &'static str {
        match self {
            Progress::Started { .. } => "started",
            Progress::Listening { .. } => "listening",
            Progress::Status { .. } => "status",
            Progress::Ready { .. } => "ready",
            Progress::Draining { .. } => "draining",
            Progress::Done { .. } => "done",
        }
    }

    /// The `a{sv}` of the D-Bus signal.
    pub fn detail(&self) -> HashMap<String, OwnedVariant> {
        let mut d = HashMap::new();
        let mut put = |key: &str, value: Variant<'_>| {
            if let Ok(value) = value.try_into_owned() {
                d.insert(key.to_string(), value);
            }
        };
        match self {
            Progress::Started { pid, reason } => {
                put("pid", Variant::from(*pid));
                put("reason", Variant::from(reason.as_str()));
            }
            Progress::Listening { network, address } => {
                put("network", Variant::from(network.as_str()));
                put("address", Variant::from(address.as_str()));
            }
            Progress::Status { text } => put("text", Variant::from(text.as_str())),
            Progress::Ready { seconds } => put("seconds", Variant::from(*seconds)),
            Progress::Draining {
                generation,
                instance,
                pid,
                tasks,
            } => {
                put("generation", Variant::from(*generation));
                put("instance", Variant::from(*instance));
                put("pid", Variant::from(*pid));
                if let Some(tasks) = tasks {
                    put("tasks", Variant::from(*tasks));
                }
            }
            Progress::Done { success, message } => {
                put("success", Variant::from(*success));
                put("message", Variant::from(message.as_str()));
            }
        }
        d
    }

    /// Reads a signal's phase and detail. Unknown keys are ignored, so a
    /// newer broker may add some; a missing or mistyped known key is an error.
    pub fn from_detail(
        phase: &str,
        detail: &HashMap<String, OwnedVariant>,
    ) -> Result<Progress, BadDetail> {
        let bad = |problem: String| BadDetail {
            phase: phase.to_string(),
            problem,
        };
        let get = |key: &str| detail.get(key).map(|v| &**v);
        let need = |key: &str| get(key).ok_or_else(|| bad(format!("no {key:?} in the detail")));
        let wrong = |key: &str, want: &str| bad(format!("{key:?} is not {want}"));
        let u32_of = |key: &str| match need(key)? {
            Variant::U32(n) => Ok(*n),
            _ => Err(wrong(key, "a u32")),
        };
        let u64_of = |key: &str| match need(key)? {
            Variant::U64(n) => Ok(*n),
            _ => Err(wrong(key, "a u64")),
        };
        let str_of = |key: &str| match need(key)? {
            Variant::Str(s) => Ok(s.to_string()),
            _ => Err(wrong(key, "a string")),
        };
        Ok(match phase {
            "started" => Progress::Started {
                pid: u32_of("pid")?,
                reason: match get("reason") {
                    Some(_) => str_of("reason")?,
                    None => String::new(),
                },
            },
            "listening" => Progress::Listening {
                network: str_of("network")?,
                address: str_of("address")?,
            },
            "status" => Progress::Status {
                text: str_of("text")?,
            },
            "ready" => Progress::Ready {
                seconds: match need("seconds")? {
                    Variant::F64(s) => *s,
                    _ => return Err(wrong("seconds", "a double")),
                },
            },
            "draining" => Progress::Draining {
                generation: u64_of("generation")?,
                instance: u64_of("instance")?,
                pid: u32_of("pid")?,
                tasks: match get("tasks") {
                    Some(_) => Some(u32_of("tasks")?),
                    None => None,
                },
            },
            "done" => Progress::Done {
                success: match need("success")? {
                    Variant::Bool(b) => *b,
                    _ => return Err(wrong("success", "a boolean")),
                },
                message: str_of("message")?,
            },
            other => return Err(bad(format!("unknown phase {other:?}"))),
        })
    }

    /// How `ally reload` shows it on a terminal; `None` for `Done`, whose
    /// result line follows.
    pub fn line(&self, generation: u64) -> Option<String> {
        Some(match self {
            Progress::Started { pid, .. } => format!("generation {generation} started (pid {pid})"),
            Progress::Listening { network, address } => {
                format!("  listening on {network} {address}")
            }
            Progress::Status { text } => format!("  status: {}", one_line(text)),
            Progress::Ready { seconds } => format!("  ready after {}", seconds_text(*seconds)),
            Progress::Draining {
                generation,
                pid,
                tasks,
                ..
            } => match tasks {
                Some(n) => format!(
                    "  generation {generation} (pid {pid}) draining: {n} {} left",
                    if *n == 1 { "task" } else { "tasks" }
                ),
                None => format!("  generation {generation} (pid {pid}) draining"),
            },
            Progress::Done { .. } => return None,
        })
    }

    /// One `--json` line's object: phase, generation, the detail's fields and
    /// `time` (seconds since the Unix epoch), in this order.
    pub fn json(&self, generation: u64, time: Duration) -> JsonEvent {
        let mut o = serde_json::Map::new();
        match self {
            Progress::Started { pid, reason } => {
                o.insert("pid".into(), (*pid).into());
                o.insert("reason".into(), reason.as_str().into());
            }
            Progress::Listening { network, address } => {
                o.insert("network".into(), network.as_str().into());
                o.insert("address".into(), address.as_str().into());
            }
            Progress::Status { text } => {
                o.insert("text".into(), text.as_str().into());
            }
            Progress::Ready { seconds } => {
                o.insert("seconds".into(), (*seconds).into());
            }
            Progress::Draining {
                generation,
                instance,
                pid,
                tasks,
            } => {
                o.insert("draining_generation".into(), (*generation).into());
                o.insert("instance".into(), (*instance).into());
                o.insert("pid".into(), (*pid).into());
                o.insert("tasks".into(), (*tasks).into());
            }
            Progress::Done { success, message } => {
                o.insert("success".into(), (*success).into());
                o.insert("message".into(), message.as_str().into());
            }
        }
        JsonEvent {
            phase: self.phase(),
            generation,
            fields: o,
            time: time.as_secs_f64(),
        }
    }
}

/// A phase as `ally reload --json` prints it.
#[derive(Debug, serde::Serialize)]
pub struct JsonEvent {
    pub phase: &'static str,
    pub generation: u64,
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
    pub time: f64,
}

impl std::fmt::Display for JsonEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        f.write_str(&line)
    }
}

/// "1.3s", "0.02s", "12s".
fn seconds_text(seconds: f64) -> String {
    if seconds >= 10.0 {
        format!("{seconds:.0}s")
    } else if seconds >= 0.1 {
        format!("{seconds:.1}s")
    } else {
        format!("{seconds:.2}s")
    }
}

/// An app's text on one terminal line: control characters (a newline, an
/// escape sequence) shown escaped, at most 200 characters.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == 200 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_phase() -> Vec<Progress> {
        vec![
            Progress::Started {
                pid: 4242,
                reason: "reload".into(),
            },
            Progress::Listening {
                network: "tcp".into(),
                address: "127.0.0.1:8080".into(),
            },
            Progress::Status {
                text: "warming caches".into(),
            },
            Progress::Ready { seconds: 1.3 },
            Progress::Draining {
                generation: 7,
                instance: 7,
                pid: 4100,
                tasks: Some(3),
            },
            Progress::Draining {
                generation: 7,
                instance: 7,
                pid: 4100,
                tasks: None,
            },
            Progress::Done {
                success: true,
                message: "reloaded to generation 8 (1303.2 ms)".into(),
            },
        ]
    }

    #[test]
    fn every_phase_reads_back_from_its_detail() {
        for p in every_phase() {
            assert_eq!(Progress::from_detail(p.phase(), &p.detail()), Ok(p));
        }
    }

    #[test]
    fn lines_read_as_documented() {
        let lines: Vec<_> = every_phase().iter().filter_map(|p| p.line(8)).collect();
        assert_eq!(
            lines,
            [
                "generation 8 started (pid 4242)",
                "  listening on tcp 127.0.0.1:8080",
                "  status: warming caches",
                "  ready after 1.3s",
                "  generation 7 (pid 4100) draining: 3 tasks left",
                "  generation 7 (pid 4100) draining",
            ]
        );
    }

    #[test]
    fn one_task_is_singular_and_seconds_keep_their_precision() {
        let one = Progress::Draining {
            generation: 2,
            instance: 3,
            pid: 9,
            tasks: Some(1),
        };
        assert_eq!(
            one.line(3).unwrap(),
            "  generation 2 (pid 9) draining: 1 task left"
        );
        assert_eq!(seconds_text(0.021), "0.02s");
        assert_eq!(seconds_text(12.4), "12s");
    }

    #[test]
    fn status_text_cannot_move_the_terminal() {
        let p = Progress::Status {
            text: "a\nb\u{1b}[2J".into(),
        };
        assert_eq!(p.line(1).unwrap(), "  status: a\\nb\\u{1b}[2J");
        let long = Progress::Status {
            text: "x".repeat(500),
        };
        assert_eq!(
            long.line(1).unwrap().chars().count(),
            "  status: ".len() + 201
        );
    }

    #[test]
    fn a_bad_detail_names_the_phase_and_key() {
        let mut detail = Progress::Ready { seconds: 1.0 }.detail();
        detail.insert(
            "seconds".into(),
            Variant::from("soon").try_into_owned().unwrap(),
        );
        assert_eq!(
            Progress::from_detail("ready", &detail)
                .unwrap_err()
                .to_string(),
            "ReloadProgress ready: \"seconds\" is not a double"
        );
        assert_eq!(
            Progress::from_detail("started", &HashMap::new())
                .unwrap_err()
                .to_string(),
            "ReloadProgress started: no \"pid\" in the detail"
        );
        assert!(Progress::from_detail("exploded", &HashMap::new()).is_err());
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let mut detail = Progress::Status { text: "ok".into() }.detail();
        detail.insert("later".into(), Variant::from(1u8).try_into_owned().unwrap());
        assert!(Progress::from_detail("status", &detail).is_ok());
    }

    #[test]
    fn json_has_phase_generation_fields_and_time() {
        let j = every_phase()[4].json(8, Duration::from_millis(1500));
        assert!(
            j.to_string()
                .starts_with(r#"{"phase":"draining","generation":8,"#)
        );
        assert!(j.to_string().ends_with(r#","time":1.5}"#));
        assert_eq!(
            serde_json::to_value(&j).unwrap(),
            serde_json::json!({
                "phase": "draining", "generation": 8, "draining_generation": 7,
                "instance": 7, "pid": 4100, "tasks": 3, "time": 1.5
            })
        );
    }
}
