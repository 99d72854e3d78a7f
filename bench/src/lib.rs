//! Load harness for Ally: a load generator (HTTP/1.1 per-request connections,
//! HTTP/1.1 keep-alive, gRPC), the one server every scenario runs
//! (`bench-server`), and the driver that runs the scenarios side by side and
//! writes `docs/benchmarks.md`; and [`frameworks`], real frameworks' apps
//! reloaded under load generators that do not retry; and [`unmodified`], gunicorn
//! and puma under `ally reload` beside their own reload mechanisms; and [`go`],
//! one Go server under the Go package beside tableflip and a plain restart; and
//! [`reexec`], how long the broker takes to re-execute itself.

pub mod frameworks;
pub mod go;
pub mod grpc;
pub mod http;
pub mod load;
pub mod reexec;
pub mod report;
pub mod serve;
pub mod stats;
pub mod unmodified;
