//! Re-executing the broker in place: the same process (systemd's `MAINPID`
//! stays, the instances stay its children) runs the binary now at the path it
//! was started from, and carries on from an [image](image::BrokerImage).
//!
//! How: the image goes into a memfd; the fds the image names (listeners,
//! pidfds, the instances' output pipes and notification sockets, the private
//! and state sockets) lose their close-on-exec flag; `execve` runs the binary
//! with the same arguments and environment plus `ALLY_REEXEC_IMAGE=<fd>` and
//! `ALLY_REEXEC_FALLBACK=<fd>` (the old binary, opened before the exec).
//! Everything else closes at the exec.
//!
//! When the new binary cannot start: an `execve` that fails (no such file, not
//! executable, wrong format) returns here, the flags are set back and the old
//! process goes on as it was. A new binary that starts but cannot read the
//! image (another image version, a config it refuses) runs the old binary again
//! through the fallback fd with the same image, which that binary wrote.

pub mod image;

use std::ffi::{CString, OsString};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// Names the memfd holding the image, in the re-executed broker's environment.
pub const IMAGE_ENV: &str = "ALLY_REEXEC_IMAGE";
/// Names an fd of the binary that wrote the image.
pub const FALLBACK_ENV: &str = "ALLY_REEXEC_FALLBACK";
/// Set when the binary that wrote the image runs again with it: why the new
/// one could not take it.
pub const FALLEN_BACK_ENV: &str = "ALLY_REEXEC_FALLEN_BACK";

/// How the broker was started, to start it the same way again.
#[derive(Debug, Clone)]
pub struct Startup {
    /// The binary's path as it was when the broker started: after a package
    /// upgrade `/proc/self/exe` names the deleted old file, this path the new one.
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

static STARTUP: OnceLock<Startup> = OnceLock::new();

/// Records how this process was started; call first thing in `main`.
pub fn record_startup() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let exe = std::env::current_exe()
        .ok()
        .map(|p| {
            // A process re-executed after an upgrade sees " (deleted)" no more:
            // it was started from the new file. Strip it anyway for safety.
            let s = p.as_os_str().as_bytes();
            match s.strip_suffix(b" (deleted)") {
                Some(stripped) => PathBuf::from(std::ffi::OsStr::from_bytes(stripped)),
                None => p,
            }
        })
        .unwrap_or_else(|| PathBuf::from(args.first().cloned().unwrap_or_default()));
    let _ = STARTUP.set(Startup { exe, args });
}

pub fn startup() -> Option<&'static Startup> {
    STARTUP.get()
}

/// Clears close-on-exec on each fd for the exec, and sets it back if the exec
/// does not happen.
pub struct Kept {
    fds: Vec<RawFd>,
}

impl Kept {
    pub fn new() -> Kept {
        Kept { fds: Vec::new() }
    }

    pub fn keep(&mut self, fd: RawFd) -> io::Result<()> {
        set_cloexec(fd, false)?;
        self.fds.push(fd);
        Ok(())
    }
}

impl Default for Kept {
    fn default() -> Self {
        Kept::new()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        for fd in &self.fds {
            let _ = set_cloexec(*fd, true);
        }
    }
}

pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: the fd is one the broker holds for as long as this call runs.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = FdFlag::from_bits_truncate(fcntl(borrowed, FcntlArg::F_GETFD)?);
    let flags = if on {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    fcntl(borrowed, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Writes `image` to a memfd that survives the exec.
pub fn image_fd(image: &[u8]) -> io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(c"ally-image", nix::sys::memfd::MFdFlags::empty())?;
    let mut file = std::fs::File::from(fd);
    file.write_all(image)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// The binary running now, opened so it can be run again after its file was
/// replaced or removed.
pub fn open_fallback() -> io::Result<OwnedFd> {
    let file = std::fs::File::open("/proc/self/exe")?;
    let fd = OwnedFd::from(file);
    set_cloexec(fd.as_raw_fd(), false)?;
    Ok(fd)
}

/// Runs `exe` in place of this process with `env` added. Returns only if it failed.
pub fn exec(exe: &Path, args: &[OsString], env: &[(&str, String)]) -> io::Error {
    let path = match CString::new(exe.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return io::Error::new(io::ErrorKind::InvalidInput, e),
    };
    let (args, vars) = match exec_args(args, env) {
        Ok(v) => v,
        Err(e) => return e,
    };
    match nix::unistd::execve(&path, &args, &vars) {
        Err(e) => io::Error::from(e),
    }
}

/// Runs the binary behind `fd` in place of this process (the fallback).
pub fn exec_fd(fd: RawFd, args: &[OsString], env: &[(&str, String)]) -> io::Error {
    let (args, vars) = match exec_args(args, env) {
        Ok(v) => v,
        Err(e) => return e,
    };
    // SAFETY: the fd stays open until the exec, which replaces the process.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match nix::unistd::fexecve(borrowed, &args, &vars) {
        Err(e) => io::Error::from(e),
    }
}

type ExecArgs = (Vec<CString>, Vec<CString>);

fn exec_args(args: &[OsString], env: &[(&str, String)]) -> io::Result<ExecArgs> {
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let args = args
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let mut vars = Vec::new();
    for (key, value) in std::env::vars_os() {
        let key_bytes = key.as_bytes();
        // systemd's socket-activation variables name fds of the first start.
        if [
            IMAGE_ENV,
            FALLBACK_ENV,
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
        ]
        .iter()
        .any(|v| key_bytes == v.as_bytes())
        {
            continue;
        }
        let mut pair = key_bytes.to_vec();
        pair.push(b'=');
        pair.extend_from_slice(value.as_bytes());
        vars.push(cstring(&pair)?);
    }
    for (key, value) in env {
        vars.push(cstring(format!("{key}={value}").as_bytes())?);
    }
    Ok((args, vars))
}

/// What a re-executed broker was handed: the image's bytes and the fallback.
pub struct Handed {
    pub image: Vec<u8>,
    pub fallback: Option<OwnedFd>,
}

/// The image this process was re-executed with, if it was; the fds named by
/// the environment are taken (and closed once read).
pub fn take_handed() -> Option<io::Result<Handed>> {
    let image_fd = fd_from_env(IMAGE_ENV)?;
    let fallback = fd_from_env(FALLBACK_ENV).and_then(Result::ok);
    if let Some(fd) = &fallback {
        let _ = set_cloexec(fd.as_raw_fd(), true);
    }
    Some(image_fd.and_then(|fd| {
        let mut image = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut image)?;
        Ok(Handed { image, fallback })
    }))
}

fn fd_from_env(name: &str) -> Option<io::Result<OwnedFd>> {
    let value = std::env::var(name).ok()?;
    let fd: RawFd = match value.parse() {
        Ok(fd) if fd > 2 => fd,
        _ => {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}={value:?} is not an fd number"),
            )));
        }
    };
    Some(take_fd(fd))
}

/// Takes ownership of carried fd `fd`, setting close-on-exec again. Fails if
/// it is not open.
pub fn take_fd(fd: RawFd) -> io::Result<OwnedFd> {
    set_cloexec(fd, true)?;
    // SAFETY: the old process handed this fd over, open, for this process to own;
    // `set_cloexec` just showed it is open, and nothing else in this process
    // claims it (each carried fd is taken once).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
