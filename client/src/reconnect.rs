//! What the client does when a connection to the broker breaks — the broker
//! re-executed itself or was restarted — decided here without any I/O: how long to
//! keep trying to connect again, whether the call that was in flight may be repeated,
//! and what the caller is told when it is not. The connections themselves are
//! `crate::link` (D-Bus) and `crate::direct` (the state socket).
//!
//! A call is repeated at most once, and only when repeating it cannot do twice what
//! was meant once: when it never fully reached the broker (a broker only acts on a
//! whole message), or when it is one of [`REPEATABLE`].

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use ally_core::proxy::INTERFACE as BROKER;
use ally_core::state::calls::{ATOMIC, CACHE, LOCKER};

/// Overrides [`DEFAULT_TIMEOUT`]: a duration such as `10s` or `500ms`.
pub const TIMEOUT_ENV: &str = "ALLY_RECONNECT_TIMEOUT";

/// How long connecting again is tried before the call fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

const FIRST_DELAY: Duration = Duration::from_millis(20);
const MAX_DELAY: Duration = Duration::from_millis(500);

/// The calls whose repetition is harmless: they read, or they set what they set
/// whatever was there. Everything else (`Close`, `Reload`, `Atomic.Add`, `Swap`,
/// `CompareAndSwap`, `SetIfAbsent`, `Delete`, `Flush`, the locks, ...) may have taken
/// effect and is not repeated.
pub(crate) const REPEATABLE: &[(&str, &str)] = &[
    (BROKER, "Listen"),
    (BROKER, "ListenWith"),
    (BROKER, "Ready"),
    (BROKER, "Report"),
    (BROKER, "Status"),
    (CACHE, "Get"),
    (CACHE, "Exists"),
    (CACHE, "Keys"),
    (CACHE, "Count"),
    (CACHE, "Set"),
    (ATOMIC, "Load"),
    (ATOMIC, "Store"),
    (LOCKER, "Queues"),
];

/// One method of the broker, as the retry table names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Method {
    pub interface: &'static str,
    pub member: &'static str,
}

impl Method {
    pub(crate) const fn broker(member: &'static str) -> Method {
        Method {
            interface: BROKER,
            member,
        }
    }

    /// Whether repeating the call after it may have reached the broker is harmless.
    pub(crate) fn repeatable(self) -> bool {
        REPEATABLE.contains(&(self.interface, self.member))
    }

    /// Whether a call broken at `when` goes again on a new connection.
    pub(crate) fn may_repeat(self, when: Broke) -> bool {
        match when {
            Broke::BeforeSending => true,
            Broke::InFlight => self.repeatable(),
        }
    }
}

/// When the connection was found broken, which says whether the broker may have
/// acted on the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Broke {
    /// Before the whole call was written: the broker cannot have acted on it.
    BeforeSending,
    /// After: it may have.
    InFlight,
}

/// Whether a zbus failure is the connection breaking, and when.
pub(crate) fn zbus_broke(e: &zbus::Error) -> Option<Broke> {
    match e {
        // A write to a peer that is gone fails with EPIPE; reads end with EOF or
        // ECONNRESET, and every call still waiting then fails with the reader's error.
        zbus::Error::InputOutput(io) if io.raw_os_error() == Some(libc::EPIPE) => {
            Some(Broke::BeforeSending)
        }
        zbus::Error::InputOutput(_) => Some(Broke::InFlight),
        _ => None,
    }
}

/// Whether a failed read of a reply is the broker's end of the connection closing.
pub(crate) fn read_broke(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

/// Reads [`TIMEOUT_ENV`]'s value; unset or empty is [`DEFAULT_TIMEOUT`].
pub(crate) fn parse_timeout(value: Option<&str>) -> Result<Duration, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(DEFAULT_TIMEOUT),
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            format!("{TIMEOUT_ENV}: {text:?} is not a duration such as 10s or 500ms ({e})")
        }),
    }
}

/// The waits between attempts to connect: from 20 ms, doubling up to 500 ms, until
/// `timeout` after the first attempt.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    deadline: Instant,
}

impl Backoff {
    pub(crate) fn new(start: Instant, timeout: Duration) -> Backoff {
        Backoff {
            next: FIRST_DELAY,
            deadline: start + timeout,
        }
    }

    /// How long to wait at `now` before the next attempt; `None` once the time is up.
    pub(crate) fn delay(&mut self, now: Instant) -> Option<Duration> {
        let left = self.remaining(now);
        if left.is_zero() {
            return None;
        }
        let delay = self.next.min(left);
        self.next = (self.next * 2).min(MAX_DELAY);
        Some(delay)
    }

    /// What is left of the time at `now`: the most one attempt may take.
    pub(crate) fn remaining(&self, now: Instant) -> Duration {
        self.deadline.saturating_duration_since(now)
    }
}

/// The message of a call broken in flight and not repeated.
pub(crate) fn not_repeated(member: &str) -> String {
    format!(
        "the broker's connection closed during {member} (the broker restarted?); \
         it was not repeated because it may have taken effect"
    )
}

/// The message of a call that found no broker to connect to again.
pub(crate) fn reconnect_failed(member: &str, cause: impl fmt::Display) -> String {
    format!(
        "the broker's connection closed during {member} (the broker restarted?); \
         reconnecting failed: {cause}"
    )
}

/// Why reconnecting gave up, for [`reconnect_failed`].
pub(crate) fn gave_up(
    address: impl fmt::Display,
    timeout: Duration,
    last: impl fmt::Display,
) -> String {
    format!(
        "no broker answered at {address} within {} ({TIMEOUT_ENV}): {last}",
        humantime::format_duration(timeout)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ally_core::state::calls::TABLE;

    #[test]
    fn the_back_off_doubles_to_half_a_second_and_stops_at_the_deadline() {
        let start = Instant::now();
        let mut backoff = Backoff::new(start, Duration::from_secs(2));
        let mut now = start;
        let mut delays = Vec::new();
        while let Some(delay) = backoff.delay(now) {
            delays.push(delay.as_millis());
            now += delay;
        }
        assert_eq!(delays, [20, 40, 80, 160, 320, 500, 500, 380]);
        assert_eq!(now, start + Duration::from_secs(2));
        assert_eq!(backoff.remaining(now), Duration::ZERO);
        let mut none = Backoff::new(start, Duration::ZERO);
        assert_eq!(none.delay(start), None);
    }

    #[test]
    fn the_timeout_is_ten_seconds_unless_the_environment_says() {
        assert_eq!(parse_timeout(None), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout(Some("")), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout(Some("300ms")), Ok(Duration::from_millis(300)));
        assert_eq!(parse_timeout(Some(" 1m ")), Ok(Duration::from_secs(60)));
        let e = parse_timeout(Some("ten")).unwrap_err();
        assert!(
            e.starts_with("ALLY_RECONNECT_TIMEOUT: \"ten\" is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn only_calls_that_are_harmless_twice_are_repeated_after_they_may_have_arrived() {
        let method = |interface, member| Method { interface, member };
        for (interface, member) in [
            (BROKER, "Listen"),
            (BROKER, "Status"),
            (CACHE, "Set"),
            (CACHE, "Get"),
            (ATOMIC, "Load"),
            (ATOMIC, "Store"),
            (LOCKER, "Queues"),
        ] {
            assert!(
                method(interface, member).may_repeat(Broke::InFlight),
                "{member}"
            );
        }
        for (interface, member) in [
            (BROKER, "Close"),
            (BROKER, "Reload"),
            (ATOMIC, "Add"),
            (ATOMIC, "Swap"),
            (ATOMIC, "CompareAndSwap"),
            (CACHE, "CompareAndSwap"),
            (CACHE, "SetIfAbsent"),
            (CACHE, "Delete"),
            (CACHE, "Flush"),
            (LOCKER, "Lock"),
            (LOCKER, "RLock"),
            (LOCKER, "Unlock"),
            (LOCKER, "RUnlock"),
        ] {
            let m = method(interface, member);
            assert!(!m.may_repeat(Broke::InFlight), "{interface}.{member}");
            assert!(m.may_repeat(Broke::BeforeSending), "{member} never arrived");
        }
    }

    #[test]
    fn every_repeatable_state_call_is_in_the_state_table() {
        for (interface, member) in REPEATABLE {
            if *interface == BROKER {
                continue;
            }
            assert!(
                TABLE
                    .iter()
                    .any(|e| e.interface == *interface && e.member == *member),
                "{interface}.{member} is no state call"
            );
        }
    }

    #[test]
    fn a_write_to_a_closed_peer_never_reached_it_and_a_closed_read_may_have() {
        let io = |e: io::Error| zbus::Error::InputOutput(e.into());
        let epipe = io::Error::from_raw_os_error(libc::EPIPE);
        assert_eq!(zbus_broke(&io(epipe)), Some(Broke::BeforeSending));
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "socket closed");
        assert_eq!(zbus_broke(&io(eof)), Some(Broke::InFlight));
        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(zbus_broke(&io(reset)), Some(Broke::InFlight));
        assert_eq!(zbus_broke(&zbus::Error::InvalidReply), None);
        assert!(read_broke(&io::Error::from_raw_os_error(libc::ECONNRESET)));
        assert!(read_broke(&io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "eof"
        )));
        assert!(!read_broke(&io::Error::new(
            io::ErrorKind::InvalidData,
            "two replies"
        )));
    }

    #[test]
    fn the_messages_name_the_call_and_what_became_of_it() {
        assert_eq!(
            not_repeated("Add"),
            "the broker's connection closed during Add (the broker restarted?); \
             it was not repeated because it may have taken effect"
        );
        let why = gave_up(
            "unix:path=/run/ally/web/bus",
            Duration::from_millis(1500),
            "refused",
        );
        assert_eq!(
            reconnect_failed("Get", why),
            "the broker's connection closed during Get (the broker restarted?); \
             reconnecting failed: no broker answered at unix:path=/run/ally/web/bus \
             within 1s 500ms (ALLY_RECONNECT_TIMEOUT): refused"
        );
    }
}
