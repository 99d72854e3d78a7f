//! Starting and signalling an instance's process.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use nix::sys::signal::Signal;

use crate::generations::{Generation, InstanceId};
use crate::identity::RunAs;

/// Everything needed to start one instance.
#[derive(Debug, Clone)]
pub struct Launch {
    pub command: Vec<String>,
    pub working_directory: Option<PathBuf>,
    /// Who the instances run as, resolved when the broker started.
    pub run_as: RunAs,
    pub environment: BTreeMap<String, String>,
    pub app: String,
    pub address: String,
    pub state_address: String,
    pub stop_signal: Signal,
    /// `ALLY_DRAIN_IDLE`, in whole milliseconds.
    pub drain_idle: std::time::Duration,
}

/// Spawns the command. The program is looked up again on every call, so a
/// replaced binary or a re-pointed `current` symlink is what the next
/// generation runs.
///
/// Each instance gets its own process group: a Ctrl-C at the broker's terminal
/// reaches only the broker, which then stops its instances in order, and a
/// SIGKILL can take an instance's helpers with it.
///
/// An `idle` instance starts under `SCHED_IDLE` (see [`crate::priority`]).
pub fn spawn(
    launch: &Launch,
    id: InstanceId,
    generation: Generation,
    idle: bool,
) -> io::Result<tokio::process::Child> {
    let (program, args) = launch
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the command is empty"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(&launch.environment)
        .env("ALLY_ADDRESS", &launch.address)
        .env("ALLY_STATE_ADDRESS", &launch.state_address)
        .env("ALLY_APP", &launch.app)
        .env("ALLY_INSTANCE", id.to_string())
        .env("ALLY_GENERATION", generation.to_string())
        .env("ALLY_STOP_SIGNAL", launch.stop_signal.as_str())
        .env("ALLY_DRAIN_IDLE", launch.drain_idle.as_millis().to_string())
        // systemd's variables describe the broker, not the app.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(dir) = &launch.working_directory {
        cmd.current_dir(dir);
    }
    if launch.run_as.switch {
        let RunAs {
            uid,
            gid,
            set_groups,
            ..
        } = launch.run_as;
        let groups: Vec<libc::gid_t> = launch.run_as.groups.clone();
        // std's own uid()/gid() run before pre_exec hooks, and setgroups must come
        // before setuid: the whole drop happens here, in order.
        // SAFETY: the hook makes only the async-signal-safe calls `drop_privileges`
        // documents, on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || drop_privileges(uid, gid, set_groups.then_some(&groups[..])));
        }
    }
    let spawned = if idle {
        let runtime = tokio::runtime::Handle::current();
        crate::priority::spawn_idle(|| {
            let _entered = runtime.enter();
            cmd.spawn()
        })
    } else {
        cmd.spawn()
    };
    spawned.map_err(|e| io::Error::new(e.kind(), format!("cannot start {program:?}: {e}")))
}

/// Switches the child to `uid`, `gid` and, if given, the supplementary
/// `groups`.
///
/// This runs between fork and exec in a child of the multi-threaded broker,
/// where a lock another thread held at the fork stays held forever: so it makes
/// only raw, async-signal-safe calls, with no allocation, no lock and no user
/// database lookup (`initgroups` would read /etc/group through NSS; the groups
/// were resolved before, see [`crate::identity`]). An error is built from errno
/// without allocating.
fn drop_privileges(uid: u32, gid: u32, groups: Option<&[libc::gid_t]>) -> io::Result<()> {
    let check = |result: libc::c_int| {
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls; `groups` points to `groups.len()` valid ids.
    unsafe {
        if let Some(groups) = groups {
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
        }
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))?;
    }
    Ok(())
}

/// Describes how a process ended, the way a person reads it.
pub fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("unknown signal");
        format!("was killed by {name}")
    } else {
        "ended".to_string()
    }
}
