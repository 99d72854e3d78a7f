use std::process::ExitCode;

use ally::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    ally::reexec::record_startup();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ally: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => ally::run::run(args).await,
            Command::Reload(args) => ally::control::reload(args).await,
            Command::Reexec(args) => ally::reexec_command::reexec(args).await,
            Command::StopPost(args) => ally::stop_post::stop_post(args),
            Command::Status(args) => ally::control::status(args).await,
            Command::List(args) => ally::control::list(args).await,
            Command::History(args) => ally::observe_cli::history(args).await,
            Command::Metrics(args) => ally::observe_cli::metrics(args).await,
            Command::Cache(cmd) => ally::state_cli::cache(cmd).await,
            Command::Atomic(cmd) => ally::state_cli::atomic(cmd).await,
            Command::Lock(cmd) => ally::state_cli::lock(cmd).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(message) => {
            eprintln!("ally: {message}");
            ExitCode::FAILURE
        }
    }
}
