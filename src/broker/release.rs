//! The `watch` task: inotify on the directories that hold every component of
//! the watched paths (so a rename over a file or a symlink swap is seen), a
//! quiet period after the last event that matters, then a look at what the
//! paths resolve to, which [`Decider`] turns into a reload or nothing.
//!
//! The watches are on directories the resolution walked through, added with
//! `IN_ONLYDIR | IN_DONT_FOLLOW`; the files themselves are only `lstat`ed
//! (see [`crate::release_watch::resolve`]). A `watch` changed by a reload
//! re-arms the task.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Broker, Settings};
use crate::activation;
use crate::config::Watch;
use crate::identity::RunAs;
use crate::release_watch::resolve::Looked;
use crate::release_watch::{Decider, Resolved, Verdict, resolve};

/// How long the watched paths must be quiet before they are looked at; a
/// complete change must also look the same one quiet period later.
pub const QUIET: Duration = Duration::from_millis(500);
/// Directories watched at most: inotify watches are a per-user kernel resource.
const MAX_WATCHED_DIRS: usize = 1024;

/// The watch's side of the broker: when the settings changed, and what
/// `Status` shows.
#[derive(Debug)]
pub(super) struct ReleaseWatch {
    settings_changed: watch::Sender<u64>,
    shown: Mutex<Shown>,
}

#[derive(Debug, Clone, Default)]
pub struct Shown {
    /// The watched paths, each with where it ends now.
    pub paths: Vec<String>,
    /// The last change the watch acted on, and what came of it.
    pub last: String,
}

impl ReleaseWatch {
    pub fn new() -> ReleaseWatch {
        ReleaseWatch {
            settings_changed: watch::channel(0).0,
            shown: Mutex::new(Shown::default()),
        }
    }

    /// The broker's settings changed: `watch` may watch something else now.
    pub fn settings_changed(&self) {
        self.settings_changed.send_modify(|n| *n += 1);
    }

    pub fn shown(&self) -> Shown {
        self.shown.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn show(&self, f: impl FnOnce(&mut Shown)) {
        f(&mut self.shown.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// What one armed watch watches, as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    paths: Vec<PathBuf>,
    run_as: RunAs,
}

impl Settings {
    /// The paths `watch` names: with `true`, the program the next spawn would
    /// run, looked up in the instances' `PATH` as the spawn looks it up.
    fn watched_paths(&self) -> Result<Vec<PathBuf>, String> {
        let config = &self.config;
        let program = match &config.watch {
            Watch::Off => return Ok(Vec::new()),
            Watch::Paths(paths) => return Ok(paths.clone()),
            Watch::Command => &config.command[0],
        };
        let path = match config.environment.get("PATH") {
            Some(p) => Some(std::ffi::OsString::from(p)),
            None => std::env::var_os("PATH"),
        };
        let found = activation::lookup(program, path.as_deref())
            .map_err(|e| format!("watch = true: cannot find {program:?} to watch: {e}"))?;
        if found.is_absolute() {
            return Ok(vec![found]);
        }
        let base = match &config.working_directory {
            Some(dir) => dir.clone(),
            None => std::env::current_dir().map_err(|e| e.to_string())?,
        };
        Ok(vec![base.join(found)])
    }
}

impl Broker {
    /// Runs for the broker's life, re-armed whenever the settings change.
    pub(super) async fn watch_releases(self: Arc<Self>) {
        let mut changed = self.release_watch.settings_changed.subscribe();
        let mut armed: Option<Spec> = None;
        loop {
            let settings = self.settings();
            let spec = match settings.watched_paths() {
                Ok(paths) => Spec {
                    paths,
                    run_as: settings.launch.run_as.clone(),
                },
                Err(e) => {
                    tracing::warn!("{e}; nothing is watched");
                    Spec {
                        paths: Vec::new(),
                        run_as: settings.launch.run_as.clone(),
                    }
                }
            };
            drop(settings);
            if armed.as_ref() == Some(&spec) {
                if changed.changed().await.is_err() {
                    return;
                }
                continue;
            }
            armed = Some(spec.clone());
            if spec.paths.is_empty() {
                self.release_watch.show(|s| s.paths.clear());
                if changed.changed().await.is_err() {
                    return;
                }
                continue;
            }
            match self.watch_until_changed(&spec, &mut changed).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!("watch: {e}; nothing is watched until the config changes");
                    if changed.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Watches `spec` until the settings change.
    async fn watch_until_changed(
        self: &Arc<Self>,
        spec: &Spec,
        changed: &mut watch::Receiver<u64>,
    ) -> Result<(), String> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("cannot start inotify: {e}"))?;
        // SAFETY: `Watched` owns the descriptor, which stays open and the same
        // until the `AsyncFd` is dropped.
        let inotify = unsafe { AsyncFd::register(Watched(inotify)) }
            .map_err(|e| format!("cannot poll inotify: {e}"))?;
        let mut dirs = Dirs::default();
        let mut writing: HashSet<PathBuf> = HashSet::new();
        let (seen, looked) = look(&spec.paths, &writing);
        dirs.sync(&inotify.get_ref().0, &looked.dirs);
        let mut entries = looked.entries;
        self.show_paths(&seen);
        tracing::info!(
            "watch: watching {} for new releases",
            seen.iter()
                .map(|r| r.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut decider = Decider::new(seen);
        let mut deadline: Option<Instant> = None;
        let mut last_incomplete = String::new();
        changed.mark_unchanged();
        loop {
            let sleep = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                ready = inotify.readable() => {
                    let mut guard = ready.map_err(|e| e.to_string())?;
                    let events = match guard.try_io(|i| i.get_ref().0.read_events().map_err(std::io::Error::from)) {
                        Ok(Ok(events)) => events,
                        Ok(Err(e)) => return Err(format!("reading inotify events failed: {e}")),
                        Err(_would_block) => continue,
                    };
                    let mut matters = false;
                    for event in events {
                        matters |= dirs.note(&event, &entries, &mut writing);
                    }
                    if matters {
                        deadline = Some(Instant::now() + QUIET);
                    }
                }
                _ = tokio::time::sleep_until(sleep), if deadline.is_some() => {
                    deadline = None;
                    let (seen, looked) = look(&spec.paths, &writing);
                    dirs.sync(&inotify.get_ref().0, &looked.dirs);
                    entries = looked.entries;
                    match decider.look(seen.clone(), &spec.run_as) {
                        Verdict::Unchanged => last_incomplete.clear(),
                        Verdict::Incomplete(why) => {
                            if why != last_incomplete {
                                tracing::info!("watch: {why}: waiting until it is complete");
                                last_incomplete = why;
                            }
                        }
                        Verdict::Settling => deadline = Some(Instant::now() + QUIET),
                        Verdict::Reload(why) => {
                            last_incomplete.clear();
                            self.show_paths(&seen);
                            self.reload_for(why);
                        }
                    }
                }
                done = changed.changed() => {
                    if done.is_err() {
                        return Ok(());
                    }
                    let settings = self.settings();
                    let same = settings.watched_paths().ok().as_ref() == Some(&spec.paths)
                        && settings.launch.run_as == spec.run_as;
                    if !same {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Reloads because of `why`, logging the result: a failure is retried only
    /// on the next change.
    fn reload_for(self: &Arc<Self>, why: String) {
        tracing::info!("{why}: reloading");
        self.release_watch
            .show(|s| s.last = format!("{why}: reloading"));
        let reload = self.reload_by(why.clone());
        let broker = self.clone();
        tokio::spawn(async move {
            let last = match reload.await {
                Ok(generation) => {
                    tracing::info!("{why}: reloaded to generation {generation}");
                    format!("{why}: reloaded to generation {generation}")
                }
                Err(e) => {
                    tracing::warn!(
                        "{why}: the reload failed: {e}; the watch tries again at the next change"
                    );
                    format!("{why}: the reload failed: {e}")
                }
            };
            broker.release_watch.show(|s| s.last = last);
        });
    }

    fn show_paths(&self, seen: &[Resolved]) {
        let paths = seen
            .iter()
            .map(|r| {
                if r.target == r.path {
                    r.path.display().to_string()
                } else {
                    format!("{} -> {}", r.path.display(), r.target.display())
                }
            })
            .collect();
        self.release_watch.show(|s| s.paths = paths);
    }
}

/// The inotify descriptor, as tokio polls it.
struct Watched(Inotify);

impl std::os::fd::AsRawFd for Watched {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// What `paths` resolve to now, and where to watch for their next change.
fn look(paths: &[PathBuf], writing: &HashSet<PathBuf>) -> (Vec<Resolved>, Looked) {
    let mut looked = Looked::default();
    let seen = paths
        .iter()
        .map(|p| {
            let mut r = resolve(p, &mut looked);
            r.being_written = writing.contains(&r.target);
            r
        })
        .collect();
    (seen, looked)
}

/// The directories watched, by path and by watch descriptor.
#[derive(Default)]
struct Dirs {
    by_path: HashMap<PathBuf, WatchDescriptor>,
    by_wd: HashMap<WatchDescriptor, PathBuf>,
    warned: bool,
}

impl Dirs {
    const FLAGS: AddWatchFlags = AddWatchFlags::IN_CREATE
        .union(AddWatchFlags::IN_DELETE)
        .union(AddWatchFlags::IN_MOVED_FROM)
        .union(AddWatchFlags::IN_MOVED_TO)
        .union(AddWatchFlags::IN_ATTRIB)
        .union(AddWatchFlags::IN_MODIFY)
        .union(AddWatchFlags::IN_CLOSE_WRITE)
        .union(AddWatchFlags::IN_DELETE_SELF)
        .union(AddWatchFlags::IN_MOVE_SELF)
        .union(AddWatchFlags::IN_ONLYDIR)
        .union(AddWatchFlags::IN_DONT_FOLLOW);

    /// Watches exactly `wanted`.
    fn sync(&mut self, inotify: &Inotify, wanted: &BTreeSet<PathBuf>) {
        let gone: Vec<PathBuf> = self
            .by_path
            .keys()
            .filter(|p| !wanted.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(wd) = self.by_path.remove(&path) {
                self.by_wd.remove(&wd);
                let _ = inotify.rm_watch(wd);
            }
        }
        for path in wanted {
            if self.by_path.contains_key(path) {
                continue;
            }
            if self.by_path.len() >= MAX_WATCHED_DIRS {
                self.warn(format!(
                    "watch: more than {MAX_WATCHED_DIRS} directories to watch; {} and others are not watched",
                    path.display()
                ));
                break;
            }
            match inotify.add_watch(path.as_path(), Self::FLAGS) {
                Ok(wd) => {
                    // Two paths to one directory (a watch moved) share a descriptor.
                    if let Some(old) = self.by_wd.insert(wd, path.clone()) {
                        self.by_path.remove(&old);
                    }
                    self.by_path.insert(path.clone(), wd);
                }
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {}
                Err(e) => self.warn(format!("watch: cannot watch {}: {e}", path.display())),
            }
        }
    }

    fn warn(&mut self, message: String) {
        if !self.warned {
            tracing::warn!("{message}");
            self.warned = true;
        }
    }

    /// Whether `event` may change what a watched path resolves to; keeps
    /// `writing` (entries written to and not closed yet).
    fn note(
        &mut self,
        event: &nix::sys::inotify::InotifyEvent,
        entries: &BTreeSet<PathBuf>,
        writing: &mut HashSet<PathBuf>,
    ) -> bool {
        let mask = event.mask;
        if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            writing.clear();
            return true;
        }
        let Some(dir) = self.by_wd.get(&event.wd).cloned() else {
            return false;
        };
        if mask.contains(AddWatchFlags::IN_IGNORED) {
            self.by_wd.remove(&event.wd);
            self.by_path.remove(&dir);
            return true;
        }
        let Some(name) = &event.name else {
            // The directory itself moved or went.
            return true;
        };
        let entry = dir.join(name);
        if !entries.contains(&entry) {
            return false;
        }
        // Not IN_CREATE: a hard link or a mkdir is created and never closed.
        if mask.contains(AddWatchFlags::IN_MODIFY) {
            writing.insert(entry);
        } else if mask.intersects(
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_MOVED_TO,
        ) {
            writing.remove(&entry);
        }
        true
    }
}
