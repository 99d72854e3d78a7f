//! The parts this benchmark plays inside the instances of its brokers.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use ally_testkit::procfs::mono_ns;
use ally_testkit::publish;
use serde_json::json;

use crate::{CALLS, OUT, PORT, WARMUP, time_ns};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

/// Role `listen`: Listen round trips from inside an instance.
pub fn listen() {
    let out = PathBuf::from(env(OUT));
    let address = format!("127.0.0.1:{}", env(PORT));
    let ally = ally_client::blocking::Ally::from_env().expect("connecting to the broker");
    assert!(ally.is_managed(), "ALLY_ADDRESS is not set");
    // Bind once and report ready, as an app does; then time the steady state.
    // A raw socket: the broker's round trip, without the client's checks of the type.
    let tcp = ally_client::ListenOptions::network("tcp");
    drop(
        ally.listen_with::<OwnedFd>(&address, &tcp)
            .expect("first Listen"),
    );
    ally.ready().expect("Ready");
    let listen = || drop(ally.listen_with::<OwnedFd>(&address, &tcp).expect("Listen"));
    for _ in 0..WARMUP {
        listen();
    }
    let blocking: Vec<u64> = (0..CALLS).map(|_| time_ns(listen)).collect();

    // The async client on a current-thread runtime: no hop between threads on
    // the client's side.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let asynchronous: Vec<u64> = runtime.block_on(async {
        let ally = ally_client::Ally::from_env()
            .await
            .expect("connecting to the broker (async)");
        for _ in 0..WARMUP {
            drop(
                ally.listen_with::<OwnedFd>(&address, &tcp)
                    .await
                    .expect("Listen"),
            );
        }
        let mut durations = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let start = Instant::now();
            drop(
                ally.listen_with::<OwnedFd>(&address, &tcp)
                    .await
                    .expect("Listen"),
            );
            durations.push(start.elapsed().as_nanos() as u64);
        }
        durations
    });
    drop(runtime);
    publish(
        &out,
        &json!({"blocking": blocking, "async": asynchronous}).to_string(),
    );
    ally.wait_stopped();
}

/// Role `app`: ready at once; records when the stop signal arrives.
///
/// When SIGTERM arrived, from a handler of ours that the client's handler
/// (signal-hook-registry, via Tokio) chains to.
static SIGNALLED_NS: AtomicI64 = AtomicI64::new(0);

extern "C" fn on_stop_signal(_: libc::c_int) {
    SIGNALLED_NS.store(mono_ns(), Ordering::SeqCst);
}

pub fn app() {
    let main_ns = mono_ns();
    let dir = PathBuf::from(env(OUT));
    let address = format!("127.0.0.1:{}", env(PORT));
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only reads the clock and stores to an atomic.
    unsafe { sigaction(Signal::SIGTERM, &action) }.expect("installing the SIGTERM handler");

    let ally = ally_client::blocking::Ally::from_env().expect("connecting to the broker");
    let connected_ns = mono_ns();
    let tcp = ally_client::ListenOptions::network("tcp");
    let _socket = ally.listen_with::<OwnedFd>(&address, &tcp).expect("Listen");
    let listened_ns = mono_ns();
    ally.ready().expect("Ready");
    let ready_ns = mono_ns();
    let generation = ally.generation();
    publish(
        &dir.join(format!("start-{generation}")),
        &format!(
            "{} {main_ns} {connected_ns} {listened_ns} {ready_ns}",
            std::process::id()
        ),
    );
    ally.wait_stopped();
    let woke_ns = mono_ns();
    let signalled = SIGNALLED_NS.load(Ordering::SeqCst);
    publish(
        &dir.join(format!("stop-{generation}")),
        &format!("{signalled} {woke_ns}"),
    );
}
