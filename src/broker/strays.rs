//! Strays: processes in the unit's cgroup that are no instance of this broker.
//!
//! A broker restarted after a crash adopts the instances its snapshot names.
//! A process the snapshot missed — an instance started in the dead broker's
//! last moments, before a snapshot named it, or the instances of a snapshot that
//! could not be read — keeps serving on the shared sockets, out of any
//! generation: a reload would never replace it, and old code would answer
//! requests forever. Once an instance this broker knows is ready, each stray is
//! stopped as an old generation is: its stop signal, then SIGKILL after
//! `stop_timeout`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::cgroup::{self, OwnCgroup};
use crate::process::Process;

use super::{Broker, InstanceState};

/// A process of the cgroup, as the classification needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    /// It runs the broker's own binary: `ally reload` or `ally stop-post` run
    /// by systemd in the unit's cgroup, never an instance.
    pub ours: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Strays {
    /// Strays whose parent is not a stray: each heads a tree of them.
    pub roots: Vec<u32>,
    pub all: Vec<u32>,
}

/// Which of `procs` are strays: neither the broker, nor a process it tracks
/// (`kept`), nor a descendant of either, nor running the broker's binary.
pub fn classify(procs: &[Proc], broker: u32, kept: &HashSet<u32>) -> Strays {
    let parent: HashMap<u32, u32> = procs.iter().map(|p| (p.pid, p.ppid)).collect();
    let ours: HashSet<u32> = procs.iter().filter(|p| p.ours).map(|p| p.pid).collect();
    let known = |pid: u32| {
        let mut at = pid;
        let mut seen = HashSet::new();
        loop {
            if at == broker || kept.contains(&at) || ours.contains(&at) {
                return true;
            }
            match parent.get(&at) {
                Some(&up) if seen.insert(at) => at = up,
                _ => return false,
            }
        }
    };
    let mut all: Vec<u32> = procs.iter().map(|p| p.pid).filter(|&p| !known(p)).collect();
    all.sort_unstable();
    let set: HashSet<u32> = all.iter().copied().collect();
    let roots = all
        .iter()
        .copied()
        .filter(|pid| parent.get(pid).is_none_or(|up| !set.contains(up)))
        .collect();
    Strays { roots, all }
}

/// The processes in `dir` (the unit's cgroup) and the cgroups below it.
fn scan(dir: &Path) -> Vec<Proc> {
    let exe = |pid: &str| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| {
                let s = p.to_string_lossy();
                s.strip_suffix(" (deleted)").unwrap_or(&s).to_string()
            })
    };
    let own_exe = exe("self");
    cgroup::procs_below(dir)
        .into_iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The name in parentheses may hold anything; the fields follow its last ')'.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let ours = own_exe.is_some() && exe(&pid.to_string()) == own_exe;
            Some(Proc { pid, ppid, ours })
        })
        .collect()
}

impl Broker {
    /// Every process the broker tracks: its instances and their `MAINPID`s.
    fn tracked_pids(&self) -> HashSet<u32> {
        let shared = self.lock();
        shared
            .tracked
            .values()
            .flat_map(|t| [Some(t.process.pid()), t.main.as_ref().map(|m| m.pid())])
            .flatten()
            .collect()
    }

    fn strays(&self, dir: &Path) -> Strays {
        classify(&scan(dir), std::process::id(), &self.tracked_pids())
    }

    fn has_ready_instance(&self) -> bool {
        self.lock()
            .table
            .iter()
            .any(|i| i.state == InstanceState::Ready)
    }

    /// Under systemd, after a start: stops the strays of the unit's cgroup (see
    /// the module's docs) once an instance of this broker is ready.
    pub async fn stop_strays(self: Arc<Self>) {
        let unit = format!("ally@{}.service", self.app);
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| e.to_string())
            .and_then(|text| cgroup::own_cgroup(&text, &unit));
        let unit_cgroup = match own {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("not looking for strays: {e}");
                return;
            }
        };
        let Some(dir) = unit_cgroup.dir() else {
            return;
        };
        let found = self.strays(&dir);
        if found.all.is_empty() {
            return;
        }
        tracing::warn!(
            "{} in {unit} {} no instance of this broker (no snapshot it could read named {}): stopped once an instance of this broker is ready",
            describe(&found.all),
            if found.all.len() == 1 { "is" } else { "are" },
            if found.all.len() == 1 { "it" } else { "them" },
        );
        let mut events = self.subscribe();
        while !self.has_ready_instance() {
            if *self.stopping.borrow() {
                return;
            }
            // Events can be missed (a lagging receiver); look again now and then.
            let _ = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
        }
        self.stop(&unit_cgroup, &dir).await;
    }

    async fn stop(&self, unit_cgroup: &OwnCgroup, dir: &Path) {
        let config = self.settings().config.clone();
        let found = self.strays(dir);
        let mut stopping = Vec::new();
        for pid in found.roots {
            let Ok(process) = Process::pin(pid) else {
                continue;
            };
            // Pinned and alive after the check: the check was about this process.
            let inside = cgroup::holds(unit_cgroup, pid);
            if process.has_exited() || !inside {
                continue;
            }
            tracing::info!(
                "stopping stray {pid} ({}) with {}",
                cgroup::comm(pid),
                config.stop_signal
            );
            process.signal(config.stop_signal);
            stopping.push(process);
        }
        let all_exited = async {
            for process in &stopping {
                process.exited().await;
            }
        };
        if tokio::time::timeout(config.stop_timeout, all_exited)
            .await
            .is_ok()
            && self.strays(dir).all.is_empty()
        {
            tracing::info!("the strays are gone");
            return;
        }
        for pid in self.strays(dir).all {
            let name = cgroup::comm(pid);
            match cgroup::signal_in_cgroup(pid, unit_cgroup, libc::SIGKILL) {
                Ok(true) => tracing::warn!(
                    "killed stray {pid} ({name}): still running {} after its stop signal",
                    humantime::format_duration(config.stop_timeout)
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot kill stray {pid} ({name}): {e}"),
            }
        }
    }
}

fn describe(pids: &[u32]) -> String {
    let named: Vec<String> = pids
        .iter()
        .map(|&pid| format!("{pid} ({})", cgroup::comm(pid)))
        .collect();
    format!(
        "process{} {}",
        if pids.len() == 1 { "" } else { "es" },
        named.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, ppid: u32) -> Proc {
        Proc {
            pid,
            ppid,
            ours: false,
        }
    }

    #[test]
    fn the_broker_its_instances_and_their_descendants_are_no_strays() {
        // 100 the broker, 200 an adopted instance (reparented to 1) with a
        // worker 201 and its child 202, 300 a new instance (the broker's child).
        let procs = [p(100, 1), p(200, 1), p(201, 200), p(202, 201), p(300, 100)];
        let kept = HashSet::from([200]);
        assert_eq!(classify(&procs, 100, &kept), Strays::default());
    }

    #[test]
    fn an_unknown_tree_is_a_stray_headed_by_its_root() {
        let procs = [p(100, 1), p(200, 1), p(400, 1), p(401, 400), p(402, 401)];
        let kept = HashSet::from([200]);
        let found = classify(&procs, 100, &kept);
        assert_eq!(found.roots, vec![400]);
        assert_eq!(found.all, vec![400, 401, 402]);
    }

    #[test]
    fn a_main_pid_the_broker_tracks_is_kept_with_its_children() {
        // 500 is an instance's MAINPID: a daemon its launcher forked.
        let procs = [p(100, 1), p(500, 1), p(501, 500)];
        let kept = HashSet::from([500]);
        assert!(classify(&procs, 100, &kept).all.is_empty());
    }

    #[test]
    fn the_brokers_own_binary_run_by_systemd_is_no_stray() {
        // `ally reload` (ExecReload) runs in the cgroup as systemd's child.
        let procs = [
            p(100, 1),
            Proc {
                pid: 600,
                ppid: 1,
                ours: true,
            },
        ];
        assert!(classify(&procs, 100, &HashSet::new()).all.is_empty());
    }

    #[test]
    fn a_child_of_a_process_outside_the_cgroup_heads_its_tree() {
        // 700's parent 50 is outside the cgroup (not listed).
        let procs = [p(100, 1), p(700, 50), p(701, 700)];
        let found = classify(&procs, 100, &HashSet::new());
        assert_eq!(found.roots, vec![700]);
        assert_eq!(found.all, vec![700, 701]);
    }

    #[test]
    fn a_parent_loop_ends() {
        // Pids read at different moments can disagree; never loop forever.
        let procs = [p(100, 1), p(800, 801), p(801, 800)];
        let found = classify(&procs, 100, &HashSet::new());
        assert_eq!(found.all, vec![800, 801]);
        // No root to signal: both are killed at `stop_timeout`.
        assert!(found.roots.is_empty());
    }
}
