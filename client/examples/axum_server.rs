//! An axum app under Ally.
//!
//! ```text
//! axum_server [--listen ADDR]
//! ```
//!
//! `GET /` answers `hello from axum pid=P generation=G`. Run it with
//! `ally run web -- ./target/debug/examples/axum_server`, or alone in simulate mode.
//!
//! Why not `axum::serve(listener, app).with_graceful_shutdown(ally.stopped())`? It
//! compiles, but every reload then fails some requests: on the stop, hyper closes at
//! once the connections it accepted whose request has not arrived yet, and the idle
//! keep-alive connections on which a client may be sending its next request. So the
//! router is served here connection by connection, each drained as
//! [`ally_client::drain`] explains: stop accepting, answer with `Connection: close`,
//! close a connection once it has been idle for a second. (A ready-made
//! `axum::serve::Listener` for Ally is the subject of the issue on real frameworks.)

use std::pin::pin;
use std::process::ExitCode;
use std::time::Duration;

use ally_client::{Ally, StopHandle, drain};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::CONNECTION;
use axum::http::{HeaderValue, Version};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use clap::Parser;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

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
    let stop = ally.stop_handle();
    let greeting = format!(
        "hello from axum pid={} generation={}\n",
        std::process::id(),
        ally.generation()
    );
    let app = Router::new()
        .route("/", get(move || std::future::ready(greeting.clone())))
        .layer(middleware::from_fn_with_state(
            stop.clone(),
            close_while_stopping,
        ));
    eprintln!("axum_server: listening on {}", listener.local_addr()?);
    ally.ready().await?;

    let mut connections = JoinSet::new();
    let mut stopped = pin!(ally.stopped());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, app.clone(), stop.clone()));
                }
                Err(e) => {
                    eprintln!("axum_server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut stopped => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Stop accepting: the broker keeps the socket for the next generation.
    drop(listener);
    eprintln!(
        "axum_server: stopping, {} connection(s) open",
        connections.len()
    );
    while connections.join_next().await.is_some() {}
    eprintln!("axum_server: stopped");
    Ok(())
}

/// Serves one connection; once stopping, shuts it down gracefully when it has been
/// idle for [`drain::DEFAULT_IDLE`].
async fn serve(stream: TcpStream, app: Router, stop: StopHandle) {
    let (stream, activity) = drain::track(stream);
    let conn =
        http1::Builder::new().serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut conn = pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = activity.idle_after_stop(stop, drain::DEFAULT_IDLE) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// While stopping, every response tells the client to move to a new connection (which
/// the next generation accepts).
async fn close_while_stopping(
    State(stop): State<StopHandle>,
    request: Request,
    next: Next,
) -> Response {
    let version = request.version();
    let mut response = next.run(request).await;
    if stop.is_stopping() {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        // To an HTTP/1.0 client that asked for keep-alive, hyper would add
        // `keep-alive` to a 1.1 response's `close`; a 1.0 response it closes.
        if version == Version::HTTP_10 {
            *response.version_mut() = Version::HTTP_10;
        }
    }
    response
}
