//! The application config, `/etc/ally/<app>.toml`.
//!
//! The file is parsed into a plain `toml::Table` and checked key by key, rather than
//! deserialised with serde, so that every error names the file, the key and what is
//! expected.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ally_core::net::{Endpoint, ListenAddr, ListenOptions};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Group, Uid, User};
use toml::{Table, Value};

use crate::listen_policy::Allowed;

/// Where `ally run <app>` looks for the config of `<app>`.
pub const CONFIG_DIR: &str = "/etc/ally";

pub const DEFAULT_STOP_SIGNAL: Signal = Signal::SIGTERM;
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RESTART_DELAY: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_DRAINING: usize = 4;
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

const TOP_KEYS: &[&str] = &[
    "command",
    "working_directory",
    "user",
    "group",
    "environment",
    "stop_signal",
    "ready_timeout",
    "stop_timeout",
    "restart",
    "restart_delay",
    "max_draining",
    "listener_linger",
    "listen",
    "allow_listen",
    "limits",
    "state_busy_poll",
    "start_priority",
];
const LISTEN_KEYS: &[&str] = &["network", "address", "backlog", "reuse_port", "mode"];
const LIMIT_KEYS: &[&str] = &[
    "max_key_bytes",
    "max_value_bytes",
    "max_keys_per_namespace",
    "max_total_bytes",
    "max_lock_waiters_per_connection",
    "max_lock_waiters_per_lock",
    "max_connections",
    "max_connections_per_uid",
    "handshake_timeout",
    "max_message_bytes",
];

const COMMAND_EXAMPLE: &str = r#"the program to run, e.g. command = ["/usr/bin/myapp", "--flag"]"#;
const DURATION_EXAMPLE: &str = r#"a duration like "30s" or "1m 30s""#;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Program and arguments; never empty.
    pub command: Vec<String>,
    pub working_directory: Option<PathBuf>,
    pub user: Option<u32>,
    /// Set when `user` is set: the explicit group, else the user's primary group.
    pub group: Option<u32>,
    /// The name of `user` in the user database, for supplementary groups and `$USER`.
    pub user_name: Option<String>,
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
}

/// A `[[listen]]` entry, bound before the app starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenEntry {
    pub addr: ListenAddr,
    pub options: ListenOptions,
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

/// Why a config could not be loaded. Each displays as one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {}", one_line(.path.display()), one_line(io_message(.error)))]
    Read { path: PathBuf, error: io::Error },
    #[error("{}{}: TOML syntax error: {}", one_line(.path.display()), format_location(*.location), one_line(.message))]
    Syntax {
        path: PathBuf,
        /// 1-based line and column, when the parser reports where.
        location: Option<(usize, usize)>,
        message: String,
    },
    #[error("{}: unknown key `{}` (expected one of: {})", one_line(.path.display()), one_line(.key), .expected.join(", "))]
    UnknownKey {
        path: PathBuf,
        key: String,
        expected: Vec<&'static str>,
    },
    #[error("{}: key `{}` is missing: expected {expected}", one_line(.path.display()), one_line(.key))]
    Missing {
        path: PathBuf,
        key: String,
        expected: String,
    },
    #[error("{}: key `{}`: {}", one_line(.path.display()), one_line(.key), one_line(.message))]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. }
            | ConfigError::Syntax { path, .. }
            | ConfigError::UnknownKey { path, .. }
            | ConfigError::Missing { path, .. }
            | ConfigError::Invalid { path, .. } => path,
        }
    }
}

/// `text` with its control characters escaped (a newline as `\n`), so that an
/// error stays one line whatever the names and values it quotes from the file.
fn one_line(text: impl fmt::Display) -> String {
    let mut line = String::new();
    for c in text.to_string().chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

/// The io error without Rust's " (os error N)" suffix, which says nothing to an operator.
fn io_message(error: &io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

fn format_location(location: Option<(usize, usize)>) -> String {
    location.map_or_else(String::new, |(line, column)| format!(":{line}:{column}"))
}

impl Config {
    /// The embedded defaults, for `ally run <app> -- COMMAND...` without a config file.
    pub fn defaults(command: Vec<String>) -> Config {
        Config {
            command,
            working_directory: None,
            user: None,
            group: None,
            user_name: None,
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
        }
    }

    /// `/etc/ally/<app>.toml`.
    pub fn default_path(app: &str) -> PathBuf {
        Path::new(CONFIG_DIR).join(format!("{app}.toml"))
    }

    /// Reads and checks the config at `path`. A non-empty `command_override` (the
    /// command given on the command line) replaces the file's `command`.
    pub fn load(path: &Path, command_override: Option<Vec<String>>) -> Result<Config, ConfigError> {
        let read_error = |error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        };
        let bytes = read_regular_file(path).map_err(read_error)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            read_error(io::Error::new(
                io::ErrorKind::InvalidData,
                "the file is not valid UTF-8",
            ))
        })?;
        Config::parse(&text, path, command_override)
    }

    /// Checks the config `text`; `origin` is the file it came from, named in errors.
    pub fn parse(
        text: &str,
        origin: &Path,
        command_override: Option<Vec<String>>,
    ) -> Result<Config, ConfigError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: origin.to_path_buf(),
                location: e.span().map(|span| line_column(text, span.start)),
                message: e.message().split_whitespace().collect::<Vec<_>>().join(" "),
            })?;
        let cx = Cx { origin };
        cx.check_keys(&table, "", TOP_KEYS)?;

        let file_command = table.get("command").map(|v| cx.command(v)).transpose()?;
        let command = match command_override.filter(|c| !c.is_empty()) {
            Some(command) => command,
            None => file_command.ok_or_else(|| cx.missing("command", COMMAND_EXAMPLE))?,
        };

        let mut config = Config::defaults(command);
        config.file = Some(origin.to_path_buf());
        if let Some(v) = table.get("working_directory") {
            config.working_directory = Some(cx.working_directory(v)?);
        }
        let group = table.get("group").map(|v| cx.group(v)).transpose()?;
        if let Some(v) = table.get("user") {
            let (uid, name, primary_gid) = cx.user(v)?;
            config.user = Some(uid);
            config.user_name = name;
            config.group = match (group, primary_gid) {
                (Some(gid), _) | (None, Some(gid)) => Some(gid),
                (None, None) => {
                    return Err(cx.invalid(
                        "user",
                        format!(
                            "uid {uid} has no entry in the user database, so it has no primary group: set `group` too"
                        ),
                    ));
                }
            };
        } else {
            config.group = group;
        }
        if let Some(v) = table.get("environment") {
            config.environment = cx.environment(v)?;
        }
        if let Some(v) = table.get("stop_signal") {
            config.stop_signal = cx.signal("stop_signal", v)?;
        }
        if let Some(v) = table.get("ready_timeout") {
            config.ready_timeout = cx.duration("ready_timeout", v, false)?;
        }
        if let Some(v) = table.get("stop_timeout") {
            config.stop_timeout = cx.duration("stop_timeout", v, false)?;
        }
        if let Some(v) = table.get("restart") {
            let s = cx.string("restart", v, r#""on-failure", "always" or "never""#)?;
            config.restart = s.parse().map_err(|e| cx.invalid("restart", e))?;
        }
        if let Some(v) = table.get("restart_delay") {
            // Zero would make the back-off a busy loop.
            config.restart_delay = cx.duration("restart_delay", v, false)?;
        }
        if let Some(v) = table.get("max_draining") {
            let n = cx.positive_integer("max_draining", v)?;
            config.max_draining = usize::try_from(n)
                .map_err(|_| cx.invalid("max_draining", format!("{n} is too large")))?;
        }
        if let Some(v) = table.get("listener_linger") {
            config.listener_linger = cx.duration("listener_linger", v, true)?;
        }
        if let Some(v) = table.get("listen") {
            config.listen = cx.listen(v)?;
        }
        if let Some(v) = table.get("allow_listen") {
            config.allow_listen = cx.allow_listen(v)?;
        }
        if let Some(v) = table.get("limits") {
            (config.limits, config.connections) = cx.limits(v)?;
        }
        if let Some(v) = table.get("state_busy_poll") {
            let d = cx.duration("state_busy_poll", v, true)?;
            if d > MAX_STATE_BUSY_POLL {
                return Err(cx.invalid(
                    "state_busy_poll",
                    format!(
                        "{} is too long: expected at most 1ms (\"0s\" turns polling off)",
                        humantime::format_duration(d)
                    ),
                ));
            }
            config.state_busy_poll = d;
        }
        if let Some(v) = table.get("start_priority") {
            let s = cx.string("start_priority", v, r#""normal" or "idle""#)?;
            config.start_priority = s.parse().map_err(|e| cx.invalid("start_priority", e))?;
        }
        Ok(config)
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

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A short rendering of a value for "found ..." in messages.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("string {s:?}"),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        other => other.type_str().to_string(),
    }
}

/// Validation context: the file errors are reported against.
struct Cx<'a> {
    origin: &'a Path,
}

impl Cx<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn missing(&self, key: &str, expected: &str) -> ConfigError {
        ConfigError::Missing {
            path: self.origin.to_path_buf(),
            key: key.to_string(),
            expected: expected.to_string(),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> ConfigError {
        self.invalid(
            key,
            format!("expected {expected}, found {}", describe(found)),
        )
    }

    /// Refuses keys of `table` not in `known`; `prefix` is the table's own key path.
    fn check_keys(
        &self,
        table: &Table,
        prefix: &str,
        known: &[&'static str],
    ) -> Result<(), ConfigError> {
        match table.keys().find(|k| !known.contains(&k.as_str())) {
            Some(key) => Err(ConfigError::UnknownKey {
                path: self.origin.to_path_buf(),
                key: format!("{prefix}{key}"),
                expected: known.to_vec(),
            }),
            None => Ok(()),
        }
    }

    fn string<'v>(
        &self,
        key: &str,
        value: &'v Value,
        expected: &str,
    ) -> Result<&'v str, ConfigError> {
        value
            .as_str()
            .ok_or_else(|| self.wrong_type(key, expected, value))
    }

    fn command(&self, value: &Value) -> Result<Vec<String>, ConfigError> {
        let items = value.as_array().ok_or_else(|| {
            self.wrong_type(
                "command",
                &format!("an array of strings: {COMMAND_EXAMPLE}"),
                value,
            )
        })?;
        if items.is_empty() {
            return Err(self.invalid("command", format!("is empty: expected {COMMAND_EXAMPLE}")));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let key = format!("command[{i}]");
                let s = self.string(&key, item, "a string")?;
                if s.contains('\0') {
                    return Err(self.invalid(&key, "must not contain a NUL character"));
                }
                if i == 0 && s.is_empty() {
                    return Err(self.invalid(&key, "the program must not be empty"));
                }
                Ok(s.to_string())
            })
            .collect()
    }

    fn working_directory(&self, value: &Value) -> Result<PathBuf, ConfigError> {
        let key = "working_directory";
        let s = self.string(key, value, "an absolute path")?;
        if s.contains('\0') {
            return Err(self.invalid(key, "must not contain a NUL character"));
        }
        if !Path::new(s).is_absolute() {
            return Err(self.invalid(
                key,
                format!("{s:?} is not absolute: expected an absolute path"),
            ));
        }
        Ok(PathBuf::from(s))
    }

    /// A numeric id, given as an integer or a string of digits; `None` for a name.
    fn numeric_id(&self, key: &str, value: &Value, what: &str) -> Result<Option<u32>, ConfigError> {
        let expected = format!("a {what} name or a numeric id");
        let out_of_range = |n: &dyn fmt::Display| {
            self.invalid(key, format!("id {n} is out of range: expected {expected}"))
        };
        match value {
            // u32::MAX is (uid_t)-1, which means "no change" to setuid and friends.
            Value::Integer(n) => match u32::try_from(*n) {
                Ok(id) if id != u32::MAX => Ok(Some(id)),
                _ => Err(out_of_range(n)),
            },
            Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                match s.parse::<u32>() {
                    Ok(id) if id != u32::MAX => Ok(Some(id)),
                    _ => Err(out_of_range(s)),
                }
            }
            Value::String(s) if !s.is_empty() && !s.contains('\0') => Ok(None),
            Value::String(s) => Err(self.invalid(
                key,
                format!("invalid {what} name {s:?}: expected {expected}"),
            )),
            other => Err(self.wrong_type(key, &expected, other)),
        }
    }

    /// uid, its name if the user database knows it, and its primary group.
    fn user(&self, value: &Value) -> Result<(u32, Option<String>, Option<u32>), ConfigError> {
        let key = "user";
        let lookup_error = |e: nix::Error| {
            self.invalid(
                key,
                format!("cannot look up the user database: {}", e.desc()),
            )
        };
        let user = match self.numeric_id(key, value, "user")? {
            Some(uid) => match User::from_uid(Uid::from_raw(uid)).map_err(lookup_error)? {
                Some(user) => user,
                None => return Ok((uid, None, None)),
            },
            None => {
                let name = value.as_str().unwrap_or_default();
                User::from_name(name).map_err(lookup_error)?.ok_or_else(|| {
                    self.invalid(key, format!("unknown user {name:?}: expected an existing user name or a numeric uid"))
                })?
            }
        };
        Ok((user.uid.as_raw(), Some(user.name), Some(user.gid.as_raw())))
    }

    fn group(&self, value: &Value) -> Result<u32, ConfigError> {
        let key = "group";
        if let Some(gid) = self.numeric_id(key, value, "group")? {
            return Ok(gid);
        }
        let name = value.as_str().unwrap_or_default();
        let group = Group::from_name(name)
            .map_err(|e| {
                self.invalid(
                    key,
                    format!("cannot look up the group database: {}", e.desc()),
                )
            })?
            .ok_or_else(|| {
                self.invalid(
                    key,
                    format!(
                        "unknown group {name:?}: expected an existing group name or a numeric gid"
                    ),
                )
            })?;
        Ok(Gid::as_raw(group.gid))
    }

    fn environment(&self, value: &Value) -> Result<BTreeMap<String, String>, ConfigError> {
        let table = value.as_table().ok_or_else(|| {
            self.wrong_type(
                "environment",
                r#"a table of strings, e.g. environment = { LANG = "C.UTF-8" }"#,
                value,
            )
        })?;
        table
            .iter()
            .map(|(name, value)| {
                let key = format!("environment.{name}");
                if name.is_empty() || name.contains(['=', '\0']) {
                    return Err(self.invalid(
                        &key,
                        format!("invalid variable name {name:?}: expected a non-empty name without '=' or NUL"),
                    ));
                }
                let s = self.string(&key, value, "a string value")?;
                if s.contains('\0') {
                    return Err(self.invalid(&key, "the value must not contain a NUL character"));
                }
                Ok((name.clone(), s.to_string()))
            })
            .collect()
    }

    fn signal(&self, key: &str, value: &Value) -> Result<Signal, ConfigError> {
        let expected = r#"a signal name like "SIGTERM", "TERM" or "SIGUSR2""#;
        let s = self.string(key, value, expected)?;
        let upper = s.trim().to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        match Signal::from_str(&name) {
            Ok(Signal::SIGKILL | Signal::SIGSTOP) => Err(self.invalid(
                key,
                format!("{name} cannot be caught, so it cannot stop an app gracefully: expected a signal the app handles, like \"SIGTERM\""),
            )),
            Ok(signal) => Ok(signal),
            Err(_) => Err(self.invalid(key, format!("unknown signal {s:?}: expected {expected}"))),
        }
    }

    fn duration(&self, key: &str, value: &Value, zero_ok: bool) -> Result<Duration, ConfigError> {
        let s = match value {
            Value::String(s) => s,
            Value::Integer(n) => {
                return Err(self.invalid(
                    key,
                    format!("expected a duration string like \"{n}s\", found integer {n} (durations need a unit)"),
                ));
            }
            other => {
                return Err(self.wrong_type(key, &format!("{DURATION_EXAMPLE} (a string)"), other));
            }
        };
        let d = humantime::parse_duration(s.trim()).map_err(|_| {
            self.invalid(
                key,
                format!("invalid duration {s:?}: expected {DURATION_EXAMPLE}"),
            )
        })?;
        if d.is_zero() && !zero_ok {
            return Err(self.invalid(
                key,
                format!("must be greater than zero: expected {DURATION_EXAMPLE}"),
            ));
        }
        if d > MAX_DURATION {
            return Err(self.invalid(key, format!("{s:?} is too long: expected at most 365 days")));
        }
        Ok(d)
    }

    fn positive_integer(&self, key: &str, value: &Value) -> Result<u64, ConfigError> {
        match value.as_integer() {
            Some(n) if n > 0 => Ok(n as u64),
            Some(n) => Err(self.invalid(key, format!("expected a positive integer, found {n}"))),
            None => Err(self.wrong_type(key, "a positive integer", value)),
        }
    }

    fn listen(&self, value: &Value) -> Result<Vec<ListenEntry>, ConfigError> {
        let expected =
            r#"an array of tables: [[listen]] with network = "tcp" and address = ":8080""#;
        let items = value
            .as_array()
            .ok_or_else(|| self.wrong_type("listen", expected, value))?;
        let mut entries: Vec<ListenEntry> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("listen[{i}]");
            let entry = self.listen_entry(&prefix, item)?;
            if let Some(j) = entries.iter().position(|e| e.addr == entry.addr) {
                return Err(self.invalid(
                    &prefix,
                    format!(
                        "{} is already listed as listen[{j}]: expected each address once",
                        entry.addr
                    ),
                ));
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn listen_entry(&self, prefix: &str, value: &Value) -> Result<ListenEntry, ConfigError> {
        let table = value.as_table().ok_or_else(|| {
            self.wrong_type(
                prefix,
                r#"a table with network = "tcp" and address = ":8080""#,
                value,
            )
        })?;
        self.check_keys(table, &format!("{prefix}."), LISTEN_KEYS)?;
        let key = |name: &str| format!("{prefix}.{name}");

        let network = match table.get("network") {
            Some(v) => self.string(
                &key("network"),
                v,
                "a network name like \"tcp\" or \"unix\"",
            )?,
            None => {
                return Err(self.missing(
                    &key("network"),
                    "one of tcp, tcp4, tcp6, udp, udp4, udp6, unix, unixgram, unixpacket",
                ));
            }
        };
        let address = match table.get("address") {
            Some(v) => self.string(
                &key("address"),
                v,
                r#"an address like ":8080" or "/run/app.sock""#,
            )?,
            None => {
                return Err(self.missing(
                    &key("address"),
                    r#"an address like ":8080" or "/run/app.sock""#,
                ));
            }
        };
        // The parser's messages name what it rejected: the network or the address.
        let addr = ListenAddr::parse(network, address).map_err(|e| {
            let which = if network.parse::<ally_core::net::Network>().is_err() {
                "network"
            } else {
                "address"
            };
            self.invalid(&key(which), e.to_string())
        })?;

        let mut options = ListenOptions::default();
        if let Some(v) = table.get("backlog") {
            let k = key("backlog");
            if !addr.network.is_listening() {
                return Err(self.invalid(
                    &k,
                    format!(
                        "applies only to connection-oriented networks, not {}",
                        addr.network
                    ),
                ));
            }
            let n = self.positive_integer(&k, v)?;
            let n = u32::try_from(n).map_err(|_| {
                self.invalid(
                    &k,
                    format!("{n} is too large: expected at most {}", u32::MAX),
                )
            })?;
            options.backlog = Some(n);
        }
        if let Some(v) = table.get("reuse_port") {
            options.reuse_port = v
                .as_bool()
                .ok_or_else(|| self.wrong_type(&key("reuse_port"), "true or false", v))?;
        }
        if let Some(v) = table.get("mode") {
            let k = key("mode");
            if !matches!(addr.endpoint, Endpoint::Path(_)) {
                return Err(self.invalid(
                    &k,
                    format!("applies only to filesystem unix sockets, not {addr}"),
                ));
            }
            options.mode = Some(parse_mode(v).map_err(|m| self.invalid(&k, m))?);
        }
        Ok(ListenEntry { addr, options })
    }

    fn allow_listen(&self, value: &Value) -> Result<Vec<Allowed>, ConfigError> {
        let expected =
            r#"an array of "NETWORK:ADDRESS" strings like ["tcp::443", "unix:/run/web/"]"#;
        let items = value
            .as_array()
            .ok_or_else(|| self.wrong_type("allow_listen", expected, value))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let key = format!("allow_listen[{i}]");
                let entry = self.string(&key, item, expected)?;
                Allowed::parse(entry).map_err(|m| self.invalid(&key, m))
            })
            .collect()
    }

    fn limits(&self, value: &Value) -> Result<(Limits, ConnectionLimits), ConfigError> {
        let table = value
            .as_table()
            .ok_or_else(|| self.wrong_type("limits", "a table ([limits])", value))?;
        self.check_keys(table, "limits.", LIMIT_KEYS)?;
        let mut limits = Limits::default();
        let size = |name: &str, slot: &mut u64| -> Result<(), ConfigError> {
            if let Some(v) = table.get(name) {
                *slot = parse_size(v).map_err(|m| self.invalid(&format!("limits.{name}"), m))?;
            }
            Ok(())
        };
        size("max_key_bytes", &mut limits.max_key_bytes)?;
        size("max_value_bytes", &mut limits.max_value_bytes)?;
        size("max_total_bytes", &mut limits.max_total_bytes)?;
        let count = |name: &str, slot: &mut u64| -> Result<(), ConfigError> {
            if let Some(v) = table.get(name) {
                *slot = self.positive_integer(&format!("limits.{name}"), v)?;
            }
            Ok(())
        };
        count("max_keys_per_namespace", &mut limits.max_keys_per_namespace)?;
        count(
            "max_lock_waiters_per_connection",
            &mut limits.max_lock_waiters_per_connection,
        )?;
        count(
            "max_lock_waiters_per_lock",
            &mut limits.max_lock_waiters_per_lock,
        )?;

        let mut connections = ConnectionLimits::defaults_for(&limits);
        let mut max_connections = connections.max_connections as u64;
        count("max_connections", &mut max_connections)?;
        let mut per_uid = connections.max_connections_per_uid as u64;
        count("max_connections_per_uid", &mut per_uid)?;
        let fits = |key: &str, n: u64| {
            usize::try_from(n)
                .map_err(|_| self.invalid(&format!("limits.{key}"), format!("{n} is too large")))
        };
        connections.max_connections = fits("max_connections", max_connections)?;
        connections.max_connections_per_uid = fits("max_connections_per_uid", per_uid)?;
        if let Some(v) = table.get("handshake_timeout") {
            connections.handshake_timeout = self.duration("limits.handshake_timeout", v, false)?;
        }
        size("max_message_bytes", &mut connections.max_message_bytes)?;
        let needed = largest_call(&limits);
        if connections.max_message_bytes < needed {
            return Err(self.invalid(
                "limits.max_message_bytes",
                format!(
                    "{} bytes is less than the largest call needs: {needed} bytes (2 × (max_value_bytes + max_key_bytes) + 64KiB); raise it, or lower max_value_bytes",
                    connections.max_message_bytes
                ),
            ));
        }
        let dbus_limit = ally_core::wire::MAX_MESSAGE as u64;
        if connections.max_message_bytes > dbus_limit {
            return Err(self.invalid(
                "limits.max_message_bytes",
                format!(
                    "{} bytes is more than D-Bus allows: expected at most {dbus_limit} (128MiB)",
                    connections.max_message_bytes
                ),
            ));
        }
        Ok((limits, connections))
    }
}

/// Permission bits: an integer (write `0o660` in TOML) or an octal string like `"0660"`.
fn parse_mode(value: &Value) -> Result<u32, String> {
    const EXPECTED: &str = r#"expected octal permission bits like 0o660 or "0660""#;
    let mode = match value {
        Value::Integer(n) => {
            u32::try_from(*n).map_err(|_| format!("{n} is out of range: {EXPECTED}"))?
        }
        Value::String(s) => {
            let digits = s.strip_prefix("0o").unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                return Err(format!("invalid mode {s:?}: {EXPECTED}"));
            }
            u32::from_str_radix(digits, 8).map_err(|_| format!("invalid mode {s:?}: {EXPECTED}"))?
        }
        other => return Err(format!("{EXPECTED}, found {}", describe(other))),
    };
    // Set-id and sticky bits mean nothing on a socket; refusing them also catches
    // decimal slips such as `mode = 660` (0o1224).
    if mode > 0o777 {
        return Err(format!("{mode} ({mode:#o}) is more than 0o777: {EXPECTED}"));
    }
    Ok(mode)
}

/// A byte size: a positive integer, or a string like `"512"`, `"1KiB"`, `"64 MiB"`, `"1GB"`.
fn parse_size(value: &Value) -> Result<u64, String> {
    const EXPECTED: &str = r#"expected a positive size in bytes like 1048576 or "1MiB" (units B, KiB, MiB, GiB, KB, MB, GB)"#;
    let size = match value {
        Value::Integer(n) => {
            u64::try_from(*n).map_err(|_| format!("{n} is negative: {EXPECTED}"))?
        }
        Value::String(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (number, unit) = t.split_at(split);
            let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
                "" | "b" => 1,
                "kib" => 1 << 10,
                "mib" => 1 << 20,
                "gib" => 1 << 30,
                "kb" => 1_000,
                "mb" => 1_000_000,
                "gb" => 1_000_000_000,
                _ => return Err(format!("invalid size {s:?}: {EXPECTED}")),
            };
            number
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(multiplier))
                .ok_or_else(|| format!("invalid size {s:?}: {EXPECTED}"))?
        }
        other => return Err(format!("{EXPECTED}, found {}", describe(other))),
    };
    if size == 0 {
        return Err(format!("must be greater than zero: {EXPECTED}"));
    }
    Ok(size)
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
mod tests {
    use super::*;

    const ORIGIN: &str = "/etc/ally/web.toml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(ORIGIN), None)
    }

    /// The error message for `text`, checked to be one line naming the file.
    fn error(text: &str) -> String {
        let message = parse(text)
            .expect_err("config should be refused")
            .to_string();
        assert!(message.starts_with(ORIGIN), "{message}");
        assert!(!message.contains('\n'), "{message}");
        message
    }

    fn with_command(rest: &str) -> String {
        format!("command = [\"/bin/app\"]\n{rest}")
    }

    #[test]
    fn defaults() {
        let config = Config::defaults(vec!["/bin/app".into(), "-v".into()]);
        assert_eq!(config.command, ["/bin/app", "-v"]);
        assert_eq!(config.stop_signal, Signal::SIGTERM);
        assert_eq!(config.ready_timeout, Duration::from_secs(60));
        assert_eq!(config.stop_timeout, Duration::from_secs(30));
        assert_eq!(config.restart, RestartPolicy::OnFailure);
        assert_eq!(config.restart_delay, Duration::from_secs(1));
        assert_eq!(config.max_draining, 4);
        assert_eq!(config.listener_linger, Duration::from_secs(10));
        assert!(config.listen.is_empty() && config.environment.is_empty());
        assert_eq!(
            (config.user, config.group, config.user_name.as_deref()),
            (None, None, None)
        );
        assert_eq!(config.working_directory, None);
        assert_eq!(config.limits.max_key_bytes, 1024);
        assert_eq!(config.limits.max_value_bytes, 1048576);
        assert_eq!(config.limits.max_keys_per_namespace, 100_000);
        assert_eq!(config.limits.max_total_bytes, 64 * 1024 * 1024);
        assert_eq!(config.limits.max_lock_waiters_per_connection, 128);
        assert_eq!(config.limits.max_lock_waiters_per_lock, 1024);
        assert_eq!(
            config.connections,
            ConnectionLimits {
                max_connections: 1024,
                max_connections_per_uid: 128,
                handshake_timeout: Duration::from_secs(10),
                max_message_bytes: 2 * (1048576 + 1024) + 65536,
            }
        );
        assert_eq!(config.state_busy_poll, Duration::ZERO);
        // A minimal file means the defaults.
        let file = Some(PathBuf::from(ORIGIN));
        assert_eq!(
            parse(r#"command = ["/bin/app", "-v"]"#).unwrap(),
            Config { file, ..config }
        );
        assert_eq!(Config::default_path("web"), Path::new("/etc/ally/web.toml"));
    }

    #[test]
    fn full_file() {
        let text = r#"
            command = ["/usr/bin/web", "--port", "8080"]
            working_directory = "/srv/web"
            user = "root"
            group = 0
            stop_signal = "usr2"
            ready_timeout = "1m 30s"
            stop_timeout = "500ms"
            restart = "always"
            restart_delay = "2s"
            max_draining = 2
            listener_linger = "0s"

            [environment]
            LANG = "C.UTF-8"
            "x.y" = ""

            [[listen]]
            network = "tcp4"
            address = "127.0.0.1:8080"
            backlog = 128
            reuse_port = true

            [[listen]]
            network = "unix"
            address = "/run/web/web.sock"
            mode = 0o660

            [limits]
            max_key_bytes = "1KiB"
            max_value_bytes = 4096
            max_keys_per_namespace = 10
            max_total_bytes = "64MiB"
        "#;
        let config = parse(text).unwrap();
        assert_eq!(config.command, ["/usr/bin/web", "--port", "8080"]);
        assert_eq!(
            config.working_directory.as_deref(),
            Some(Path::new("/srv/web"))
        );
        assert_eq!((config.user, config.group), (Some(0), Some(0)));
        assert_eq!(config.user_name.as_deref(), Some("root"));
        assert_eq!(config.stop_signal, Signal::SIGUSR2);
        assert_eq!(config.ready_timeout, Duration::from_secs(90));
        assert_eq!(config.stop_timeout, Duration::from_millis(500));
        assert_eq!(config.restart, RestartPolicy::Always);
        assert_eq!(config.restart_delay, Duration::from_secs(2));
        assert_eq!(config.max_draining, 2);
        assert_eq!(config.listener_linger, Duration::ZERO);
        assert_eq!(config.environment["LANG"], "C.UTF-8");
        assert_eq!(config.environment["x.y"], "");
        assert_eq!(config.listen.len(), 2);
        assert_eq!(
            config.listen[0].addr,
            ListenAddr::parse("tcp4", "127.0.0.1:8080").unwrap()
        );
        assert_eq!(
            config.listen[0].options,
            ListenOptions {
                backlog: Some(128),
                reuse_port: true,
                mode: None
            }
        );
        assert_eq!(
            config.listen[1].addr.endpoint,
            Endpoint::Path("/run/web/web.sock".into())
        );
        assert_eq!(config.listen[1].options.mode, Some(0o660));
        assert_eq!(
            config.limits,
            Limits {
                max_key_bytes: 1024,
                max_value_bytes: 4096,
                max_keys_per_namespace: 10,
                max_total_bytes: 64 << 20,
                ..Limits::default()
            }
        );
    }

    #[test]
    fn command_override_replaces_file_command() {
        let over = Some(vec!["/bin/other".to_string()]);
        let config =
            Config::parse(r#"command = ["/bin/app"]"#, Path::new(ORIGIN), over.clone()).unwrap();
        assert_eq!(config.command, ["/bin/other"]);
        // With an override the file need not name a command.
        let config = Config::parse(r#"restart = "never""#, Path::new(ORIGIN), over).unwrap();
        assert_eq!(config.command, ["/bin/other"]);
        assert_eq!(config.restart, RestartPolicy::Never);
    }

    #[test]
    fn missing_or_bad_command() {
        let m = error(r#"restart = "never""#);
        assert_eq!(
            m,
            r#"/etc/ally/web.toml: key `command` is missing: expected the program to run, e.g. command = ["/usr/bin/myapp", "--flag"]"#
        );
        let m = error("command = []");
        assert!(
            m.contains("key `command`: is empty: expected the program to run"),
            "{m}"
        );
        let m = error(r#"command = "/bin/app""#);
        assert!(
            m.contains("key `command`: expected an array of strings"),
            "{m}"
        );
        let m = error(r#"command = ["/bin/app", 3]"#);
        assert!(
            m.contains("key `command[1]`: expected a string, found integer 3"),
            "{m}"
        );
        let m = error(r#"command = [""]"#);
        assert!(
            m.contains("key `command[0]`: the program must not be empty"),
            "{m}"
        );
    }

    #[test]
    fn unknown_keys() {
        let m = error(&with_command(r#"ready_timeot = "5s""#));
        assert!(m.starts_with("/etc/ally/web.toml: unknown key `ready_timeot` (expected one of: command, working_directory, "), "{m}");
        let m = error(&with_command(
            "[[listen]]\nnetwork = \"tcp\"\naddress = \":80\"\nadress = \"x\"",
        ));
        assert!(m.contains("unknown key `listen[0].adress` (expected one of: network, address, backlog, reuse_port, mode)"), "{m}");
        let m = error(&with_command("[limits]\nmax_keys = 3"));
        assert!(
            m.contains("unknown key `limits.max_keys` (expected one of: max_key_bytes,"),
            "{m}"
        );
    }

    #[test]
    fn syntax_error_has_location() {
        let m = error("command = [\"/bin/app\"]\nrestart = \"never\"\nstop_timeout = 30s\n");
        assert!(m.starts_with("/etc/ally/web.toml:3:"), "{m}");
        assert!(m.contains(": TOML syntax error: "), "{m}");
        let m = error("command = [\"/bin/app\"]\ncommand = [\"/bin/b\"]\n");
        assert!(m.contains("TOML syntax error"), "{m}");
    }

    #[test]
    fn read_errors() {
        let m = Config::load(Path::new("/nonexistent/ally/web.toml"), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            m,
            "/nonexistent/ally/web.toml: cannot read: No such file or directory"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.toml");
        std::fs::write(&path, "command = [\"/bin/app\"]\nmax_draining = 7\n").unwrap();
        assert_eq!(Config::load(&path, None).unwrap().max_draining, 7);
        std::fs::write(&path, b"command = [\"\xff\"]").unwrap();
        let m = Config::load(&path, None).unwrap_err().to_string();
        assert!(
            m.ends_with("cannot read: the file is not valid UTF-8"),
            "{m}"
        );
    }

    #[test]
    fn names_and_values_with_line_breaks_stay_on_one_line() {
        let cases = [
            (
                "[limits]\n\"max\\nkeys\" = 3\n",
                "unknown key `limits.max\\nkeys`",
            ),
            (
                "environment = { \"A\\rB\" = 1 }\n",
                "key `environment.A\\rB`",
            ),
            (
                "[[listen]]\nnetwork = \"unixgram\"\naddress = \"@a\\nb\"\nmode = 0o600\n",
                "not unixgram @a\\nb",
            ),
        ];
        for (text, expected) in cases {
            let m = parse(&format!("command = [\"/bin/app\"]\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(m.contains(expected), "{m:?} should contain {expected:?}");
            assert!(!m.contains(['\n', '\r']), "one line: {m:?}");
        }
    }

    #[test]
    fn a_config_is_read_up_to_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.toml");
        let mut text = String::from("command = [\"/bin/app\"]\n#");
        text.push_str(&"x".repeat(MAX_CONFIG_BYTES as usize - text.len()));
        std::fs::write(&path, &text).unwrap();
        assert!(Config::load(&path, None).is_ok());
        text.push('x');
        std::fs::write(&path, &text).unwrap();
        let m = Config::load(&path, None).unwrap_err().to_string();
        assert!(m.contains("larger than 1048576 bytes (1 MiB)"), "{m}");
    }

    #[test]
    fn durations() {
        let m = error(&with_command(r#"ready_timeout = "30 parsecs""#));
        assert_eq!(
            m,
            r#"/etc/ally/web.toml: key `ready_timeout`: invalid duration "30 parsecs": expected a duration like "30s" or "1m 30s""#
        );
        let m = error(&with_command("restart_delay = 5"));
        assert!(
            m.contains(
                r#"key `restart_delay`: expected a duration string like "5s", found integer 5"#
            ),
            "{m}"
        );
        let m = error(&with_command("stop_timeout = true"));
        assert!(
            m.contains("key `stop_timeout`: expected a duration like"),
            "{m}"
        );
        assert!(m.contains("found boolean true"), "{m}");
        let m = error(&with_command(r#"stop_timeout = "0s""#));
        assert!(
            m.contains("key `stop_timeout`: must be greater than zero"),
            "{m}"
        );
        let m = error(&with_command(r#"ready_timeout = "400 years""#));
        assert!(
            m.contains("key `ready_timeout`") && m.contains("too long"),
            "{m}"
        );
        assert_eq!(
            parse(&with_command(r#"listener_linger = "1m""#))
                .unwrap()
                .listener_linger,
            Duration::from_secs(60)
        );
    }

    /// The README's example, and the packaged one with every key uncommented, are
    /// valid (but for the user, which need not exist here).
    #[test]
    fn the_documented_examples_parse() {
        let readme = include_str!("../README.md");
        let block = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a toml block in README.md");
        let without_user: String = block
            .lines()
            .filter(|l| !l.starts_with("user ="))
            .map(|l| format!("{l}\n"))
            .collect();
        let config = parse(&without_user).unwrap();
        assert_eq!(config.state_busy_poll, Duration::ZERO);
        assert_eq!(config.start_priority, StartPriority::Normal);
        assert_eq!(config.limits.max_total_bytes, 64 << 20);
        let packaged: String = include_str!("../packaging/example.toml")
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|k| k.contains(" = ") || k.starts_with('['))
                    .unwrap_or(l)
            })
            .filter(|l| !l.starts_with("user =") && !l.starts_with("group ="))
            .map(|l| format!("{l}\n"))
            .collect();
        let config = parse(&packaged).unwrap();
        assert_eq!(config.listen.len(), 1);
        assert_eq!(config.start_priority, StartPriority::Idle);
        assert_eq!(config.limits.max_keys_per_namespace, 100_000);
    }

    #[test]
    fn start_priority_is_normal_or_idle() {
        let priority = |v: &str| parse(&with_command(&format!("start_priority = {v:?}")));
        assert_eq!(
            parse(&with_command("")).unwrap().start_priority,
            StartPriority::Normal
        );
        assert_eq!(
            priority("idle").unwrap().start_priority,
            StartPriority::Idle
        );
        assert_eq!(
            priority("normal").unwrap().start_priority,
            StartPriority::Normal
        );
        let m = priority("low").unwrap_err().to_string();
        assert!(
            m.contains(
                r#"key `start_priority`: invalid start priority "low": expected "normal" or "idle""#
            ),
            "{m}"
        );
        let m = error(&with_command("start_priority = 19"));
        assert!(m.contains("key `start_priority`"), "{m}");
    }

    #[test]
    fn state_busy_poll_is_bounded_and_can_be_off() {
        let busy_poll = |v: &str| parse(&with_command(&format!("state_busy_poll = {v:?}")));
        assert_eq!(
            busy_poll("20us").unwrap().state_busy_poll,
            Duration::from_micros(20)
        );
        assert_eq!(busy_poll("0s").unwrap().state_busy_poll, Duration::ZERO);
        let m = busy_poll("5ms").unwrap_err().to_string();
        assert!(
            m.contains("key `state_busy_poll`: 5ms is too long: expected at most 1ms"),
            "{m}"
        );
        let m = busy_poll("fast").unwrap_err().to_string();
        assert!(m.contains("key `state_busy_poll`: invalid duration"), "{m}");
    }

    #[test]
    fn signals() {
        for (name, signal) in [
            ("SIGTERM", Signal::SIGTERM),
            ("TERM", Signal::SIGTERM),
            ("sigusr2", Signal::SIGUSR2),
            ("Int", Signal::SIGINT),
            ("SIGQUIT", Signal::SIGQUIT),
        ] {
            let config = parse(&with_command(&format!("stop_signal = {name:?}"))).unwrap();
            assert_eq!(config.stop_signal, signal, "{name}");
        }
        for name in ["SIGKILL", "kill", "STOP"] {
            let m = error(&with_command(&format!("stop_signal = {name:?}")));
            assert!(
                m.contains("key `stop_signal`: SIG") && m.contains("cannot be caught"),
                "{m}"
            );
        }
        let m = error(&with_command(r#"stop_signal = "SIGFOO""#));
        assert!(m.contains(r#"key `stop_signal`: unknown signal "SIGFOO": expected a signal name like "SIGTERM""#), "{m}");
        let m = error(&with_command("stop_signal = 15"));
        assert!(
            m.contains("key `stop_signal`: expected a signal name")
                && m.contains("found integer 15"),
            "{m}"
        );
    }

    #[test]
    fn restart_and_counts() {
        for policy in RestartPolicy::ALL {
            let config = parse(&with_command(&format!("restart = \"{policy}\""))).unwrap();
            assert_eq!(config.restart, policy);
        }
        let m = error(&with_command(r#"restart = "sometimes""#));
        assert!(m.contains(r#"key `restart`: invalid restart policy "sometimes": expected "on-failure", "always" or "never""#), "{m}");
        let m = error(&with_command("max_draining = 0"));
        assert!(
            m.contains("key `max_draining`: expected a positive integer, found 0"),
            "{m}"
        );
        let m = error(&with_command(r#"max_draining = "4""#));
        assert!(
            m.contains(r#"key `max_draining`: expected a positive integer, found string "4""#),
            "{m}"
        );
    }

    #[test]
    fn working_directory_and_environment() {
        let m = error(&with_command(r#"working_directory = "srv/web""#));
        assert!(
            m.contains(
                r#"key `working_directory`: "srv/web" is not absolute: expected an absolute path"#
            ),
            "{m}"
        );
        let m = error(&with_command("[environment]\n\"A=B\" = \"x\""));
        assert!(
            m.contains("key `environment.A=B`: invalid variable name \"A=B\""),
            "{m}"
        );
        let m = error(&with_command("[environment]\n\"\" = \"x\""));
        assert!(
            m.contains("key `environment.`: invalid variable name \"\""),
            "{m}"
        );
        let m = error(&with_command("[environment]\nPORT = 8080"));
        assert!(
            m.contains("key `environment.PORT`: expected a string value, found integer 8080"),
            "{m}"
        );
        let m = error(&with_command(r#"environment = ["A=B"]"#));
        assert!(
            m.contains("key `environment`: expected a table of strings"),
            "{m}"
        );
    }

    #[test]
    fn users_and_groups() {
        let config = parse(&with_command(r#"user = "root""#)).unwrap();
        assert_eq!((config.user, config.group), (Some(0), Some(0)));
        assert_eq!(config.user_name.as_deref(), Some("root"));
        let config = parse(&with_command("user = 0")).unwrap();
        assert_eq!(
            (config.user, config.group, config.user_name.as_deref()),
            (Some(0), Some(0), Some("root"))
        );
        let config = parse(&with_command(r#"user = "0""#)).unwrap();
        assert_eq!(config.user, Some(0));
        let config = parse(&with_command(r#"group = "root""#)).unwrap();
        assert_eq!((config.user, config.group), (None, Some(0)));

        let m = error(&with_command(r#"user = "no-such-user-ally""#));
        assert!(m.contains(r#"key `user`: unknown user "no-such-user-ally": expected an existing user name or a numeric uid"#), "{m}");
        let m = error(&with_command(r#"group = "no-such-group-ally""#));
        assert!(
            m.contains(r#"key `group`: unknown group "no-such-group-ally""#),
            "{m}"
        );
        let m = error(&with_command("user = -1"));
        assert!(m.contains("key `user`: id -1 is out of range"), "{m}");
        let m = error(&with_command("user = 4294967295"));
        assert!(
            m.contains("key `user`: id 4294967295 is out of range"),
            "{m}"
        );
        let m = error(&with_command("user = true"));
        assert!(
            m.contains("key `user`: expected a user name or a numeric id, found boolean true"),
            "{m}"
        );

        // A uid without a passwd entry has no primary group to fall back on.
        let m = error(&with_command("user = 3999999"));
        assert!(
            m.contains("key `user`: uid 3999999 has no entry") && m.contains("set `group` too"),
            "{m}"
        );
        let config = parse(&with_command("user = 3999999\ngroup = 3999999")).unwrap();
        assert_eq!(
            (config.user, config.group, config.user_name),
            (Some(3999999), Some(3999999), None)
        );
    }

    #[test]
    fn listen_entries() {
        let config = parse(&with_command(
            "[[listen]]\nnetwork = \"udp6\"\naddress = \"[::1]:5353\"\n[[listen]]\nnetwork = \"unix\"\naddress = \"@ally-test\"",
        ))
        .unwrap();
        assert_eq!(
            config.listen[0].addr,
            ListenAddr::parse("udp6", "[::1]:5353").unwrap()
        );
        assert_eq!(config.listen[0].options, ListenOptions::default());
        assert_eq!(
            config.listen[1].addr.endpoint,
            Endpoint::Abstract(b"ally-test".to_vec())
        );

        let listen = |body: &str| {
            error(&with_command(&format!(
                "[[listen]]\nnetwork = \"tcp\"\naddress = \":80\"\n[[listen]]\n{body}"
            )))
        };
        let m = listen("network = \"tcp\"\naddress = \"localhost\"");
        assert!(
            m.contains("key `listen[1].address`: invalid tcp address \"localhost\": missing port"),
            "{m}"
        );
        let m = listen("network = \"sctp\"\naddress = \":80\"");
        assert!(
            m.contains("key `listen[1].network`: unknown network \"sctp\": expected one of tcp,"),
            "{m}"
        );
        let m = listen("network = \"tcp\"");
        assert!(
            m.contains("key `listen[1].address` is missing: expected an address like"),
            "{m}"
        );
        let m = listen("address = \":80\"");
        assert!(
            m.contains("key `listen[1].network` is missing: expected one of tcp,"),
            "{m}"
        );
        let m = listen("network = \"tcp\"\naddress = \":80\"");
        assert!(
            m.contains("key `listen[1]`: tcp ") && m.contains("is already listed as listen[0]"),
            "{m}"
        );
        let m = listen("network = \"tcp\"\naddress = \":81\"\nbacklog = 0");
        assert!(
            m.contains("key `listen[1].backlog`: expected a positive integer, found 0"),
            "{m}"
        );
        let m = listen("network = \"tcp\"\naddress = \":81\"\nbacklog = 4294967296");
        assert!(
            m.contains("key `listen[1].backlog`: 4294967296 is too large"),
            "{m}"
        );
        let m = listen("network = \"udp\"\naddress = \":81\"\nbacklog = 10");
        assert!(
            m.contains("key `listen[1].backlog`: applies only to connection-oriented networks"),
            "{m}"
        );
        let m = listen("network = \"tcp\"\naddress = \":81\"\nreuse_port = \"yes\"");
        assert!(
            m.contains("key `listen[1].reuse_port`: expected true or false, found string \"yes\""),
            "{m}"
        );
        let m = listen("network = \"tcp\"\naddress = \":81\"\nmode = 0o660");
        assert!(
            m.contains("key `listen[1].mode`: applies only to filesystem unix sockets"),
            "{m}"
        );
        let m = error(&with_command("[listen]\nnetwork = \"tcp\""));
        assert!(
            m.contains("key `listen`: expected an array of tables: [[listen]]"),
            "{m}"
        );
    }

    #[test]
    fn allow_listen_entries() {
        let config = parse(&with_command(
            r#"allow_listen = ["tcp::443", "tcp:127.0.0.1:81", "unix:/run/web/"]"#,
        ))
        .unwrap();
        assert_eq!(
            config.allow_listen,
            vec![
                Allowed::parse("tcp::443").unwrap(),
                Allowed::parse("tcp:127.0.0.1:81").unwrap(),
                Allowed::parse("unix:/run/web/").unwrap(),
            ]
        );
        assert_eq!(config.file.as_deref(), Some(Path::new(ORIGIN)));
        let m = error(&with_command(r#"allow_listen = "tcp::443""#));
        assert!(
            m.contains("key `allow_listen`: expected an array of \"NETWORK:ADDRESS\" strings"),
            "{m}"
        );
        let m = error(&with_command(r#"allow_listen = ["tcp::443", 443]"#));
        assert!(
            m.contains("key `allow_listen[1]`: expected an array of"),
            "{m}"
        );
        let m = error(&with_command(r#"allow_listen = ["tcp:443"]"#));
        assert!(
            m.contains("key `allow_listen[0]`: invalid tcp address \"443\": missing port"),
            "{m}"
        );
        let m = error(&with_command(r#"allow_listen = ["unix:/run/../etc/"]"#));
        assert!(
            m.contains("key `allow_listen[0]`: ") && m.contains("`..`"),
            "{m}"
        );
        let m = error(&with_command(r#"allow_listen = [":443"]"#));
        assert!(
            m.contains("key `allow_listen[0]`: unknown network \"\""),
            "{m}"
        );
    }

    #[test]
    fn modes() {
        for (text, mode) in [
            ("0o660", 0o660),
            ("\"0660\"", 0o660),
            ("\"660\"", 0o660),
            ("\"0o600\"", 0o600),
            ("0o777", 0o777),
            ("0", 0),
        ] {
            let config = parse(&with_command(&format!(
                "[[listen]]\nnetwork = \"unix\"\naddress = \"/run/ally-test.sock\"\nmode = {text}"
            )))
            .unwrap();
            assert_eq!(config.listen[0].options.mode, Some(mode), "{text}");
        }
        for (text, expect) in [
            ("660", "660 (0o1224) is more than 0o777"),
            ("0o1777", "1023 (0o1777) is more than 0o777"),
            ("\"0689\"", "invalid mode \"0689\""),
            ("\"\"", "invalid mode \"\""),
            ("-1", "-1 is out of range"),
            ("true", "found boolean true"),
        ] {
            let m = error(&with_command(&format!(
                "[[listen]]\nnetwork = \"unix\"\naddress = \"/run/ally-test.sock\"\nmode = {text}"
            )));
            assert!(
                m.contains("key `listen[0].mode`: ") && m.contains(expect),
                "{m}"
            );
            assert!(
                m.contains("expected octal permission bits like 0o660 or \"0660\""),
                "{m}"
            );
        }
    }

    #[test]
    fn sizes() {
        let size = |s: &str| {
            parse_size(
                &s.parse::<Value>()
                    .unwrap_or_else(|_| Value::String(s.into())),
            )
        };
        assert_eq!(parse_size(&Value::Integer(512)), Ok(512));
        assert_eq!(size("512"), Ok(512));
        assert_eq!(size("512B"), Ok(512));
        assert_eq!(size("1KiB"), Ok(1024));
        assert_eq!(size("64MiB"), Ok(64 << 20));
        assert_eq!(size("64 MiB"), Ok(64 << 20));
        assert_eq!(size("2GiB"), Ok(2 << 30));
        assert_eq!(size("1KB"), Ok(1000));
        assert_eq!(size("3MB"), Ok(3_000_000));
        assert_eq!(size("1gb"), Ok(1_000_000_000));
        for bad in [
            "",
            "KiB",
            "1.5MiB",
            "12 parsecs",
            "-5",
            "0",
            "0KiB",
            "99999999999999999999GiB",
        ] {
            assert!(size(bad).is_err(), "{bad:?}");
        }
        assert!(parse_size(&Value::Integer(-1)).is_err());
        assert!(parse_size(&Value::Integer(0)).is_err());

        let m = error(&with_command("[limits]\nmax_value_bytes = \"lots\""));
        assert!(m.contains("key `limits.max_value_bytes`: invalid size \"lots\": expected a positive size in bytes"), "{m}");
        let m = error(&with_command("[limits]\nmax_keys_per_namespace = \"10k\""));
        assert!(
            m.contains("key `limits.max_keys_per_namespace`: expected a positive integer"),
            "{m}"
        );
        let m = error(&with_command("limits = 5"));
        assert!(
            m.contains("key `limits`: expected a table ([limits]), found integer 5"),
            "{m}"
        );
    }

    #[test]
    fn connection_and_lock_waiter_limits() {
        let config = parse(&with_command(
            "[limits]\nmax_connections = 64\nmax_connections_per_uid = 8\nhandshake_timeout = \"1s\"\nmax_lock_waiters_per_connection = 3\nmax_lock_waiters_per_lock = 5\nmax_value_bytes = \"1KiB\"",
        ))
        .unwrap();
        assert_eq!(
            config.connections,
            ConnectionLimits {
                max_connections: 64,
                max_connections_per_uid: 8,
                handshake_timeout: Duration::from_secs(1),
                max_message_bytes: 2 * (1024 + 1024) + 65536,
            },
            "max_message_bytes follows max_value_bytes unless it is set"
        );
        assert_eq!(
            (
                config.limits.max_lock_waiters_per_connection,
                config.limits.max_lock_waiters_per_lock
            ),
            (3, 5)
        );
        let config = parse(&with_command("[limits]\nmax_message_bytes = \"4MiB\"")).unwrap();
        assert_eq!(config.connections.max_message_bytes, 4 << 20);

        let m = error(&with_command("[limits]\nmax_message_bytes = \"1MiB\""));
        assert!(
            m.contains("key `limits.max_message_bytes`: 1048576 bytes is less than the largest call needs: 2164736 bytes"),
            "{m}"
        );
        let m = error(&with_command("[limits]\nmax_message_bytes = \"1GiB\""));
        assert!(m.contains("more than D-Bus allows"), "{m}");
        let m = error(&with_command("[limits]\nmax_connections = 0"));
        assert!(
            m.contains("key `limits.max_connections`: expected a positive integer, found 0"),
            "{m}"
        );
        let m = error(&with_command("[limits]\nhandshake_timeout = 10"));
        assert!(m.contains("key `limits.handshake_timeout`"), "{m}");
        let m = error(&with_command("[limits]\nmax_lock_waiters_per_lock = -1"));
        assert!(m.contains("key `limits.max_lock_waiters_per_lock`"), "{m}");
    }

    #[test]
    fn app_names() {
        for good in [
            "web",
            "my-app",
            "my_app",
            "a.b-c",
            "App2",
            "x",
            &"a".repeat(64),
        ] {
            assert_eq!(validate_app_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".web",
            "-web",
            "web.",
            "a..b",
            "2web",
            "a.2b",
            "we b",
            "we/b",
            "wéb",
            "a:b",
            &"a".repeat(65),
        ] {
            let m = validate_app_name(bad).expect_err(bad);
            assert!(m.starts_with("invalid app name"), "{m}");
        }
    }

    #[test]
    fn error_display_forms() {
        let syntax = ConfigError::Syntax {
            path: ORIGIN.into(),
            location: None,
            message: "oops".into(),
        };
        assert_eq!(
            syntax.to_string(),
            "/etc/ally/web.toml: TOML syntax error: oops"
        );
        assert_eq!(syntax.path(), Path::new(ORIGIN));
    }
}
