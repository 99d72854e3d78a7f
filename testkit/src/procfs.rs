//! What a process holds and has used, from `/proc`.

use std::path::Path;
use std::time::Duration;

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `RssAnon:`, ...); 0 when the
/// process or the field is missing.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field_kib(&status, key).unwrap_or(0)
}

fn status_field_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident memory, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Open file descriptors; 0 when the process is gone.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// CPU time a process has used (user + system), ms, from `/proc/PID/stat`.
pub fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    stat_cpu_ticks(&stat) * 1000 / ticks
}

/// utime + stime, in clock ticks, of a `/proc/PID/stat` line.
fn stat_cpu_ticks(stat: &str) -> u64 {
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum()
}

/// CPU time all threads of `pid` have used, to the nanosecond (`schedstat`).
pub fn process_cpu_time(pid: u32) -> Duration {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|task| Some(schedstat_cpu(&task.ok()?.path().join("schedstat"))))
                .sum()
        })
        .unwrap_or_default()
}

/// CPU time the calling thread has used.
pub fn thread_cpu_time() -> Duration {
    schedstat_cpu(Path::new("/proc/thread-self/schedstat"))
}

/// The time on CPU that a task's `schedstat` gives.
fn schedstat_cpu(path: &Path) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let nanos = stat.split_whitespace().next().and_then(|n| n.parse().ok());
    Duration::from_nanos(nanos.unwrap_or(0))
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine.
pub fn mono_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; the call is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// Connections waiting in the accept queue of the IPv4 TCP listener on `port`
/// (`/proc/net/tcp`, the listening socket's `rx_queue`); `None` if nothing
/// listens there. What a test waits on to know a connection was accepted.
pub fn accept_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields.get(1)?.rsplit_once(':')?.1;
        let listening = *fields.get(3)? == "0A";
        if !listening || u16::from_str_radix(local_port, 16).ok()? != port {
            return None;
        }
        u64::from_str_radix(fields.get(4)?.split_once(':')?.1, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_stat_fields() {
        let status = "Name:\tally\nVmRSS:\t    5120 kB\nRssAnon:\t  1024 kB\n";
        assert_eq!(status_field_kib(status, "VmRSS:"), Some(5120));
        assert_eq!(status_field_kib(status, "RssAnon:"), Some(1024));
        assert_eq!(status_field_kib(status, "RssFile:"), None);
        // A command with a space and a parenthesis in it; utime 7, stime 5.
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(stat_cpu_ticks(stat), 12);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me) > 0);
        assert!(open_fds(me) >= 3);
        assert_eq!(open_fds(u32::MAX), 0);
        let spent = thread_cpu_time();
        let start = mono_ns();
        // schedstat of a running thread moves at scheduler ticks: spin over several.
        while mono_ns() - start < 50_000_000 {}
        assert!(thread_cpu_time() > spent);
        assert!(process_cpu_time(me) >= thread_cpu_time());
    }
}
