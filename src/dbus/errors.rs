//! D-Bus errors: the broker's methods fail with [`ally_core::Error`], which replies
//! `org.ally.Error.<Kind>` with its message (see `ally_core::error` for the names,
//! and `docs/dbus-api.md`, which a test keeps in step with them).

pub use ally_core::Error;

pub type Result<T> = std::result::Result<T, Error>;
