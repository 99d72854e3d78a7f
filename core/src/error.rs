//! The kinds of failure every part of Ally reports, and their D-Bus error names.

/// What went wrong, independent of where (broker or simulate mode).
///
/// The first seven kinds are the broker's D-Bus errors `org.ally.Error.<Kind>`; simulate
/// mode reports the same kinds for the same causes.
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
    /// A wait ran out.
    Timeout,
    /// A configured limit would be passed.
    LimitExceeded,
    /// The operation needs a broker and this instance runs in simulate mode.
    NotManaged,
    /// Any other error reply from the broker.
    Broker,
    /// The D-Bus connection to the broker failed or broke.
    Transport,
    /// A local I/O error.
    Io,
}

impl ErrorKind {
    /// The kind for a D-Bus error name, if it is one of `org.ally.Error.*`.
    pub fn from_dbus_name(name: &str) -> Option<ErrorKind> {
        Some(match name.strip_prefix("org.ally.Error.")? {
            "InvalidArgument" => ErrorKind::InvalidArgument,
            "AccessDenied" => ErrorKind::AccessDenied,
            "AddressInUse" => ErrorKind::AddressInUse,
            "ReloadFailed" => ErrorKind::ReloadFailed,
            "NotOwner" => ErrorKind::NotOwner,
            "Timeout" => ErrorKind::Timeout,
            "LimitExceeded" => ErrorKind::LimitExceeded,
            _ => return None,
        })
    }

    /// The D-Bus error name the broker uses for this kind, if it has one.
    pub fn dbus_name(self) -> Option<&'static str> {
        Some(match self {
            ErrorKind::InvalidArgument => "org.ally.Error.InvalidArgument",
            ErrorKind::AccessDenied => "org.ally.Error.AccessDenied",
            ErrorKind::AddressInUse => "org.ally.Error.AddressInUse",
            ErrorKind::ReloadFailed => "org.ally.Error.ReloadFailed",
            ErrorKind::NotOwner => "org.ally.Error.NotOwner",
            ErrorKind::Timeout => "org.ally.Error.Timeout",
            ErrorKind::LimitExceeded => "org.ally.Error.LimitExceeded",
            _ => return None,
        })
    }
}
