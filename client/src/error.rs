//! Errors of the client binding: the broker's replies, mapped back from their
//! D-Bus names to [`ErrorKind`]s, the connection's failures, and local errors
//! ([`ally_core::Error`], the same value the broker fails with).

use std::fmt;
use std::io;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub use ally_core::ErrorKind;

/// An error of the client binding.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The broker answered a method call with an error.
    Broker {
        kind: ErrorKind,
        /// The method that failed, e.g. `Listen`.
        method: &'static str,
        /// The D-Bus error name, e.g. `org.ally.Error.AddressInUse`.
        name: String,
        /// The broker's human message.
        message: String,
    },
    /// Connecting to the broker, or talking to it, failed.
    Transport {
        context: String,
        /// The D-Bus library's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A local error (simulate mode, bad address or environment, wrong socket
    /// type, a failed system call), with its cause.
    Local(ally_core::Error),
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Broker { kind, .. } => *kind,
            Error::Transport { .. } => ErrorKind::Transport,
            Error::Local(e) => e.kind(),
        }
    }

    /// The broker's message, or this error's own text for local errors.
    pub fn message(&self) -> String {
        match self {
            Error::Broker { message, .. } => message.clone(),
            Error::Local(e) => e.message().to_owned(),
            other => other.to_string(),
        }
    }

    pub(crate) fn local(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error::Local(ally_core::Error::new(kind, message))
    }

    /// The broker's connection broke and the call failed for it (see `crate::reconnect`).
    pub(crate) fn disconnected(message: String) -> Error {
        Error::local(ErrorKind::Disconnected, message)
    }

    /// A failed system call; its kind follows the OS error where one fits.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        let kind = match source.raw_os_error() {
            Some(libc::EADDRINUSE) => ErrorKind::AddressInUse,
            Some(libc::EACCES | libc::EPERM) => ErrorKind::AccessDenied,
            Some(libc::EINVAL) => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        };
        Error::Local(ally_core::Error::caused_by(kind, context.into(), source))
    }

    pub(crate) fn transport(context: impl Into<String>, source: zbus::Error) -> Error {
        Error::Transport {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// Converts a failed method call on the broker.
    pub(crate) fn call(method: &'static str, e: zbus::Error) -> Error {
        match e {
            zbus::Error::MethodError(name, message, _) => {
                let name = name.as_str().to_owned();
                let kind = ErrorKind::from_dbus_name(&name).unwrap_or(ErrorKind::Broker);
                Error::Broker {
                    kind,
                    method,
                    name,
                    message: message.unwrap_or_default(),
                }
            }
            zbus::Error::FDO(fdo) => {
                use zbus::DBusError;
                let kind = match &*fdo {
                    zbus::fdo::Error::AccessDenied(_) => ErrorKind::AccessDenied,
                    zbus::fdo::Error::InvalidArgs(_) => ErrorKind::InvalidArgument,
                    zbus::fdo::Error::AddressInUse(_) => ErrorKind::AddressInUse,
                    zbus::fdo::Error::LimitsExceeded(_) => ErrorKind::LimitExceeded,
                    zbus::fdo::Error::Timeout(_) | zbus::fdo::Error::NoReply(_) => {
                        ErrorKind::Timeout
                    }
                    zbus::fdo::Error::ZBus(_) => {
                        return Error::transport(format!("{method} failed"), zbus::Error::FDO(fdo));
                    }
                    _ => ErrorKind::Broker,
                };
                Error::Broker {
                    kind,
                    method,
                    name: fdo.name().as_str().to_owned(),
                    message: fdo.description().unwrap_or_default().to_owned(),
                }
            }
            other => Error::transport(format!("{method} failed"), other),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Broker {
                method,
                name,
                message,
                ..
            } => {
                if message.is_empty() {
                    write!(f, "{method} failed ({name})")
                } else {
                    write!(f, "{method} failed: {} ({name})", one_line(message))
                }
            }
            Error::Transport { context, source } => {
                write!(f, "{context}: {}", one_line(&source.to_string()))
            }
            Error::Local(e) => f.write_str(&one_line(e.message())),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Transport { source, .. } => Some(&**source),
            // The local error's text is this error's: its cause is the next link.
            Error::Local(e) => std::error::Error::source(e),
            Error::Broker { .. } => None,
        }
    }
}

impl From<ally_core::Error> for Error {
    fn from(e: ally_core::Error) -> Self {
        Error::Local(e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind() {
            ErrorKind::InvalidArgument => io::ErrorKind::InvalidInput,
            ErrorKind::AccessDenied => io::ErrorKind::PermissionDenied,
            ErrorKind::AddressInUse => io::ErrorKind::AddrInUse,
            ErrorKind::Timeout => io::ErrorKind::TimedOut,
            ErrorKind::NotManaged => io::ErrorKind::Unsupported,
            ErrorKind::Disconnected => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_the_broker_sends_maps_back_to_its_kind() {
        for kind in ErrorKind::ALL {
            let Some(name) = kind.dbus_name() else {
                continue;
            };
            let reply = zbus::Error::MethodError(
                zbus::names::OwnedErrorName::try_from(name).unwrap(),
                Some("why".into()),
                zbus::message::Message::method_call("/", "M")
                    .build(&())
                    .unwrap(),
            );
            let e = Error::call("Listen", reply);
            assert_eq!(e.kind(), kind, "{name}");
            assert_eq!(e.to_string(), format!("Listen failed: why ({name})"));
        }
        let failed = ErrorKind::from_dbus_name("org.ally.Error.Failed");
        assert_eq!(failed, Some(ErrorKind::Failed));
    }

    #[test]
    fn broker_errors_display_on_one_line_with_the_message() {
        let e = Error::Broker {
            kind: ErrorKind::ReloadFailed,
            method: "Reload",
            name: "org.ally.Error.ReloadFailed".into(),
            message: "generation 3 exited with status 1\nbefore it was ready".into(),
        };
        assert_eq!(
            e.to_string(),
            "Reload failed: generation 3 exited with status 1 before it was ready (org.ally.Error.ReloadFailed)"
        );
        assert_eq!(e.kind(), ErrorKind::ReloadFailed);
    }

    #[test]
    fn address_errors_keep_their_kind() {
        let e: Error =
            ally_core::Error::address_in_use("tcp 127.0.0.1:80 is already in use".into()).into();
        assert_eq!(e.kind(), ErrorKind::AddressInUse);
        assert_eq!(e.to_string(), "tcp 127.0.0.1:80 is already in use");
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_local_io_error_keeps_its_cause_and_an_errno_kind() {
        let e = Error::io(
            "tokio TcpListener",
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(e.kind(), ErrorKind::AccessDenied);
        assert_eq!(
            e.to_string(),
            "tokio TcpListener: Permission denied (os error 13)"
        );
        let cause = std::error::Error::source(&e).expect("the cause is kept");
        assert_eq!(
            cause
                .downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error),
            Some(libc::EACCES)
        );
        let other = Error::io("dup", io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(other.kind(), ErrorKind::Io);
    }
}
