//! The short-lived thread a bind runs on: its own cwd and umask (so that a
//! unix socket's mode comes from the umask at `bind()` and nothing is chmod-ed),
//! and, for an instance, that user's file-access credentials, so that the
//! kernel checks every step as that user. The thread ends with the bind, and
//! the rights with it; no other thread of the broker ever sees them.

use std::io;

use ally_core::Error as CoreError;

use super::{BindAs, Error};

/// Runs `f` on a new thread with its own cwd and umask and, for a user, that
/// user's file-access credentials; the thread ends with `f`, and its
/// credentials with it.
pub(super) fn on_own_thread<T: Send>(
    who: BindAs<'_>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> Result<T, Error> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                isolate(who).map_err(|e| {
                    CoreError::io("cannot take the instance's credentials to bind", e)
                })?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(CoreError::failed("the bind thread panicked".into()).into()))
    })
}

fn isolate(who: BindAs<'_>) -> io::Result<()> {
    // SAFETY: these calls change only the calling thread: after
    // unshare(CLONE_FS) its cwd and umask are its own, and the raw syscalls
    // bypass glibc's broadcast of credential changes to every thread.
    unsafe {
        if libc::unshare(libc::CLONE_FS) != 0 {
            return Err(io::Error::last_os_error());
        }
        let BindAs::User(creds) = who else {
            return Ok(());
        };
        if libc::geteuid() == 0 {
            let groups: Vec<libc::gid_t> = creds.groups.clone();
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // setfs[ug]id report no error: ask back (an invalid id changes nothing).
        libc::syscall(libc::SYS_setfsgid, creds.gid);
        if libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32 != creds.gid {
            return Err(io::Error::other(format!("setfsgid({}) failed", creds.gid)));
        }
        libc::syscall(libc::SYS_setfsuid, creds.uid);
        if libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 != creds.uid {
            return Err(io::Error::other(format!("setfsuid({}) failed", creds.uid)));
        }
    }
    Ok(())
}
