//! An axum app under Ally.
//!
//! ```text
//! axum_server [--listen ADDR]
//! ```
//!
//! `GET /` answers `hello from axum pid=P generation=G`. Run it with
//! `ally run web -- ./target/debug/examples/axum_server`, or alone in simulate mode.
//!
//! It is served by [`ally_client::axum::serve`] rather than `axum::serve(listener,
//! app).with_graceful_shutdown(ally.stopped())`, which loses requests on every reload
//! (the module docs say why): on the stop it stops accepting, answers with
//! `Connection: close`, and closes a connection once it has been idle for the app's
//! `drain_idle`.

use std::process::ExitCode;

use ally_client::Ally;
use axum::Router;
use axum::routing::get;
use clap::Parser;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(about = "An axum app under Ally")]
struct Args {
    /// The address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("axum_server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let ally = Ally::from_env().await?;
    let listener: TcpListener = ally.listen(&args.listen).await?;
    let greeting = format!(
        "hello from axum pid={} generation={}\n",
        std::process::id(),
        ally.generation()
    );
    let app = Router::new().route("/", get(move || std::future::ready(greeting.clone())));
    eprintln!("axum_server: listening on {}", listener.local_addr()?);
    ally.ready().await?;

    let stopped = ally.stopped();
    tokio::spawn(async move {
        stopped.await;
        eprintln!("axum_server: stopping");
    });
    ally_client::axum::serve(listener, app, ally.drain()).await?;
    eprintln!("axum_server: stopped");
    Ok(())
}
