//! The application config, `/etc/ally/<app>.toml`.
//!
//! Read in two steps: serde reads the document into its [raw](raw) form, which
//! knows the keys and the type of each, then [`typed`] checks what the values
//! mean. Every error names the file, the line and column, the key and what is
//! expected ([`ConfigError`]). Users and groups are kept as written; they are
//! looked up when the broker starts (see [`crate::identity`]).

pub mod changes;
mod error;
mod locate;
mod raw;
pub mod revision;
mod typed;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ally_core::net::{ListenAddr, ListenOptions};
use nix::sys::signal::Signal;
use serde::Deserialize;

use crate::listen_policy::Allowed;

pub use error::{ConfigError, Location};

/// What `ally run`'s options change in the config, applied again at every
/// reload that re-reads the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen NET:ADDR`, after the file's `[[listen]]` entries.
    pub listen: Vec<ListenEntry>,
    /// `--sockets`.
    pub sockets: Option<Sockets>,
    /// `--ready`, with `--ready-delay` or `--ready-probe`.
    pub ready: Option<Readiness>,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }

    /// `config` with these overrides, checked as the file's keys are.
    pub fn apply(&self, mut config: Config) -> Result<Config, String> {
        for entry in &self.listen {
            if config.listen.iter().any(|e| e.addr == entry.addr) {
                return Err(format!(
                    "--listen {}: the config already listens there",
                    entry.addr
                ));
            }
            config.listen.push(entry.clone());
        }
        if let Some(sockets) = self.sockets {
            config.sockets = sockets;
        }
        if config.sockets == Sockets::ListenFds && config.listen.is_empty() {
            return Err(
                "sockets = \"listen-fds\" passes the [[listen]] sockets, and there is none: give --listen NET:ADDR or a [[listen]] entry".into(),
            );
        }
        if let Some(ready) = &self.ready {
            if let Readiness::Delay(delay) = ready
                && *delay >= config.ready_timeout
            {
                return Err(format!(
                    "--ready-delay {} is not shorter than ready_timeout ({})",
                    humantime::format_duration(*delay),
                    humantime::format_duration(config.ready_timeout)
                ));
            }
            config.ready = ready.clone();
            if *ready != Readiness::Notify {
                config.watchdog = None;
            }
        }
        Ok(config)
    }
}

/// Where `ally run <app>` looks for the config of `<app>`.
pub const CONFIG_DIR: &str = "/etc/ally";

pub const DEFAULT_STOP_SIGNAL: Signal = Signal::SIGTERM;
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RESTART_DELAY: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_DRAINING: usize = 4;
/// How long an app's HTTP drain lets an idle keep-alive connection stay idle after
/// the stop before closing it (passed as `ALLY_DRAIN_IDLE`, in milliseconds).
pub const DEFAULT_DRAIN_IDLE: Duration = Duration::from_secs(1);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// More watched paths than this is a mistake, and each costs inotify watches.
pub const MAX_WATCH_PATHS: usize = 64;
pub const DEFAULT_LISTENER_LINGER: Duration = Duration::from_secs(10);
/// Off: a supervisor must not spin on the host it protects unless asked to
/// (docs/state.md has what polling buys and costs).
pub const DEFAULT_STATE_BUSY_POLL: Duration = Duration::ZERO;
/// Polling longer than this between calls burns a CPU for no gain: a sleeping thread
/// wakes within tens of microseconds.
pub const MAX_STATE_BUSY_POLL: Duration = Duration::from_millis(1);

pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 128;
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Room in the largest legitimate message for everything but its names and values:
/// the header fields (path, interface, member, destination, signature) and the
/// body's framing, with plenty to spare.
pub const MESSAGE_OVERHEAD: u64 = 64 << 10;

/// Longer durations are refused so that arithmetic on instants cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The largest config file read. A config is a few kilobytes; the cap keeps a wrong
/// `--config` (a device, a log file) from exhausting the broker's memory.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Program and arguments; never empty.
    pub command: Vec<String>,
    pub working_directory: Option<PathBuf>,
    /// The user the instances run as, as written: resolved when the broker starts.
    pub user: Option<Located<Principal>>,
    /// The group the instances run as, as written; without it, `user`'s primary group.
    pub group: Option<Located<Principal>>,
    pub environment: BTreeMap<String, String>,
    pub stop_signal: Signal,
    pub ready_timeout: Duration,
    pub stop_timeout: Duration,
    pub restart: RestartPolicy,
    /// Base of the exponential back-off between restarts.
    pub restart_delay: Duration,
    /// At most this many old instances draining at once.
    pub max_draining: usize,
    /// How long a listener no instance refers to stays open.
    pub listener_linger: Duration,
    pub listen: Vec<ListenEntry>,
    /// Addresses the broker binds with its own rights when an instance asks,
    /// besides `listen`; others only as the instances' user could.
    pub allow_listen: Vec<Allowed>,
    /// The file this config came from, named in messages that tell the operator what to change.
    pub file: Option<PathBuf>,
    pub limits: Limits,
    /// What one connection to the broker's sockets may cost it (also `[limits]`).
    pub connections: ConnectionLimits,
    /// How long the state socket polls a busy connection for its next call; off by default.
    pub state_busy_poll: Duration,
    /// The CPU priority of a generation that starts while another one serves.
    pub start_priority: StartPriority,
    /// Passed to every instance as `ALLY_DRAIN_IDLE`; at most `stop_timeout`.
    pub drain_idle: Duration,
    /// How the instances get the `[[listen]]` sockets.
    pub sockets: Sockets,
    /// How an instance says it serves.
    pub ready: Readiness,
    /// With `ready = "notify"`: an instance that sends no `WATCHDOG=1` for this
    /// long is killed and, if it was the serving one, restarted per `restart`.
    pub watchdog: Option<Duration>,
    /// How many reloads and restarts `History()` keeps.
    pub history: usize,
    /// Where `GET /metrics` is served over HTTP, if anywhere.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Where the instances' stdout goes.
    pub stdout: Output,
    /// Where the instances' stderr goes.
    pub stderr: Output,
    /// Run before every reload, as the instances run; a failure refuses the reload.
    pub check: Option<Vec<String>>,
    /// How long `check` may run before it is killed and the reload refused.
    pub check_timeout: Duration,
    /// What is watched for a new release, which then reloads the app.
    pub watch: Watch,
}

/// `watch`: which executables, when they change, reload the app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Watch {
    #[default]
    Off,
    /// The command's program, looked up as a spawn looks it up.
    Command,
    /// These absolute paths.
    Paths(Vec<PathBuf>),
}

/// `sockets`: how an instance gets the `[[listen]]` sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Sockets {
    /// It asks with `Listen` over D-Bus.
    #[default]
    Dbus,
    /// systemd's socket-activation protocol: fds 3, 4, … in config order, with
    /// `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (its own pid).
    ListenFds,
}

impl Sockets {
    pub fn as_str(self) -> &'static str {
        match self {
            Sockets::Dbus => "dbus",
            Sockets::ListenFds => "listen-fds",
        }
    }
}

impl fmt::Display for Sockets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Sockets {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Sockets::Dbus, Sockets::ListenFds]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!(r#"invalid sockets {s:?}: expected "dbus" or "listen-fds""#))
    }
}

/// `ready`: what makes an instance ready, so that the older ones are stopped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Readiness {
    /// It calls `Ready` over D-Bus.
    #[default]
    Dbus,
    /// `READY=1` on its own `NOTIFY_SOCKET`, from any of its processes.
    Notify,
    /// It has run this long without exiting.
    Delay(Duration),
    /// This command, run every [`PROBE_INTERVAL`], exited 0.
    Probe(Vec<String>),
}

/// How often `ready_probe` runs until it succeeds.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// A `ready_probe` run still going after this long is killed, and counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl Readiness {
    pub const NAMES: [&'static str; 4] = ["dbus", "notify", "delay", "probe"];

    pub fn name(&self) -> &'static str {
        match self {
            Readiness::Dbus => "dbus",
            Readiness::Notify => "notify",
            Readiness::Delay(_) => "delay",
            Readiness::Probe(_) => "probe",
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A user or a group as the config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Id(u32),
    Name(String),
}

/// A setting with the place in the file it was written at, for messages about
/// it after the file is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub location: Location,
}

/// A `[[listen]]` entry, bound before the app starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenEntry {
    pub addr: ListenAddr,
    pub options: ListenOptions,
    /// Its `LISTEN_FDNAMES` entry, if the config names it.
    pub name: Option<String>,
}

impl ListenEntry {
    /// Its `LISTEN_FDNAMES` entry: the configured `name`, else
    /// `"<network> <address>"` with each `:` (the list's separator) written `_`.
    pub fn fd_name(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => self
                .addr
                .to_string()
                .chars()
                .map(|c| {
                    if (' '..='~').contains(&c) && c != ':' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect(),
        }
    }
}

/// Why `name` cannot be a `LISTEN_FDNAMES` entry (systemd's rule: printable
/// ASCII without `:`, at most 255 bytes).
pub fn check_fd_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty: expected a name like \"http\"".into());
    }
    if name.len() > 255 {
        return Err(format!(
            "is {} bytes long: expected at most 255",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| !(' '..='~').contains(c) || *c == ':') {
        return Err(format!(
            "{name:?} contains {c:?}: expected printable ASCII without ':' (LISTEN_FDNAMES separates names with ':')"
        ));
    }
    Ok(())
}

/// Limits on shared state, `[limits]`: the stores' own type, so a default
/// lives in one place.
pub use ally_core::state::Limits;

/// Limits on the connections to the private and the state socket, `[limits]` too:
/// everything a caller can make the broker hold before it is known to be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections to both sockets together.
    pub max_connections: usize,
    /// Connections of one uid to both sockets together.
    pub max_connections_per_uid: usize,
    /// A connection that has not authenticated by then is closed.
    pub handshake_timeout: Duration,
    /// A message that declares more is refused before it is read.
    pub max_message_bytes: u64,
}

impl ConnectionLimits {
    /// The defaults, with room for the largest call that `limits` allow.
    pub fn defaults_for(limits: &Limits) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_message_bytes: largest_call(limits),
        }
    }
}

/// The size of the largest message a legitimate call needs under `limits`:
/// `Cache1.CompareAndSwap` carries two names and two values.
pub fn largest_call(limits: &Limits) -> u64 {
    limits
        .max_value_bytes
        .saturating_add(limits.max_key_bytes)
        .saturating_mul(2)
        .saturating_add(MESSAGE_OVERHEAD)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RestartPolicy {
    #[default]
    OnFailure,
    Always,
    Never,
}

impl RestartPolicy {
    pub const ALL: [RestartPolicy; 3] = [
        RestartPolicy::OnFailure,
        RestartPolicy::Always,
        RestartPolicy::Never,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
            RestartPolicy::Never => "never",
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RestartPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RestartPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!(
                    r#"invalid restart policy {s:?}: expected "on-failure", "always" or "never""#
                )
            })
    }
}

/// How a reload's new generation is scheduled until it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StartPriority {
    /// The broker's own scheduling policy, like every instance.
    #[default]
    Normal,
    /// `SCHED_IDLE` while a generation serves beside it; raised once ready.
    Idle,
}

impl StartPriority {
    pub fn as_str(self) -> &'static str {
        match self {
            StartPriority::Normal => "normal",
            StartPriority::Idle => "idle",
        }
    }
}

impl fmt::Display for StartPriority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StartPriority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [StartPriority::Normal, StartPriority::Idle]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!(r#"invalid start priority {s:?}: expected "normal" or "idle""#))
    }
}

/// Where an instance's stdout or stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Output {
    /// Line by line to journald, with the instance's generation (see
    /// [`crate::app_logs`]); to the broker's stderr without journald.
    #[default]
    Journal,
    /// The broker's own stdout or stderr, as the instance's.
    Inherit,
}

impl Output {
    pub fn as_str(self) -> &'static str {
        match self {
            Output::Journal => "journal",
            Output::Inherit => "inherit",
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Output {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Output::Journal, Output::Inherit]
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!(r#"invalid output {s:?}: expected "journal" or "inherit""#))
    }
}

impl Config {
    /// The embedded defaults, for `ally run <app> -- COMMAND...` without a config file.
    pub fn defaults(command: Vec<String>) -> Config {
        Config {
            command,
            working_directory: None,
            user: None,
            group: None,
            environment: BTreeMap::new(),
            stop_signal: DEFAULT_STOP_SIGNAL,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            restart: RestartPolicy::default(),
            restart_delay: DEFAULT_RESTART_DELAY,
            max_draining: DEFAULT_MAX_DRAINING,
            listener_linger: DEFAULT_LISTENER_LINGER,
            listen: Vec::new(),
            allow_listen: Vec::new(),
            file: None,
            limits: Limits::default(),
            connections: ConnectionLimits::defaults_for(&Limits::default()),
            state_busy_poll: DEFAULT_STATE_BUSY_POLL,
            start_priority: StartPriority::default(),
            drain_idle: DEFAULT_DRAIN_IDLE,
            sockets: Sockets::default(),
            ready: Readiness::default(),
            watchdog: None,
            check: None,
            check_timeout: DEFAULT_CHECK_TIMEOUT,
            watch: Watch::Off,
            history: crate::history::DEFAULT_HISTORY,
            metrics_address: None,
            stdout: Output::default(),
            stderr: Output::default(),
        }
    }

    /// `/etc/ally/<app>.toml`.
    pub fn default_path(app: &str) -> PathBuf {
        Path::new(CONFIG_DIR).join(format!("{app}.toml"))
    }

    /// Reads and checks the config at `path`. A non-empty `command_override` (the
    /// command given on the command line) replaces the file's `command`.
    pub fn load(path: &Path, command_override: Option<Vec<String>>) -> Result<Config, ConfigError> {
        let text = Config::read(path)?;
        Config::parse(&text, path, command_override)
    }

    /// The text of the config file at `path`, as [`Config::load`] reads it.
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        let read_error = |error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        };
        let bytes = read_regular_file(path).map_err(read_error)?;
        String::from_utf8(bytes).map_err(|_| {
            read_error(io::Error::new(
                io::ErrorKind::InvalidData,
                "the file is not valid UTF-8",
            ))
        })
    }

    /// Checks the config `text`; `origin` is the file it came from, named in errors.
    pub fn parse(
        text: &str,
        origin: &Path,
        command_override: Option<Vec<String>>,
    ) -> Result<Config, ConfigError> {
        let document = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_path_buf(),
            location: e.span().map(|span| error::line_column(text, span.start)),
            message: e.message().split_whitespace().collect::<Vec<_>>().join(" "),
        })?;
        let raw = raw::RawConfig::deserialize(document)
            .map_err(|e| locate::deserialize_error(text, origin, &e))?;
        typed::Cx { text, origin }.config(raw, command_override)
    }
}

/// The contents of `path`, if it is a regular file of at most [`MAX_CONFIG_BYTES`].
/// It is opened without blocking, so a FIFO without a writer fails at once instead of
/// hanging, and checked through the open descriptor, so the file read is the file
/// checked; reading stops past the cap even if the file grows meanwhile.
fn read_regular_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let metadata = file.metadata()?;
    let kind = metadata.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "something else"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {what}, not a regular file"),
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!(
                "the file is larger than {MAX_CONFIG_BYTES} bytes (1 MiB), the limit of a config file"
            ),
        )
    };
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Checks an app name. It becomes part of the D-Bus name `org.ally.<app>`, a unit
/// instance `ally@<app>` and file paths, so it follows the D-Bus well-known-name
/// rules: dot-separated elements of `[A-Za-z0-9_-]`, none empty, none starting with
/// a digit.
pub fn validate_app_name(name: &str) -> Result<(), String> {
    let invalid = |why: &str| Err(format!("invalid app name {name:?}: {why}"));
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > 64 {
        return invalid("it is longer than 64 characters");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return invalid(&format!(
            "{c:?} is not allowed: expected letters, digits, '_', '-' and '.'"
        ));
    }
    if name.starts_with(['.', '-']) {
        return invalid("it must not start with '.' or '-'");
    }
    for element in name.split('.') {
        if element.is_empty() {
            return invalid("it must not end with '.' or contain '..'");
        }
        if element.starts_with(|c: char| c.is_ascii_digit()) {
            return invalid("no dot-separated part may start with a digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
