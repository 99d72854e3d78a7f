//! Who is on the other end of a private-socket connection, pinned when it
//! connects.
//!
//! `SO_PEERCRED` gives the pid of the process that called `connect`, but a pid is
//! only a number: that process may pass the socket on and exit, and its pid may
//! later belong to an instance's child. So the broker takes a pidfd of the very
//! process at accept time (`SO_PEERPIDFD`, Linux 6.5+; else `pidfd_open` at once,
//! refused if the process started after the accept) and trusts what `/proc` says
//! about a pid only while the pidfd shows that process alive. A connection whose
//! process has gone is known by its uid alone and can never act as an instance.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::socket::{getsockopt, sockopt};

/// Longest ancestry walked; deeper process trees end the walk.
const MAX_DEPTH: usize = 64;

#[derive(Debug)]
pub struct Identity {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The connecting process itself; `None` when it could not be pinned (it was
    /// already gone, or lives in another pid namespace and has no pid here).
    process: Option<OwnedFd>,
}

impl Identity {
    /// The peer of a freshly accepted connection.
    pub fn of(socket: impl AsFd) -> io::Result<Identity> {
        let accepted_at = boot_ticks();
        let cred = getsockopt(&socket, sockopt::PeerCredentials).map_err(io::Error::from)?;
        let pid = u32::try_from(cred.pid()).unwrap_or(0);
        let process = match getsockopt(&socket, sockopt::PeerPidfd) {
            Ok(fd) => Some(fd),
            // A kernel before 6.5 does not know the option.
            Err(nix::Error::ENOPROTOOPT) if pid > 0 => pin_started_before(pid, accepted_at),
            // The process has already gone (or is in another pid namespace).
            Err(_) => None,
        };
        Ok(Identity {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            process,
        })
    }

    /// An identity that names no process: only its uid counts.
    pub fn uid_only(uid: u32) -> Identity {
        Identity {
            pid: 0,
            uid,
            gid: u32::MAX,
            process: None,
        }
    }

    /// Whether the connecting process still runs.
    pub fn alive(&self) -> bool {
        self.process.as_ref().is_some_and(|fd| running(fd.as_fd()))
    }

    /// The connecting process and its ancestors, itself first, stopping below
    /// `stop` (the broker, whose other children are not instances) and at init;
    /// the process itself is always first, whatever its pid.
    /// Empty when the process has gone: then no pid says anything about it.
    ///
    /// Each link is checked while both ends are pinned: the parent named in the
    /// child's `/proc` entry is pinned with a pidfd, and the child must still
    /// name it and still be alive afterwards. A parent that died in between
    /// would have left the child reparented, so a reused pid never joins the chain.
    pub fn ancestry(&self, stop: u32) -> Vec<u32> {
        let Some(first) = &self.process else {
            return Vec::new();
        };
        let mut chain = Vec::new();
        let mut pinned: Vec<OwnedFd> = Vec::new();
        let mut child = (self.pid, first.as_fd());
        loop {
            chain.push(child.0);
            if chain.len() >= MAX_DEPTH {
                break;
            }
            let Some(parent) = parent_of(child.0) else {
                break;
            };
            if parent <= 1 || parent == stop {
                break;
            }
            let Some(parent_fd) = pidfd_open(parent) else {
                break;
            };
            if parent_of(child.0) != Some(parent) || !running(child.1) {
                break;
            }
            pinned.push(parent_fd);
            let fd = pinned.last().expect("just pushed").as_raw_fd();
            // SAFETY: `fd` belongs to `pinned`, which outlives every use of `child`.
            child = (parent, unsafe { BorrowedFd::borrow_raw(fd) });
        }
        if !self.alive() {
            return Vec::new();
        }
        chain
    }
}

/// Whether the process behind `pidfd` has not exited: a pidfd polls readable once
/// it has.
fn running(pidfd: BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => true,
        Ok(_) => false,
        Err(_) => false,
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a plain system call; on success it returns a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned to us by the kernel.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// For kernels without `SO_PEERPIDFD`: a pidfd for `pid`, unless the process
/// that has it now started after the connection was accepted (then it is not
/// the one that connected). A pid reused between connect and accept is not
/// caught: the reason to prefer a kernel that has `SO_PEERPIDFD`.
fn pin_started_before(pid: u32, accepted_at: Option<u64>) -> Option<OwnedFd> {
    let fd = pidfd_open(pid)?;
    let started = start_ticks(pid)?;
    let accepted_at = accepted_at?;
    (started <= accepted_at && running(fd.as_fd())).then_some(fd)
}

/// Field 4 of `/proc/<pid>/stat`. The command name may hold spaces and
/// parentheses: fields start after the last ')'.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_field(pid, 1)
}

/// Field 22: when the process started, in clock ticks since boot.
fn start_ticks(pid: u32) -> Option<u64> {
    stat_field(pid, 19)
}

fn stat_field<T: std::str::FromStr>(pid: u32, after_state: usize) -> Option<T> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(after_state)?.parse().ok()
}

/// Now, in the clock ticks of `/proc/<pid>/stat`'s start time.
fn boot_ticks() -> Option<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()?? as u64;
    Some(now.tv_sec() as u64 * hz + now.tv_nsec() as u64 * hz / 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_connected_peer_is_pinned_and_its_ancestry_read() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let me = Identity::of(&ours).unwrap();
        drop(theirs);
        assert_eq!(me.pid, std::process::id());
        assert_eq!(me.uid, nix::unistd::geteuid().as_raw());
        assert!(me.alive());
        let chain = me.ancestry(0);
        assert_eq!(chain[0], std::process::id());
        assert_eq!(
            chain.get(1).copied(),
            parent_of(std::process::id()).filter(|p| *p > 1)
        );
        let parent = nix::unistd::getppid().as_raw() as u32;
        assert_eq!(me.ancestry(parent), vec![std::process::id()]);
    }

    #[test]
    fn a_peer_that_exited_has_no_ancestry() {
        let path = tempfile::tempdir().unwrap();
        let socket = path.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // A process that connects and exits: its pid says nothing any more.
        let status = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?})",
                socket.display().to_string()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        let (stream, _) = listener.accept().unwrap();
        let peer = Identity::of(&stream).unwrap();
        assert!(peer.pid > 0);
        assert!(!peer.alive());
        assert!(peer.ancestry(0).is_empty());
    }

    #[test]
    fn a_live_child_is_pinned_with_its_parent() {
        let path = tempfile::tempdir().unwrap();
        let socket = path.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket, time; s = socket.socket(socket.AF_UNIX); s.connect({:?}); time.sleep(30)",
                socket.display().to_string()
            ))
            .spawn()
            .unwrap();
        let (stream, _) = listener.accept().unwrap();
        let peer = Identity::of(&stream).unwrap();
        assert_eq!(peer.pid, child.id());
        assert!(peer.alive());
        assert_eq!(peer.ancestry(std::process::id()), vec![child.id()]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!peer.alive());
        assert!(peer.ancestry(std::process::id()).is_empty());
    }

    #[test]
    fn parent_is_read_past_odd_command_names() {
        assert_eq!(
            parent_of(std::process::id()),
            Some(nix::unistd::getppid().as_raw() as u32)
        );
    }

    #[test]
    fn the_fallback_refuses_a_process_started_after_the_accept() {
        let pid = std::process::id();
        assert!(pin_started_before(pid, boot_ticks()).is_some());
        assert!(pin_started_before(pid, Some(0)).is_none());
    }
}
