//! Starting a process the way systemd's socket activation does: its sockets at
//! fds 3, 4, … with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` set to the
//! process's **own** pid (and `WATCHDOG_PID` likewise), which only the child
//! knows.
//!
//! `std`'s spawn builds the environment before it forks, so it cannot hold a pid
//! the fork has not made yet. Here everything is prepared in the parent — the
//! program's path, argv, envp with room for the pid's digits — and the child,
//! between fork and exec, only moves fds, writes digits into memory of its own
//! and calls `execve`: async-signal-safe calls, no allocation, no lock. No
//! trampoline process and no second exec.
//!
//! Moving fds to 3, 4, … may close whatever the child had there, including the
//! pipe on which `std` would report a failed exec. So the child reports on a
//! pipe of its own, moved above the fds it hands over: the parent reads the
//! exec's errno from it, or end-of-file once the exec closed it.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What the child's environment gains from the broker, beyond its own.
#[derive(Debug, Default)]
pub struct Activation {
    /// The sockets, in `[[listen]]` order, with their `LISTEN_FDNAMES` entries.
    pub sockets: Vec<(OwnedFd, String)>,
    /// Also set `WATCHDOG_PID`, to the child's pid.
    pub watchdog_pid: bool,
}

/// Room for any pid's decimal digits and a NUL.
const PID_DIGITS: usize = 20;

/// Everything the child needs between fork and exec, prepared in the parent.
pub struct Exec {
    program: CString,
    _argv: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp_strings: Vec<CString>,
    envp: Vec<*const libc::c_char>,
    /// Where in `envp_strings` the pid's digits go: (string, offset).
    pid_slots: Vec<(usize, usize)>,
    sources: Vec<OwnedFd>,
    /// The sources' fds once moved above every target, filled in by the child.
    moved: Vec<RawFd>,
    report: Option<OwnedFd>,
}

// SAFETY: the raw pointers point into the `CString`s the `Exec` owns, which
// never move or change but in the child's own copy of the memory.
unsafe impl Send for Exec {}
// SAFETY: as above; a shared `Exec` is only read.
unsafe impl Sync for Exec {}

impl Exec {
    /// Prepares the exec of `command` with `env` (the complete environment),
    /// plus `LISTEN_*` for `activation`'s sockets. The program is looked up in
    /// `env`'s `PATH` now, as `execvp` would in the child.
    ///
    /// Returns the exec and the read end of its report pipe.
    pub fn prepare(
        command: &[String],
        env: &BTreeMap<OsString, OsString>,
        activation: Activation,
    ) -> io::Result<(Exec, OwnedFd)> {
        let (program, args) = command
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the command is empty"))?;
        let path = lookup(
            program,
            env.get(OsStr::new("PATH")).map(OsString::as_os_str),
        )?;
        let program = cstring(path.as_os_str().as_bytes())?;
        let argv_strings = std::iter::once(command[0].as_str())
            .chain(args.iter().map(String::as_str))
            .map(|a| cstring(a.as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;

        let mut env = env.clone();
        let (fds, names): (Vec<OwnedFd>, Vec<String>) = activation.sockets.into_iter().unzip();
        let mut pid_vars = Vec::new();
        if !fds.is_empty() {
            env.insert("LISTEN_FDS".into(), fds.len().to_string().into());
            env.insert("LISTEN_FDNAMES".into(), names.join(":").into());
            pid_vars.push("LISTEN_PID");
        }
        if activation.watchdog_pid {
            pid_vars.push("WATCHDOG_PID");
        }
        for var in &pid_vars {
            env.insert((*var).into(), "0".repeat(PID_DIGITS).into());
        }
        let mut envp_strings = Vec::with_capacity(env.len());
        let mut pid_slots = Vec::new();
        for (name, value) in &env {
            let mut entry = name.as_bytes().to_vec();
            entry.push(b'=');
            if pid_vars.iter().any(|v| OsStr::new(v) == name) {
                pid_slots.push((envp_strings.len(), entry.len()));
            }
            entry.extend_from_slice(value.as_bytes());
            envp_strings.push(cstring(&entry)?);
        }

        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut exec = Exec {
            program,
            argv: Vec::new(),
            _argv: argv_strings,
            envp: Vec::new(),
            envp_strings,
            pid_slots,
            moved: vec![-1; fds.len()],
            sources: fds,
            report: Some(write),
        };
        exec.argv = exec
            ._argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        exec.envp = exec
            .envp_strings
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok((exec, read))
    }

    /// Runs in the child between fork and exec; returns only if it could not
    /// even start (then `std` reports the error), else execs or `_exit`s.
    ///
    /// # Safety
    /// Only in a forked child, as a `pre_exec` hook registered after any other.
    pub unsafe fn run_in_child(&mut self) -> io::Result<()> {
        let last = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(rc)
            }
        };
        let first_free = 3 + self.sources.len() as libc::c_int;
        let report = self.report.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        // SAFETY: fcntl, dup2, getpid, execve, write and _exit are
        // async-signal-safe; the memory written is this process's own copy.
        unsafe {
            let report = last(libc::fcntl(report, libc::F_DUPFD_CLOEXEC, first_free))?;
            for (i, fd) in self.sources.iter().enumerate() {
                self.moved[i] = last(libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_DUPFD_CLOEXEC,
                    first_free,
                ))?;
            }
            for (i, moved) in self.moved.iter().enumerate() {
                // dup2 leaves the new fd without FD_CLOEXEC: it survives the exec.
                last(libc::dup2(*moved, 3 + i as libc::c_int))?;
            }
            close_on_exec_from(first_free);
            let pid = libc::getpid() as u64;
            for &(string, offset) in &self.pid_slots {
                let base = self.envp_strings[string].as_ptr() as *mut u8;
                write_decimal(base.add(offset), pid);
            }
            libc::execve(
                self.program.as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
            );
            let errno = *libc::__errno_location();
            let bytes = errno.to_ne_bytes();
            libc::write(report, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127);
        }
    }
}

/// Marks every fd from `first` on close-on-exec: what the broker inherited
/// without the flag (from a shell, from cargo) reaches no instance.
/// Async-signal-safe; a kernel without `close_range` (before 5.11) keeps them.
pub fn close_on_exec_from(first: libc::c_int) {
    // SAFETY: a plain system call on this process's own fd table.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// Waits for the child's exec: `Ok` once it happened, else the exec's error.
pub fn exec_result(mut report: std::fs::File) -> io::Result<()> {
    let mut errno = [0u8; 4];
    let mut read = 0;
    while read < errno.len() {
        match report.read(&mut errno[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    match read {
        0 => Ok(()),
        4 => Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno))),
        _ => Err(io::Error::other(
            "the child reported a malformed exec error",
        )),
    }
}

/// Writes `n` in decimal at `at`, NUL-terminated.
///
/// # Safety
/// `at` must point to [`PID_DIGITS`] + 1 writable bytes (a slot and its NUL).
unsafe fn write_decimal(at: *mut u8, mut n: u64) {
    let mut digits = [0u8; PID_DIGITS];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: len <= PID_DIGITS: a u64 has at most 20 digits.
        unsafe { *at.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: as above.
    unsafe { *at.add(len) = 0 };
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL character in the command or the environment",
        )
    })
}

/// `execvp`'s lookup: a program with a `/` as it is, else the first
/// executable file of that name in `path` (default `/usr/local/bin:/usr/bin:/bin`).
pub fn lookup(program: &str, path: Option<&OsStr>) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    let mut denied = false;
    for dir in path.as_bytes().split(|b| *b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(program);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                return Ok(candidate);
            }
            Ok(meta) if meta.is_file() => denied = true,
            _ => {}
        }
    }
    Err(if denied {
        io::Error::from_raw_os_error(libc::EACCES)
    } else {
        io::Error::from_raw_os_error(libc::ENOENT)
    })
}

/// The broker's environment as a child inherits it, minus what describes the
/// broker itself, plus `set`.
pub fn child_environment(
    remove: &[&str],
    set: impl IntoIterator<Item = (OsString, OsString)>,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(k, _)| !remove.iter().any(|r| OsStr::new(r) == k))
        .collect();
    env.extend(set);
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_follows_path_like_execvp() {
        assert_eq!(
            lookup("sh", Some(OsStr::new("/nonexistent:/bin"))).unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert_eq!(
            lookup("./x", None).unwrap(),
            PathBuf::from("./x"),
            "a path is taken as it is"
        );
        let e = lookup("no-such-program-here", Some(OsStr::new("/bin"))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data"), "").unwrap();
        let e = lookup("data", Some(dir.path().as_os_str())).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EACCES),
            "found, not executable"
        );
    }

    #[test]
    fn decimal_digits_are_written_in_place() {
        let mut buf = [b'x'; PID_DIGITS + 1];
        for (n, text) in [
            (0u64, "0"),
            (7, "7"),
            (4194304, "4194304"),
            (u64::MAX, "18446744073709551615"),
        ] {
            // SAFETY: buf holds PID_DIGITS + 1 bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), n) };
            let end = buf.iter().position(|b| *b == 0).unwrap();
            assert_eq!(&buf[..end], text.as_bytes());
        }
    }
}
