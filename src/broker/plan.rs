//! What the coordinator does next, decided from what has happened: which
//! generation to start and when, what to answer the callers, what becomes of a
//! new generation once waiting for it ends, and when the broker gives up.
//! Pure: the coordinator (`super::coordinator`) does the I/O.

use std::io;
use std::time::Duration;

use crate::config::RestartPolicy;
use crate::generations::Generation;

/// An instance that stays ready this long has recovered: its next crash
/// restarts without back-off.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Back-off of crash restarts grows up to this (or `restart_delay`, if longer).
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);

/// Something asked of the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The broker's first start of the application.
    Start,
    Reload,
    /// The current instance exited; `stable` if it had served for a while.
    Restart {
        stable: bool,
    },
    /// The current instance exited and the restart policy does not restart it.
    GiveUp {
        code: i32,
    },
}

/// Which kind of generation a launch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    Start,
    Reload,
    Restart,
}

impl Launch {
    /// As the `started` phase's `reason` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Launch::Start => "start",
            Launch::Reload => "reload",
            Launch::Restart => "restart",
        }
    }
}

/// What the broker knows when it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub stopping: bool,
    /// The generation that serves, if any.
    pub current: Option<Generation>,
    /// Whether any instance still runs (starting or ready).
    pub running: bool,
}

/// A crash restart waiting for its back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    /// 1 for the first restart since the app last recovered.
    pub attempt: u32,
    pub delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Answer every pending request: the broker is stopping.
    AnswerStopping,
    /// Answer every pending request with the generation that serves: a crash
    /// while a reload was in flight was already replaced by it.
    AnswerServing(Generation),
    /// The application is gone and is not restarted: the broker exits.
    Exit { code: i32 },
    /// Nothing to do: the give-up of an instance while others still run.
    Forget,
    /// Start a generation; a crash restart first waits for its back-off.
    Launch {
        launch: Launch,
        restart: Option<Restart>,
    },
}

/// How a launch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ready,
    /// It could not start, exited, or was not ready in time.
    Failed,
    /// The command could not be executed at all (missing, not executable,
    /// not a program).
    NotExecutable,
}

/// What follows a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Done,
    /// Nothing serves: recover as from a crash.
    Restart,
    /// Nothing serves and nothing will: the broker exits. `fatal` when the very
    /// first start could not execute the command, whose reason is then the
    /// broker's last word.
    Exit {
        code: i32,
        fatal: bool,
    },
}

/// How waiting for a new generation to be ready ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    Ready,
    /// It exited on its own.
    Exited,
    /// `ready_timeout` passed.
    TimedOut,
    /// The broker is stopping.
    Stopping,
}

/// What becomes of the new generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// It serves: the older instances are asked to stop.
    Promote,
    /// It failed but may have accepted connections on the shared sockets: it is
    /// stopped as an old generation is (stop signal, `stop_timeout`, SIGKILL),
    /// never killed outright.
    Stop,
    /// It is gone already.
    Nothing,
}

pub fn settle(waited: Waited) -> Settle {
    match waited {
        Waited::Ready => Settle::Promote,
        Waited::TimedOut | Waited::Stopping => Settle::Stop,
        Waited::Exited => Settle::Nothing,
    }
}

/// Whether a spawn error means the command cannot be executed, rather than a
/// shortage the next attempt may not meet.
pub fn cannot_execute(kind: io::ErrorKind) -> bool {
    !matches!(
        kind,
        io::ErrorKind::OutOfMemory | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

/// The back-off before crash restart `attempt` (0 first).
pub fn restart_delay(base: Duration, attempt: u32) -> Duration {
    let cap = MAX_RESTART_DELAY.max(base);
    base.saturating_mul(1u32 << attempt.min(16)).min(cap)
}

#[derive(Debug, Clone)]
pub struct Plan {
    restart_delay: Duration,
    policy: RestartPolicy,
    /// Crash restarts since the app last recovered.
    restarts: u32,
}

impl Plan {
    pub fn new(restart_delay: Duration, policy: RestartPolicy) -> Plan {
        Plan {
            restart_delay,
            policy,
            restarts: 0,
        }
    }

    /// Crash restarts since the app last recovered: carried by a re-exec or a
    /// broker restart, so the back-off goes on where it was.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    pub fn resume(&mut self, restarts: u32) {
        self.restarts = restarts;
    }

    /// Takes a reloaded config's restart keys; the back-off counted so far stays.
    pub fn reconfigure(&mut self, restart_delay: Duration, policy: RestartPolicy) {
        self.restart_delay = restart_delay;
        self.policy = policy;
    }

    /// The next step for the requests that are pending (all are answered by it).
    pub fn next(&mut self, pending: &[Request], facts: Facts) -> Step {
        if facts.stopping {
            return Step::AnswerStopping;
        }
        let wants = |pred: fn(&Request) -> bool| pending.iter().any(pred);
        let reload = wants(|r| matches!(r, Request::Reload));
        let start = wants(|r| matches!(r, Request::Start));
        let restart = wants(|r| matches!(r, Request::Restart { .. }));
        if wants(|r| matches!(r, Request::Restart { stable: true })) {
            self.restarts = 0;
        }
        if !reload && let Some(generation) = facts.current {
            return Step::AnswerServing(generation);
        }
        if !reload && !start && !restart {
            if facts.running {
                return Step::Forget;
            }
            let code = pending
                .iter()
                .find_map(|r| match r {
                    Request::GiveUp { code } => Some(*code),
                    _ => None,
                })
                .unwrap_or(0);
            return Step::Exit { code };
        }
        if reload {
            return Step::Launch {
                launch: Launch::Reload,
                restart: None,
            };
        }
        if start {
            return Step::Launch {
                launch: Launch::Start,
                restart: None,
            };
        }
        let delay = restart_delay(self.restart_delay, self.restarts);
        self.restarts = self.restarts.saturating_add(1);
        Step::Launch {
            launch: Launch::Restart,
            restart: Some(Restart {
                attempt: self.restarts,
                delay,
            }),
        }
    }

    /// What follows a launch that ended with `outcome`.
    pub fn finished(&mut self, launch: Launch, outcome: Outcome, facts: Facts) -> After {
        if outcome == Outcome::Ready {
            if launch == Launch::Reload {
                self.restarts = 0;
            }
            return After::Done;
        }
        if facts.stopping || facts.current.is_some() {
            return After::Done;
        }
        if launch == Launch::Start && outcome == Outcome::NotExecutable {
            return After::Exit {
                code: 1,
                fatal: true,
            };
        }
        if self.policy != RestartPolicy::Never {
            After::Restart
        } else if facts.running {
            After::Done
        } else {
            After::Exit {
                code: 1,
                fatal: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn facts(current: Option<Generation>, running: bool) -> Facts {
        Facts {
            stopping: false,
            current,
            running,
        }
    }

    fn plan() -> Plan {
        Plan::new(SECOND, RestartPolicy::OnFailure)
    }

    fn restart_attempt(step: Step) -> Restart {
        match step {
            Step::Launch {
                launch: Launch::Restart,
                restart: Some(r),
            } => r,
            other => panic!("expected a delayed restart, got {other:?}"),
        }
    }

    #[test]
    fn restart_back_off_doubles_up_to_a_cap() {
        assert_eq!(restart_delay(SECOND, 0), SECOND);
        assert_eq!(restart_delay(SECOND, 1), 2 * SECOND);
        assert_eq!(restart_delay(SECOND, 3), 8 * SECOND);
        assert_eq!(restart_delay(SECOND, 30), MAX_RESTART_DELAY);
        let slow = Duration::from_secs(120);
        assert_eq!(restart_delay(slow, 5), slow);
    }

    #[test]
    fn crash_restarts_back_off_and_count_their_attempts() {
        let mut p = plan();
        let crash = [Request::Restart { stable: false }];
        let first = restart_attempt(p.next(&crash, facts(None, false)));
        assert_eq!((first.attempt, first.delay), (1, SECOND));
        // It came up, then crashed again before it was stable.
        assert_eq!(
            p.finished(Launch::Restart, Outcome::Ready, facts(Some(2), true)),
            After::Done
        );
        let second = restart_attempt(p.next(&crash, facts(None, false)));
        assert_eq!((second.attempt, second.delay), (2, 2 * SECOND));
        // A failed restart is recovered from as another crash.
        assert_eq!(
            p.finished(Launch::Restart, Outcome::Failed, facts(None, false)),
            After::Restart
        );
        let third = restart_attempt(p.next(&crash, facts(None, false)));
        assert_eq!((third.attempt, third.delay), (3, 4 * SECOND));
    }

    #[test]
    fn a_stable_crash_or_a_good_reload_forgets_the_back_off() {
        let mut p = plan();
        let crash = [Request::Restart { stable: false }];
        p.next(&crash, facts(None, false));
        p.next(&crash, facts(None, false));
        let stable = [Request::Restart { stable: true }];
        assert_eq!(
            restart_attempt(p.next(&stable, facts(None, false))).attempt,
            1
        );
        p.next(&crash, facts(None, false));
        p.finished(Launch::Reload, Outcome::Ready, facts(Some(5), true));
        assert_eq!(
            restart_attempt(p.next(&crash, facts(None, false))).attempt,
            1
        );
    }

    #[test]
    fn a_reload_wins_over_everything_and_starts_at_once() {
        let mut p = plan();
        let pending = [
            Request::Restart { stable: false },
            Request::Reload,
            Request::GiveUp { code: 3 },
        ];
        assert_eq!(
            p.next(&pending, facts(Some(1), true)),
            Step::Launch {
                launch: Launch::Reload,
                restart: None
            }
        );
    }

    #[test]
    fn a_crash_already_replaced_by_a_reload_is_answered_with_it() {
        let mut p = plan();
        let pending = [Request::Restart { stable: false }];
        assert_eq!(
            p.next(&pending, facts(Some(4), true)),
            Step::AnswerServing(4)
        );
    }

    #[test]
    fn stopping_answers_everything() {
        let mut p = plan();
        let stopping = Facts {
            stopping: true,
            current: Some(1),
            running: true,
        };
        assert_eq!(p.next(&[Request::Reload], stopping), Step::AnswerStopping);
        assert_eq!(
            p.finished(Launch::Reload, Outcome::Failed, stopping),
            After::Done
        );
    }

    #[test]
    fn giving_up_exits_once_nothing_runs() {
        let mut p = Plan::new(SECOND, RestartPolicy::Never);
        let gone = [Request::GiveUp { code: 3 }];
        assert_eq!(p.next(&gone, facts(None, true)), Step::Forget);
        assert_eq!(p.next(&gone, facts(None, false)), Step::Exit { code: 3 });
        assert_eq!(
            p.finished(Launch::Start, Outcome::Failed, facts(None, false)),
            After::Exit {
                code: 1,
                fatal: false
            }
        );
        assert_eq!(
            p.finished(Launch::Start, Outcome::Failed, facts(None, true)),
            After::Done
        );
    }

    #[test]
    fn a_first_start_that_cannot_execute_the_command_exits_at_once() {
        let mut p = plan();
        assert_eq!(
            p.next(&[Request::Start], facts(None, false)),
            Step::Launch {
                launch: Launch::Start,
                restart: None
            }
        );
        assert_eq!(
            p.finished(Launch::Start, Outcome::NotExecutable, facts(None, false)),
            After::Exit {
                code: 1,
                fatal: true
            }
        );
        // A first start that ran but failed is retried with back-off.
        assert_eq!(
            p.finished(Launch::Start, Outcome::Failed, facts(None, false)),
            After::Restart
        );
    }

    #[test]
    fn a_restart_that_cannot_execute_keeps_its_back_off() {
        let mut p = plan();
        assert_eq!(
            p.finished(Launch::Restart, Outcome::NotExecutable, facts(None, false)),
            After::Restart
        );
        // A reload of a broken build leaves the serving generation alone.
        assert_eq!(
            p.finished(Launch::Reload, Outcome::NotExecutable, facts(Some(2), true)),
            After::Done
        );
    }

    #[test]
    fn a_reloaded_restart_policy_applies_to_the_next_crash() {
        let mut p = plan();
        p.reconfigure(5 * SECOND, RestartPolicy::Never);
        assert_eq!(
            p.finished(Launch::Restart, Outcome::Failed, facts(None, false)),
            After::Exit {
                code: 1,
                fatal: false
            }
        );
        let mut p = plan();
        p.reconfigure(5 * SECOND, RestartPolicy::Always);
        let crash = [Request::Restart { stable: false }];
        assert_eq!(
            restart_attempt(p.next(&crash, facts(None, false))).delay,
            5 * SECOND
        );
    }

    #[test]
    fn a_failed_new_generation_is_stopped_not_killed() {
        assert_eq!(settle(Waited::TimedOut), Settle::Stop);
        assert_eq!(settle(Waited::Stopping), Settle::Stop);
        assert_eq!(settle(Waited::Ready), Settle::Promote);
        assert_eq!(settle(Waited::Exited), Settle::Nothing);
    }

    #[test]
    fn only_shortages_are_worth_another_try() {
        for kind in [
            io::ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput,
            io::ErrorKind::Other,
        ] {
            assert!(cannot_execute(kind), "{kind:?}");
        }
        for kind in [io::ErrorKind::OutOfMemory, io::ErrorKind::WouldBlock] {
            assert!(!cannot_execute(kind), "{kind:?}");
        }
    }
}
