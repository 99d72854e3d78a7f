//! Resolving a watched path as the kernel would for an exec: component by
//! component, through every symlink, with `lstat` and `readlink` only. Nothing
//! is opened, executed or followed by a system call that could act on a
//! symlink's target: a path an unprivileged user controls makes the broker
//! look at other places at most, never do anything there.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::identity::RunAs;

/// Like the kernel's `MAXSYMLINKS`.
pub const MAX_SYMLINKS: usize = 40;
/// Components a path may have, counting those symlinks add.
pub const MAX_COMPONENTS: usize = 256;

/// The file a path ends at, as far as telling a new release goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub regular: bool,
}

impl FileState {
    fn of(meta: &std::fs::Metadata) -> FileState {
        FileState {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            regular: meta.file_type().is_file() && !meta.file_type().is_fifo(),
        }
    }

    /// Whether `run_as` may execute it, by its mode bits (root: any x bit).
    pub fn executable_by(&self, run_as: &RunAs) -> bool {
        let bits = if run_as.uid == 0 {
            0o111
        } else if self.uid == run_as.uid {
            0o100
        } else if self.gid == run_as.gid || run_as.groups.contains(&self.gid) {
            0o010
        } else {
            0o001
        };
        self.mode & bits != 0
    }
}

/// One watched path, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The path as configured (or as the command's program was looked up).
    pub path: PathBuf,
    /// Every symlink met, with what it pointed to.
    pub links: Vec<(PathBuf, PathBuf)>,
    /// Where it ends, symlinks resolved.
    pub target: PathBuf,
    /// The file there, or why there is none.
    pub file: Result<FileState, String>,
    /// Whether something wrote to it and has not closed it yet (from inotify).
    pub being_written: bool,
}

impl Resolved {
    /// Why this is not a release the instances' user could start yet.
    pub fn incomplete(&self, run_as: &RunAs) -> Option<String> {
        let target = self.target.display();
        match &self.file {
            Err(why) => Some(format!("{target}: {why}")),
            Ok(f) if !f.regular => Some(format!("{target} is not a regular file")),
            // What a copy that has not written yet leaves.
            Ok(f) if f.size == 0 => Some(format!("{target} is empty")),
            Ok(_) if self.being_written => Some(format!("{target} is still being written")),
            Ok(f) if !f.executable_by(run_as) => Some(format!(
                "{target} is not executable by {} (mode {:o})",
                run_as.describe(),
                f.mode
            )),
            Ok(_) => None,
        }
    }
}

/// What a resolution looked at: the directories to watch, and the entries in
/// them that matter (each component, each symlink).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Looked {
    pub dirs: BTreeSet<PathBuf>,
    pub entries: BTreeSet<PathBuf>,
}

/// Resolves `path` (absolute; a relative one is taken from `/`).
pub fn resolve(path: &Path, looked: &mut Looked) -> Resolved {
    let mut links = Vec::new();
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, path);
    let mut current = PathBuf::from("/");
    let mut meta: Option<std::fs::Metadata> = None;
    let mut steps = 0;
    let end = |current: PathBuf, links, file| Resolved {
        path: path.to_path_buf(),
        links,
        target: current,
        file,
        being_written: false,
    };
    while let Some(name) = pending.pop() {
        steps += 1;
        if steps > MAX_COMPONENTS {
            return end(current, links, Err("too many path components".into()));
        }
        match name.to_str() {
            Some("/") => {
                current = PathBuf::from("/");
                meta = None;
                continue;
            }
            Some(".") => continue,
            Some("..") => {
                current.pop();
                meta = None;
                continue;
            }
            _ => {}
        }
        if meta.as_ref().is_some_and(|m| !m.is_dir()) {
            return end(current, links, Err("not a directory".into()));
        }
        looked.dirs.insert(current.clone());
        let candidate = current.join(&name);
        looked.entries.insert(candidate.clone());
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                if links.len() >= MAX_SYMLINKS {
                    return end(
                        candidate,
                        links,
                        Err("too many levels of symbolic links".into()),
                    );
                }
                let target = match std::fs::read_link(&candidate) {
                    Ok(t) => t,
                    Err(e) => return end(candidate, links, Err(e.to_string())),
                };
                push_components(&mut pending, &target);
                links.push((candidate, target));
                meta = None;
            }
            Ok(m) => {
                current = candidate;
                meta = Some(m);
            }
            Err(e) => return end(candidate, links, Err(io_reason(&e))),
        }
    }
    let file = match meta {
        Some(m) => Ok(FileState::of(&m)),
        None => std::fs::symlink_metadata(&current)
            .map(|m| FileState::of(&m))
            .map_err(|e| io_reason(&e)),
    };
    end(current, links, file)
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".into(),
        _ => e.to_string(),
    }
}

/// Pushes `path`'s components so that the first is popped first.
fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    let at = pending.len();
    for c in path.components() {
        let s = match c {
            Component::RootDir => OsString::from("/"),
            Component::CurDir => OsString::from("."),
            Component::ParentDir => OsString::from(".."),
            Component::Normal(n) => n.to_os_string(),
            Component::Prefix(_) => continue,
        };
        pending.insert(at, s);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn run_as(uid: u32, gid: u32, groups: Vec<u32>) -> RunAs {
        RunAs {
            uid,
            gid,
            name: None,
            groups,
            switch: true,
            set_groups: true,
        }
    }

    fn file(mode: u32, uid: u32, gid: u32) -> FileState {
        FileState {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (4, 0),
            ctime: (4, 0),
            mode,
            uid,
            gid,
            regular: true,
        }
    }

    #[test]
    fn executable_by_the_mode_bits_that_apply_to_the_user() {
        let user = run_as(1000, 100, vec![100, 27]);
        assert!(file(0o700, 1000, 0).executable_by(&user));
        assert!(
            !file(0o077, 1000, 100).executable_by(&user),
            "owner bits rule"
        );
        assert!(
            file(0o010, 0, 27).executable_by(&user),
            "a supplementary group"
        );
        assert!(!file(0o601, 0, 100).executable_by(&user), "group bits rule");
        assert!(file(0o001, 0, 0).executable_by(&user));
        assert!(!file(0o644, 1000, 100).executable_by(&user));
        assert!(file(0o010, 5, 5).executable_by(&run_as(0, 0, vec![])));
        assert!(!file(0o644, 5, 5).executable_by(&run_as(0, 0, vec![])));
    }

    #[test]
    fn resolves_every_symlink_on_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("releases/1/bin")).unwrap();
        let app = root.join("releases/1/bin/app");
        std::fs::write(&app, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
        symlink("releases/1", root.join("current")).unwrap();
        symlink(root.join("current/bin/app"), root.join("app")).unwrap();
        let mut looked = Looked::default();
        let r = resolve(&root.join("app"), &mut looked);
        assert_eq!(r.target, app);
        assert_eq!(
            r.links,
            vec![
                (root.join("app"), root.join("current/bin/app")),
                (root.join("current"), PathBuf::from("releases/1")),
            ]
        );
        assert!(r.file.as_ref().unwrap().regular);
        assert_eq!(r.incomplete(&run_as(0, 0, vec![])), None);
        assert!(looked.dirs.contains(&root));
        assert!(looked.dirs.contains(&root.join("releases/1/bin")));
        assert!(looked.entries.contains(&root.join("current")));
        assert!(looked.entries.contains(&app));

        std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = resolve(&root.join("app"), &mut Looked::default());
        let why = r.incomplete(&run_as(0, 0, vec![])).unwrap();
        assert!(
            why.ends_with("is not executable by uid 0 (mode 644)"),
            "{why}"
        );
    }

    #[test]
    fn a_missing_file_or_a_loop_is_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let r = resolve(&root.join("nothing/app"), &mut Looked::default());
        assert_eq!(r.file, Err("does not exist".to_string()));
        assert_eq!(r.target, root.join("nothing"));
        symlink("b", root.join("a")).unwrap();
        symlink("a", root.join("b")).unwrap();
        let r = resolve(&root.join("a"), &mut Looked::default());
        assert_eq!(r.file, Err("too many levels of symbolic links".to_string()));
        assert_eq!(r.links.len(), MAX_SYMLINKS);
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), "x").unwrap();
        symlink("/", root.join("up")).unwrap();
        let through = root
            .join("up")
            .join(root.strip_prefix("/").unwrap())
            .join("d/../d/./f");
        let r = resolve(&through, &mut Looked::default());
        assert_eq!(r.target, root.join("d/f"), "{r:?}");
        assert_eq!(r.links[0], (root.join("up"), PathBuf::from("/")));
    }
}
