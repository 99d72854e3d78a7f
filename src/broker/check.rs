//! `check`: the command run before every reload (like `nginx -t`), as the
//! instances run — their user and group, working directory and environment —
//! with stdin on /dev/null and its output (stdout and stderr in one pipe, in
//! the order written) kept up to its last [`KEPT_OUTPUT`] bytes. A check that
//! fails, is killed, outlives `check_timeout` or cannot start refuses the
//! reload; nothing is started then.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::Settings;
use crate::activation;
use crate::instance::{self, SYSTEMD_VARIABLES};

/// The end of the output a refusal quotes.
pub const KEPT_OUTPUT: usize = 4096;
/// How much of it goes into the one-line message.
const QUOTED_OUTPUT: usize = 512;

/// Runs the settings' check, if any. The error is the one line the reload's
/// caller gets.
pub(super) async fn run(settings: &Settings) -> Result<(), String> {
    let Some(command) = &settings.config.check else {
        return Ok(());
    };
    let timeout = settings.config.check_timeout;
    let refused = |how: String, output: &str| {
        let output = one_line(output);
        format!(
            "the check refused the reload, nothing was started: check {command:?} {how}{}",
            if output.is_empty() {
                String::new()
            } else {
                format!(": {output}")
            }
        )
    };
    let (program, args) = command.split_first().ok_or("the check is empty")?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| refused(format!("cannot start: no pipe for its output: {e}"), ""))?;
    let write_too: OwnedFd = write
        .try_clone()
        .map_err(|e| refused(format!("cannot start: {e}"), ""))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(activation::child_environment(
            &SYSTEMD_VARIABLES,
            settings
                .config
                .environment
                .iter()
                .map(|(k, v)| (k.into(), v.into()))
                .chain([("ALLY_APP".into(), settings.launch.app.clone().into())]),
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write_too))
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &settings.config.working_directory {
        cmd.current_dir(dir);
    }
    instance::run_as(&mut cmd, &settings.launch.run_as);
    let spawned = cmd.spawn();
    // The parent's write ends go now, so the output ends when the check's do.
    drop(cmd);
    let mut child = spawned.map_err(|e| refused(format!("cannot start: {e}"), ""))?;
    let output = tokio::net::unix::pipe::Receiver::from_owned_fd(read)
        .map(|pipe| tokio::spawn(read_tail(pipe)));
    let ended = tokio::time::timeout(timeout, child.wait()).await;
    let how = match ended {
        Ok(Ok(status)) if status.success() => None,
        Ok(Ok(status)) => Some(instance::describe_exit(&status)),
        Ok(Err(e)) => Some(format!("could not be waited for: {e}")),
        Err(_) => {
            // Unreaped, so its group id is still its own.
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            Some(format!(
                "did not finish within {} (check_timeout) and was killed",
                humantime::format_duration(timeout)
            ))
        }
    };
    let Some(how) = how else {
        return Ok(());
    };
    // Output still open after the check ended (a helper holding it) is not waited for.
    let text = match output {
        Ok(task) => {
            let abort = task.abort_handle();
            let text = tokio::time::timeout(Duration::from_millis(200), task).await;
            abort.abort();
            match text {
                Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                _ => String::new(),
            }
        }
        Err(_) => String::new(),
    };
    Err(refused(how, &text))
}

/// Reads `pipe` to its end, keeping the last [`KEPT_OUTPUT`] bytes.
async fn read_tail(mut pipe: tokio::net::unix::pipe::Receiver) -> Vec<u8> {
    let mut tail = Tail::new(KEPT_OUTPUT);
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return tail.into_bytes(),
            Ok(n) => tail.push(&buf[..n]),
        }
    }
}

/// The last `cap` bytes of a stream.
#[derive(Debug)]
pub struct Tail {
    cap: usize,
    bytes: std::collections::VecDeque<u8>,
    /// Whether bytes were dropped from the front.
    cut: bool,
}

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail {
            cap,
            bytes: std::collections::VecDeque::with_capacity(cap.min(8192)),
            cut: false,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            self.cut = true;
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let over = (self.bytes.len() + data.len()).saturating_sub(self.cap);
        if over > 0 {
            self.cut = true;
            self.bytes.drain(..over);
        }
        self.bytes.extend(data);
    }

    /// The kept bytes, with "…" in front if some were dropped.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len() + 3);
        if self.cut {
            out.extend_from_slice("…".as_bytes());
        }
        out.extend(self.bytes);
        out
    }
}

/// The output on one line (lines joined with "; "), at most its last
/// [`QUOTED_OUTPUT`] bytes.
fn one_line(output: &str) -> String {
    let joined = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if joined.len() <= QUOTED_OUTPUT {
        return joined;
    }
    let mut start = joined.len() - QUOTED_OUTPUT;
    while !joined.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &joined[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_bytes() {
        let mut tail = Tail::new(8);
        tail.push(b"abc");
        tail.push(b"def");
        assert_eq!(tail.into_bytes(), b"abcdef");
        let mut tail = Tail::new(8);
        tail.push(b"0123456");
        tail.push(b"789");
        assert_eq!(tail.into_bytes(), "…23456789".as_bytes());
        let mut tail = Tail::new(4);
        tail.push(b"a very long line");
        assert_eq!(tail.into_bytes(), "…line".as_bytes());
    }

    #[test]
    fn output_is_quoted_on_one_line_from_its_end() {
        assert_eq!(
            one_line("nginx: [emerg] unknown directive\n\n  test failed \n"),
            "nginx: [emerg] unknown directive; test failed"
        );
        let long = format!("{}é{}", "x".repeat(2000), "y".repeat(QUOTED_OUTPUT - 1));
        let quoted = one_line(&long);
        assert!(quoted.starts_with('…') && quoted.ends_with('y'), "{quoted}");
        assert!(quoted.len() <= QUOTED_OUTPUT + 4);
    }
}
