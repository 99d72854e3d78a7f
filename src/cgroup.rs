//! The unit's own cgroup: where it is, what runs in it, and signals sent only
//! to processes still in it. `ally stop-post` kills what a stop leaves there;
//! a broker restarted after a crash stops what it could not adopt.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Where a cgroup lives, as read from `/proc/self/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnCgroup {
    /// Its hierarchy's field in `/proc/PID/cgroup`: empty for the unified one.
    pub controllers: &'static str,
    /// The directories (under `/sys/fs/cgroup`) that may hold it: the unified
    /// hierarchy alone, or systemd's named hierarchy on a hybrid system.
    pub mounts: Vec<&'static str>,
    /// The unit's cgroup path, e.g. `/system.slice/system-ally.slice/ally@web.service`.
    pub path: String,
}

impl OwnCgroup {
    /// Its directory under `/sys/fs/cgroup`, if one of its mounts holds it.
    pub fn dir(&self) -> Option<PathBuf> {
        self.mounts
            .iter()
            .map(|mount| PathBuf::from(format!("{mount}{}", self.path)))
            .find(|dir| dir.join("cgroup.procs").is_file())
    }
}

/// The cgroup of `unit` this process runs in, from `/proc/self/cgroup`: its own
/// cgroup if that is the unit's, or the unit's when this process runs in the
/// unit's `.control` sub-cgroup. Anything else is refused, so that a command
/// run by hand, or a broker run outside systemd, never signals outside the unit.
pub fn own_cgroup(proc_self_cgroup: &str, unit: &str) -> Result<OwnCgroup, String> {
    let hierarchies: [(&'static str, Vec<&'static str>); 2] = [
        ("", vec!["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]),
        ("name=systemd", vec!["/sys/fs/cgroup/systemd"]),
    ];
    let lines: Vec<(&str, &str)> = proc_self_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((controllers, path))
        })
        .collect();
    for (controllers, mounts) in hierarchies {
        for &(_, path) in lines.iter().filter(|(c, _)| *c == controllers) {
            if let Some(path) = unit_cgroup(path, unit) {
                return Ok(OwnCgroup {
                    controllers,
                    mounts,
                    path,
                });
            }
        }
    }
    let mut seen: Vec<&str> = lines
        .iter()
        .filter(|(c, _)| c.is_empty() || *c == "name=systemd")
        .map(|(_, path)| *path)
        .collect();
    seen.dedup();
    Err(format!(
        "not running in the cgroup of {unit} (but in {}): nothing outside it is signalled",
        if seen.is_empty() {
            "no cgroup systemd tracks".to_string()
        } else {
            seen.join(", ")
        }
    ))
}

fn unit_cgroup(path: &str, unit: &str) -> Option<String> {
    let path = path.strip_suffix("/.control").unwrap_or(path);
    let last = path.rsplit('/').next()?;
    let clean = path.starts_with('/') && !path.split('/').any(|c| c == "..");
    (last == unit && clean).then(|| path.to_string())
}

/// The pids in `dir`'s `cgroup.procs` and those of the cgroups below it.
pub fn procs_below(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(procs_below(&entry.path()));
            }
        }
    }
    pids
}

/// Sends `signal` to `pid` through a pidfd, once it is sure the pidfd's process
/// is in the unit's cgroup (a pid read from `cgroup.procs` may have been reused
/// since). Ok(false): the process was already gone.
pub fn signal_in_cgroup(pid: u32, cgroup: &OwnCgroup, signal: libc::c_int) -> io::Result<bool> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // SAFETY: the fd was just returned by pidfd_open and is owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let inside = holds(cgroup, pid);
    // Still alive after the read, so the read was about the pidfd's process.
    let alive = send(&pidfd, 0)?;
    if !alive {
        return Ok(false);
    }
    if !inside {
        return Err(io::Error::other("it is no longer in the unit's cgroup"));
    }
    send(&pidfd, signal)
}

fn send(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<bool> {
    // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether `pid` runs in `cgroup` or a cgroup below it. Only meaningful about
/// a process pinned by a pidfd and alive after the call.
pub fn holds(cgroup: &OwnCgroup, pid: u32) -> bool {
    let below = format!("{}/", cgroup.path);
    match std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        Ok(text) => text.lines().any(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            controllers == Some(cgroup.controllers)
                && path.is_some_and(|p| p == cgroup.path || p.starts_with(&below))
        }),
        Err(_) => false,
    }
}

pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: &str = "ally@web.service";

    #[test]
    fn own_cgroup_on_a_hybrid_system_prefers_the_unified_line() {
        let text = "9:name=systemd:/system.slice/system-ally.slice/ally@web.service\n\
                    4:memory:/system.slice/system-ally.slice/ally@web.service\n\
                    0::/system.slice/system-ally.slice/ally@web.service\n";
        let found = own_cgroup(text, UNIT).unwrap();
        assert_eq!(
            found.path,
            "/system.slice/system-ally.slice/ally@web.service"
        );
        assert_eq!(found.controllers, "");
        let legacy = own_cgroup(
            "9:name=systemd:/system.slice/ally@web.service\n0::/\n",
            UNIT,
        )
        .unwrap();
        assert_eq!(legacy.controllers, "name=systemd");
        assert_eq!(legacy.mounts, vec!["/sys/fs/cgroup/systemd"]);
        let unified = own_cgroup("0::/system.slice/ally@web.service\n", UNIT).unwrap();
        assert_eq!(
            unified.mounts,
            vec!["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        );
    }

    #[test]
    fn own_cgroup_acts_on_the_service_from_its_control_cgroup() {
        let found = own_cgroup("0::/system.slice/ally@web.service/.control\n", UNIT).unwrap();
        assert_eq!(found.path, "/system.slice/ally@web.service");
    }

    #[test]
    fn own_cgroup_refuses_anything_else() {
        for text in [
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "0::/system.slice/ally@webx.service\n",
            "0::/system.slice/ally@web.service/sub\n",
            "0::/system.slice/xally@web.service\n",
            "0::/\n",
            "0::ally@web.service\n",
            "0::/system.slice/../ally@web.service\n",
            "4:memory:/system.slice/ally@web.service\n",
            "",
        ] {
            let err = own_cgroup(text, UNIT).unwrap_err();
            assert!(
                err.contains("not running in the cgroup of ally@web.service"),
                "{err}"
            );
        }
    }
}
