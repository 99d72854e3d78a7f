//! A reload reads the config file again, with the parser `ally run` used
//! (`crate::config::changes` says what that changes): the new generation starts
//! with the new settings, the `[[listen]]` sockets the file added are bound
//! before it starts, and the broker keeps the new settings for its later
//! restarts only once that generation is ready. A config that no longer reads
//! fails the reload before anything is started.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use ally_core::net::ListenAddr;

use super::plan::Plan;
use super::{Broker, Settings};
use crate::config::Config;
use crate::config::changes::{self, Changes};
use crate::identity::RunAs;
use crate::instance::Launch;
use crate::runtime_dir;

/// The settings a reload's generation starts with, and what they change.
pub(super) struct Prepared {
    pub settings: Arc<Settings>,
    changes: Changes,
    /// Listeners this reload pinned: let go again if it fails.
    pinned: Vec<ListenAddr>,
    /// The broker's sockets were given to the new user: given back if it fails.
    owner_changed: bool,
}

impl Prepared {
    /// A launch with the settings the broker has.
    pub fn current(settings: Arc<Settings>) -> Prepared {
        Prepared {
            settings,
            changes: Changes::default(),
            pinned: Vec::new(),
            owner_changed: false,
        }
    }
}

impl Settings {
    /// Who may connect to the broker's sockets besides root and the broker's
    /// user: the configured user, with the group the instances run with.
    pub(super) fn socket_owner(&self) -> Option<(u32, u32)> {
        let run_as = &self.launch.run_as;
        self.config
            .user
            .is_some()
            .then_some((run_as.uid, run_as.gid))
    }
}

impl Broker {
    /// Reads the config file again. Without one (`ally run APP -- COMMAND`) the
    /// settings stay as they are. The error is the one line the caller gets.
    pub(super) async fn reconfigure(self: &Arc<Self>) -> Result<Prepared, String> {
        let current = self.settings();
        let Some(path) = current.config.file.clone() else {
            return Ok(Prepared::current(current));
        };
        let command_override = self.command_override.clone();
        let overrides = self.overrides.clone();
        // File reads and user database lookups (NSS) stay off the async workers.
        let read =
            tokio::task::spawn_blocking(move || read_config(path, command_override, &overrides))
                .await
                .map_err(|e| format!("reading the config failed: {e}"))?;
        let (text, config, run_as) = read.map_err(refused)?;
        let changes = changes::between(&current.config, &config);
        let config = changes::effective(&current.config, config);
        let launch = Launch {
            run_as,
            ..current.launch.clone()
        };
        let revision = current.revision.next(&text);
        self.remember_config(&revision, Some(text));
        let settings =
            Settings::new(config, launch, revision).map_err(|e| refused(e.to_string()))?;
        let settings = Arc::new(settings);
        let pinned = self.pin_listen_entries(&settings, &changes)?;
        let mut prepared = Prepared {
            settings,
            changes,
            pinned,
            owner_changed: false,
        };
        let owner = prepared.settings.socket_owner();
        if owner != current.socket_owner() {
            if let Err(e) = self.give_sockets_to(owner) {
                self.abandon(prepared);
                return Err(refused(e));
            }
            prepared.owner_changed = true;
        }
        Ok(prepared)
    }

    /// Binds the `[[listen]]` entries the file added, or keeps those an
    /// instance asked for already, for the broker's life.
    fn pin_listen_entries(
        &self,
        settings: &Settings,
        changes: &Changes,
    ) -> Result<Vec<ListenAddr>, String> {
        let mut pinned = Vec::new();
        let mut shared = self.lock();
        let now = Instant::now();
        for entry in &changes.listen_added {
            let addr = &entry.addr;
            let done = match shared.listeners.set_pinned(addr, true, now) {
                Some(true) => Ok(()),
                Some(false) => {
                    pinned.push(addr.clone());
                    Ok(())
                }
                None => self
                    .bind(&mut shared, settings, addr, &entry.options, true)
                    .map(|_copy| {
                        tracing::info!("listening on {addr} ([[listen]] added by the reload)");
                        pinned.push(addr.clone());
                    }),
            };
            if let Err(e) = done {
                for addr in &pinned {
                    shared.listeners.set_pinned(addr, false, now);
                }
                let config = &settings.config;
                let index = config.listen.iter().position(|l| l.addr == *addr);
                return Err(refused(format!(
                    "{}: key `listen[{}]` ({addr}): {e}",
                    file_name(config),
                    index.unwrap_or_default()
                )));
            }
        }
        Ok(pinned)
    }

    /// The reload's generation is ready: its settings are the broker's now.
    pub(super) fn commit(&self, prepared: Prepared, plan: &mut Plan) {
        let Prepared {
            settings, changes, ..
        } = prepared;
        let config = &settings.config;
        let file = file_name(config);
        {
            let mut shared = self.lock();
            let now = Instant::now();
            for addr in &changes.listen_removed {
                if shared.listeners.set_pinned(addr, false, now) == Some(true) {
                    tracing::info!(
                        "{addr} is no longer in [[listen]]: it closes once no instance has used it for {} (listener_linger)",
                        humantime::format_duration(config.listener_linger)
                    );
                }
            }
        }
        plan.reconfigure(config.restart_delay, config.restart);
        if !changes.applied.is_empty() {
            tracing::info!(
                "config revision {} ({}): changed {}",
                settings.revision.number,
                settings.revision.digest,
                changes.applied.join(", ")
            );
        }
        for key in &changes.on_restart {
            tracing::warn!(
                "{file}: `{key}` changed; the broker keeps its old value until it restarts"
            );
        }
        for addr in &changes.listen_reoptioned {
            tracing::warn!(
                "{file}: the options of [[listen]] {addr} changed; its socket stays open as it was bound, so that no connection is refused"
            );
        }
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
        self.release_watch.settings_changed();
    }

    /// The reload failed: the broker keeps its settings, and lets go of the
    /// listeners it pinned for the new ones.
    pub(super) fn abandon(&self, prepared: Prepared) {
        let mut shared = self.lock();
        let now = Instant::now();
        for addr in &prepared.pinned {
            shared.listeners.set_pinned(addr, false, now);
        }
        drop(shared);
        if prepared.owner_changed
            && let Err(e) = self.give_sockets_to(self.settings().socket_owner())
        {
            tracing::error!("{e}");
        }
    }

    /// Lets the instances' user (`owner`) connect to the broker's sockets, as
    /// `ally run` did at its start.
    fn give_sockets_to(&self, owner: Option<(u32, u32)>) -> Result<(), String> {
        let sockets = self.socket_files.lock().unwrap_or_else(|p| p.into_inner());
        let Some((dir, files)) = &*sockets else {
            return Ok(());
        };
        runtime_dir::prepare(dir, owner.is_some()).map_err(|e| e.to_string())?;
        for path in files {
            runtime_dir::set_socket_owner(path, owner).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The broker's runtime directory and own sockets in it (`$RUNTIME/bus`,
    /// `$RUNTIME/state`), whose owner follows the config's `user` and `group`.
    pub fn serve_socket_files(&self, dir: PathBuf, files: Vec<PathBuf>) {
        *self.socket_files.lock().unwrap_or_else(|p| p.into_inner()) = Some((dir, files));
    }
}

fn read_config(
    path: PathBuf,
    command_override: Option<Vec<String>>,
    overrides: &crate::config::Overrides,
) -> Result<(String, Config, RunAs), String> {
    let text = Config::read(&path).map_err(|e| e.to_string())?;
    let config = Config::parse(&text, &path, command_override).map_err(|e| e.to_string())?;
    let config = overrides.apply(config)?;
    let run_as = RunAs::resolve(&config)?;
    Ok((text, config, run_as))
}

/// The config file, for messages about it.
fn file_name(config: &Config) -> String {
    config
        .file
        .as_ref()
        .map(|f| f.display().to_string())
        .unwrap_or_default()
}

fn refused(why: String) -> String {
    format!("the config was not reloaded: {why}")
}
