//! An actix-web app under Ally.
//!
//! ```text
//! actix_server [--listen ADDR]
//! ```
//!
//! `GET /` answers `hello from actix pid=P generation=G`. Run it with
//! `ally run web -- ./target/debug/examples/actix_server`, or alone in simulate mode.
//!
//! Why not `HttpServer::new(..).listen(listener)?.run().await`? It compiles, but every
//! reload then fails some requests: actix catches the stop signal itself and at once
//! closes the keep-alive connections that are between requests (on which a client may
//! be sending its next one) and those whose first request has not arrived yet.
//! [`ally_client::actix`] explains the drain that loses nothing: the
//! `CloseWhileStopping` middleware, and `serve` in place of `run`.

use std::process::ExitCode;

use actix_web::{App, HttpServer, web};
use ally_client::Ally;
use ally_client::actix::{CloseWhileStopping, serve};
use clap::Parser;

#[derive(Parser)]
#[command(about = "An actix-web app under Ally")]
struct Args {
    /// The address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

#[actix_web::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("actix_server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let ally = Ally::from_env().await?;
    let listener: std::net::TcpListener = ally.listen(&args.listen).await?;
    let greeting = format!(
        "hello from actix pid={} generation={}\n",
        std::process::id(),
        ally.generation()
    );
    let drain = ally.drain();
    let close = CloseWhileStopping::new(&drain);
    let server = HttpServer::new(move || {
        let greeting = greeting.clone();
        App::new().wrap(close.clone()).route(
            "/",
            web::get().to(move || std::future::ready(greeting.clone())),
        )
    });
    eprintln!("actix_server: listening on {}", listener.local_addr()?);
    ally.ready().await?;

    let stopping = drain.stopped();
    actix_web::rt::spawn(async move {
        stopping.await;
        eprintln!("actix_server: stopping");
    });
    serve(server, listener, drain).await?;
    eprintln!("actix_server: stopped");
    Ok(())
}
