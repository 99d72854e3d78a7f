pub mod error;
pub mod net;
pub mod proxy;

pub use error::{Error, ErrorKind, Result};
