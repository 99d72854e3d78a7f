//! HTTP load from worker threads that counts every failed request: what the
//! zero-downtime tests hold a reload to.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::http::{HttpConnection, is_unanswered};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// A new TCP connection for every request.
    NewConnection,
    /// Keep-alive connections; a request the server never answered on a reused
    /// connection it closed is retried once on a new one, as HTTP clients do.
    KeepAlive,
}

#[derive(Debug, Default)]
pub struct LoadStats {
    pub ok: u64,
    pub failed: u64,
    pub retried: u64,
    pub errors: Vec<String>,
    pub versions: BTreeMap<String, u64>,
    pub pids: BTreeSet<u32>,
}

/// Continuous requests from worker threads until stopped. An answer counts as
/// good when its body is the hello example's (`hello version=V pid=P ...`).
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    stats: Arc<Mutex<LoadStats>>,
}

/// The value of `name=value` in a body.
pub fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

impl Load {
    pub fn start(addr: SocketAddr, mode: LoadMode, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let workers = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                let stats = stats.clone();
                std::thread::spawn(move || run_worker(addr, mode, &stop, &stats))
            })
            .collect();
        Load {
            stop,
            workers,
            stats,
        }
    }

    pub fn ok(&self) -> u64 {
        self.stats.lock().unwrap().ok
    }

    pub fn finish(self) -> LoadStats {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            w.join().unwrap();
        }
        Arc::try_unwrap(self.stats).unwrap().into_inner().unwrap()
    }
}

fn run_worker(addr: SocketAddr, mode: LoadMode, stop: &AtomicBool, stats: &Mutex<LoadStats>) {
    let mut conn: Option<HttpConnection> = None;
    while !stop.load(Ordering::SeqCst) {
        let result = match mode {
            LoadMode::NewConnection => {
                HttpConnection::connect(addr).and_then(|mut c| c.request(true))
            }
            LoadMode::KeepAlive => {
                let reused = conn.is_some();
                let attempt = match conn.take() {
                    Some(c) => Ok(c),
                    None => HttpConnection::connect(addr),
                }
                .and_then(|mut c| c.request(false).map(|r| (r, c)));
                match attempt {
                    Ok(((body, keep), c)) => {
                        if keep {
                            conn = Some(c);
                        }
                        Ok((body, keep))
                    }
                    Err(e) if reused && is_unanswered(&e) => {
                        stats.lock().unwrap().retried += 1;
                        HttpConnection::connect(addr).and_then(|mut c| {
                            let r = c.request(false)?;
                            if r.1 {
                                conn = Some(c);
                            }
                            Ok(r)
                        })
                    }
                    Err(e) => Err(e),
                }
            }
        };
        let mut s = stats.lock().unwrap();
        match result {
            Ok((body, _)) if body.starts_with("hello ") => {
                s.ok += 1;
                if let Some(v) = field(&body, "version") {
                    *s.versions.entry(v.to_string()).or_default() += 1;
                }
                if let Some(pid) = field(&body, "pid").and_then(|p| p.parse().ok()) {
                    s.pids.insert(pid);
                }
            }
            Ok((body, _)) => {
                s.failed += 1;
                s.errors.push(format!("wrong answer {body:?}"));
            }
            Err(e) => {
                s.failed += 1;
                if s.errors.len() < 20 {
                    s.errors.push(e.to_string());
                }
            }
        }
    }
}
