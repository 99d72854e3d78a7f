//! The one error of Ally: a kind, a one-line message and the cause, and the
//! `org.ally.Error.*` names the broker answers D-Bus calls with.
//!
//! The broker returns [`Error`] from its D-Bus methods (it implements
//! [`zbus::DBusError`]); address parsing and binding produce it; the state stores
//! produce a [`crate::state::StateError`] that converts into it. The app-side
//! binding reports the same [`ErrorKind`]s.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;

use zbus::message::{Header, Message};
use zbus::names::ErrorName;

/// What went wrong, independent of where (broker or simulate mode).
///
/// The kinds with a [`dbus_name`](ErrorKind::dbus_name) are the broker's D-Bus errors;
/// simulate mode reports the same kinds for the same causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Unknown network, malformed address, unknown option, wrong socket type.
    InvalidArgument,
    /// The caller may not call this method.
    AccessDenied,
    /// Another process holds the address.
    AddressInUse,
    /// A reload failed; the message says why.
    ReloadFailed,
    /// Unlocking a lock the caller does not hold.
    NotOwner,
    /// A wait ran out (the client's own lock timeout; the broker answers a lock
    /// that is not granted in time with `false`).
    Timeout,
    /// A configured limit would be passed.
    LimitExceeded,
    /// Anything else went wrong in the broker; the message says what.
    Failed,
    /// The operation needs a broker and this instance runs in simulate mode.
    NotManaged,
    /// Any other error reply from the broker (not one of `org.ally.Error.*`).
    Broker,
    /// The D-Bus connection failed or broke.
    Transport,
    /// A local I/O error.
    Io,
    /// The connection to the broker closed (the broker re-executed itself or
    /// restarted) during a call the client did not repeat because it may have taken
    /// effect, or no broker answered again within the client's reconnect timeout
    /// (`ALLY_RECONNECT_TIMEOUT`). Local: the broker never sends it; clients name it
    /// [`DISCONNECTED_NAME`].
    Disconnected,
}

/// The D-Bus-like name of [`ErrorKind::Disconnected`], for clients that report errors
/// by name. Never on the wire: the broker cannot answer on a connection that is gone.
pub const DISCONNECTED_NAME: &str = "org.ally.Error.Disconnected";

/// The errors the broker sends, and nothing else: `docs/dbus-api.md` lists exactly
/// these (checked by a test). A kind without a name goes out as `Failed`.
const DBUS_NAMES: [(ErrorKind, &str); 7] = [
    (ErrorKind::InvalidArgument, "org.ally.Error.InvalidArgument"),
    (ErrorKind::AccessDenied, "org.ally.Error.AccessDenied"),
    (ErrorKind::AddressInUse, "org.ally.Error.AddressInUse"),
    (ErrorKind::ReloadFailed, "org.ally.Error.ReloadFailed"),
    (ErrorKind::NotOwner, "org.ally.Error.NotOwner"),
    (ErrorKind::LimitExceeded, "org.ally.Error.LimitExceeded"),
    (ErrorKind::Failed, "org.ally.Error.Failed"),
];

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::InvalidArgument,
        ErrorKind::AccessDenied,
        ErrorKind::AddressInUse,
        ErrorKind::ReloadFailed,
        ErrorKind::NotOwner,
        ErrorKind::Timeout,
        ErrorKind::LimitExceeded,
        ErrorKind::Failed,
        ErrorKind::NotManaged,
        ErrorKind::Broker,
        ErrorKind::Transport,
        ErrorKind::Io,
        ErrorKind::Disconnected,
    ];

    /// The kind for a D-Bus error name, if it is one the broker sends.
    pub fn from_dbus_name(name: &str) -> Option<ErrorKind> {
        DBUS_NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(kind, _)| *kind)
    }

    /// The D-Bus error name the broker uses for this kind, if it has one.
    pub fn dbus_name(self) -> Option<&'static str> {
        DBUS_NAMES
            .iter()
            .find(|(kind, _)| *kind == self)
            .map(|(_, name)| *name)
    }

    /// The name of a broker reply of this kind: its own, else `org.ally.Error.Failed`.
    pub fn reply_name(self) -> &'static str {
        self.dbus_name()
            .unwrap_or_else(|| ErrorKind::Failed.dbus_name().expect("Failed has a name"))
    }
}

/// A cause kept with an [`Error`]; shared so that one failed reload can answer
/// every caller waiting on it.
type Source = Arc<dyn StdError + Send + Sync>;

/// A failure: its kind, what happened in one line, and what caused it.
///
/// The message is the whole story as callers and logs see it, the cause's text
/// included (`"tcp 127.0.0.1:80: bind: Permission denied (os error 13)"`); the
/// cause itself stays available, typed, through [`std::error::Error::source`].
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Source>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An error of `kind` that `source` caused: `"{context}: {source}"`.
    pub fn caused_by(
        kind: ErrorKind,
        context: impl fmt::Display,
        source: impl StdError + Send + Sync + 'static,
    ) -> Error {
        Error {
            kind,
            message: format!("{context}: {source}"),
            source: Some(Arc::new(source)),
        }
    }

    /// An error of `kind` whose message is the text of `source`.
    pub fn from_source(kind: ErrorKind, source: impl StdError + Send + Sync + 'static) -> Error {
        Error {
            kind,
            message: source.to_string(),
            source: Some(Arc::new(source)),
        }
    }

    /// A local I/O failure while doing `context`.
    pub fn io(context: impl fmt::Display, source: io::Error) -> Error {
        Error::caused_by(ErrorKind::Io, context, source)
    }

    // The constructors of one kind take a `String`, as the enum variants they
    // replace did, so `Error::failed("x".into())` and `Error::failed(format!(..))`
    // both read the same.
    pub fn invalid_argument(message: String) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    pub fn access_denied(message: String) -> Error {
        Error::new(ErrorKind::AccessDenied, message)
    }

    pub fn address_in_use(message: String) -> Error {
        Error::new(ErrorKind::AddressInUse, message)
    }

    pub fn reload_failed(message: String) -> Error {
        Error::new(ErrorKind::ReloadFailed, message)
    }

    pub fn not_owner(message: String) -> Error {
        Error::new(ErrorKind::NotOwner, message)
    }

    pub fn timeout(message: String) -> Error {
        Error::new(ErrorKind::Timeout, message)
    }

    pub fn limit_exceeded(message: String) -> Error {
        Error::new(ErrorKind::LimitExceeded, message)
    }

    pub fn failed(message: String) -> Error {
        Error::new(ErrorKind::Failed, message)
    }

    pub fn not_managed(message: String) -> Error {
        Error::new(ErrorKind::NotManaged, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The whole one-line message, the cause's text included.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The OS error number at the bottom of the cause chain, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        let mut cause: Option<&(dyn StdError + 'static)> = self.source();
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<io::Error>()
                && let Some(errno) = io.raw_os_error()
            {
                return Some(errno);
            }
            cause = e.source();
        }
        None
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// A D-Bus failure inside the broker (e.g. asking the bus who called).
impl From<zbus::Error> for Error {
    fn from(e: zbus::Error) -> Error {
        Error {
            kind: ErrorKind::Transport,
            message: e.to_string(),
            source: Some(Arc::new(e)),
        }
    }
}

/// The reply the broker sends: `org.ally.Error.<Kind>` with the message as its text.
impl zbus::DBusError for Error {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name()).build(&self.message)
    }

    fn name(&self) -> ErrorName<'_> {
        ErrorName::from_static_str_unchecked(self.kind.reply_name())
    }

    fn description(&self) -> Option<&str> {
        Some(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    #[test]
    fn dbus_names_round_trip_and_only_the_broker_kinds_have_one() {
        let named: Vec<ErrorKind> = ErrorKind::ALL
            .into_iter()
            .filter(|k| k.dbus_name().is_some())
            .collect();
        for kind in &named {
            let name = kind.dbus_name().unwrap();
            assert_eq!(name, format!("org.ally.Error.{kind:?}"));
            assert_eq!(ErrorKind::from_dbus_name(name), Some(*kind));
        }
        assert_eq!(named.len(), DBUS_NAMES.len(), "ALL lists every named kind");
        assert_eq!(ErrorKind::from_dbus_name("org.ally.Error.Nope"), None);
        assert_eq!(ErrorKind::from_dbus_name("org.ally.Error.Timeout"), None);
        assert_eq!(
            ErrorKind::from_dbus_name("org.freedesktop.DBus.Error.AccessDenied"),
            None
        );
        assert_eq!(ErrorKind::Io.dbus_name(), None);
        assert_eq!(ErrorKind::Io.reply_name(), "org.ally.Error.Failed");
        assert_eq!(ErrorKind::NotOwner.reply_name(), "org.ally.Error.NotOwner");
        assert_eq!(ErrorKind::Disconnected.dbus_name(), None, "never sent");
        assert_eq!(ErrorKind::from_dbus_name(DISCONNECTED_NAME), None);
    }

    #[test]
    fn a_cause_is_kept_typed_and_told_in_the_message() {
        let e = Error::io(
            "tcp 127.0.0.1:80: bind",
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(
            e.to_string(),
            "tcp 127.0.0.1:80: bind: Permission denied (os error 13)"
        );
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        let source = e.source().expect("the cause is kept");
        assert!(source.downcast_ref::<io::Error>().is_some());
        let shared = e.clone();
        assert!(shared.source().is_some(), "a clone shares the cause");
        assert_eq!(Error::failed("x".into()).raw_os_error(), None);
    }

    #[test]
    fn the_dbus_reply_carries_the_kinds_name_and_the_message() {
        let e = Error::limit_exceeded("too many keys".into());
        assert_eq!(e.name().as_str(), "org.ally.Error.LimitExceeded");
        assert_eq!(DBusError::description(&e), Some("too many keys"));
        let io = Error::io("cannot duplicate socket", io::Error::other("EMFILE"));
        assert_eq!(io.name().as_str(), "org.ally.Error.Failed");
        assert_eq!(
            DBusError::description(&io),
            Some("cannot duplicate socket: EMFILE")
        );
    }

    /// `docs/dbus-api.md` lists exactly the errors the broker sends.
    #[test]
    fn the_documented_error_table_is_the_one_the_broker_sends() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/dbus-api.md");
        let docs = std::fs::read_to_string(path).expect(path);
        let documented = documented_errors(&docs);
        let sent: Vec<&str> = DBUS_NAMES.iter().map(|(_, name)| *name).collect();
        let mut missing: Vec<&str> = sent
            .iter()
            .copied()
            .filter(|n| !documented.contains(n))
            .collect();
        missing.sort();
        let mut extra: Vec<&str> = documented
            .iter()
            .copied()
            .filter(|n| !sent.contains(n))
            .collect();
        extra.sort();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "docs/dbus-api.md \"## Errors\": missing {missing:?}, never sent {extra:?}"
        );
        assert_eq!(
            documented.len(),
            sent.len(),
            "each name once: {documented:?}"
        );
    }

    /// The names in the first column of the table under `## Errors`.
    fn documented_errors(markdown: &str) -> Vec<&str> {
        let section = markdown
            .split("\n## Errors\n")
            .nth(1)
            .expect("docs/dbus-api.md has a \"## Errors\" section");
        let section = section.split("\n#").next().unwrap_or(section);
        let rows: Vec<Vec<&str>> = section
            .lines()
            .map(str::trim)
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        assert!(rows.len() > 2, "the Errors section has a table: {rows:?}");
        assert_eq!(rows[0].first(), Some(&"name"), "header: {:?}", rows[0]);
        rows[2..]
            .iter()
            .map(|row| row[0].trim_matches('`'))
            .collect()
    }

    #[test]
    fn the_table_parser_sees_every_row() {
        let md = "x\n## Errors\n\n| name | when |\n| --- | --- |\n| `a.B` | b |\n| `c.D` | d |\n\n## Next\n| `e.F` | f |\n";
        assert_eq!(documented_errors(md), ["a.B", "c.D"]);
    }
}
