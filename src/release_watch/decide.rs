//! When a watched release reloads the app, from what the watched paths
//! resolved to after each quiet period. Pure: the broker's watch task does the
//! waiting and the looking.
//!
//! A change reloads once it is complete — every path ends at a regular file
//! the instances' user may execute, not being written — and the same at two
//! looks a quiet period apart (a copy that pauses is not taken for done). What
//! triggered a reload is what the app runs from then on, whether the reload
//! succeeded or not: a failed one is retried only on the next change.

use super::resolve::Resolved;
use crate::identity::RunAs;

/// What one look at the watched paths means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// What the app runs: nothing to do.
    Unchanged,
    /// A change that cannot run yet, and why; the next change is looked at again.
    Incomplete(String),
    /// A complete change seen once: look again after the quiet period.
    Settling,
    /// Reload, for this reason.
    Reload(String),
}

#[derive(Debug)]
pub struct Decider {
    /// What the running generation was started from (or the last reload was tried with).
    served: Vec<Resolved>,
    /// A complete change seen at the last look.
    candidate: Option<Vec<Resolved>>,
}

impl Decider {
    pub fn new(served: Vec<Resolved>) -> Decider {
        Decider {
            served,
            candidate: None,
        }
    }

    pub fn served(&self) -> &[Resolved] {
        &self.served
    }

    /// Takes `seen` as what runs, without a reload (a reload asked otherwise did it).
    pub fn serve(&mut self, seen: Vec<Resolved>) {
        self.served = seen;
        self.candidate = None;
    }

    /// What the paths resolve to now, after a quiet period.
    pub fn look(&mut self, seen: Vec<Resolved>, run_as: &RunAs) -> Verdict {
        if seen == self.served {
            self.candidate = None;
            return Verdict::Unchanged;
        }
        if let Some(why) = seen.iter().find_map(|r| r.incomplete(run_as)) {
            self.candidate = None;
            return Verdict::Incomplete(why);
        }
        if self.candidate.as_ref() != Some(&seen) {
            self.candidate = Some(seen);
            return Verdict::Settling;
        }
        let why = describe(&self.served, &seen);
        self.serve(seen);
        Verdict::Reload(why)
    }
}

/// "watch: …", naming the first path that changed and how.
pub fn describe(old: &[Resolved], new: &[Resolved]) -> String {
    for (i, n) in new.iter().enumerate() {
        let o = old.get(i).filter(|o| o.path == n.path);
        if o == Some(n) {
            continue;
        }
        let path = n.path.display();
        let moved = n
            .links
            .iter()
            .find(|link| o.is_none_or(|o| !o.links.contains(link)));
        return match moved {
            Some((link, to)) => format!(
                "watch: {path} changed: {} now points to {} ({})",
                link.display(),
                to.display(),
                n.target.display()
            ),
            None if o.is_some_and(|o| o.target == n.target) => {
                format!("watch: {path} changed: {} was replaced", n.target.display())
            }
            None => format!("watch: {path} changed: now {}", n.target.display()),
        };
    }
    "watch: the watched paths changed".into()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::resolve::FileState;
    use super::*;

    fn root() -> RunAs {
        RunAs {
            uid: 0,
            gid: 0,
            name: Some("root".into()),
            groups: vec![],
            switch: false,
            set_groups: true,
        }
    }

    fn release(n: u64, size: u64, mode: u32) -> Vec<Resolved> {
        vec![Resolved {
            path: PathBuf::from("/srv/web/current/bin/web"),
            links: vec![(
                PathBuf::from("/srv/web/current"),
                PathBuf::from(format!("releases/{n}")),
            )],
            target: PathBuf::from(format!("/srv/web/releases/{n}/bin/web")),
            file: Ok(FileState {
                dev: 1,
                ino: 100 + n,
                size,
                mtime: (n as i64, 0),
                ctime: (n as i64, 0),
                mode,
                uid: 0,
                gid: 0,
                regular: true,
            }),
            being_written: false,
        }]
    }

    #[test]
    fn nothing_changed_nothing_happens() {
        let mut d = Decider::new(release(1, 10, 0o755));
        assert_eq!(d.look(release(1, 10, 0o755), &root()), Verdict::Unchanged);
        assert_eq!(d.look(release(1, 10, 0o755), &root()), Verdict::Unchanged);
    }

    #[test]
    fn a_retargeted_link_reloads_once_after_two_equal_looks() {
        let mut d = Decider::new(release(1, 10, 0o755));
        assert_eq!(d.look(release(2, 10, 0o755), &root()), Verdict::Settling);
        assert_eq!(
            d.look(release(2, 10, 0o755), &root()),
            Verdict::Reload(
                "watch: /srv/web/current/bin/web changed: /srv/web/current now points to releases/2 (/srv/web/releases/2/bin/web)".into()
            )
        );
        assert_eq!(d.look(release(2, 10, 0o755), &root()), Verdict::Unchanged);
    }

    #[test]
    fn a_file_still_growing_or_not_executable_waits_for_the_next_change() {
        let mut d = Decider::new(release(1, 10, 0o755));
        // Being copied: not executable yet, then growing.
        assert!(matches!(
            d.look(release(2, 5, 0o644), &root()),
            Verdict::Incomplete(why) if why.contains("not executable")
        ));
        assert_eq!(d.look(release(2, 7, 0o755), &root()), Verdict::Settling);
        assert_eq!(d.look(release(2, 9, 0o755), &root()), Verdict::Settling);
        let mut writing = release(2, 10, 0o755);
        writing[0].being_written = true;
        assert!(matches!(
            d.look(writing, &root()),
            Verdict::Incomplete(why) if why.ends_with("is still being written")
        ));
        assert_eq!(d.look(release(2, 10, 0o755), &root()), Verdict::Settling);
        assert!(matches!(
            d.look(release(2, 10, 0o755), &root()),
            Verdict::Reload(_)
        ));
    }

    #[test]
    fn a_missing_target_or_a_directory_is_incomplete() {
        let mut d = Decider::new(release(1, 10, 0o755));
        let mut gone = release(2, 10, 0o755);
        gone[0].file = Err("does not exist".into());
        assert_eq!(
            d.look(gone, &root()),
            Verdict::Incomplete("/srv/web/releases/2/bin/web: does not exist".into())
        );
        let mut dir = release(2, 10, 0o755);
        if let Ok(f) = &mut dir[0].file {
            f.regular = false;
        }
        assert!(matches!(d.look(dir, &root()), Verdict::Incomplete(_)));
    }

    #[test]
    fn a_failed_reload_is_not_retried_until_the_next_change() {
        let mut d = Decider::new(release(1, 10, 0o755));
        d.look(release(2, 10, 0o755), &root());
        assert!(matches!(
            d.look(release(2, 10, 0o755), &root()),
            Verdict::Reload(_)
        ));
        // The reload failed: the same release again is no change.
        assert_eq!(d.look(release(2, 10, 0o755), &root()), Verdict::Unchanged);
        // The binary replaced in place (same link, new inode and size).
        let mut fixed = release(2, 11, 0o755);
        if let Ok(f) = &mut fixed[0].file {
            f.ino = 999;
        }
        assert_eq!(d.look(fixed.clone(), &root()), Verdict::Settling);
        assert_eq!(
            d.look(fixed, &root()),
            Verdict::Reload(
                "watch: /srv/web/current/bin/web changed: /srv/web/releases/2/bin/web was replaced"
                    .into()
            )
        );
    }

    #[test]
    fn a_release_taken_by_another_reload_is_served() {
        let mut d = Decider::new(release(1, 10, 0o755));
        assert_eq!(d.look(release(2, 10, 0o755), &root()), Verdict::Settling);
        d.serve(release(2, 10, 0o755));
        assert_eq!(d.look(release(2, 10, 0o755), &root()), Verdict::Unchanged);
    }
}
