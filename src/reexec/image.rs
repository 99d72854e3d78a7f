//! The broker's image: everything a re-executed broker needs to carry on where
//! the old one stopped, as one JSON document written to a memfd before `execve`.
//!
//! Fds are carried by number: the old process clears their close-on-exec flag,
//! the new one takes them back (and sets it again) by the numbers named here.
//! Times are carried as ages (how long ago, when the image was taken) for the
//! monotonic clock and as UNIX microseconds for the wall clock.

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use ally_core::report::AppReport;
use ally_core::state::image::StoreImage;

use crate::history::HistoryImage;

/// Bumped when a field changes meaning; a broker refuses an image of another
/// version (and runs the old binary again with it, see [`super`]).
pub const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub struct BrokerImage {
    pub version: u32,
    /// `ally --version` of the binary that took the image, for the log.
    pub taken_by: String,
    pub app: String,
    /// Re-executions since `ally run` started, this one included.
    pub reexecs: u64,
    /// The private socket's and the state socket's listening sockets.
    pub private_socket: RawFd,
    pub state_socket: RawFd,
    /// The config texts the settings in use were read from; `settings` and each
    /// instance's `settings` index this list.
    pub configs: Vec<ConfigImage>,
    /// The settings the next generation starts with.
    pub settings: usize,
    pub last_generation: u64,
    pub next_id: u64,
    pub instances: Vec<InstanceImage>,
    pub listeners: Vec<ListenerImage>,
    pub reloads: u64,
    pub last_reload: String,
    pub notified_ready: bool,
    /// `(dev, ino)` of the unix socket files the broker made.
    pub socket_files: Vec<(u64, u64)>,
    pub state: StoreImage,
    pub history: HistoryImage,
    /// Crash restarts since the app last recovered: the next one backs off
    /// as it would have.
    #[serde(default)]
    pub restarts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigImage {
    /// The file's text; none when the broker runs on the built-in defaults.
    pub text: Option<String>,
    pub revision: u64,
    pub digest: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InstanceImage {
    pub id: u64,
    pub generation: u64,
    pub pid: u32,
    /// `starting`, `ready` or `draining`.
    pub state: String,
    pub started_unix_us: u64,
    pub started_age_ms: u64,
    pub ready_unix_us: Option<u64>,
    pub ready_age_ms: Option<u64>,
    pub settings: usize,
    /// The process's start time (`/proc/<pid>/stat` field 22), which tells it
    /// from a later process with its pid when the broker restarts.
    #[serde(default)]
    pub start_ticks: Option<u64>,
    /// The pidfd pinning the instance's process.
    pub pidfd: RawFd,
    /// `MAINPID=`: its pid and the pidfd pinning it.
    pub main: Option<(u32, RawFd)>,
    pub stdout: Option<RawFd>,
    pub stderr: Option<RawFd>,
    pub notify_socket: Option<RawFd>,
    pub status: Option<String>,
    pub stopping: bool,
    pub errno: Option<i32>,
    pub app_report: AppReport,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerImage {
    /// As in systemd's fd store: `systemd::fd_name`.
    pub key: String,
    pub aliases: Vec<String>,
    pub fd: RawFd,
    pub bound: String,
    pub refs: Vec<(u64, u32)>,
    pub pinned: bool,
    pub unreferenced_age_ms: Option<u64>,
}
