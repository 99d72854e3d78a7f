//! Starting and signalling an instance's process.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use nix::sys::signal::Signal;

use crate::activation::{self, Activation};
use crate::config::Output;
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
    /// Where its stdout and stderr go: a pipe the broker reads
    /// ([`crate::app_logs`]) or the broker's own.
    pub stdout: Output,
    pub stderr: Output,
}

/// What one instance is given besides its [`Launch`]: the sockets of
/// `sockets = "listen-fds"`, its own `NOTIFY_SOCKET`, the watchdog.
#[derive(Debug, Default)]
pub struct Handed {
    /// Passed as fds 3, 4, … with `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`.
    pub sockets: Vec<(std::os::fd::OwnedFd, String)>,
    pub notify_socket: Option<PathBuf>,
    /// `WATCHDOG_USEC`, with `WATCHDOG_PID` = its pid.
    pub watchdog: Option<std::time::Duration>,
}

/// The variables that describe the broker to systemd, never the app: an
/// instance gets its own or none.
const SYSTEMD_VARIABLES: [&str; 6] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Spawns the command. The program is looked up again on every call, so a
/// replaced binary or a re-pointed `current` symlink is what the next
/// generation runs.
///
/// Each instance gets its own process group: a Ctrl-C at the broker's terminal
/// reaches only the broker, which then stops its instances in order, and a
/// SIGKILL can take an instance's helpers with it.
///
/// An `idle` instance starts under `SCHED_IDLE` (see [`crate::priority`]).
///
/// With sockets to hand over or a watchdog, the exec is [`crate::activation`]'s,
/// which sets `LISTEN_PID` and `WATCHDOG_PID` to the child's own pid.
pub fn spawn(
    launch: &Launch,
    id: InstanceId,
    generation: Generation,
    idle: bool,
    handed: Handed,
) -> io::Result<tokio::process::Child> {
    let (program, args) = launch
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the command is empty"))?;
    let mut variables: Vec<(String, String)> = launch
        .environment
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    variables.extend([
        ("ALLY_ADDRESS".into(), launch.address.clone()),
        ("ALLY_STATE_ADDRESS".into(), launch.state_address.clone()),
        ("ALLY_APP".into(), launch.app.clone()),
        ("ALLY_INSTANCE".into(), id.to_string()),
        ("ALLY_GENERATION".into(), generation.to_string()),
        (
            "ALLY_STOP_SIGNAL".into(),
            launch.stop_signal.as_str().into(),
        ),
        (
            "ALLY_DRAIN_IDLE".into(),
            launch.drain_idle.as_millis().to_string(),
        ),
    ]);
    if let Some(path) = &handed.notify_socket {
        variables.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    }
    if let Some(watchdog) = handed.watchdog {
        variables.push(("WATCHDOG_USEC".into(), watchdog.as_micros().to_string()));
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(activation::child_environment(
            &SYSTEMD_VARIABLES,
            variables.iter().map(|(k, v)| (k.into(), v.into())),
        ))
        .stdin(Stdio::null())
        .stdout(stdio(launch.stdout))
        .stderr(stdio(launch.stderr))
        .process_group(0)
        .kill_on_drop(false);
    if let Some(dir) = &launch.working_directory {
        cmd.current_dir(dir);
    }
    run_as(&mut cmd, &launch.run_as);
    // Registered after the privilege drop: hooks run in order, and this one execs.
    let report = if handed.sockets.is_empty() && handed.watchdog.is_none() {
        // SAFETY: one async-signal-safe system call.
        unsafe {
            cmd.pre_exec(|| {
                activation::close_on_exec_from(3);
                Ok(())
            });
        }
        None
    } else {
        let env = activation::child_environment(
            &SYSTEMD_VARIABLES,
            variables.iter().map(|(k, v)| (k.into(), v.into())),
        );
        let activation = Activation {
            sockets: handed.sockets,
            watchdog_pid: handed.watchdog.is_some(),
        };
        let (mut exec, report) = activation::Exec::prepare(&launch.command, &env, activation)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {program:?}: {e}")))?;
        // SAFETY: `run_in_child` makes only async-signal-safe calls on memory
        // prepared before the fork, and is the last hook.
        unsafe {
            cmd.pre_exec(move || exec.run_in_child());
        }
        Some(std::fs::File::from(report))
    };
    let spawned = if idle {
        let runtime = tokio::runtime::Handle::current();
        crate::priority::spawn_idle(|| {
            let _entered = runtime.enter();
            cmd.spawn()
        })
    } else {
        cmd.spawn()
    };
    // The parent's copies of the handed sockets and of the report pipe's write
    // end go with the command, before the report is read.
    drop(cmd);
    let mut child =
        spawned.map_err(|e| io::Error::new(e.kind(), format!("cannot start {program:?}: {e}")))?;
    if let Some(report) = report
        && let Err(e) = activation::exec_result(report)
    {
        // It `_exit`ed: reap it.
        tokio::spawn(async move { child.wait().await });
        return Err(io::Error::new(
            e.kind(),
            format!("cannot start {program:?}: {e}"),
        ));
    }
    Ok(child)
}

/// A pipe for the broker to read (std makes it and moves it to fd 1 or 2 in
/// the child with `dup2` alone), or the broker's own.
fn stdio(output: Output) -> Stdio {
    match output {
        Output::Journal => Stdio::piped(),
        Output::Inherit => Stdio::inherit(),
    }
}

/// Makes `cmd`'s process run as `run_as`, if the broker switches users.
pub fn run_as(cmd: &mut tokio::process::Command, run_as: &RunAs) {
    if !run_as.switch {
        return;
    }
    let RunAs {
        uid,
        gid,
        set_groups,
        ..
    } = *run_as;
    let groups: Vec<libc::gid_t> = run_as.groups.clone();
    // std's own uid()/gid() run before pre_exec hooks, and setgroups must come
    // before setuid: the whole drop happens here, in order.
    // SAFETY: the hook makes only the async-signal-safe calls `drop_privileges`
    // documents, on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || drop_privileges(uid, gid, set_groups.then_some(&groups[..])));
    }
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
