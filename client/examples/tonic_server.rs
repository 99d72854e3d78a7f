//! A tonic gRPC server under Ally.
//!
//! ```text
//! tonic_server [--listen ADDR]
//! ```
//!
//! It serves this service; the code `tonic-build` would generate is written out below
//! (prost messages and a small `Service`), so the example needs no `protoc`:
//!
//! ```proto
//! package hello;
//! service Greeter { rpc Hello(HelloRequest) returns (HelloReply); }
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; uint32 pid = 2; uint64 generation = 3; }
//! ```
//!
//! On the stop signal it drains as [`ally_client::tonic`] explains: it stops accepting,
//! lets every connection accepted before the stop send its first call, then tonic
//! sends `GOAWAY` and finishes the calls in flight. Handing tonic `ally.stopped()` as
//! its shutdown future instead loses calls on every reload.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};

use ally_client::Ally;
use clap::Parser;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic_prost::ProstCodec;

#[derive(Parser)]
#[command(about = "A tonic gRPC server under Ally")]
struct Args {
    /// The address to serve on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tonic_server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let ally = Ally::from_env().await?;
    let listener: tokio::net::TcpListener = ally.listen(&args.listen).await?;
    eprintln!("tonic_server: listening on {}", listener.local_addr()?);
    let greeter = Greeter {
        generation: ally.generation(),
    };
    ally.ready().await?;

    let incoming = ally_client::tonic::incoming(listener, &ally.drain());
    let shutdown = incoming.shutdown();
    tonic::transport::Server::builder()
        .add_service(greeter)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    eprintln!("tonic_server: stopped");
    Ok(())
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint32, tag = "2")]
    pub pid: u32,
    #[prost(uint64, tag = "3")]
    pub generation: u64,
}

/// The service: `Hello` answers `hello NAME`, with who answered.
#[derive(Clone, Copy)]
struct Greeter {
    generation: u64,
}

impl tonic::server::UnaryService<HelloRequest> for Greeter {
    type Response = HelloReply;
    type Future = std::future::Ready<Result<tonic::Response<HelloReply>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(HelloReply {
            message: format!("hello {}", request.into_inner().name),
            pid: std::process::id(),
            generation: self.generation,
        })))
    }
}

// What `tonic-build` generates for the service, in short.

impl NamedService for Greeter {
    const NAME: &'static str = "hello.Greeter";
}

impl tonic::codegen::Service<http::Request<Body>> for Greeter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let greeter = *self;
        Box::pin(async move {
            if request.uri().path() == "/hello.Greeter/Hello" {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(greeter, request).await)
            } else {
                Ok(tonic::Status::unimplemented("no such method").into_http())
            }
        })
    }
}
