//! Starting and signalling an instance's process.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use nix::sys::signal::Signal;

use crate::generations::{Generation, InstanceId};

/// Everything needed to start one instance.
#[derive(Debug, Clone)]
pub struct Launch {
    pub command: Vec<String>,
    pub working_directory: Option<PathBuf>,
    pub user: Option<(u32, String)>,
    pub group: Option<u32>,
    pub environment: BTreeMap<String, String>,
    pub app: String,
    pub address: String,
    pub state_address: String,
    pub stop_signal: Signal,
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
    if launch.user.is_some() || launch.group.is_some() {
        let (uid, name) = match &launch.user {
            Some((uid, name)) => (Some(*uid), Some(name.clone())),
            None => (None, None),
        };
        let name = name
            .map(std::ffi::CString::new)
            .transpose()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name has NUL"))?;
        let gid = launch.group;
        let privileged = nix::unistd::geteuid().is_root();
        // std's own uid()/gid() run before pre_exec hooks, and initgroups needs
        // root: the whole drop happens here, in order.
        // SAFETY: the hook only makes the set*id calls every setuid-spawning daemon makes.
        unsafe {
            cmd.pre_exec(move || drop_privileges(uid, gid, name.as_deref(), privileged));
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

fn drop_privileges(
    uid: Option<u32>,
    gid: Option<u32>,
    name: Option<&std::ffi::CStr>,
    privileged: bool,
) -> io::Result<()> {
    use nix::unistd::{Gid, Uid, initgroups, setgid, setgroups, setuid};
    if let Some(gid) = gid.map(Gid::from_raw) {
        if privileged {
            match name {
                Some(name) => initgroups(name, gid)?,
                None => setgroups(&[gid])?,
            }
        }
        setgid(gid)?;
    }
    if let Some(uid) = uid {
        setuid(Uid::from_raw(uid))?;
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
