//! The `sd_notify` datagrams an instance sends on its own `NOTIFY_SOCKET`, as
//! systemd defines them (`sd_notify(3)`): newline-separated `KEY=VALUE`
//! assignments. Pure: the broker (`crate::broker`) receives and applies them.
//!
//! What a datagram holds comes from the app, so nothing here trusts it: a
//! datagram that is not text, or holds a line that is no assignment, is
//! refused whole; a known field with a bad value is skipped with a reason;
//! unknown fields are ignored, as systemd ignores them.

use std::time::Duration;

/// The largest datagram read; a longer one is refused (systemd reads as much).
pub const MAX_DATAGRAM: usize = 4096;
/// `STATUS=` text kept per instance, in bytes.
pub const MAX_STATUS: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// `READY=1`.
    Ready,
    /// `STATUS=…`, with control characters replaced and cut at [`MAX_STATUS`].
    Status(String),
    /// `STOPPING=1`.
    Stopping,
    /// `EXTEND_TIMEOUT_USEC=…`: the start may take this much longer from now.
    ExtendTimeout(Duration),
    /// `MAINPID=…`.
    MainPid(u32),
    /// `ERRNO=…`.
    Errno(i32),
    /// `WATCHDOG=1`.
    Watchdog,
    /// `WATCHDOG=trigger`: act as if the watchdog expired.
    WatchdogTrigger,
    /// `WATCHDOG_USEC=…`: a new watchdog timeout.
    WatchdogTimeout(Duration),
}

/// A datagram's fields, and the assignments skipped with the reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub fields: Vec<Field>,
    pub skipped: Vec<String>,
}

/// Why a whole datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Oversized,
    NotText,
    NotAnAssignment(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Oversized => write!(f, "longer than {MAX_DATAGRAM} bytes"),
            Refused::NotText => write!(f, "not UTF-8 text without NUL"),
            Refused::NotAnAssignment(line) => {
                write!(f, "line {line:?} is not a KEY=VALUE assignment")
            }
        }
    }
}

pub fn parse(datagram: &[u8]) -> Result<Message, Refused> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(Refused::Oversized);
    }
    let text = std::str::from_utf8(datagram).map_err(|_| Refused::NotText)?;
    if text.contains('\0') {
        return Err(Refused::NotText);
    }
    let mut message = Message::default();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let Some((key, value)) = line.split_once('=') else {
            return Err(Refused::NotAnAssignment(shorten(line)));
        };
        if key.is_empty() {
            return Err(Refused::NotAnAssignment(shorten(line)));
        }
        let field = match key {
            "READY" => flag(value).map(|()| Field::Ready),
            "STOPPING" => flag(value).map(|()| Field::Stopping),
            "STATUS" => Ok(Field::Status(clean_status(value))),
            "EXTEND_TIMEOUT_USEC" => usec(value).map(Field::ExtendTimeout),
            "WATCHDOG_USEC" => usec(value).and_then(|d| {
                if d.is_zero() {
                    Err(
                        "0 turns no watchdog off here: expected a positive number of microseconds"
                            .into(),
                    )
                } else {
                    Ok(Field::WatchdogTimeout(d))
                }
            }),
            "MAINPID" => value
                .parse::<u32>()
                .ok()
                .filter(|pid| *pid > 1)
                .map(Field::MainPid)
                .ok_or_else(|| format!("{value:?} is not a pid")),
            "ERRNO" => value
                .parse::<i32>()
                .ok()
                .filter(|e| *e >= 0)
                .map(Field::Errno)
                .ok_or_else(|| format!("{value:?} is not an errno number")),
            "WATCHDOG" => match value {
                "1" => Ok(Field::Watchdog),
                "trigger" => Ok(Field::WatchdogTrigger),
                _ => Err(format!("{value:?}: expected 1 or trigger")),
            },
            _ => continue,
        };
        match field {
            Ok(field) => message.fields.push(field),
            Err(why) => message.skipped.push(format!("{key}: {why}")),
        }
    }
    Ok(message)
}

fn flag(value: &str) -> Result<(), String> {
    if value == "1" {
        Ok(())
    } else {
        Err(format!("{value:?}: expected 1"))
    }
}

fn usec(value: &str) -> Result<Duration, String> {
    value
        .parse::<u64>()
        .map(Duration::from_micros)
        .map_err(|_| format!("{value:?} is not a number of microseconds"))
}

fn clean_status(value: &str) -> String {
    let mut status = String::with_capacity(value.len().min(MAX_STATUS));
    for c in value.chars() {
        if status.len() + c.len_utf8() > MAX_STATUS {
            break;
        }
        status.push(if c.is_control() { ' ' } else { c });
    }
    status
}

fn shorten(line: &str) -> String {
    line.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_systemd_defines_are_read() {
        let m = parse(
            b"READY=1\nSTATUS=Serving 4 workers\nMAINPID=4242\nEXTEND_TIMEOUT_USEC=5000000\nERRNO=2\nWATCHDOG=1\nWATCHDOG_USEC=3000000\nSTOPPING=1\n",
        )
        .unwrap();
        assert_eq!(
            m.fields,
            vec![
                Field::Ready,
                Field::Status("Serving 4 workers".into()),
                Field::MainPid(4242),
                Field::ExtendTimeout(Duration::from_secs(5)),
                Field::Errno(2),
                Field::Watchdog,
                Field::WatchdogTimeout(Duration::from_secs(3)),
                Field::Stopping,
            ]
        );
        assert!(m.skipped.is_empty());
        assert_eq!(
            parse(b"WATCHDOG=trigger").unwrap().fields,
            vec![Field::WatchdogTrigger]
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_bad_values_skipped_with_a_reason() {
        let m = parse(b"RELOADING=1\nFDSTORE=1\nX_CUSTOM=yes\nREADY=yes\nMAINPID=1\nMAINPID=-3\nEXTEND_TIMEOUT_USEC=soon\nREADY=1").unwrap();
        assert_eq!(m.fields, vec![Field::Ready]);
        assert_eq!(m.skipped.len(), 4, "{:?}", m.skipped);
        assert!(
            m.skipped[0].starts_with("READY: \"yes\""),
            "{:?}",
            m.skipped
        );
    }

    #[test]
    fn datagrams_that_are_not_assignments_are_refused_whole() {
        assert_eq!(parse(&[0xff, 0xfe]), Err(Refused::NotText));
        assert_eq!(parse(b"READY=1\0"), Err(Refused::NotText));
        assert!(matches!(
            parse(b"READY=1\ngarbage"),
            Err(Refused::NotAnAssignment(_))
        ));
        assert!(matches!(parse(b"=1"), Err(Refused::NotAnAssignment(_))));
        assert_eq!(
            parse(&vec![b'a'; MAX_DATAGRAM + 1]),
            Err(Refused::Oversized)
        );
        assert_eq!(parse(b"").unwrap(), Message::default());
    }

    #[test]
    fn status_is_cleaned_and_bounded() {
        let long = format!("STATUS=a\tb{}", "é".repeat(1000));
        let m = parse(long.as_bytes()).unwrap();
        let Field::Status(s) = &m.fields[0] else {
            panic!()
        };
        assert!(s.starts_with("a b"));
        assert!(s.len() <= MAX_STATUS);
    }
}
