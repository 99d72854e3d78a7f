//! The quick-start app: an HTTP server (hyper) that says which version, process and
//! generation answered.
//!
//! ```text
//! hello [--listen ADDR] [--version V] [--ready-delay MS] [--ignore-stop]
//! ```
//!
//! Every request gets `200 OK` with the body `hello version=V pid=P generation=G`.
//! Under `ally run` it takes its socket from the broker; alone (`cargo run -p ally-client
//! --example hello`) it binds the socket itself. On the stop signal it drains without
//! losing a request (see [`ally_client::drain`]): it stops accepting, answers every
//! request with `Connection: close`, and closes each connection once it has been idle
//! for a second. `--ignore-stop` ignores the stop signal, to exercise the broker's
//! `stop_timeout`.

use std::convert::Infallible;
use std::pin::pin;
use std::process::ExitCode;
use std::time::Duration;

use ally_client::{Ally, StopHandle, drain};
use clap::Parser;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Request, Response, Version};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(about = "The Ally quick-start app: an HTTP server that says who answered")]
struct Args {
    /// The address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The version it reports [default: 1; empty: 1]
    #[arg(long, env = "HELLO_VERSION")]
    version: Option<String>,
    /// Milliseconds to wait before reporting ready.
    #[arg(long, value_name = "MS")]
    ready_delay: Option<u64>,
    /// Keep serving on the stop signal (the broker kills it after `stop_timeout`).
    #[arg(long)]
    ignore_stop: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let version = args.version.filter(|v| !v.is_empty());
    let version = version.as_deref().unwrap_or("1");
    let ally = Ally::from_env().await?;
    let listener: TcpListener = ally.listen(&args.listen).await?;
    let pid = std::process::id();
    eprintln!(
        "hello: listening on {} version={version} pid={pid} generation={} ({})",
        listener.local_addr()?,
        ally.generation(),
        if ally.is_managed() {
            "managed"
        } else {
            "simulate mode"
        },
    );
    if let Some(ms) = args.ready_delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    ally.ready().await?;

    // With --ignore-stop the signal is still caught (so it does not kill us) but nothing
    // listens to it: a handle of our own that never fires stands in.
    let stop = if args.ignore_stop {
        StopHandle::new()
    } else {
        ally.stop_handle()
    };
    let body = Bytes::from(format!(
        "hello version={version} pid={pid} generation={}\n",
        ally.generation()
    ));
    let mut connections = JoinSet::new();
    let mut stopped = pin!(stop.stopped());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, body.clone(), stop.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    eprintln!("hello: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut stopped => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Stop accepting; the broker keeps the socket and the next generation accepts
    // what is queued.
    drop(listener);
    eprintln!(
        "hello: stopping pid={pid}, {} connection(s) open",
        connections.len()
    );
    while connections.join_next().await.is_some() {}
    eprintln!("hello: stopped pid={pid}");
    Ok(())
}

/// Serves one connection until the client closes it or, once stopping, until it has
/// been idle for [`drain::DEFAULT_IDLE`]: closing it at once could cut off a request
/// already on its way.
async fn serve(stream: TcpStream, body: Bytes, stop: StopHandle) {
    let (stream, activity) = drain::track(stream);
    let service = {
        let stop = stop.clone();
        hyper::service::service_fn(move |request| {
            std::future::ready(Ok::<_, Infallible>(respond(&request, &body, &stop)))
        })
    };
    // Title-case header names, as hello always sent: HTTP does not care, scripts may.
    let conn = http1::Builder::new()
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = activity.idle_after_stop(stop, drain::DEFAULT_IDLE) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

fn respond(request: &Request<Incoming>, body: &Bytes, stop: &StopHandle) -> Response<Full<Bytes>> {
    // For HEAD, hyper sends the body's length and no body.
    let mut response = Response::new(Full::new(body.clone()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Said explicitly either way: an HTTP/1.0 client keeps a connection alive only when
    // told so, and while stopping every client must be told to move on.
    let keep_alive = !stop.is_stopping() && wants_keep_alive(request);
    response.headers_mut().insert(
        CONNECTION,
        HeaderValue::from_static(if keep_alive { "keep-alive" } else { "close" }),
    );
    // To an HTTP/1.0 client that asked for keep-alive, hyper would add `keep-alive` to
    // a 1.1 response's `close`; a 1.0 response it closes as told.
    if request.version() == Version::HTTP_10 {
        *response.version_mut() = Version::HTTP_10;
    }
    response
}

fn wants_keep_alive(request: &Request<Incoming>) -> bool {
    let tokens = request
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let (mut close, mut keep_alive) = (false, false);
    for token in tokens {
        close |= token.eq_ignore_ascii_case("close");
        keep_alive |= token.eq_ignore_ascii_case("keep-alive");
    }
    !close && (request.version() == Version::HTTP_11 || keep_alive)
}
