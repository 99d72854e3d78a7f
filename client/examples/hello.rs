//! The quick-start app: an HTTP server (hyper) that says which version, process and
//! generation answered.
//!
//! ```text
//! hello [--listen ADDR] [--version V] [--ready-delay MS] [--ignore-stop]
//! ```
//!
//! Every request gets `200 OK` with the body `hello version=V pid=P generation=G`.
//! Under `ally run` it takes its socket from the broker; alone (`cargo run -p ally-client
//! --example hello`) it binds the socket itself. It is served by
//! [`ally_client::hyper::serve`], which drains on the stop signal without losing a
//! request: it stops accepting, answers every request with `Connection: close`, and
//! closes each connection once it has been idle for the app's `drain_idle` (1 s by
//! default). `--ignore-stop` ignores the stop signal, to exercise the broker's
//! `stop_timeout`.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use ally_client::drain::Drain;
use ally_client::{Ally, StopHandle};
use clap::Parser;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

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
    let drain = if args.ignore_stop {
        Drain::new(StopHandle::new())
    } else {
        ally.drain()
    };
    let body = Bytes::from(format!(
        "hello version={version} pid={pid} generation={}\n",
        ally.generation()
    ));
    let service = service_fn(move |_: Request<Incoming>| {
        let mut response = Response::new(Full::new(body.clone()));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let stopped = drain.stopped();
    tokio::spawn(async move {
        stopped.await;
        eprintln!("hello: stopping pid={pid}");
    });
    // Title-case header names, as hello always sent: HTTP does not care, scripts may.
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().title_case_headers(true);
    ally_client::hyper::serve_with(builder, listener, service, drain).await?;
    eprintln!("hello: stopped pid={pid}");
    Ok(())
}
