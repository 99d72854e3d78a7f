//! Which of a broker's progress signals belong to the reload `ally reload`
//! asked for, and when it has seen all of them. Free of I/O.
//!
//! The signals are subscribed to before `Reload` is called, and `Reload`
//! answers only once its generation is ready or failed: until then the first
//! generation started for a reload is shown as it happens; the answer names
//! the right one, and if that was another (a reload already running answered
//! a queued request), the signals kept for it are shown then.

use std::collections::BTreeMap;

use crate::progress::Progress;

/// What the broker said, in the order it arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Progress {
        generation: u64,
        progress: Progress,
    },
    /// An instance's `InstanceReported` with a `tasks` count.
    Tasks {
        instance: u64,
        tasks: u32,
    },
    /// An instance's `InstanceStateChanged` to `exited`.
    Exited {
        instance: u64,
    },
    /// `Reload`'s answer: the generation, or why it failed.
    Replied(Result<u64, String>),
}

/// An older instance being stopped, while its tasks are followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Draining {
    generation: u64,
    pid: u32,
    tasks: Option<u32>,
}

#[derive(Debug, Default)]
pub struct Follow {
    /// The generation shown: the reply's, or until it comes the first started for a reload.
    shown: Option<u64>,
    replied: bool,
    /// Progress of other generations, in case the reply names one of them.
    kept: Vec<(u64, Progress)>,
    done: bool,
    /// Failed with nothing shown: the failed `done` of whichever generation ends it.
    any_failure: bool,
    draining: BTreeMap<u64, Draining>,
}

impl Follow {
    /// Takes what arrived; returns the phases to show now, as (generation, phase).
    pub fn feed(&mut self, input: Input) -> Vec<(u64, Progress)> {
        let mut show = Vec::new();
        match input {
            Input::Progress {
                generation,
                progress,
            } => {
                let first_for_reload = !self.replied
                    && self.shown.is_none()
                    && matches!(&progress, Progress::Started { reason, .. } if reason == "reload" || reason.is_empty());
                let the_failure = self.any_failure
                    && self.shown.is_none()
                    && matches!(progress, Progress::Done { success: false, .. });
                if first_for_reload || the_failure {
                    self.shown = Some(generation);
                }
                if self.shown == Some(generation) {
                    self.track(&progress);
                    show.push((generation, progress));
                } else if !self.replied {
                    self.kept.push((generation, progress));
                }
            }
            Input::Tasks { instance, tasks } => {
                if let (Some(generation), Some(d)) = (self.shown, self.draining.get_mut(&instance))
                    && d.tasks != Some(tasks)
                {
                    d.tasks = Some(tasks);
                    show.push((
                        generation,
                        Progress::Draining {
                            generation: d.generation,
                            instance,
                            pid: d.pid,
                            tasks: Some(tasks),
                        },
                    ));
                }
            }
            Input::Exited { instance } => {
                self.draining.remove(&instance);
            }
            Input::Replied(result) => {
                self.replied = true;
                let kept = std::mem::take(&mut self.kept);
                let wanted = match result {
                    Ok(generation) => Some(generation),
                    // Failed before a generation was started (a bad config, a spawn that failed).
                    Err(_) if self.shown.is_none() => {
                        self.any_failure = true;
                        kept.iter().rev().find_map(|(generation, progress)| {
                            matches!(progress, Progress::Done { success: false, .. })
                                .then_some(*generation)
                        })
                    }
                    Err(_) => None,
                };
                if let Some(wanted) = wanted
                    && self.shown != Some(wanted)
                {
                    self.shown = Some(wanted);
                    self.done = false;
                    self.draining.clear();
                    for (generation, progress) in kept {
                        if generation == wanted {
                            self.track(&progress);
                            show.push((generation, progress));
                        }
                    }
                }
            }
        }
        show
    }

    fn track(&mut self, progress: &Progress) {
        match progress {
            Progress::Done { .. } => self.done = true,
            Progress::Draining {
                generation,
                instance,
                pid,
                tasks,
            } => {
                self.draining.insert(
                    *instance,
                    Draining {
                        generation: *generation,
                        pid: *pid,
                        tasks: *tasks,
                    },
                );
            }
            _ => {}
        }
    }

    /// Replied, and its generation's `done` seen.
    pub fn settled(&self) -> bool {
        self.replied && self.done
    }

    /// Settled, and no older instance that reports its tasks is still draining.
    pub fn finished(&self) -> bool {
        self.settled() && self.draining.values().all(|d| d.tasks.is_none())
    }

    /// Replied, but its `done` not seen (yet).
    pub fn replied(&self) -> bool {
        self.replied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(reason: &str) -> Progress {
        Progress::Started {
            pid: 10,
            reason: reason.into(),
        }
    }

    fn done(success: bool) -> Progress {
        Progress::Done {
            success,
            message: "m".into(),
        }
    }

    fn draining(tasks: Option<u32>) -> Progress {
        Progress::Draining {
            generation: 1,
            instance: 1,
            pid: 5,
            tasks,
        }
    }

    fn at(generation: u64, progress: Progress) -> Input {
        Input::Progress {
            generation,
            progress,
        }
    }

    fn phases(shown: Vec<(u64, Progress)>) -> Vec<(u64, &'static str)> {
        shown.into_iter().map(|(g, p)| (g, p.phase())).collect()
    }

    #[test]
    fn a_lone_reload_is_shown_as_it_happens_and_ends_with_reply_and_done() {
        let mut f = Follow::default();
        assert_eq!(phases(f.feed(at(2, started("reload")))), [(2, "started")]);
        assert_eq!(
            phases(f.feed(at(2, Progress::Ready { seconds: 0.5 }))),
            [(2, "ready")]
        );
        assert_eq!(phases(f.feed(at(2, draining(None)))), [(2, "draining")]);
        assert_eq!(phases(f.feed(at(2, done(true)))), [(2, "done")]);
        assert!(!f.finished(), "not before the reply");
        assert!(f.feed(Input::Replied(Ok(2))).is_empty());
        assert!(
            f.finished(),
            "an instance that reports no tasks is not waited for"
        );
    }

    #[test]
    fn the_reply_may_come_before_done() {
        let mut f = Follow::default();
        f.feed(at(2, started("reload")));
        f.feed(Input::Replied(Ok(2)));
        assert!(f.replied() && !f.settled());
        f.feed(at(2, done(true)));
        assert!(f.finished());
    }

    #[test]
    fn a_crash_restart_is_not_taken_for_the_reload() {
        let mut f = Follow::default();
        assert!(f.feed(at(2, started("restart"))).is_empty());
        assert!(f.feed(at(2, done(true))).is_empty());
        assert_eq!(phases(f.feed(at(3, started("reload")))), [(3, "started")]);
    }

    #[test]
    fn when_the_reply_names_another_generation_its_kept_phases_are_shown() {
        let mut f = Follow::default();
        // A reload already running when ours was asked; ours is the follow-up.
        f.feed(at(2, started("reload")));
        f.feed(at(2, done(true)));
        f.feed(at(3, started("reload")));
        f.feed(at(3, Progress::Status { text: "x".into() }));
        f.feed(at(3, done(true)));
        assert_eq!(
            phases(f.feed(Input::Replied(Ok(3)))),
            [(3, "started"), (3, "status"), (3, "done")]
        );
        assert!(f.finished());
        assert!(
            f.feed(at(4, started("reload"))).is_empty(),
            "after the reply, only its generation"
        );
    }

    #[test]
    fn a_reload_that_failed_before_starting_anything_ends_with_generation_0s_done() {
        let mut f = Follow::default();
        assert!(f.feed(at(0, done(false))).is_empty());
        assert_eq!(
            phases(f.feed(Input::Replied(Err("bad config".into())))),
            [(0, "done")]
        );
        assert!(f.finished());
    }

    #[test]
    fn a_failure_whose_done_comes_after_the_reply_ends_it() {
        let mut f = Follow::default();
        assert!(
            f.feed(Input::Replied(Err("cannot spawn".into())))
                .is_empty()
        );
        assert!(!f.finished());
        assert!(f.feed(at(4, done(true))).is_empty(), "not a success");
        assert_eq!(phases(f.feed(at(3, done(false)))), [(3, "done")]);
        assert!(f.finished());
    }

    #[test]
    fn a_failed_generation_ends_with_its_done() {
        let mut f = Follow::default();
        f.feed(at(2, started("reload")));
        f.feed(Input::Replied(Err("exited".into())));
        assert!(!f.finished());
        assert_eq!(phases(f.feed(at(2, done(false)))), [(2, "done")]);
        assert!(f.finished());
    }

    #[test]
    fn reported_tasks_count_down_until_the_draining_instance_exits() {
        let mut f = Follow::default();
        f.feed(at(2, started("reload")));
        f.feed(at(2, draining(Some(3))));
        f.feed(at(2, done(true)));
        f.feed(Input::Replied(Ok(2)));
        assert!(f.settled() && !f.finished());
        let shown = f.feed(Input::Tasks {
            instance: 1,
            tasks: 2,
        });
        assert_eq!(shown[0].1, draining(Some(2)));
        assert!(
            f.feed(Input::Tasks {
                instance: 1,
                tasks: 2
            })
            .is_empty(),
            "an unchanged count is not shown again"
        );
        assert!(
            f.feed(Input::Tasks {
                instance: 9,
                tasks: 1
            })
            .is_empty(),
            "another instance's"
        );
        f.feed(Input::Tasks {
            instance: 1,
            tasks: 0,
        });
        assert!(!f.finished());
        f.feed(Input::Exited { instance: 1 });
        assert!(f.finished());
    }
}
