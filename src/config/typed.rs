//! From the raw document to the [`Config`]: what each value means, and the
//! checks that need several keys at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ally_core::net::{Endpoint, ListenAddr, ListenOptions};
use nix::sys::signal::Signal;
use toml::Spanned;

use super::error::{ConfigError, Location, line_column};
use super::raw::{
    self, COMMAND_EXAMPLE, DURATION_EXAMPLE, DurationText, Expected, IntOrText, MODE_EXPECTED,
    RawConfig, RawLimits, SIZE_EXPECTED, Scalar,
};
use super::{
    Config, ConnectionLimits, Limits, ListenEntry, Located, MAX_DURATION, MAX_STATE_BUSY_POLL,
    MAX_WATCH_PATHS, Principal, Readiness, Sockets, Watch, largest_call,
};
use crate::listen_policy::Allowed;

/// The keys of [`Cx::activation`], taken out of the document first.
struct RawActivation {
    sockets: Option<Spanned<raw::Text<raw::SocketsName>>>,
    ready: Option<Spanned<raw::Text<raw::ReadyName>>>,
    ready_delay: Option<Spanned<DurationText>>,
    ready_probe: Option<Spanned<raw::Command>>,
    watchdog: Option<Spanned<DurationText>>,
}

/// Validation context: the file errors are reported against, and its text,
/// for line and column.
pub(super) struct Cx<'a> {
    pub text: &'a str,
    pub origin: &'a Path,
}

impl Cx<'_> {
    fn at<T>(&self, value: &Spanned<T>) -> Location {
        Some(line_column(self.text, value.span().start))
    }

    fn invalid<T>(&self, key: &str, at: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.to_path_buf(),
            location: self.at(at),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// Checks `raw`; a non-empty `command_override` replaces the file's `command`.
    pub fn config(
        &self,
        raw: RawConfig,
        command_override: Option<Vec<String>>,
    ) -> Result<Config, ConfigError> {
        let raw_activation = RawActivation {
            sockets: raw.sockets,
            ready: raw.ready,
            ready_delay: raw.ready_delay,
            ready_probe: raw.ready_probe,
            watchdog: raw.watchdog,
        };
        let file_command = raw.command.map(|v| self.command(&v)).transpose()?;
        let command = match command_override.filter(|c| !c.is_empty()) {
            Some(command) => command,
            None => file_command.ok_or_else(|| ConfigError::Missing {
                path: self.origin.to_path_buf(),
                location: None,
                key: "command".into(),
                expected: COMMAND_EXAMPLE.into(),
            })?,
        };
        let mut config = Config::defaults(command);
        config.file = Some(self.origin.to_path_buf());
        if let Some(v) = raw.working_directory {
            config.working_directory = Some(self.working_directory(&v)?);
        }
        config.group = raw
            .group
            .map(|v| self.principal("group", &v, "group"))
            .transpose()?;
        config.user = raw
            .user
            .map(|v| self.principal("user", &v, "user"))
            .transpose()?;
        if let Some(v) = raw.environment {
            config.environment = self.environment(v)?;
        }
        if let Some(v) = raw.stop_signal {
            config.stop_signal = self.signal("stop_signal", &v)?;
        }
        if let Some(v) = raw.ready_timeout {
            config.ready_timeout = self.duration("ready_timeout", &v, false)?;
        }
        if let Some(v) = raw.stop_timeout {
            config.stop_timeout = self.duration("stop_timeout", &v, false)?;
        }
        if let Some(v) = raw.restart {
            config.restart = v
                .get_ref()
                .0
                .parse()
                .map_err(|e| self.invalid("restart", &v, e))?;
        }
        if let Some(v) = raw.restart_delay {
            // Zero would make the back-off a busy loop.
            config.restart_delay = self.duration("restart_delay", &v, false)?;
        }
        if let Some(v) = raw.max_draining {
            let n = v.get_ref().0;
            config.max_draining = usize::try_from(n)
                .map_err(|_| self.invalid("max_draining", &v, format!("{n} is too large")))?;
        }
        if let Some(v) = raw.listener_linger {
            config.listener_linger = self.duration("listener_linger", &v, true)?;
        }
        if let Some(v) = raw.listen {
            config.listen = self.listen(v.into_inner().0)?;
        }
        if let Some(v) = raw.allow_listen {
            config.allow_listen = self.allow_listen(&v.get_ref().0)?;
        }
        if let Some(v) = raw.limits {
            (config.limits, config.connections) = self.limits(&v.get_ref().0)?;
        }
        if let Some(v) = raw.state_busy_poll {
            let d = self.duration("state_busy_poll", &v, true)?;
            if d > MAX_STATE_BUSY_POLL {
                return Err(self.invalid(
                    "state_busy_poll",
                    &v,
                    format!(
                        "{} is too long: expected at most 1ms (\"0s\" turns polling off)",
                        humantime::format_duration(d)
                    ),
                ));
            }
            config.state_busy_poll = d;
        }
        if let Some(v) = raw.start_priority {
            config.start_priority = v
                .get_ref()
                .0
                .parse()
                .map_err(|e| self.invalid("start_priority", &v, e))?;
        }
        for (key, value, output) in [
            ("stdout", &raw.stdout, &mut config.stdout),
            ("stderr", &raw.stderr, &mut config.stderr),
        ] {
            if let Some(v) = value {
                *output = v.get_ref().0.parse().map_err(|e| self.invalid(key, v, e))?;
            }
        }
        if let Some(v) = raw.drain_idle {
            let d = self.duration("drain_idle", &v, false)?;
            if d > config.stop_timeout {
                return Err(self.invalid(
                    "drain_idle",
                    &v,
                    format!(
                        "{} is longer than stop_timeout ({}): an instance would be killed before an idle connection could be closed; expected at most stop_timeout",
                        humantime::format_duration(d),
                        humantime::format_duration(config.stop_timeout)
                    ),
                ));
            }
            config.drain_idle = d;
        }
        if let Some(v) = raw.history {
            let n = v.get_ref().0;
            config.history = usize::try_from(n)
                .ok()
                .filter(|&n| n <= crate::history::MAX_HISTORY)
                .ok_or_else(|| {
                    self.invalid(
                        "history",
                        &v,
                        format!(
                            "{n} is too large: expected at most {} reloads and restarts kept",
                            crate::history::MAX_HISTORY
                        ),
                    )
                })?;
        }
        if let Some(v) = raw.metrics_address {
            config.metrics_address = Some(self.metrics_address(&v)?);
        }
        self.activation(&raw_activation, &mut config)?;
        if let Some(v) = raw.check {
            config.check = Some(self.command_at("check", &v)?);
        }
        if let Some(v) = raw.check_timeout {
            config.check_timeout = self.duration("check_timeout", &v, false)?;
        }
        if let Some(v) = raw.watch {
            config.watch = self.watch(&v)?;
        }
        Ok(config)
    }

    /// `metrics_address`: an IP address and port, no host name (nothing to
    /// resolve) and no path (nothing to follow).
    fn metrics_address(
        &self,
        v: &Spanned<raw::Text<raw::MetricsAddress>>,
    ) -> Result<std::net::SocketAddr, ConfigError> {
        let text = v.get_ref().0.trim();
        let addr: std::net::SocketAddr = text.parse().map_err(|_| {
            self.invalid(
                "metrics_address",
                v,
                format!(
                    "{text:?} is not an IP address and port: expected a TCP address like \"127.0.0.1:9102\" or \"[::1]:9102\""
                ),
            )
        })?;
        if addr.port() == 0 {
            return Err(self.invalid(
                "metrics_address",
                v,
                format!("{text:?} has port 0: expected a fixed port, like \"127.0.0.1:9102\""),
            ));
        }
        Ok(addr)
    }

    /// `sockets`, `ready` with `ready_delay` / `ready_probe`, and `watchdog`:
    /// for apps that were not written for Ally.
    fn activation(&self, raw: &RawActivation, config: &mut Config) -> Result<(), ConfigError> {
        if let Some(v) = &raw.sockets {
            config.sockets = v
                .get_ref()
                .0
                .parse()
                .map_err(|e| self.invalid("sockets", v, e))?;
            if config.sockets == Sockets::ListenFds && config.listen.is_empty() {
                return Err(self.invalid(
                    "sockets",
                    v,
                    "\"listen-fds\" passes the [[listen]] sockets, and there is none: expected at least one [[listen]] entry",
                ));
            }
        }
        let only_with = |key: &str, at: &dyn Fn() -> Location, mode: &str| ConfigError::Invalid {
            path: self.origin.to_path_buf(),
            location: at(),
            key: key.to_string(),
            message: format!(
                "is read only with ready = \"{mode}\": expected ready = \"{mode}\" or no {key}"
            ),
        };
        let name = raw.ready.as_ref().map(|v| (v.get_ref().0.as_str(), v));
        config.ready = match name {
            None | Some(("dbus", _)) => Readiness::Dbus,
            Some(("notify", _)) => Readiness::Notify,
            Some(("delay", v)) => {
                let d = raw.ready_delay.as_ref().ok_or_else(|| ConfigError::Missing {
                    path: self.origin.to_path_buf(),
                    location: self.at(v),
                    key: "ready_delay".into(),
                    expected: format!("how long an instance must run before it counts as ready: {DURATION_EXAMPLE}"),
                })?;
                let delay = self.duration("ready_delay", d, false)?;
                if delay >= config.ready_timeout {
                    return Err(self.invalid(
                        "ready_delay",
                        d,
                        format!(
                            "{} is not shorter than ready_timeout ({}): expected a delay shorter than ready_timeout",
                            humantime::format_duration(delay),
                            humantime::format_duration(config.ready_timeout)
                        ),
                    ));
                }
                Readiness::Delay(delay)
            }
            Some(("probe", v)) => {
                let p = raw.ready_probe.as_ref().ok_or_else(|| ConfigError::Missing {
                    path: self.origin.to_path_buf(),
                    location: self.at(v),
                    key: "ready_probe".into(),
                    expected: r#"the command that exits 0 once the app serves, e.g. ready_probe = ["curl", "-fsS", "http://127.0.0.1:8080/healthz"]"#.into(),
                })?;
                Readiness::Probe(self.command_at("ready_probe", p)?)
            }
            Some((other, v)) => {
                return Err(self.invalid(
                    "ready",
                    v,
                    format!(
                        r#"invalid ready {other:?}: expected "dbus", "notify", "delay" or "probe""#
                    ),
                ));
            }
        };
        if let Some(d) = &raw.ready_delay
            && !matches!(config.ready, Readiness::Delay(_))
        {
            return Err(only_with("ready_delay", &|| self.at(d), "delay"));
        }
        if let Some(p) = &raw.ready_probe
            && !matches!(config.ready, Readiness::Probe(_))
        {
            return Err(only_with("ready_probe", &|| self.at(p), "probe"));
        }
        if let Some(v) = &raw.watchdog {
            if config.ready != Readiness::Notify {
                return Err(only_with("watchdog", &|| self.at(v), "notify"));
            }
            config.watchdog = Some(self.duration("watchdog", v, false)?);
        }
        Ok(())
    }

    fn command(&self, value: &Spanned<raw::Command>) -> Result<Vec<String>, ConfigError> {
        self.command_at("command", value)
    }

    fn command_at(
        &self,
        name: &str,
        value: &Spanned<raw::Command>,
    ) -> Result<Vec<String>, ConfigError> {
        let items = &value.get_ref().0;
        if items.is_empty() {
            return Err(self.invalid(name, value, format!("is empty: expected {COMMAND_EXAMPLE}")));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let key = format!("{name}[{i}]");
                let s = &item.get_ref().0;
                if s.contains('\0') {
                    return Err(self.invalid(&key, item, "must not contain a NUL character"));
                }
                if i == 0 && s.is_empty() {
                    return Err(self.invalid(&key, item, "the program must not be empty"));
                }
                Ok(s.clone())
            })
            .collect()
    }

    fn watch(&self, value: &Spanned<raw::WatchValue>) -> Result<Watch, ConfigError> {
        let items = match value.get_ref() {
            raw::WatchValue::Switch(false) => return Ok(Watch::Off),
            raw::WatchValue::Switch(true) => return Ok(Watch::Command),
            raw::WatchValue::Paths(items) => items,
        };
        if items.is_empty() {
            return Err(self.invalid(
                "watch",
                value,
                format!("is empty: expected {}", raw::WATCH_EXPECTED),
            ));
        }
        if items.len() > MAX_WATCH_PATHS {
            return Err(self.invalid(
                "watch",
                value,
                format!(
                    "has {} paths: expected at most {MAX_WATCH_PATHS}",
                    items.len()
                ),
            ));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let key = format!("watch[{i}]");
                let s = &item.get_ref().0;
                if s.contains('\0') {
                    return Err(self.invalid(&key, item, "must not contain a NUL character"));
                }
                if !Path::new(s).is_absolute() {
                    return Err(self.invalid(
                        &key,
                        item,
                        format!("{s:?} is not absolute: expected an absolute path"),
                    ));
                }
                Ok(PathBuf::from(s))
            })
            .collect::<Result<_, _>>()
            .map(Watch::Paths)
    }

    fn working_directory(
        &self,
        value: &Spanned<raw::Text<raw::AbsolutePath>>,
    ) -> Result<PathBuf, ConfigError> {
        let key = "working_directory";
        let s = &value.get_ref().0;
        if s.contains('\0') {
            return Err(self.invalid(key, value, "must not contain a NUL character"));
        }
        if !Path::new(s).is_absolute() {
            return Err(self.invalid(
                key,
                value,
                format!("{s:?} is not absolute: expected an absolute path"),
            ));
        }
        Ok(PathBuf::from(s))
    }

    /// A numeric id, given as an integer or a string of digits, or a name, looked
    /// up when the broker starts.
    fn principal<E: Expected>(
        &self,
        key: &str,
        value: &Spanned<IntOrText<E>>,
        what: &str,
    ) -> Result<Located<Principal>, ConfigError> {
        let expected = E::TEXT;
        let out_of_range = |n: &dyn std::fmt::Display| {
            self.invalid(
                key,
                value,
                format!("id {n} is out of range: expected {expected}"),
            )
        };
        let principal = match &value.get_ref().0 {
            // u32::MAX is (uid_t)-1, which means "no change" to setuid and friends.
            Scalar::Int(n) => match u32::try_from(*n) {
                Ok(id) if id != u32::MAX => Principal::Id(id),
                _ => return Err(out_of_range(n)),
            },
            Scalar::Text(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                match s.parse::<u32>() {
                    Ok(id) if id != u32::MAX => Principal::Id(id),
                    _ => return Err(out_of_range(s)),
                }
            }
            Scalar::Text(s) if !s.is_empty() && !s.contains('\0') => Principal::Name(s.clone()),
            Scalar::Text(s) => {
                return Err(self.invalid(
                    key,
                    value,
                    format!("invalid {what} name {s:?}: expected {expected}"),
                ));
            }
        };
        Ok(Located {
            value: principal,
            location: self.at(value),
        })
    }

    fn environment(
        &self,
        value: Spanned<raw::Environment>,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        value
            .into_inner()
            .0
            .into_iter()
            .map(|(name, value)| {
                let key = format!("environment.{name}");
                if name.is_empty() || name.contains(['=', '\0']) {
                    return Err(self.invalid(
                        &key,
                        &value,
                        format!("invalid variable name {name:?}: expected a non-empty name without '=' or NUL"),
                    ));
                }
                if value.get_ref().0.contains('\0') {
                    return Err(self.invalid(
                        &key,
                        &value,
                        "the value must not contain a NUL character",
                    ));
                }
                Ok((name, value.into_inner().0))
            })
            .collect()
    }

    fn signal(
        &self,
        key: &str,
        value: &Spanned<raw::Text<raw::SignalName>>,
    ) -> Result<Signal, ConfigError> {
        let s = &value.get_ref().0;
        let upper = s.trim().to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        match Signal::from_str(&name) {
            Ok(Signal::SIGKILL | Signal::SIGSTOP) => Err(self.invalid(
                key,
                value,
                format!("{name} cannot be caught, so it cannot stop an app gracefully: expected a signal the app handles, like \"SIGTERM\""),
            )),
            Ok(signal) => Ok(signal),
            Err(_) => Err(self.invalid(
                key,
                value,
                format!("unknown signal {s:?}: expected {}", raw::SignalName::TEXT),
            )),
        }
    }

    fn duration(
        &self,
        key: &str,
        value: &Spanned<DurationText>,
        zero_ok: bool,
    ) -> Result<Duration, ConfigError> {
        let s = &value.get_ref().0;
        let d = humantime::parse_duration(s.trim()).map_err(|_| {
            self.invalid(
                key,
                value,
                format!("invalid duration {s:?}: expected {DURATION_EXAMPLE}"),
            )
        })?;
        if d.is_zero() && !zero_ok {
            return Err(self.invalid(
                key,
                value,
                format!("must be greater than zero: expected {DURATION_EXAMPLE}"),
            ));
        }
        if d > MAX_DURATION {
            return Err(self.invalid(
                key,
                value,
                format!("{s:?} is too long: expected at most 365 days"),
            ));
        }
        Ok(d)
    }

    fn listen(
        &self,
        items: Vec<Spanned<raw::ListenItem>>,
    ) -> Result<Vec<ListenEntry>, ConfigError> {
        let mut entries: Vec<ListenEntry> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("listen[{i}]");
            let entry = self.listen_entry(&prefix, item)?;
            if let Some(j) = entries.iter().position(|e| e.addr == entry.addr) {
                return Err(self.invalid(
                    &prefix,
                    item,
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

    fn listen_entry(
        &self,
        prefix: &str,
        item: &Spanned<raw::ListenItem>,
    ) -> Result<ListenEntry, ConfigError> {
        let table = &item.get_ref().0;
        let key = |name: &str| format!("{prefix}.{name}");
        let missing = |name: &str, expected: &str| ConfigError::Missing {
            path: self.origin.to_path_buf(),
            location: self.at(item),
            key: key(name),
            expected: expected.to_string(),
        };
        let network = table
            .network
            .as_ref()
            .ok_or_else(|| missing("network", raw::NETWORKS))?;
        let address = table
            .address
            .as_ref()
            .ok_or_else(|| missing("address", raw::ADDRESS_EXAMPLE))?;
        // The parser's messages name what it rejected: the network or the address.
        let addr = ListenAddr::parse(&network.get_ref().0, &address.get_ref().0).map_err(|e| {
            if network
                .get_ref()
                .0
                .parse::<ally_core::net::Network>()
                .is_err()
            {
                self.invalid(&key("network"), network, e.to_string())
            } else {
                self.invalid(&key("address"), address, e.to_string())
            }
        })?;

        let mut options = ListenOptions::default();
        if let Some(v) = &table.backlog {
            let k = key("backlog");
            if !addr.network.is_listening() {
                return Err(self.invalid(
                    &k,
                    v,
                    format!(
                        "applies only to connection-oriented networks, not {}",
                        addr.network
                    ),
                ));
            }
            let n = v.get_ref().0;
            let n = u32::try_from(n).map_err(|_| {
                self.invalid(
                    &k,
                    v,
                    format!("{n} is too large: expected at most {}", u32::MAX),
                )
            })?;
            options.backlog = Some(n);
        }
        if let Some(v) = &table.reuse_port {
            options.reuse_port = v.get_ref().0;
        }
        if let Some(v) = &table.mode {
            let k = key("mode");
            if !matches!(addr.endpoint, Endpoint::Path(_)) {
                return Err(self.invalid(
                    &k,
                    v,
                    format!("applies only to filesystem unix sockets, not {addr}"),
                ));
            }
            options.mode = Some(parse_mode(&v.get_ref().0).map_err(|m| self.invalid(&k, v, m))?);
        }
        let name = match &table.name {
            Some(v) => {
                let s = &v.get_ref().0;
                super::check_fd_name(s).map_err(|m| self.invalid(&key("name"), v, m))?;
                Some(s.clone())
            }
            None => None,
        };
        Ok(ListenEntry {
            addr,
            options,
            name,
        })
    }

    fn allow_listen(
        &self,
        items: &[Spanned<raw::Text<raw::AllowEntry>>],
    ) -> Result<Vec<Allowed>, ConfigError> {
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                Allowed::parse(&item.get_ref().0)
                    .map_err(|m| self.invalid(&format!("allow_listen[{i}]"), item, m))
            })
            .collect()
    }

    fn limits(&self, raw: &RawLimits) -> Result<(Limits, ConnectionLimits), ConfigError> {
        let mut limits = Limits::default();
        let size = |name: &str, value: &Option<Spanned<IntOrText<raw::Size>>>, slot: &mut u64| {
            if let Some(v) = value {
                *slot = parse_size(&v.get_ref().0)
                    .map_err(|m| self.invalid(&format!("limits.{name}"), v, m))?;
            }
            Ok::<(), ConfigError>(())
        };
        let count = |value: &Option<Spanned<raw::Integer>>, slot: &mut u64| {
            if let Some(v) = value {
                *slot = v.get_ref().0;
            }
        };
        size(
            "max_key_bytes",
            &raw.max_key_bytes,
            &mut limits.max_key_bytes,
        )?;
        size(
            "max_value_bytes",
            &raw.max_value_bytes,
            &mut limits.max_value_bytes,
        )?;
        size(
            "max_total_bytes",
            &raw.max_total_bytes,
            &mut limits.max_total_bytes,
        )?;
        count(
            &raw.max_keys_per_namespace,
            &mut limits.max_keys_per_namespace,
        );
        count(
            &raw.max_lock_waiters_per_connection,
            &mut limits.max_lock_waiters_per_connection,
        );
        count(
            &raw.max_lock_waiters_per_lock,
            &mut limits.max_lock_waiters_per_lock,
        );

        let mut connections = ConnectionLimits::defaults_for(&limits);
        let fits = |key: &str, value: &Option<Spanned<raw::Integer>>, slot: &mut usize| {
            if let Some(v) = value {
                let n = v.get_ref().0;
                *slot = usize::try_from(n).map_err(|_| {
                    self.invalid(&format!("limits.{key}"), v, format!("{n} is too large"))
                })?;
            }
            Ok::<(), ConfigError>(())
        };
        fits(
            "max_connections",
            &raw.max_connections,
            &mut connections.max_connections,
        )?;
        fits(
            "max_connections_per_uid",
            &raw.max_connections_per_uid,
            &mut connections.max_connections_per_uid,
        )?;
        if let Some(v) = &raw.handshake_timeout {
            connections.handshake_timeout = self.duration("limits.handshake_timeout", v, false)?;
        }
        size(
            "max_message_bytes",
            &raw.max_message_bytes,
            &mut connections.max_message_bytes,
        )?;
        let bad_message_bytes = |message: String| match &raw.max_message_bytes {
            Some(v) => self.invalid("limits.max_message_bytes", v, message),
            // Too small for the defaults only because max_value_bytes grew.
            None => ConfigError::Invalid {
                path: self.origin.to_path_buf(),
                location: None,
                key: "limits.max_message_bytes".into(),
                message,
            },
        };
        let needed = largest_call(&limits);
        if connections.max_message_bytes < needed {
            return Err(bad_message_bytes(format!(
                "{} bytes is less than the largest call needs: {needed} bytes (2 × (max_value_bytes + max_key_bytes) + 64KiB); raise it, or lower max_value_bytes",
                connections.max_message_bytes
            )));
        }
        let dbus_limit = ally_core::wire::MAX_MESSAGE as u64;
        if connections.max_message_bytes > dbus_limit {
            return Err(bad_message_bytes(format!(
                "{} bytes is more than D-Bus allows: expected at most {dbus_limit} (128MiB)",
                connections.max_message_bytes
            )));
        }
        Ok((limits, connections))
    }
}

/// Permission bits: an integer (write `0o660` in TOML) or an octal string like `"0660"`.
pub(super) fn parse_mode(value: &Scalar) -> Result<u32, String> {
    let mode = match value {
        Scalar::Int(n) => u32::try_from(*n)
            .map_err(|_| format!("{n} is out of range: expected {MODE_EXPECTED}"))?,
        Scalar::Text(s) => {
            let digits = s.strip_prefix("0o").unwrap_or(s);
            let invalid = || format!("invalid mode {s:?}: expected {MODE_EXPECTED}");
            if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                return Err(invalid());
            }
            u32::from_str_radix(digits, 8).map_err(|_| invalid())?
        }
    };
    // Set-id and sticky bits mean nothing on a socket; refusing them also catches
    // decimal slips such as `mode = 660` (0o1224).
    if mode > 0o777 {
        return Err(format!(
            "{mode} ({mode:#o}) is more than 0o777: expected {MODE_EXPECTED}"
        ));
    }
    Ok(mode)
}

/// A byte size: a positive integer, or a string like `"512"`, `"1KiB"`, `"64 MiB"`, `"1GB"`.
pub(super) fn parse_size(value: &Scalar) -> Result<u64, String> {
    let size = match value {
        Scalar::Int(n) => {
            u64::try_from(*n).map_err(|_| format!("{n} is negative: expected {SIZE_EXPECTED}"))?
        }
        Scalar::Text(s) => {
            let invalid = || format!("invalid size {s:?}: expected {SIZE_EXPECTED}");
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
                _ => return Err(invalid()),
            };
            number
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(multiplier))
                .ok_or_else(invalid)?
        }
    };
    if size == 0 {
        return Err(format!(
            "must be greater than zero: expected {SIZE_EXPECTED}"
        ));
    }
    Ok(size)
}
