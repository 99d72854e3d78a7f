//! A tiny unary gRPC service, `bench.Echo/Echo`, written without protoc: the prost
//! messages by hand and the service as tonic's generated code would be.
//!
//! ```proto
//! package bench;
//! service Echo { rpc Echo(EchoRequest) returns (EchoReply); }
//! message EchoRequest { string message = 1; }
//! message EchoReply { string message = 1; uint32 pid = 2; }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic_prost::ProstCodec;

pub const ECHO_PATH: &str = "/bench.Echo/Echo";

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint32, tag = "2")]
    pub pid: u32,
}

#[derive(Clone, Copy)]
struct EchoMethod;

impl tonic::server::UnaryService<EchoRequest> for EchoMethod {
    type Response = EchoReply;
    type Future = std::future::Ready<Result<tonic::Response<EchoReply>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(EchoReply {
            message: request.into_inner().message,
            pid: std::process::id(),
        })))
    }
}

/// The `bench.Echo` service as a plain HTTP service for `tonic::transport::Server`.
#[derive(Clone, Copy, Default)]
pub struct EchoService;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tonic::codegen::Service<http::Request<Body>> for EchoService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == ECHO_PATH {
            Box::pin(async move {
                let mut grpc =
                    tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
                Ok(grpc.unary(EchoMethod, req).await)
            })
        } else {
            Box::pin(async move {
                let mut response = http::Response::new(Body::default());
                let headers = response.headers_mut();
                headers.insert("grpc-status", (tonic::Code::Unimplemented as i32).into());
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
                Ok(response)
            })
        }
    }
}

/// One `Echo` call on `channel`.
pub async fn echo(
    channel: tonic::transport::Channel,
    message: &str,
) -> Result<EchoReply, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("not ready: {e}")))?;
    let response = grpc
        .unary(
            tonic::Request::new(EchoRequest {
                message: message.to_string(),
            }),
            http::uri::PathAndQuery::from_static(ECHO_PATH),
            ProstCodec::<EchoRequest, EchoReply>::default(),
        )
        .await?;
    Ok(response.into_inner())
}
