//! D-Bus errors, named `org.ally.Error.<Kind>`.

use zbus::DBusError;

#[derive(Debug, DBusError)]
#[zbus(prefix = "org.ally.Error")]
pub enum AllyError {
    #[zbus(error)]
    ZBus(zbus::Error),
    InvalidArgument(String),
    AccessDenied(String),
    AddressInUse(String),
    ReloadFailed(String),
    NotOwner(String),
    Timeout(String),
    LimitExceeded(String),
    Failed(String),
}

impl From<crate::broker::Error> for AllyError {
    fn from(e: crate::broker::Error) -> Self {
        use crate::broker::Error as E;
        match e {
            E::InvalidArgument(m) => AllyError::InvalidArgument(m),
            E::AddressInUse(m) => AllyError::AddressInUse(m),
            E::AccessDenied(m) => AllyError::AccessDenied(m),
            E::ReloadFailed(m) => AllyError::ReloadFailed(m),
            E::Failed(m) => AllyError::Failed(m),
        }
    }
}

pub type Result<T> = std::result::Result<T, AllyError>;

impl From<ally_core::state::StateError> for AllyError {
    fn from(e: ally_core::state::StateError) -> Self {
        use ally_core::state::StateError as E;
        match e {
            E::InvalidArgument(m) => AllyError::InvalidArgument(m),
            E::LimitExceeded(m) => AllyError::LimitExceeded(m),
            E::NotOwner(m) => AllyError::NotOwner(m),
        }
    }
}
