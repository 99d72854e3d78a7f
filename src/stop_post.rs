//! `ally stop-post APP`: the `ExecStopPost=` of ally@APP.service.
//!
//! The unit runs with `KillMode=process`, so systemd signals only the broker and
//! leaves the instances in the cgroup: after a crash they keep serving until the
//! restarted broker adopts them. After a real stop nothing may stay behind, so
//! this command tells the two apart and, on a stop, kills what is left of the
//! unit's own cgroup.
//!
//! Measured with systemd 252 (docs/operations.md, "When the broker dies or
//! hangs"): `ExecStopPost=` runs inside the service's cgroup; while it runs, a
//! `systemctl stop` or `restart` shows as a running `stop` / `restart` job of
//! the unit, also when the broker hung past `TimeoutStopSec=` (then
//! `SERVICE_RESULT=timeout`) or was killed during the stop; after a crash the
//! unit has no job.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cgroup::{self, OwnCgroup};
use crate::cli::StopPostArgs;

/// How long to keep killing what is left before giving up (bounded: systemd
/// waits for this command, at most `TimeoutStopSec=`).
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// How long `systemctl list-jobs` may take (it answers in milliseconds).
const ASK_SYSTEMD_FOR: Duration = Duration::from_secs(5);
/// The broker's state image for a restarted broker; stale once the unit stopped.
const SNAPSHOT: &str = "snapshot.json";

/// What the end of the broker's main process was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The operator stopped or restarted the unit: nothing may stay.
    Stop(String),
    /// The broker died on its own: its instances stay for the restarted broker.
    Crash,
}

/// What `systemctl list-jobs` said about the unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Jobs {
    /// The type of the unit's job (`stop`, `restart`, `start`, …), if it has one.
    Known(Option<String>),
    /// The query failed (the message says why).
    Unknown(String),
}

/// Decides from the unit's job and `$SERVICE_RESULT`. A stop and a restart
/// both run a job while `ExecStopPost=` runs; a crash runs none. A stop whose
/// broker did not exit in time is a stop whatever the job says. When the job
/// cannot be read, killing is the safe side: a crash then costs the app a cold
/// start, as before crash survival, while a stop never leaves processes behind.
pub fn decide(jobs: &Jobs, service_result: Option<&str>) -> Verdict {
    if service_result == Some("timeout") {
        return Verdict::Stop("the broker did not stop in time (SERVICE_RESULT=timeout)".into());
    }
    match jobs {
        Jobs::Known(Some(kind)) if kind == "stop" || kind == "restart" => {
            Verdict::Stop(format!("a {kind} job is running for the unit"))
        }
        Jobs::Known(_) => Verdict::Crash,
        Jobs::Unknown(why) => Verdict::Stop(format!(
            "cannot tell a stop from a crash ({why}); treating it as a stop"
        )),
    }
}

/// The type of `unit`'s job in the output of `systemctl list-jobs --no-legend
/// --plain` (columns: id, unit, type, state).
pub fn job_of(list_jobs: &str, unit: &str) -> Option<String> {
    list_jobs.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_id, name, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (name == unit).then(|| kind.to_string())
    })
}

pub fn stop_post(args: StopPostArgs) -> Result<i32, String> {
    let app = args.app;
    if app.is_empty() || app.contains('/') || app.contains(char::is_whitespace) {
        return Err(format!("{app:?} is not an application name"));
    }
    let unit = format!("ally@{app}.service");
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let cgroup = cgroup::own_cgroup(&proc_cgroup, &unit)
        .map_err(|e| format!("{e}; `ally stop-post` is meant to be the unit's ExecStopPost="))?;
    let service_result = std::env::var("SERVICE_RESULT").ok();
    let verdict = decide(&unit_jobs(&unit), service_result.as_deref());
    match verdict {
        Verdict::Crash => {
            eprintln!(
                "ally stop-post: the broker died (SERVICE_RESULT={}, EXIT_CODE={}, EXIT_STATUS={}); \
                 its instances keep serving until the restarted broker adopts them",
                service_result.as_deref().unwrap_or("unset"),
                std::env::var("EXIT_CODE").unwrap_or_default(),
                std::env::var("EXIT_STATUS").unwrap_or_default(),
            );
        }
        Verdict::Stop(why) => {
            eprintln!("ally stop-post: {unit} stops ({why}): killing what is left of it");
            kill_all(&cgroup, &unit);
            remove_snapshot(&crate::runtime_dir::resolve(&app, None, true));
        }
    }
    // A failing ExecStopPost= would only mark the unit failed (and hide why the
    // broker ended); what went wrong is in the journal above.
    Ok(0)
}

/// The job of `unit`, from all of systemd's jobs: a unit name given as a
/// pattern would be read as a glob, and a `\x2d` in an escaped instance name
/// would not match itself.
fn unit_jobs(unit: &str) -> Jobs {
    match list_jobs() {
        Ok(out) => Jobs::Known(job_of(&out, unit)),
        Err(why) => Jobs::Unknown(why),
    }
}

/// `systemctl list-jobs`, its output in a memfd (a pipe could fill up while we
/// wait for the exit), given `ASK_SYSTEMD_FOR` to answer.
fn list_jobs() -> Result<String, String> {
    use std::io::{Read, Seek};
    let memfd = |name: &std::ffi::CStr| -> Result<std::fs::File, String> {
        // SAFETY: memfd_create with a valid C string and flags; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", io::Error::last_os_error()));
        }
        // SAFETY: the fd was just created and is owned by nobody else.
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    };
    let mut out = memfd(c"list-jobs")?;
    let mut err = memfd(c"list-jobs-err")?;
    let clone = |f: &std::fs::File| f.try_clone().map_err(|e| format!("dup: {e}"));
    let mut child = std::process::Command::new("systemctl")
        .args(["list-jobs", "--no-legend", "--plain", "--no-pager"])
        .stdin(std::process::Stdio::null())
        .stdout(clone(&out)?)
        .stderr(clone(&err)?)
        .spawn()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    let deadline = Instant::now() + ASK_SYSTEMD_FOR;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "systemctl list-jobs did not answer within {}s",
                    ASK_SYSTEMD_FOR.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for systemctl: {e}")),
        }
    };
    let read = |f: &mut std::fs::File| {
        let mut text = String::new();
        f.rewind()
            .and_then(|()| f.read_to_string(&mut text))
            .map(|_| text)
            .map_err(|e| format!("reading systemctl's answer: {e}"))
    };
    if status.success() {
        read(&mut out)
    } else {
        Err(format!(
            "systemctl list-jobs failed ({status}): {}",
            read(&mut err)?.trim()
        ))
    }
}

/// SIGKILLs every process in the unit's cgroup (and any cgroup below it) but
/// this one, until none is left or `GIVE_UP_AFTER` passed.
fn kill_all(unit_cgroup: &OwnCgroup, unit: &str) {
    let Some(dir) = unit_cgroup.dir() else {
        eprintln!(
            "ally stop-post: cannot find the cgroup {} under /sys/fs/cgroup; nothing killed",
            unit_cgroup.path
        );
        return;
    };
    let me = std::process::id();
    let deadline = Instant::now() + GIVE_UP_AFTER;
    let mut killed = BTreeSet::new();
    loop {
        let left: Vec<u32> = cgroup::procs_below(&dir)
            .into_iter()
            .filter(|&pid| pid != me)
            .collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "ally stop-post: still in {unit} after {}s: {left:?}",
                GIVE_UP_AFTER.as_secs()
            );
            return;
        }
        for pid in left {
            let name = cgroup::comm(pid);
            match cgroup::signal_in_cgroup(pid, unit_cgroup, libc::SIGKILL) {
                Ok(true) if killed.insert(pid) => {
                    eprintln!("ally stop-post: killed {pid} ({name}), left in {unit}");
                }
                Ok(_) => {}
                Err(e) => eprintln!("ally stop-post: cannot kill {pid} ({name}): {e}"),
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Removes the broker's snapshot from the runtime directory, never through a
/// symlink: the directory is opened with O_NOFOLLOW and the entry unlinked in it
/// (a symlink named like the snapshot is removed, not followed).
fn remove_snapshot(runtime: &Path) {
    let dir = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(runtime)
    {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            eprintln!(
                "ally stop-post: cannot open {} to remove {SNAPSHOT}: {e}",
                runtime.display()
            );
            return;
        }
    };
    match nix::unistd::unlinkat(&dir, SNAPSHOT, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) => eprintln!(
            "ally stop-post: removed {}",
            runtime.join(SNAPSHOT).display()
        ),
        Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => eprintln!(
            "ally stop-post: cannot remove {}: {e}",
            runtime.join(SNAPSHOT).display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: &str = "ally@web.service";

    #[test]
    fn a_stop_or_restart_job_means_stop() {
        for kind in ["stop", "restart"] {
            let verdict = decide(&Jobs::Known(Some(kind.into())), Some("success"));
            assert!(matches!(verdict, Verdict::Stop(ref why) if why.contains(kind)));
        }
        // Killed during the stop: the job is still there.
        assert!(matches!(
            decide(&Jobs::Known(Some("stop".into())), Some("signal")),
            Verdict::Stop(_)
        ));
    }

    #[test]
    fn no_job_or_a_start_job_means_crash() {
        for result in [Some("signal"), Some("exit-code"), Some("core-dump"), None] {
            assert_eq!(decide(&Jobs::Known(None), result), Verdict::Crash);
        }
        assert_eq!(
            decide(&Jobs::Known(Some("start".into())), Some("signal")),
            Verdict::Crash
        );
    }

    #[test]
    fn a_stop_timeout_means_stop_even_without_a_job() {
        assert!(matches!(
            decide(&Jobs::Known(None), Some("timeout")),
            Verdict::Stop(ref why) if why.contains("timeout")
        ));
    }

    #[test]
    fn an_unreadable_job_means_stop() {
        assert!(matches!(
            decide(&Jobs::Unknown("no systemctl".into()), Some("signal")),
            Verdict::Stop(ref why) if why.contains("no systemctl")
        ));
    }

    #[test]
    fn job_of_reads_the_units_line_only() {
        let out = "199 ally@web.service stop running\n200 ally@webx.service restart waiting\n";
        assert_eq!(job_of(out, UNIT).as_deref(), Some("stop"));
        assert_eq!(job_of(out, "ally@webx.service").as_deref(), Some("restart"));
        assert_eq!(job_of(out, "ally@other.service"), None);
        assert_eq!(job_of("", UNIT), None);
        assert_eq!(job_of("garbage\n", UNIT), None);
    }

    #[test]
    fn remove_snapshot_unlinks_a_symlink_without_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, "keep").unwrap();
        let runtime = dir.path().join("run");
        std::fs::create_dir(&runtime).unwrap();
        std::os::unix::fs::symlink(&target, runtime.join(SNAPSHOT)).unwrap();
        remove_snapshot(&runtime);
        assert!(!runtime.join(SNAPSHOT).exists());
        assert!(std::fs::symlink_metadata(runtime.join(SNAPSHOT)).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");

        std::fs::write(runtime.join(SNAPSHOT), "{}").unwrap();
        remove_snapshot(&runtime);
        assert!(std::fs::symlink_metadata(runtime.join(SNAPSHOT)).is_err());
    }

    #[test]
    fn remove_snapshot_does_not_enter_a_symlinked_runtime_directory() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join(SNAPSHOT), "{}").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        remove_snapshot(&link);
        assert!(real.join(SNAPSHOT).exists());
    }
}
