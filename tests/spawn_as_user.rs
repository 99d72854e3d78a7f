//! Instances with `user` set: they run with exactly the configured ids, and
//! spawning them never reads the user database between fork and exec, where a
//! lock another broker thread held at the fork would hang the child.
//!
//! Switching users needs root: as anyone else these tests say so and pass.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ally::config::Config;
use ally::generations::{Generation, InstanceId};
use ally::identity::RunAs;
use ally::instance::{self, Launch};
use common::*;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Group, User, getgrouplist};

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: switching the instances' user needs root");
    false
}

/// Ids as /proc/PID/status shows them: (real uid, real gid, supplementary groups).
fn ids_of(pid: u32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    (
        field("Uid:")
            .first()
            .cloned()
            .unwrap_or_default()
            .to_string(),
        field("Gid:")
            .first()
            .cloned()
            .unwrap_or_default()
            .to_string(),
        field("Groups:").join(" "),
    )
}

/// A numeric uid the user database does not know, with a group: the instance
/// runs as that uid (it used to keep root's, as only a named user was switched to).
#[test]
fn an_unnamed_uid_is_the_uid_the_instance_runs_as() {
    if !is_root() {
        return;
    }
    assert!(User::from_uid(3999999.into()).unwrap().is_none());
    let broker = TestBroker::start(
        "unnamed",
        "command = [\"/bin/sleep\", \"60\"]\nuser = 3999999\ngroup = 3999998\n",
    );
    let pid = sleeping_instance(&broker);
    assert_eq!(
        ids_of(pid),
        ("3999999".into(), "3999998".into(), "3999998".into())
    );
}

/// The named user's ids, with its supplementary groups from the database.
#[test]
fn a_named_user_runs_with_its_groups() {
    if !is_root() {
        return;
    }
    let broker = TestBroker::start(
        "named",
        "command = [\"/bin/sleep\", \"60\"]\nuser = \"nobody\"\n",
    );
    let pid = sleeping_instance(&broker);
    let nobody = User::from_name("nobody").unwrap().unwrap();
    let groups: Vec<String> = getgrouplist(c"nobody", nobody.gid)
        .unwrap()
        .into_iter()
        .map(|g| g.as_raw().to_string())
        .collect();
    assert_eq!(
        ids_of(pid),
        (
            nobody.uid.to_string(),
            nobody.gid.to_string(),
            groups.join(" ")
        )
    );
}

const SPAWNS: usize = 200;
const HAMMERS: usize = 4;

/// 200 spawns as `nobody` from a process whose other threads read the user
/// and group databases without pause, as the broker's threads may (a bind on
/// the instances' behalf, a status naming the user). Every child must exec and
/// exit within a deadline, with nobody's ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawning_as_a_user_does_not_hang_while_other_threads_read_the_user_database() {
    if !is_root() {
        return;
    }
    let config = Config::parse(
        "command = [\"/bin/true\"]\nuser = \"nobody\"\n",
        Path::new("/etc/ally/nss.toml"),
        None,
    )
    .unwrap();
    let run_as = RunAs::resolve(&config).unwrap();
    assert!(run_as.switch && run_as.set_groups);
    let groups: Vec<String> = run_as.groups.iter().map(u32::to_string).collect();
    // `id -G` lists the effective gid first, then the rest.
    let mut expected_groups = vec![run_as.gid.to_string()];
    expected_groups.extend(groups.into_iter().filter(|g| *g != run_as.gid.to_string()));
    let check = format!(
        "[ \"$(id -u) $(id -g)\" = \"{} {}\" ] && [ \"$(id -G)\" = \"{}\" ]",
        run_as.uid,
        run_as.gid,
        expected_groups.join(" ")
    );
    let checked = Launch {
        command: vec!["/bin/sh".into(), "-c".into(), check],
        working_directory: None,
        run_as,
        environment: BTreeMap::new(),
        app: "nss".into(),
        address: String::new(),
        state_address: String::new(),
        stop_signal: Signal::SIGTERM,
        drain_idle: ally::config::DEFAULT_DRAIN_IDLE,
        stdout: ally::config::Output::Inherit,
        stderr: ally::config::Output::Inherit,
    };
    let plain = Launch {
        command: vec!["/bin/true".into()],
        ..checked.clone()
    };

    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let hammers: Vec<_> = (0..HAMMERS)
        .map(|_| {
            let (stop, lookups) = (stop.clone(), lookups.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let nobody = User::from_name("nobody").unwrap().unwrap();
                    User::from_name("no-such-user-ally").unwrap();
                    getgrouplist(c"nobody", nobody.gid).unwrap();
                    getgrouplist(c"root", Gid::from_raw(0)).unwrap();
                    Group::from_name("no-such-group-ally").unwrap();
                    lookups.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The hammers are busy before the first fork.
    while lookups.load(Ordering::Relaxed) < HAMMERS as u64 {
        tokio::task::yield_now().await;
    }

    let started = Instant::now();
    let deadline = Duration::from_secs(120);
    let mut failures = Vec::new();
    for n in 0..SPAWNS {
        // Every tenth child checks its ids; the rest only exec.
        let launch = if n % 10 == 0 { &checked } else { &plain };
        let mut child = instance::spawn(
            launch,
            InstanceId::try_from(n).unwrap() + 1,
            Generation::default() + 1,
            false,
            Default::default(),
        )
        .unwrap_or_else(|e| panic!("spawn {n}: {e}"));
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        match tokio::time::timeout(left, child.wait()).await {
            Ok(status) => {
                let status = status.unwrap();
                if !status.success() {
                    failures.push(format!("spawn {n}: {status}"));
                }
            }
            Err(_) => {
                let pid = child.id();
                let _ = child.start_kill();
                stop.store(true, Ordering::Relaxed);
                panic!(
                    "spawn {n} (pid {pid:?}) did not exit within {deadline:?} of the first: hung between fork and exec?"
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for hammer in hammers {
        hammer.join().unwrap();
    }
    assert!(failures.is_empty(), "wrong ids: {failures:?}");
    eprintln!(
        "{SPAWNS} spawns as nobody in {:?} while {HAMMERS} threads made {} rounds of lookups",
        started.elapsed(),
        lookups.load(Ordering::Relaxed)
    );
}

/// The pid of the broker's first instance once it runs `sleep` itself (it may
/// still be between fork and exec when the broker lists it).
fn sleeping_instance(broker: &TestBroker) -> u32 {
    let mut pids = Vec::new();
    wait_until("the instance to start", Duration::from_secs(10), || {
        pids = broker.pids("starting");
        !pids.is_empty()
    });
    wait_until("the instance to exec", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{}/comm", pids[0]))
            .is_ok_and(|c| c.trim() == "sleep")
    });
    pids[0]
}
