//! How long one re-exec of the broker takes, from the call to the broker
//! serving again, with its shared state empty and full, while an HTTP client
//! that never retries loads the app it runs (`--bench reexec`).
//!
//! One real broker (`ally run`) runs the hello example. For each cache size
//! the cache is filled to it (1 MiB entries of random bytes, as
//! `max_total_bytes` counts them), a load runs, and each run times:
//!
//! - `Reexecute()` sent on the private socket → its connection closes (the
//!   old image written and the exec done), → the first `Status()` on a fresh
//!   connection that shows `reexecs` one higher (polled every
//!   [`Settings::poll`]); a connection made in the gap waits in the backlog
//!   of the carried socket until the new image accepts it;
//! - the whole `ally reexec APP --quiet` process, start to exit, as operators
//!   run it (it polls every 20 ms itself).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ally_core::proxy::{self, Status};
use ally_testkit::loadgen::{Generator, Tool};
use ally_testkit::stats::Distribution;
use ally_testkit::{Launch, Load, LoadMode, free_port, wait_until};

const MIB: u64 = 1 << 20;
const NAMESPACE: &str = "fill";

#[derive(Debug, Clone)]
pub struct Settings {
    /// Re-execs per cache size; each is timed both ways (raw call, command).
    pub runs: usize,
    /// Cache sizes to measure, in MiB, growing (the cache is only added to).
    pub cache_mib: Vec<u64>,
    /// Connections of the HTTP load.
    pub connections: u32,
    /// Between a re-exec and the next.
    pub gap: Duration,
    /// How often a fresh connection asks `Status()` while waiting.
    pub poll: Duration,
    /// The `ally` binary to run (the broker and the command).
    pub ally: PathBuf,
    /// The hello example, the app the broker runs.
    pub hello: PathBuf,
}

/// The figures of one cache size.
#[derive(Debug, Clone)]
pub struct Case {
    /// Live bytes in the cache as `max_total_bytes` counts them.
    pub cache_bytes: u64,
    /// `Reexecute()` sent → its connection closed, ms.
    pub closed_ms: Vec<f64>,
    /// `Reexecute()` sent → first `Status()` of the new image, ms.
    pub serving_ms: Vec<f64>,
    /// `ally reexec APP` start → exit, ms.
    pub command_ms: Vec<f64>,
    /// The load: which client, requests answered, requests failed.
    pub client: String,
    pub requests: u64,
    pub failed: u64,
    /// What the client said of its failures (empty without any).
    pub detail: String,
}

/// Runs every cache size of `settings` on one broker; panics with the broker's
/// log if a re-exec fails or the broker never serves again.
pub fn run(settings: &Settings) -> Vec<Case> {
    let port = free_port();
    let hello = settings.hello.display().to_string();
    let config = format!(
        "command = [{hello:?}, \"--listen\", \"127.0.0.1:{port}\", \"--version\", \"1\"]\nstop_timeout = \"10s\"\nready_timeout = \"10s\"\n"
    );
    let broker = Launch::new("bench")
        .ally(&settings.ally)
        .config(&config)
        .log_level("warn")
        .start();
    let address = broker.address();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    wait_until("the app to be ready", Duration::from_secs(20), || {
        runtime
            .block_on(status(&address))
            .is_ok_and(|s| s.state == "running" && s.generation >= 1)
    });
    let admin = ally_client::blocking::Ally::connect(&address).expect("an admin connection");
    let url = format!("http://127.0.0.1:{port}/");
    let mut filled = 0u64;
    let mut cases = Vec::new();
    for &mib in &settings.cache_mib {
        while filled < mib {
            let key = format!("k{filled:05}");
            let value = noise(MIB as usize - NAMESPACE.len() - key.len(), filled);
            admin
                .cache(NAMESPACE)
                .set(&key, value, None)
                .unwrap_or_else(|e| panic!("filling the cache ({filled} MiB so far): {e}"));
            filled += 1;
        }
        assert_eq!(admin.cache(NAMESPACE).count().expect("Cache Count"), filled);
        let mut case = Case {
            cache_bytes: filled * MIB,
            closed_ms: Vec::new(),
            serving_ms: Vec::new(),
            command_ms: Vec::new(),
            client: String::new(),
            requests: 0,
            failed: 0,
            detail: String::new(),
        };
        let load = HttpLoad::start(port, &url, settings.connections);
        std::thread::sleep(Duration::from_millis(200));
        for n in 1..=settings.runs {
            let (closed, serving) = runtime
                .block_on(time_call(&address, settings.poll))
                .unwrap_or_else(|e| panic!("re-exec {n} by call: {e}\n{}", broker.logs()));
            case.closed_ms.push(ms(closed));
            case.serving_ms.push(ms(serving));
            std::thread::sleep(settings.gap);
            let began = Instant::now();
            let out = Command::new(&settings.ally)
                .args(["reexec", &broker.app, "--quiet", "--runtime-dir"])
                .arg(&broker.runtime_dir)
                .env_remove("DBUS_SESSION_BUS_ADDRESS")
                .output()
                .expect("running ally reexec");
            case.command_ms.push(ms(began.elapsed()));
            assert!(
                out.status.success(),
                "ally reexec failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                broker.logs()
            );
            std::thread::sleep(settings.gap);
        }
        (case.client, case.requests, case.failed, case.detail) = load.finish();
        cases.push(case);
    }
    let reexecs = runtime.block_on(status(&address)).expect("Status").reexecs;
    assert_eq!(
        reexecs,
        (2 * settings.runs * settings.cache_mib.len()) as u64,
        "every re-exec happened"
    );
    cases
}

/// The table the benchmark prints, one line per cache size.
pub fn table(cases: &[Case]) -> String {
    let mut out = format!(
        "{:>9} {:>4} {:>8} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>8} {:>9} {:>6}\n",
        "cache",
        "n",
        "closed",
        "serving",
        "p90",
        "max",
        "command",
        "p90",
        "max",
        "client",
        "requests",
        "failed"
    );
    for c in cases {
        let closed = Distribution::new(c.closed_ms.iter().copied());
        let serving = Distribution::new(c.serving_ms.iter().copied());
        let command = Distribution::new(c.command_ms.iter().copied());
        out += &format!(
            "{:>5} MiB {:>4} {:>8.1} | {:>7.1} {:>7.1} {:>7.1} | {:>7.1} {:>7.1} {:>7.1} | {:>8} {:>9} {:>6}\n",
            c.cache_bytes / MIB,
            serving.len(),
            closed.p(50.0),
            serving.p(50.0),
            serving.p(90.0),
            serving.max(),
            command.p(50.0),
            command.p(90.0),
            command.max(),
            c.client,
            c.requests,
            c.failed
        );
    }
    out
}

async fn status(address: &str) -> Result<Status, String> {
    let proxy = proxy::connect(address, None)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let dict = proxy.status().await.map_err(|e| format!("Status: {e}"))?;
    Status::from_dict(dict).map_err(|e| format!("reading Status: {e}"))
}

/// One re-exec by a raw call: (sent → connection closed, sent → serving again).
async fn time_call(address: &str, poll: Duration) -> Result<(Duration, Duration), String> {
    let before = status(address).await?;
    let proxy = proxy::connect(address, None)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let began = Instant::now();
    // No reply on success: the exec closes the connection, so only a refusal is an error.
    if let Err(e @ zbus::Error::MethodError(..)) = proxy.reexecute().await {
        return Err(format!("Reexecute refused: {e}"));
    }
    let closed = began.elapsed();
    drop(proxy);
    let deadline = began + Duration::from_secs(30);
    loop {
        if let Ok(now) = status(address).await {
            if now.reexecs > before.reexecs {
                if now.pid != before.pid {
                    return Err(format!("another pid: {} → {}", before.pid, now.pid));
                }
                return Ok((closed, began.elapsed()));
            }
            if !now.reexec_error.is_empty() && now.reexec_error != before.reexec_error {
                return Err(now.reexec_error);
            }
        }
        if Instant::now() > deadline {
            return Err("not serving again within 30 s".into());
        }
        tokio::time::sleep(poll).await;
    }
}

/// The HTTP load: wrk (keep-alive, never retries) when it is installed, else
/// the testkit's keep-alive [`Load`], whose retries count as failures here.
enum HttpLoad {
    Wrk(Generator),
    Ours(Load),
}

impl HttpLoad {
    fn start(port: u16, url: &str, connections: u32) -> HttpLoad {
        if Tool::Wrk.is_installed() {
            HttpLoad::Wrk(Generator::start(Tool::Wrk, url, connections))
        } else {
            let addr = ([127, 0, 0, 1], port).into();
            HttpLoad::Ours(Load::start(addr, LoadMode::KeepAlive, connections as usize))
        }
    }

    /// (client, requests answered, failed, what failed).
    fn finish(self) -> (String, u64, u64, String) {
        match self {
            HttpLoad::Wrk(mut generator) => {
                assert!(generator.is_running(), "wrk stopped early");
                let report = generator.finish();
                ("wrk".into(), report.requests, report.failed, report.detail)
            }
            HttpLoad::Ours(load) => {
                let stats = load.finish();
                let failed = stats.failed + stats.retried;
                (
                    "keepalive".into(),
                    stats.ok,
                    failed,
                    stats.errors.join("; "),
                )
            }
        }
    }
}

/// `len` bytes that do not compress, different for each `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_differs_by_seed_and_has_its_length() {
        assert_eq!(noise(1000, 1).len(), 1000);
        assert_ne!(noise(64, 1), noise(64, 2));
        assert_ne!(noise(64, 0), vec![0u8; 64]);
    }
}
