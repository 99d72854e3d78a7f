//! What re-reading the config at a reload changes: which keys apply to the
//! generations started from then on, which keep their old value until the
//! broker restarts, and what becomes of the `[[listen]]` sockets. Pure: the
//! broker (`crate::broker`) binds, unpins and logs.

use ally_core::net::ListenAddr;

use super::{Config, ListenEntry};

/// How a re-read config differs from the one the broker runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Changed keys that apply to the new generation and to later restarts.
    pub applied: Vec<&'static str>,
    /// Changed keys the broker fixed when it started (the state stores' and its
    /// own sockets' limits): they keep their old value until it restarts.
    pub on_restart: Vec<&'static str>,
    /// `[[listen]]` entries to bind before the new generation starts.
    pub listen_added: Vec<ListenEntry>,
    /// `[[listen]]` entries gone: their sockets are no longer kept for the
    /// broker's life, and close once no instance used them for `listener_linger`.
    pub listen_removed: Vec<ListenAddr>,
    /// Same address, other options (`backlog`, `reuse_port`, `mode`): the socket
    /// stays open as it was bound, since closing it would refuse connections.
    pub listen_reoptioned: Vec<ListenAddr>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// What changes from `old` to `new`.
pub fn between(old: &Config, new: &Config) -> Changes {
    let mut changes = Changes::default();
    let mut key = |name: &'static str, changed: bool| {
        if changed {
            changes.applied.push(name);
        }
    };
    key("command", old.command != new.command);
    key(
        "working_directory",
        old.working_directory != new.working_directory,
    );
    key(
        "user",
        old.user.as_ref().map(|u| &u.value) != new.user.as_ref().map(|u| &u.value),
    );
    key(
        "group",
        old.group.as_ref().map(|g| &g.value) != new.group.as_ref().map(|g| &g.value),
    );
    key("environment", old.environment != new.environment);
    key("stop_signal", old.stop_signal != new.stop_signal);
    key("ready_timeout", old.ready_timeout != new.ready_timeout);
    key("stop_timeout", old.stop_timeout != new.stop_timeout);
    key("restart", old.restart != new.restart);
    key("restart_delay", old.restart_delay != new.restart_delay);
    key("max_draining", old.max_draining != new.max_draining);
    key(
        "listener_linger",
        old.listener_linger != new.listener_linger,
    );
    key("allow_listen", old.allow_listen != new.allow_listen);
    key("start_priority", old.start_priority != new.start_priority);
    key("drain_idle", old.drain_idle != new.drain_idle);
    key("sockets", old.sockets != new.sockets);
    key("ready", old.ready != new.ready);
    key("watchdog", old.watchdog != new.watchdog);
    key("history", old.history != new.history);
    key("stdout", old.stdout != new.stdout);
    key("stderr", old.stderr != new.stderr);
    key("listen", old.listen != new.listen);
    key("check", old.check != new.check);
    key("check_timeout", old.check_timeout != new.check_timeout);
    key("watch", old.watch != new.watch);
    if old.limits != new.limits || old.connections != new.connections {
        changes.on_restart.push("limits");
    }
    if old.metrics_address != new.metrics_address {
        changes.on_restart.push("metrics_address");
    }
    if old.state_busy_poll != new.state_busy_poll {
        changes.on_restart.push("state_busy_poll");
    }
    for entry in &new.listen {
        match old.listen.iter().find(|o| o.addr == entry.addr) {
            None => changes.listen_added.push(entry.clone()),
            Some(o) if o.options != entry.options => {
                changes.listen_reoptioned.push(entry.addr.clone())
            }
            Some(_) => {}
        }
    }
    changes.listen_removed = old
        .listen
        .iter()
        .filter(|o| !new.listen.iter().any(|n| n.addr == o.addr))
        .map(|o| o.addr.clone())
        .collect();
    changes
}

/// The config the broker runs once the reload succeeded: `new`, but with the
/// keys of [`Changes::on_restart`] as they were.
pub fn effective(old: &Config, mut new: Config) -> Config {
    new.limits = old.limits;
    new.connections = old.connections;
    new.state_busy_poll = old.state_busy_poll;
    new.metrics_address = old.metrics_address;
    new
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/ally/web.toml"), None).unwrap()
    }

    fn addr(network: &str, address: &str) -> ListenAddr {
        ListenAddr::parse(network, address).unwrap()
    }

    const BASE: &str = "command = [\"/bin/app\", \"-v\"]\nenvironment = { A = \"1\" }\n\
        [[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:8080\"\n\
        [[listen]]\nnetwork = \"unix\"\naddress = \"/run/web/a.sock\"\nmode = 0o660\n";

    #[test]
    fn the_same_config_changes_nothing() {
        assert!(between(&config(BASE), &config(BASE)).is_empty());
    }

    #[test]
    fn the_process_keys_apply_to_the_new_generation() {
        let new = format!(
            "stop_signal = \"SIGINT\"\ndrain_idle = \"3s\"\nuser = \"nobody\"\n{}",
            BASE.replace("\"-v\"", "\"-q\"")
                .replace("A = \"1\"", "A = \"2\"")
        );
        let changes = between(&config(BASE), &config(&new));
        assert_eq!(
            changes.applied,
            vec![
                "command",
                "user",
                "environment",
                "stop_signal",
                "drain_idle"
            ]
        );
        assert!(changes.on_restart.is_empty());
        assert!(changes.listen_added.is_empty() && changes.listen_removed.is_empty());
    }

    #[test]
    fn a_user_moved_to_another_line_is_the_same_user() {
        let old = config(&format!("user = \"nobody\"\n{BASE}"));
        let new = config(&format!("\n\nuser = \"nobody\"\n{BASE}"));
        assert!(between(&old, &new).is_empty());
    }

    #[test]
    fn listen_entries_are_added_removed_or_keep_their_socket() {
        let new = "command = [\"/bin/app\", \"-v\"]\nenvironment = { A = \"1\" }\n\
            [[listen]]\nnetwork = \"unix\"\naddress = \"/run/web/a.sock\"\nmode = 0o600\n\
            [[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:9090\"\n";
        let changes = between(&config(BASE), &config(new));
        assert_eq!(changes.applied, vec!["listen"]);
        assert_eq!(
            changes
                .listen_added
                .iter()
                .map(|e| e.addr.clone())
                .collect::<Vec<_>>(),
            vec![addr("tcp", "127.0.0.1:9090")]
        );
        assert_eq!(changes.listen_removed, vec![addr("tcp", "127.0.0.1:8080")]);
        assert_eq!(
            changes.listen_reoptioned,
            vec![addr("unix", "/run/web/a.sock")]
        );
    }

    #[test]
    fn the_broker_limits_wait_for_a_restart() {
        let new = format!(
            "state_busy_poll = \"20us\"\nready_timeout = \"5s\"\n{BASE}[limits]\nmax_keys_per_namespace = 7\n"
        );
        let (old, new) = (config(BASE), config(&new));
        let changes = between(&old, &new);
        assert_eq!(changes.applied, vec!["ready_timeout"]);
        assert_eq!(changes.on_restart, vec!["limits", "state_busy_poll"]);
        let runs = effective(&old, new);
        assert_eq!(runs.limits, old.limits);
        assert_eq!(runs.state_busy_poll, Duration::ZERO);
        assert_eq!(runs.ready_timeout, Duration::from_secs(5));
    }
}
