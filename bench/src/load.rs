//! The load generator: `connections` concurrent clients, each sending one request
//! after another, as fast as the server answers, until stopped, a deadline, or a
//! request count — whichever comes first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::http::{Conn, Failure};
use crate::stats::Sample;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// HTTP/1.1, a new TCP connection for every request (`Connection: close`).
    NewConnection,
    /// HTTP/1.1 keep-alive; a request the server closed a reused connection on
    /// without answering is retried once on a new connection, as HTTP clients do.
    KeepAlive,
    /// gRPC unary calls over HTTP/2 (tonic), one channel per client.
    Grpc,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::NewConnection, Mode::KeepAlive, Mode::Grpc];

    pub fn name(self) -> &'static str {
        match self {
            Mode::NewConnection => "http-new-conn",
            Mode::KeepAlive => "http-keepalive",
            Mode::Grpc => "grpc",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub mode: Mode,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub connections: usize,
    /// Hard limit on the run, whatever happens.
    pub max_duration: Duration,
    /// Hard limit on requests per client.
    pub max_requests: u64,
    /// A request not answered in this time failed.
    pub timeout: Duration,
}

#[derive(Debug, Default)]
pub struct LoadResult {
    pub samples: Vec<Sample>,
    /// Failures by class.
    pub errors: BTreeMap<String, u64>,
    /// Requests sent again under the retry rule (each counted once, as one request).
    pub retried: u64,
    /// What the retried requests met the first time, by class.
    pub retried_kinds: BTreeMap<String, u64>,
    pub duration_us: u64,
}

/// Stops a running load.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Runs the load; sample times are relative to `start`.
pub async fn run(config: LoadConfig, stop: StopFlag, start: Instant) -> LoadResult {
    let deadline = start + config.max_duration;
    let mut tasks = Vec::new();
    for _ in 0..config.connections {
        let config = config.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut worker = Worker {
                result: LoadResult::default(),
                start,
            };
            match config.mode {
                Mode::NewConnection | Mode::KeepAlive => {
                    worker.http(&config, &stop, deadline).await
                }
                Mode::Grpc => worker.grpc(&config, &stop, deadline).await,
            }
            worker.result
        }));
    }
    let mut total = LoadResult::default();
    for task in tasks {
        if let Ok(r) = task.await {
            total.samples.extend(r.samples);
            total.retried += r.retried;
            for (k, v) in r.retried_kinds {
                *total.retried_kinds.entry(k).or_default() += v;
            }
            for (k, v) in r.errors {
                *total.errors.entry(k).or_default() += v;
            }
        }
    }
    total.duration_us = start.elapsed().as_micros() as u64;
    total.samples.sort_by_key(|s| s.done_us);
    total
}

struct Worker {
    result: LoadResult,
    start: Instant,
}

impl Worker {
    fn note_retry(&mut self, f: &Failure) {
        self.result.retried += 1;
        let mut class = f.class();
        class.truncate(160);
        *self.result.retried_kinds.entry(class).or_default() += 1;
    }

    fn record(&mut self, began: Instant, failure: Option<String>) {
        let now = Instant::now();
        self.result.samples.push(Sample {
            done_us: (now - self.start).as_micros() as u64,
            latency_us: (now - began).as_micros().min(u32::MAX as u128) as u32,
            ok: failure.is_none(),
        });
        if let Some(class) = failure {
            let mut class = class;
            class.truncate(120);
            *self.result.errors.entry(class).or_default() += 1;
        }
    }

    async fn http(&mut self, config: &LoadConfig, stop: &StopFlag, deadline: Instant) {
        let close = config.mode == Mode::NewConnection;
        let mut conn: Option<Conn> = None;
        for _ in 0..config.max_requests {
            if stop.is_stopped() || Instant::now() >= deadline {
                break;
            }
            let began = Instant::now();
            let mut outcome = request(&mut conn, config, close).await;
            if let Err(f) = &outcome
                && f.retryable()
            {
                self.note_retry(f);
                outcome = request(&mut conn, config, close).await;
            }
            self.record(began, outcome.err().map(|f| f.class()));
        }
    }

    async fn grpc(&mut self, config: &LoadConfig, stop: &StopFlag, deadline: Instant) {
        let endpoint =
            match tonic::transport::Endpoint::from_shared(format!("http://{}", config.grpc)) {
                Ok(e) => e
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout)
                    .tcp_nodelay(true),
                Err(e) => {
                    *self
                        .result
                        .errors
                        .entry(format!("endpoint: {e}"))
                        .or_default() += 1;
                    return;
                }
            };
        let mut channel = endpoint.connect_lazy();
        for _ in 0..config.max_requests {
            if stop.is_stopped() || Instant::now() >= deadline {
                break;
            }
            let began = Instant::now();
            let mut outcome = grpc_call(&channel, config.timeout).await;
            if let Err(f) = &outcome
                && f.retryable()
            {
                // Never seen by the server: a gRPC client retries it transparently.
                self.note_retry(f);
                channel = endpoint.connect_lazy();
                outcome = grpc_call(&channel, config.timeout).await;
            }
            let failure = outcome.err().map(|f| f.class());
            if failure.is_some() {
                // Start afresh, as a client would after a broken channel.
                channel = endpoint.connect_lazy();
            }
            self.record(began, failure);
        }
    }
}

/// One request, on the kept connection or a new one; keeps the connection when
/// the server does.
async fn request(conn: &mut Option<Conn>, config: &LoadConfig, close: bool) -> Result<(), Failure> {
    let mut c = match conn.take() {
        Some(c) => c,
        None => Conn::connect(config.http, config.timeout).await?,
    };
    let response = c.get(close, config.timeout).await?;
    if response.keep_alive && !close {
        *conn = Some(c);
    }
    Ok(())
}

async fn grpc_call(channel: &tonic::transport::Channel, timeout: Duration) -> Result<(), Failure> {
    match tokio::time::timeout(timeout, crate::grpc::echo(channel.clone(), "bench")).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Ok(reply)) if reply.message == "bench" && reply.pid != 0 => Ok(()),
        Ok(Ok(reply)) => Err(Failure::WrongAnswer(format!("{reply:?}"))),
        Ok(Err(status)) => Err(grpc_failure(&status)),
    }
}

/// Classifies a failed call: `Unanswered` when the server never saw the request —
/// the client dropped it before sending (hyper: canceled), or the server refused
/// the stream (`GOAWAY` naming a lower last stream, `REFUSED_STREAM`). gRPC
/// clients retry exactly these transparently.
pub fn grpc_failure(status: &tonic::Status) -> Failure {
    let mut chain = vec![format!("grpc {:?}: {}", status.code(), status.message())];
    let mut unprocessed = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            unprocessed |= h.is_canceled();
        }
        if let Some(h) = e.downcast_ref::<h2::Error>() {
            unprocessed |= h.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR));
        }
        chain.push(e.to_string());
        source = e.source();
    }
    chain.dedup();
    let text = chain.join(": ");
    if unprocessed {
        Failure::Unanswered(text)
    } else {
        Failure::Broken(text)
    }
}
