//! An HTTP server whose every request takes a while, and which reports what it
//! is and how many requests it is still answering: the app of "Observing
//! reloads" in `docs/operations.md`.
//!
//! ```text
//! long_requests [--listen ADDR] [--version V] [--commit C] [--request-ms MS]
//! ```
//!
//! It reports `version`, `commit` and a `description` once it serves, and counts
//! each request as a task (`GET /?ms=N` takes N ms instead) ([`Ally::task`]) while it sleeps `--request-ms` before
//! answering `done version=V pid=P`. After a reload, `ally status` shows the old
//! generation's tasks counting down while it drains.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use ally_client::{Ally, Report};
use clap::Parser;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(about = "An HTTP server of slow requests that reports its tasks to the broker")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    #[arg(long, default_value = "1")]
    version: String,
    #[arg(long, default_value = "")]
    commit: String,
    /// How long each request takes (`GET /?ms=N` asks for N).
    #[arg(long, value_name = "MS", default_value = "2000")]
    request_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("long_requests: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let ally = Ally::from_env().await?;
    let listener: TcpListener = ally.listen(&args.listen).await?;
    let mut report = Report::new()
        .version(&args.version)
        .description(format!("requests take {} ms", args.request_ms));
    if !args.commit.is_empty() {
        report = report.commit(&args.commit);
    }
    ally.report(report).await?;
    ally.ready().await?;
    let pid = std::process::id();
    let body = Bytes::from(format!("done version={} pid={pid}\n", args.version));
    let took = Duration::from_millis(args.request_ms);
    let counter = ally.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let task = counter.task();
        let body = body.clone();
        let took = request
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("ms="))
            .and_then(|ms| ms.parse().ok())
            .map_or(took, Duration::from_millis);
        async move {
            tokio::time::sleep(took).await;
            drop(task);
            Ok::<_, Infallible>(Response::new(Full::new(body)))
        }
    });
    ally_client::hyper::serve(listener, service, ally.drain()).await?;
    Ok(())
}
