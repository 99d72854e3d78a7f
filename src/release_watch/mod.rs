//! `watch`: noticing a new release. A watched path is resolved through every
//! symlink on it ([`resolve`]); what it resolves to is compared, after a quiet
//! period, with what the running generation was started from ([`decide`]).
//! The broker's task (`crate::broker::watch`) feeds them inotify's wake-ups.

pub mod decide;
pub mod resolve;

pub use decide::{Decider, Verdict};
pub use resolve::{FileState, Resolved, resolve};
