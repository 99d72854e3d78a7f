//! Why a state operation was refused: the stores' own small error, which becomes
//! an [`crate::Error`] of the same kind at the edge (`?` converts it).

use std::fmt;

use crate::{Error, ErrorKind};

/// Why a state operation was refused. Nothing changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    InvalidArgument(String),
    LimitExceeded(String),
    NotOwner(String),
}

impl StateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StateError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            StateError::LimitExceeded(_) => ErrorKind::LimitExceeded,
            StateError::NotOwner(_) => ErrorKind::NotOwner,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            StateError::InvalidArgument(m)
            | StateError::LimitExceeded(m)
            | StateError::NotOwner(m) => m,
        }
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for StateError {}

impl From<StateError> for Error {
    fn from(e: StateError) -> Error {
        let kind = e.kind();
        match e {
            StateError::InvalidArgument(m)
            | StateError::LimitExceeded(m)
            | StateError::NotOwner(m) => Error::new(kind, m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_its_kind_and_message() {
        for (e, kind) in [
            (
                StateError::InvalidArgument("bad".into()),
                ErrorKind::InvalidArgument,
            ),
            (
                StateError::LimitExceeded("bad".into()),
                ErrorKind::LimitExceeded,
            ),
            (StateError::NotOwner("bad".into()), ErrorKind::NotOwner),
        ] {
            let e = Error::from(e);
            assert_eq!((e.kind(), e.message()), (kind, "bad"));
        }
    }
}
