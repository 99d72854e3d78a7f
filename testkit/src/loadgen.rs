//! Third-party load generators that never retry a request (`ab`, `wrk`), run in
//! the background against a server while it is reloaded, and what they report.
//!
//! Our own [`Load`](crate::Load) retries a keep-alive request the server closed
//! before answering, as browsers do; these do not, so every connection a server
//! cuts, refuses or resets counts as a failure. Both print their report when
//! interrupted, which is how a run is ended once the reloads are done.

use std::fmt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::{Broker, wait_until};

/// A load generator and how it uses connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// ApacheBench, a new connection per request (HTTP/1.0).
    Ab,
    /// ApacheBench with `-k`: HTTP/1.0 keep-alive connections that keep sending.
    AbKeepAlive,
    /// wrk: HTTP/1.1 keep-alive connections that keep sending.
    Wrk,
}

impl Tool {
    pub const ALL: [Tool; 3] = [Tool::Ab, Tool::AbKeepAlive, Tool::Wrk];

    /// The program, if it is installed (`apache2-utils`, `wrk`).
    pub fn program(self) -> &'static str {
        match self {
            Tool::Ab | Tool::AbKeepAlive => "ab",
            Tool::Wrk => "wrk",
        }
    }

    pub fn is_installed(self) -> bool {
        Command::new(self.program())
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tool::Ab => "ab",
            Tool::AbKeepAlive => "ab -k",
            Tool::Wrk => "wrk",
        })
    }
}

/// What a generator reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Requests answered with a complete response.
    pub requests: u64,
    /// Requests that failed: connection refused, reset, closed before or during
    /// the response, timed out, or answered with a status other than 2xx/3xx.
    pub failed: u64,
    /// The generator's own lines about failures, for the assertion message.
    pub detail: String,
}

/// A generator running in the background until [`finish`](Self::finish).
pub struct Generator {
    tool: Tool,
    child: Child,
}

impl Generator {
    /// Starts `tool` against `url` (e.g. `http://127.0.0.1:8080/`) with
    /// `connections` concurrent connections; it runs until finished.
    pub fn start(tool: Tool, url: &str, connections: u32) -> Generator {
        let c = connections.to_string();
        let mut cmd = Command::new(tool.program());
        match tool {
            // -l: the body may change length (it names the pid that answered);
            // -r: go on after a receive error (it is counted, not fatal);
            // -n: ab allocates 32 bytes per request up front.
            Tool::Ab | Tool::AbKeepAlive => {
                cmd.args(["-q", "-l", "-r", "-s", "10", "-n", "3000000"]);
                cmd.args(["-c", &c]);
                if tool == Tool::AbKeepAlive {
                    cmd.arg("-k");
                }
            }
            Tool::Wrk => {
                cmd.args(["-t", "2", "-d", "3600s", "--timeout", "10s", "-c", &c]);
            }
        }
        cmd.arg(url).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {tool}: {e} (apt install apache2-utils wrk)"));
        Generator { tool, child }
    }

    /// Whether it is still sending (it has not run out of requests or given up).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// [`finish`](Self::finish), printing `{label} under {tool}: N requests, M
    /// failed` and asserting that none failed.
    pub fn finish_losing_nothing(self, label: &str) -> Report {
        let tool = self.tool;
        let report = self.finish();
        eprintln!(
            "{label} under {tool}: {} requests, {} failed",
            report.requests, report.failed
        );
        assert_eq!(report.failed, 0, "{label}: {}", report.detail);
        report
    }

    /// Interrupts the generator and returns its report.
    pub fn finish(mut self) -> Report {
        // Not once reaped (ab gives up by itself): its pid may be another's by now.
        if matches!(self.child.try_wait(), Ok(None)) {
            crate::process::signal(self.child.id(), Signal::SIGINT);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = std::mem::replace(&mut self.child, dummy())
            .wait_with_output()
            .unwrap_or_else(|e| panic!("reading {}'s report: {e}", self.tool));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let report = match self.tool {
            Tool::Ab | Tool::AbKeepAlive => parse_ab(&text),
            Tool::Wrk => parse_wrk(&text),
        };
        report.unwrap_or_else(|e| panic!("{}: {e} in its report:\n{text}", self.tool))
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dummy() -> Child {
    Command::new("true").spawn().expect("spawning true")
}

/// ab's report: `Complete requests`, `Failed requests` (connect, receive,
/// length, exceptions; length is not a failure with `-l`) and `Non-2xx
/// responses`.
pub fn parse_ab(text: &str) -> Result<Report, String> {
    let number = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    };
    if let Some(gave_up) = parse_ab_gave_up(text) {
        return Ok(gave_up);
    }
    let complete = number("Complete requests:").ok_or("no `Complete requests:`")?;
    let failed = number("Failed requests:").ok_or("no `Failed requests:`")?;
    let non_2xx = number("Non-2xx responses:").unwrap_or(0);
    let detail: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("Failed requests:")
                || l.starts_with("(Connect:")
                || l.starts_with("Non-2xx")
                || l.starts_with("apr_")
                || l.contains("error")
        })
        .collect();
    let detail = detail.join("\n");
    // With -l, ab still counts nothing as a length failure; any it reports is real.
    Ok(Report {
        requests: complete.saturating_sub(failed),
        failed: failed + non_2xx,
        detail,
    })
}

/// ab's words when it gave up: after more than 10 failed connects in a run
/// (refused, reset) it exits with `Test aborted after 10 failures` and no
/// report, only `Total of N requests completed` (the last multiple of 10% of
/// `-n` or a progress line). At least 11 requests failed.
fn parse_ab_gave_up(text: &str) -> Option<Report> {
    let aborted = text.lines().find(|l| l.contains("Test aborted after"))?;
    let requests = text
        .split("Total of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let detail: Vec<&str> = std::iter::once(aborted.trim())
        .chain(
            text.lines()
                .map(str::trim)
                .filter(|l| l.starts_with("apr_")),
        )
        .collect();
    Some(Report {
        requests,
        failed: 11,
        detail: detail.join("\n"),
    })
}

/// wrk's report: `N requests in`, `Socket errors: connect A, read B, write C,
/// timeout D` and `Non-2xx or 3xx responses: E`.
pub fn parse_wrk(text: &str) -> Result<Report, String> {
    let requests = text
        .lines()
        .find_map(|l| {
            let (n, rest) = l.trim().split_once(' ')?;
            rest.starts_with("requests in")
                .then(|| n.parse::<u64>().ok())?
        })
        .ok_or("no `N requests in`")?;
    // Socket errors are not among the requests counted; bad statuses are.
    let (mut socket_errors, mut bad_status) = (0, 0);
    let mut detail = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(errors) = line.strip_prefix("Socket errors:") {
            for part in errors.split(',') {
                let n = part.split_whitespace().nth(1);
                socket_errors += n.and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            }
            detail.push(line);
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            bad_status += n
                .trim()
                .parse::<u64>()
                .map_err(|e| format!("{line}: {e}"))?;
            detail.push(line);
        }
    }
    Ok(Report {
        requests: requests.saturating_sub(bad_status),
        failed: socket_errors + bad_status,
        detail: detail.join("\n"),
    })
}

/// Reloads `broker` `reloads` times while `tool` loads `url` over `connections`
/// connections, waits until no older generation is left draining, and returns
/// what the generator saw. Every reload must succeed.
pub fn reloads_under(
    broker: &Broker,
    tool: Tool,
    url: &str,
    connections: u32,
    reloads: u32,
) -> Report {
    reloads_under_with(broker, tool, url, connections, reloads, &mut |_| {})
}

/// [`reloads_under`], calling `before_reload(n)` before reload `n` (1-based)
/// and, with `n = reloads + 1`, once more after the last: where a test writes
/// version `n` and checks that version `n - 1` answers.
pub fn reloads_under_with(
    broker: &Broker,
    tool: Tool,
    url: &str,
    connections: u32,
    reloads: u32,
    before_reload: &mut dyn FnMut(u32),
) -> Report {
    let mut generator = Generator::start(tool, url, connections);
    // Let every connection get going before the first reload.
    std::thread::sleep(Duration::from_millis(300));
    for n in 1..=reloads {
        before_reload(n);
        let out = broker.reload();
        assert!(
            out.status.success(),
            "reload {n} of {reloads} under {tool} failed: {}{}",
            crate::stdout(&out),
            crate::stderr(&out)
        );
    }
    before_reload(reloads + 1);
    wait_until(
        "the old generations to finish draining",
        Duration::from_secs(60),
        || broker.pids("draining").is_empty(),
    );
    assert!(
        generator.is_running(),
        "{tool} stopped before the reloads were done: {:?}",
        generator.finish()
    );
    generator.finish()
}

/// Held while a load runs: one at a time in a test binary, since on a machine of
/// few cores a starved generator measures nothing.
pub fn one_load() -> std::sync::MutexGuard<'static, ()> {
    static ONE_LOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_LOAD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `command` (an HTTP app that serves `127.0.0.1:port`) under a broker, reloads
/// it `reloads` times under `tool` over `connections` connections, and asserts that
/// no request failed and that every reload happened. One such load runs at a time in a
/// test binary: on a machine of few cores a starved generator measures nothing.
pub fn assert_reloads_lose_nothing(
    label: &str,
    command: &[String],
    port: u16,
    tool: Tool,
    reloads: u32,
) -> Report {
    let config =
        format!("command = {command:?}\nready_timeout = \"20s\"\nstop_timeout = \"20s\"\n");
    assert_config_reloads_lose_nothing(label, &config, port, tool, reloads, &mut |_| {})
}

/// [`assert_reloads_lose_nothing`] for a whole config (`[[listen]]`, `sockets`,
/// `ready`, ...) instead of a command on the defaults; `before_reload(n)` runs
/// before reload `n` (see [`reloads_under_with`]).
pub fn assert_config_reloads_lose_nothing(
    label: &str,
    config: &str,
    port: u16,
    tool: Tool,
    reloads: u32,
    before_reload: &mut dyn FnMut(u32),
) -> Report {
    assert_config_reloads_lose_at_most(label, config, port, tool, reloads, 0, before_reload)
}

/// [`assert_config_reloads_lose_nothing`] for a server whose own graceful stop
/// loses requests whatever starts and stops it (it closes idle kept-alive
/// connections at once, say): no more than `max_failed` may fail. What failed
/// is printed either way.
pub fn assert_config_reloads_lose_at_most(
    label: &str,
    config: &str,
    port: u16,
    tool: Tool,
    reloads: u32,
    max_failed: u64,
    before_reload: &mut dyn FnMut(u32),
) -> Report {
    let _one = one_load();
    crate::build_ally();
    let broker = Broker::start("web", config);
    broker.wait_running(1);
    let url = format!("http://127.0.0.1:{port}/");
    let report = reloads_under_with(&broker, tool, &url, 8, reloads, before_reload);
    eprintln!(
        "{label} under {tool}, {reloads} reloads: {} requests, {} failed{}",
        report.requests,
        report.failed,
        if report.failed > 0 {
            format!(":\n{}", report.detail)
        } else {
            String::new()
        }
    );
    assert!(
        report.failed <= max_failed,
        "{label} under {tool}: {} failed of {} (at most {max_failed} allowed):\n{}\n--- broker log:\n{}",
        report.failed,
        report.requests,
        report.detail,
        broker.logs()
    );
    assert!(
        report.requests >= 1000,
        "{label} under {tool}: too little load to prove anything: {} requests",
        report.requests
    );
    assert_eq!(broker.generation(), u64::from(reloads) + 1);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_abs_failures() {
        let text = "Complete requests:      1041\nFailed requests:        3\n   (Connect: 0, Receive: 2, Length: 0, Exceptions: 1)\nNon-2xx responses:      2\n";
        let r = parse_ab(text).unwrap();
        assert_eq!((r.requests, r.failed), (1038, 5));
        assert!(r.detail.contains("Receive: 2"), "{}", r.detail);
        assert!(parse_ab("Benchmarking 127.0.0.1").is_err());
    }

    #[test]
    fn reads_that_ab_gave_up() {
        let text = "Benchmarking 127.0.0.1 (be patient)...Total of 32771 requests completed\n\nTest aborted after 10 failures\n\napr_socket_connect(): Connection reset by peer (104)\n";
        let r = parse_ab(text).unwrap();
        assert_eq!((r.requests, r.failed), (32771, 11));
        assert_eq!(
            r.detail,
            "Test aborted after 10 failures\napr_socket_connect(): Connection reset by peer (104)"
        );
    }

    #[test]
    fn reads_wrks_failures() {
        let text = "  1038 requests in 2.10s, 1.06MB read\n  Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 4\nRequests/sec: 493.92\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!((r.requests, r.failed), (1034, 10));
        let clean = parse_wrk("  1038 requests in 2.10s, 1.06MB read\n").unwrap();
        assert_eq!((clean.requests, clean.failed), (1038, 0));
    }
}
