//! `ally reexec APP`: asks the broker to run its binary again in place, then
//! waits until the re-executed broker answers.
//!
//! The call gets no reply when the exec happens (the connection closes with
//! it), so success is seen on a new connection: the same pid, `reexecs` one
//! higher. A re-exec that failed is answered with its reason.

use std::time::{Duration, Instant};

use crate::cli::ReexecArgs;
use crate::control::{Target, describe_error, printable};

const POLL: Duration = Duration::from_millis(5);

pub async fn reexec(args: ReexecArgs) -> Result<i32, String> {
    let target = Target::connect(&args.app, &args.connect).await?;
    let before = target.status().await?;
    let began = Instant::now();
    match target.proxy().reexecute().await {
        Ok(()) => {}
        Err(zbus::Error::MethodError(name, message, reply)) => {
            return Err(describe_error(zbus::Error::MethodError(
                name, message, reply,
            )));
        }
        // The exec closed the connection: the new broker is answered below.
        Err(_) => {}
    }
    drop(target);
    let deadline = began + args.timeout;
    let mut last_error;
    loop {
        match Target::connect(&args.app, &args.connect).await {
            Ok(target) => match target.status().await {
                Ok(status)
                    if status.reexec_error != before.reexec_error
                        && !status.reexec_error.is_empty() =>
                {
                    return Err(printable(&status.reexec_error));
                }
                Ok(status) if status.reexecs > before.reexecs => {
                    if status.pid != before.pid {
                        return Err(format!(
                            "the broker for {} answers with another pid ({} before, {} now): it was restarted, not re-executed",
                            args.app, before.pid, status.pid
                        ));
                    }
                    if !args.quiet {
                        println!(
                            "re-executed the broker for {} (pid {}, ally {}) in {} ms: {} instances and {} listeners carried",
                            args.app,
                            status.pid,
                            printable(&status.version),
                            began.elapsed().as_millis(),
                            status.instances.len(),
                            status.listeners.len()
                        );
                    }
                    return Ok(0);
                }
                Ok(_) => last_error = "the broker has not re-executed yet".to_string(),
                Err(e) => last_error = e,
            },
            Err(e) => last_error = e,
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the broker for {} did not answer as re-executed within {} ({last_error})",
                args.app,
                humantime::format_duration(args.timeout)
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
