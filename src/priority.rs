//! The CPU priority of a generation that starts beside a serving one
//! (`start_priority = "idle"`).
//!
//! Starting a process costs CPU: exec, dynamic loading, page faults, runtime
//! and thread start-up, the app's own warm-up. On a busy host that work
//! preempts the serving generation's threads while they have requests in
//! flight, and their clients see it as latency. Under `SCHED_IDLE` the new
//! generation runs only on CPU time nothing else wants, so the serving one is
//! not preempted by it. Once the new generation is ready, every thread of it
//! and of its descendants that is still idle returns to the broker's own
//! policy, before the old generation is asked to stop.
//!
//! The child inherits `SCHED_IDLE` from the short-lived thread that spawns it,
//! so it is idle from its first instruction and the spawn still uses
//! `vfork`: setting the policy in a `pre_exec` hook would force a full `fork`
//! of the broker, whose page-table copy costs more than the hook saves.

use std::collections::BTreeSet;
use std::io;

/// A thread's scheduling policy and its parameters.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    policy: libc::c_int,
    priority: libc::c_int,
}

impl Policy {
    /// The calling thread's policy: the broker's, which instances normally inherit.
    pub fn of_this_thread() -> io::Result<Policy> {
        // SAFETY: plain syscalls on the calling thread with a valid out-pointer.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            if policy < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut param = libc::sched_param { sched_priority: 0 };
            if libc::sched_getparam(0, &mut param) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Policy {
                // Not inherited across the spawn, and not ours to pass on.
                policy: policy & !libc::SCHED_RESET_ON_FORK,
                priority: param.sched_priority,
            })
        }
    }

    fn idle() -> Policy {
        Policy {
            policy: libc::SCHED_IDLE,
            priority: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.policy == libc::SCHED_IDLE
    }

    /// Sets thread `tid` (0: the calling thread) to this policy.
    fn apply(&self, tid: i32) -> io::Result<()> {
        let param = libc::sched_param {
            sched_priority: self.priority,
        };
        // SAFETY: a plain syscall with a valid pointer to a local.
        if unsafe { libc::sched_setscheduler(tid, self.policy, &param) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Runs `spawn` on a thread of its own under `SCHED_IDLE`, so whatever it
/// starts inherits the policy.
pub fn spawn_idle<T: Send>(spawn: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("idle".into())
            .spawn_scoped(scope, || {
                Policy::idle()
                    .apply(0)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot set SCHED_IDLE: {e}")))?;
                spawn()
            })?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Checks that the broker may return an idle thread to `normal`, the check the
/// kernel makes when a starting generation is raised: it needs
/// `CAP_SYS_NICE`, or an `RLIMIT_NICE` that allows the nice value.
pub fn check_can_raise(normal: Policy) -> io::Result<()> {
    if normal.is_idle() {
        return Ok(());
    }
    spawn_idle(|| normal.apply(0))
}

/// What [`raise`] did.
#[derive(Debug, Default)]
pub struct Raised {
    pub threads: usize,
    /// Threads that could not be raised; vanished ones are not counted.
    pub failed: Vec<(i32, io::Error)>,
}

/// Returns every `SCHED_IDLE` thread of process `pid` and of its descendants
/// to `normal`. Threads and children started meanwhile inherit from a thread
/// that may not have been raised yet, so it scans again until a pass finds
/// nothing new.
pub fn raise(pid: u32, normal: Policy) -> Raised {
    let mut raised = Raised::default();
    let mut seen = BTreeSet::new();
    loop {
        let fresh: Vec<i32> = threads_of_tree(pid)
            .into_iter()
            .filter(|tid| seen.insert(*tid))
            .collect();
        if fresh.is_empty() {
            return raised;
        }
        for tid in fresh {
            if !is_idle(tid) {
                continue;
            }
            match normal.apply(tid) {
                Ok(()) => raised.threads += 1,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => raised.failed.push((tid, e)),
            }
        }
    }
}

fn is_idle(tid: i32) -> bool {
    // SAFETY: a plain syscall; a vanished thread answers -1.
    unsafe { libc::sched_getscheduler(tid) == libc::SCHED_IDLE }
}

/// Every thread of `pid` and of its descendants, as `/proc` lists them now.
pub fn threads_of_tree(pid: u32) -> Vec<i32> {
    let mut threads = Vec::new();
    let mut processes = vec![pid];
    while let Some(process) = processes.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{process}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            threads.push(tid);
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                processes.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    threads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_of(tid: i32) -> libc::c_int {
        unsafe { libc::sched_getscheduler(tid) }
    }

    #[test]
    fn a_spawned_child_starts_idle_and_is_raised_with_its_threads_and_children() {
        let normal = Policy::of_this_thread().unwrap();
        assert!(!normal.is_idle());
        if let Err(e) = check_can_raise(normal) {
            eprintln!("skipped: this process may not leave SCHED_IDLE ({e})");
            return;
        }
        // A shell whose child (a sleep) also inherits the policy.
        let mut child = spawn_idle(|| {
            std::process::Command::new("sh")
                .args(["-c", "sleep 30 & wait"])
                .spawn()
        })
        .unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while threads_of_tree(pid).len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the sleep never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let tree = threads_of_tree(pid);
        assert!(tree.iter().all(|&t| policy_of(t) == libc::SCHED_IDLE));
        assert_eq!(policy_of(0), normal.policy, "the caller is untouched");

        let raised = raise(pid, normal);
        assert_eq!(raised.threads, tree.len(), "{raised:?}");
        assert!(raised.failed.is_empty(), "{raised:?}");
        assert!(tree.iter().all(|&t| policy_of(t) == normal.policy));

        assert_eq!(raise(pid, normal).threads, 0, "nothing left to raise");
        let _ = std::process::Command::new("pkill")
            .args(["-P", &pid.to_string()])
            .status();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
