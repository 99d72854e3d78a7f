//! An axum 0.8 app integrated with Ally the way the README said before issue 13:
//! `Ally::from_env`, `listen`, `ready`, then
//! `axum::serve(listener, app).with_graceful_shutdown(ally.stopped())` — no drain.
//!
//! ```text
//! naive_axum [--listen ADDR]
//! ```
//!
//! `GET /` answers `hello from axum (README pattern) pid=P generation=G`. The
//! `frameworks` benchmark runs it beside the examples for the before figure: on
//! the stop, hyper's graceful shutdown closes at once the connections it
//! accepted whose first request has not arrived, and every idle keep-alive
//! connection, while clients may be sending on them.

use std::process::ExitCode;

use ally_client::Ally;
use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:8080".to_string();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr,
            _ => {
                eprintln!("naive_axum: usage: naive_axum [--listen ADDR]");
                return ExitCode::from(2);
            }
        }
    }
    match run(&listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("naive_axum: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(listen: &str) -> Result<(), Box<dyn std::error::Error>> {
    let ally = Ally::from_env().await?;
    let listener: TcpListener = ally.listen(listen).await?;
    let greeting = format!(
        "hello from axum (README pattern) pid={} generation={}\n",
        std::process::id(),
        ally.generation()
    );
    let app = Router::new().route("/", get(move || std::future::ready(greeting.clone())));
    eprintln!("naive_axum: listening on {}", listener.local_addr()?);
    ally.ready().await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(ally.stopped())
        .await?;
    Ok(())
}
