//! An instance's process as the broker holds it: a pidfd taken right after the
//! spawn, while the child cannot have been reaped, so every signal reaches that
//! very process and never one that got its pid later.
//!
//! The instance's process group (its id is the leader's pid) is signalled only
//! while the leader is known unreaped: a group id is not reused while its
//! leader's pid is taken, and the leader's pid is taken until the broker reaps
//! it. [`Process::exited`] waits for the exit without reaping, then the reaper
//! marks the process reaped under the same lock [`Process::kill_group`] takes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

#[derive(Debug)]
pub struct Process {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    /// Set once the broker is about to reap the process: from then on its pid
    /// and group id may be anyone's.
    reaped: Mutex<bool>,
}

impl Process {
    /// Pins the broker's unreaped child `pid`.
    pub fn pin(pid: u32) -> io::Result<Process> {
        // SAFETY: a plain system call; on success it returns a new fd we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us by the kernel.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Process::from_pidfd(pid, fd)
    }

    /// A process pinned by a pidfd this process already holds (carried across
    /// a re-exec).
    pub fn from_pidfd(pid: u32, fd: OwnedFd) -> io::Result<Process> {
        // SAFETY: an `OwnedFd` stays open, and is the same fd, for as long as it is owned.
        let pidfd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Process {
            pid,
            pidfd,
            reaped: Mutex::new(false),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pidfd, for carrying it across a re-exec.
    pub fn pidfd(&self) -> std::os::fd::RawFd {
        self.pidfd.get_ref().as_raw_fd()
    }

    /// Whether the process has exited (it may still be a zombie).
    pub fn has_exited(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.pidfd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for a pidfd we own, no wait.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        n > 0 && fds[0].revents & libc::POLLIN != 0
    }

    /// Sends `signal` to the process. One that already exited is not an error.
    pub fn signal(&self, signal: Signal) {
        match send(&self.pidfd, signal) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => tracing::warn!(pid = self.pid, "cannot send {signal}: {e}"),
        }
    }

    /// Sends `signal` to the process group it leads, while it is unreaped.
    pub fn signal_group(&self, signal: Signal) {
        let reaped = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
        if !*reaped {
            match killpg(Pid::from_raw(self.pid as i32), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => tracing::warn!(
                    pid = self.pid,
                    "cannot send {signal} to its process group: {e}"
                ),
            }
        }
    }

    /// SIGKILLs the process and, while its leader is unreaped, its process group
    /// (the helpers it started). After the reap only the pidfd is used, which can
    /// no longer reach anything.
    pub fn kill_group(&self) {
        let reaped = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
        if !*reaped {
            match killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => tracing::warn!(pid = self.pid, "cannot SIGKILL process group: {e}"),
            }
        }
        drop(reaped);
        self.signal(Signal::SIGKILL);
    }

    /// Resolves once the process has exited (it is then a zombie until reaped).
    pub async fn exited(&self) {
        // A pidfd polls readable once its process has exited; it stays so.
        let _ = self
            .pidfd
            .readable()
            .await
            .map(|mut guard| guard.retain_ready());
    }

    /// Called right before the reap: no group signal is sent after this.
    pub fn mark_reaped(&self) {
        *self.reaped.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }
}

/// The process group of live process `pid`, from `/proc`; `None` once it
/// has exited (a zombie included) or if it cannot be read.
pub fn group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_group(&stat)
}

/// When live process `pid` started, in clock ticks since boot (`/proc/<pid>/stat`
/// field 22): with its pid, names one process for the machine's uptime.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_start_ticks(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line, counted after the command name.
fn stat_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow the name; starttime is field 22.
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// The real uid of process `pid`, from `/proc`.
pub fn real_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The live processes of process group `group`, from `/proc`.
pub fn group_members(group: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| group_of(*pid) == Some(group))
        .collect()
}

/// `pgrp` of a `/proc/<pid>/stat` line, unless the process is a zombie. The
/// command name may hold spaces and parentheses: fields are counted from the
/// last `)`.
fn stat_group(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let _ppid = fields.next()?;
    fields.next()?.parse().ok()
}

fn send(pidfd: &AsyncFd<OwnedFd>, signal: Signal) -> io::Result<()> {
    // SAFETY: a plain system call on a pidfd we own, with no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.get_ref().as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_start_time_is_field_22() {
        let stat = "42 (a b) c) S 1 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(stat_start_ticks(stat), Some(123456));
        assert_eq!(stat_start_ticks("garbage"), None);
        let mine = start_ticks(std::process::id()).unwrap();
        assert!(mine > 0);
        assert_eq!(start_ticks(std::process::id()), Some(mine));
    }

    #[test]
    fn the_group_is_read_after_the_command_name() {
        assert_eq!(stat_group("42 (a) b) c) S 1 77 77 0"), Some(77));
        assert_eq!(stat_group("42 (x) Z 1 77 77 0"), None);
        assert_eq!(stat_group("garbage"), None);
        assert_eq!(
            group_of(std::process::id()),
            Some(nix::unistd::getpgrp().as_raw() as u32)
        );
        assert_eq!(
            real_uid(std::process::id()),
            Some(nix::unistd::getuid().as_raw())
        );
        assert_eq!(real_uid(u32::MAX), None);
    }

    #[tokio::test]
    async fn signals_reach_the_pinned_process_and_the_group_only_before_the_reap() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let process = Process::pin(child.id().unwrap()).unwrap();
        process.signal(Signal::SIGSTOP);
        process.signal(Signal::SIGCONT);
        process.kill_group();
        tokio::time::timeout(Duration::from_secs(5), process.exited())
            .await
            .expect("the SIGKILL ended it");
        process.mark_reaped();
        let status = child.wait().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        // Reaped: its pid may be anyone's now, and nothing is sent by it.
        process.kill_group();
        process.signal(Signal::SIGTERM);
    }
}
