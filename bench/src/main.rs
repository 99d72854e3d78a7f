//! `ally-bench`: runs Ally and the alternatives side by side under the same load
//! and writes `docs/benchmarks.md` and `docs/benchmarks.svg`.
//!
//! ```text
//! cargo run --release -p ally-bench -- all            # everything, ~10 minutes
//! cargo run --release -p ally-bench -- all --quick    # a short smoke run, no files written
//! cargo run --release -p ally-bench -- soak           # only the 1000-reload soak
//! ```
//!
//! Loopback only; every load is bounded in requests and time. The broker's own
//! figures are this crate's benches: `cargo bench -p ally-bench --bench broker`
//! and `--bench state` (`benches/`).

mod driver;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(driver::main(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ally-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
