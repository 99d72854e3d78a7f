//! The cost of `sockets = "listen-fds"` at a spawn: the broker prepares the
//! child's environment, argv and fd moves itself and the child writes its own
//! pid into `LISTEN_PID` between fork and exec (`ally::activation`), instead of
//! `std`'s spawn. Measured side by side, interleaved, with what a trampoline
//! (one more exec before the app's) would cost:
//!
//! - `std`: `instance::spawn` with nothing handed over (std's own exec);
//! - `listen-fds`: the same with two sockets handed over as fds 3 and 4;
//! - `trampoline`: std's exec of `/usr/bin/env`, which execs the program: the
//!   price of one extra exec, as a helper binary setting `LISTEN_PID` would add.
//!
//! Each spawn is timed from the call until `/bin/true` has run and exited (a
//! trampoline's spawn returns after its own exec, before the program's). `cargo bench -p ally-bench --bench spawn`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use ally::config::Config;
use ally::identity::RunAs;
use ally::instance::{self, Handed, Launch};

const ROUNDS: usize = 400;

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let run_as = RunAs::resolve(&Config::defaults(vec!["true".into()])).unwrap();
    let launch = |command: &[&str]| Launch {
        command: command.iter().map(|s| s.to_string()).collect(),
        working_directory: None,
        run_as: run_as.clone(),
        environment: BTreeMap::new(),
        app: "bench".into(),
        address: String::new(),
        state_address: String::new(),
        stop_signal: nix::sys::signal::Signal::SIGTERM,
        drain_idle: Duration::from_secs(1),
        stdout: ally::config::Output::Inherit,
        stderr: ally::config::Output::Inherit,
    };
    let plain = launch(&["/bin/true"]);
    let trampoline = launch(&["/usr/bin/env", "/bin/true"]);
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let sockets = || -> Vec<(OwnedFd, String)> {
        vec![
            (OwnedFd::from(a.try_clone().unwrap()), "http".into()),
            (OwnedFd::from(b.try_clone().unwrap()), "admin".into()),
        ]
    };
    let mut times: [Vec<Duration>; 3] = Default::default();
    runtime.block_on(async {
        for round in 0..ROUNDS + 20 {
            for (i, (how, handed)) in [
                (&plain, Handed::default()),
                (
                    &plain,
                    Handed {
                        sockets: sockets(),
                        ..Handed::default()
                    },
                ),
                (&trampoline, Handed::default()),
            ]
            .into_iter()
            .enumerate()
            {
                let started = Instant::now();
                let mut child = instance::spawn(how, 1, 1, false, handed).unwrap();
                child.wait().await.unwrap();
                let ran = started.elapsed();
                if round >= 20 {
                    times[i].push(ran);
                }
            }
        }
    });
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let p90 = |v: &Vec<Duration>| v[v.len() * 9 / 10];
    let names = [
        "std (no sockets)",
        "listen-fds (2 sockets)",
        "trampoline (one more exec)",
    ];
    let medians: Vec<Duration> = times.iter_mut().map(median).collect();
    println!(
        "spawn of /bin/true until it exited, {ROUNDS} rounds interleaved ({} CPUs; shared machine: read the medians)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| spawn | p50 µs | p90 µs | p50 / std p50 |");
    println!("| --- | ---: | ---: | ---: |");
    for (i, name) in names.iter().enumerate() {
        println!(
            "| {name} | {:.0} | {:.0} | {:.2} |",
            medians[i].as_secs_f64() * 1e6,
            p90(&times[i]).as_secs_f64() * 1e6,
            medians[i].as_secs_f64() / medians[0].as_secs_f64()
        );
    }
}
