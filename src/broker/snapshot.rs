//! Surviving a crash of the broker: whenever something changes, its image is
//! written to `$RUNTIME/snapshot.json`; its instances' output pipes and
//! notification sockets, like its listeners, are kept in systemd's fd store.
//! When systemd restarts a broker that died (the unit's `KillMode=process`
//! leaves the instances running), the new one adopts the instances that are
//! still the processes the snapshot names (pid and start time), takes the fds
//! back from the fd store, and carries on with the snapshot's shared state,
//! history and counters.
//!
//! What a crash can lose: changes of the last moments before it (a snapshot is
//! written at most every [`MIN_INTERVAL`], and never more than 5% of the time
//! for the locks it holds while it takes the image), and an adopted instance's exit status (it is no longer the
//! broker's child).

use std::collections::HashSet;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Broker, Life, Phase, Tracked, unmodified};
use crate::generations::{InstanceId, InstanceState, Table};
use crate::process::Process;
use crate::reexec::image::BrokerImage;
use crate::systemd;

pub const FILE: &str = "snapshot.json";
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Larger snapshots are not read back.
const MAX_BYTES: u64 = 512 * 1024 * 1024;

fn out_name(id: InstanceId) -> String {
    format!("{}out-{id}", systemd::OWN_FD_PREFIX)
}

fn err_name(id: InstanceId) -> String {
    format!("{}err-{id}", systemd::OWN_FD_PREFIX)
}

fn notify_name(id: InstanceId) -> String {
    format!("{}notify-{id}", systemd::OWN_FD_PREFIX)
}

impl Broker {
    /// Keeps instance `id`'s output pipes and notification socket in the fd store.
    pub(super) fn store_instance_fds(&self, id: InstanceId) {
        if !systemd::has_fd_store() {
            return;
        }
        let shared = self.lock();
        let Some(t) = shared.tracked.get(&id) else {
            return;
        };
        if let Some(fd) = &t.stdout {
            systemd::store_named(&out_name(id), fd.as_fd());
        }
        if let Some(fd) = &t.stderr {
            systemd::store_named(&err_name(id), fd.as_fd());
        }
        if let Some(socket) = &t.notify_socket {
            // SAFETY: the socket stays open while the lock is held.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket.raw_fd()) };
            systemd::store_named(&notify_name(id), fd);
        }
    }

    /// Drops an exited instance's fds from the fd store.
    pub(super) fn forget_stored_fds(&self, id: InstanceId) {
        if !systemd::has_fd_store() {
            return;
        }
        for name in [out_name(id), err_name(id), notify_name(id)] {
            systemd::unstore_named(&name);
        }
    }

    /// Writes a snapshot whenever something changed, until the broker stops;
    /// then removes it: a broker that stopped leaves nothing to adopt.
    pub async fn keep_snapshots(self: Arc<Self>, dir: PathBuf) {
        let path = dir.join(FILE);
        let mut stopping = self.stopping.subscribe();
        loop {
            tokio::select! {
                () = self.changed.notified() => {}
                () = self.state.store.touched() => {}
                _ = stopping.wait_for(|s| *s) => break,
            }
            let began = Instant::now();
            let bytes =
                self.with_image(self.reexecs().count, |image, _| serde_json::to_vec(&image));
            let bytes = match bytes {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(e)) => {
                    tracing::warn!("cannot write a snapshot: {e}");
                    continue;
                }
                Err(_) => continue,
            };
            let to = path.clone();
            let written = tokio::task::spawn_blocking(move || write_atomically(&to, &bytes)).await;
            if let Ok(Err(e)) = written {
                tracing::warn!("cannot write the snapshot {}: {e}", path.display());
            }
            tokio::time::sleep((began.elapsed() * 10).max(MIN_INTERVAL)).await;
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Adopts what the snapshot of a broker that died names and still runs.
    /// Returns the lines to log.
    pub fn adopt_snapshot(
        self: &Arc<Self>,
        image: BrokerImage,
        parse: &dyn Fn(&str) -> Result<crate::config::Config, String>,
    ) -> Vec<String> {
        let mut said = Vec::new();
        let now = Instant::now();
        let current = self.settings();
        let revisions = self.settings_of_image(&image.configs, parse, &mut said);
        // The next generation starts on what the dead broker would have used.
        if let Some(s) = revisions.get(image.settings) {
            *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = s.clone();
        }
        let mut table = Vec::new();
        let mut tracked = std::collections::HashMap::new();
        let mut adopted = HashSet::new();
        for i in &image.instances {
            let Some(process) = adopt_process(i.pid, i.start_ticks) else {
                said.push(format!(
                    "instance {} (pid {}, generation {}) is gone",
                    i.id, i.pid, i.generation
                ));
                self.state.instance_exited(i.id);
                self.forget_stored_fds(i.id);
                continue;
            };
            let state = match i.state.as_str() {
                "ready" => InstanceState::Ready,
                "starting" => InstanceState::Starting,
                _ => InstanceState::Draining,
            };
            let main = i
                .main
                .and_then(|(pid, _)| adopt_process(pid, crate::process::start_ticks(pid)))
                .map(Arc::new);
            let notify_socket = self
                .take_inherited(&notify_name(i.id))
                .and_then(|fd| unmodified::NotifySocket::from_fd(fd).ok());
            let settings = revisions
                .get(i.settings)
                .cloned()
                .unwrap_or_else(|| current.clone());
            let watchdog = unmodified::Watchdog::fresh(&settings.config);
            table.push(super::reexec::table_entry(i, state, now));
            tracked.insert(
                i.id,
                Tracked {
                    life: watch::channel(Life::State(state)).0,
                    process: Arc::new(process),
                    settings,
                    reported: unmodified::Reported {
                        status: i.status.clone(),
                        stopping: i.stopping,
                        errno: i.errno,
                        main_pid: main.as_ref().map(|m| m.pid()),
                    },
                    app_report: i.app_report.clone(),
                    extended: watch::channel(None).0,
                    watchdog,
                    main,
                    notify_socket,
                    stdout: self.take_inherited(&out_name(i.id)),
                    stderr: self.take_inherited(&err_name(i.id)),
                    start_ticks: i.start_ticks,
                    adopted: true,
                },
            );
            adopted.insert(i.id);
            said.push(format!(
                "adopted instance {} (pid {}, generation {}, {})",
                i.id, i.pid, i.generation, i.state
            ));
        }
        *self.history.lock().unwrap_or_else(|p| p.into_inner()) =
            crate::history::History::restore(current.config.history, image.history);
        {
            let mut shared = self.lock();
            for l in &image.listeners {
                let Some(key) = systemd::parse_fd_name(&l.key) else {
                    continue;
                };
                if !shared.listeners.contains(&key) {
                    said.push(format!(
                        "{key} was not in the fd store: its instances keep it, new ones bind it again"
                    ));
                    continue;
                }
                for (id, n) in &l.refs {
                    if adopted.contains(id) {
                        for _ in 0..*n {
                            shared.listeners.add_ref(&key, *id);
                        }
                    }
                }
            }
            shared.table = Table::from_parts(table, image.next_id, image.last_generation);
            shared.tracked = tracked;
            shared.reloads = image.reloads;
            shared.last_reload = image.last_reload;
            shared.phase = Phase::Running;
        }
        self.restarts
            .store(image.restarts, std::sync::atomic::Ordering::Relaxed);
        *self.reexecs.lock().unwrap_or_else(|p| p.into_inner()) = super::Reexecs {
            count: image.reexecs,
            last_error: None,
        };
        self.restored.send_replace(true);
        said
    }

    /// Closes what the fd store gave back that nothing took (an instance's
    /// pipes after it was found gone), and drops it from the store.
    pub fn drop_unclaimed_fds(&self) {
        let unclaimed =
            std::mem::take(&mut *self.inherited_own.lock().unwrap_or_else(|p| p.into_inner()));
        for name in unclaimed.keys() {
            tracing::debug!("{name} from the fd store is no longer needed");
            systemd::unstore_named(name);
        }
    }
}

/// Pins `pid` if it is still the process that started at `start_ticks`.
fn adopt_process(pid: u32, start_ticks: Option<u64>) -> Option<Process> {
    let expected = start_ticks?;
    if crate::process::start_ticks(pid) != Some(expected) {
        return None;
    }
    let process = Process::pin(pid).ok()?;
    // Pinned: if it is still the same process now, the pidfd is its.
    (crate::process::start_ticks(pid) == Some(expected)).then_some(process)
}

/// The snapshot a broker that died left in `dir`, if any; one that cannot be
/// read is logged and left aside.
pub fn read(dir: &Path) -> Option<BrokerImage> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(FILE);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    let owner = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_file() || meta.uid() != owner || meta.mode() & 0o022 != 0 {
        tracing::warn!(
            "{} is not a snapshot this broker wrote (not a regular file of uid {owner}, writable by it alone): ignored",
            path.display()
        );
        return None;
    }
    if meta.len() > MAX_BYTES {
        tracing::warn!(
            "{} is larger than {MAX_BYTES} bytes: ignored",
            path.display()
        );
        return None;
    }
    let bytes = std::fs::read(&path)
        .map_err(|e| tracing::warn!("cannot read {}: {e}", path.display()))
        .ok()?;
    match serde_json::from_slice::<BrokerImage>(&bytes) {
        Ok(image) if image.version == crate::reexec::image::VERSION => Some(image),
        Ok(image) => {
            tracing::warn!(
                "{} is of image version {}; this broker reads {}: ignored",
                path.display(),
                image.version,
                crate::reexec::image::VERSION
            );
            None
        }
        Err(e) => {
            tracing::warn!("{} does not parse ({e}): ignored", path.display());
            None
        }
    }
}

/// Writes `bytes` to `path` through a temporary file renamed over it, so a
/// reader never sees half a snapshot.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_a_private_regular_snapshot_that_parses_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert!(read(dir.path()).is_none(), "none there");
        // Garbage: left aside.
        std::fs::write(&path, b"{not json").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(dir.path()).is_none());
        // A good image, private: read.
        let good = serde_json::to_vec(&image()).unwrap();
        write_atomically(&path, &good).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(read(dir.path()).map(|i| i.app), Some("snap".to_string()));
        // The same, writable by others, or a symlink to it: never read.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(read(dir.path()).is_none());
        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::rename(&path, &elsewhere).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert!(read(dir.path()).is_none());
        // A write replaces the symlink itself, not its target.
        write_atomically(&path, b"{}").unwrap();
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_file()
        );
        assert_eq!(std::fs::read(&elsewhere).unwrap(), good);
    }

    fn image() -> BrokerImage {
        BrokerImage {
            version: crate::reexec::image::VERSION,
            taken_by: "test".into(),
            app: "snap".into(),
            reexecs: 0,
            private_socket: -1,
            state_socket: -1,
            configs: Vec::new(),
            settings: 0,
            last_generation: 0,
            next_id: 0,
            instances: Vec::new(),
            listeners: Vec::new(),
            reloads: 0,
            last_reload: String::new(),
            notified_ready: false,
            socket_files: Vec::new(),
            state: ally_core::state::Store::default().image(Instant::now()),
            history: crate::history::History::new(10).image(),
            restarts: 0,
        }
    }
}
