//! The `tonic_server` example's `hello.Greeter` service, as its test clients call it.

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

/// One `Hello` call on `channel`, without any retry; the error says which step failed.
pub async fn hello(channel: tonic::transport::Channel, name: &str) -> Result<HelloReply, String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| format!("ready: {e:?}"))?;
    grpc.unary(
        tonic::Request::new(HelloRequest { name: name.into() }),
        tonic::codegen::http::uri::PathAndQuery::from_static("/hello.Greeter/Hello"),
        tonic_prost::ProstCodec::<HelloRequest, HelloReply>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
    .map_err(|status| format!("{status:?}"))
}
