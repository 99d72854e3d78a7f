//! Instances' stdout and stderr, line by line, to journald with the
//! instance's app, generation, instance id and pid — or, without journald, to
//! the broker's stderr as `web[7] 4242: line`.
//!
//! A slow or stopped journald never blocks an instance: one task per pipe
//! drains it continuously into a queue bounded in bytes, and one thread writes
//! the queue out. When the queue is full a line is dropped and counted
//! ([`AppLogs::dropped`]), so the oldest lines waiting are the ones kept.

mod line;

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};

pub use line::{Line, MAX_LINE, Origin, Stream};
use line::{Splitter, priority_prefix};

/// journald's socket for its native protocol.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Replaces [`JOURNAL_SOCKET`]; for tests, which point the broker at a socket
/// of their own.
pub const JOURNAL_SOCKET_VARIABLE: &str = "ALLY_JOURNAL_SOCKET";

/// What the queue may hold, in bytes of text plus [`LINE_COST`] per line.
pub const QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// What the writer takes from the queue at once, at most (plus one line).
const BATCH_BYTES: usize = 256 * 1024;

/// The bookkeeping of a queued line, counted against [`QUEUE_BYTES`].
const LINE_COST: usize = 128;

/// How long a stopped broker waits for the last lines to be written.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// After journald could not be reached, how long lines go to stderr before
/// it is tried again.
const RETRY_JOURNAL: Duration = Duration::from_secs(1);

/// The broker's capture of its instances' output; cheap to clone.
#[derive(Clone)]
pub struct AppLogs {
    queue: Arc<Queue>,
    /// Set before a re-exec: every capture stops reading, leaving what is
    /// not read yet in its pipe for the re-executed broker.
    paused: Arc<tokio::sync::watch::Sender<bool>>,
}

struct Queue {
    state: Mutex<Pending>,
    /// The writer waits on it for lines; [`AppLogs::flush`] for an empty queue.
    changed: Condvar,
    dropped: AtomicU64,
    capacity: usize,
}

#[derive(Default)]
struct Pending {
    lines: VecDeque<Line>,
    bytes: usize,
    /// Pipes still being read.
    readers: usize,
    /// The writer holds a line it has not written yet.
    writing: bool,
}

impl AppLogs {
    /// Starts the writer thread, writing to `journal` (see
    /// [`AppLogs::journal_path`]).
    pub fn start(journal: PathBuf, capacity: usize) -> io::Result<AppLogs> {
        let queue = Arc::new(Queue {
            state: Mutex::new(Pending::default()),
            changed: Condvar::new(),
            dropped: AtomicU64::new(0),
            capacity,
        });
        let writer = Writer {
            queue: queue.clone(),
            journal,
            socket: None,
            unreachable_until: None,
        };
        std::thread::Builder::new()
            .name("app-logs".into())
            .spawn(move || writer.run())?;
        Ok(AppLogs {
            queue,
            paused: Arc::new(tokio::sync::watch::channel(false).0),
        })
    }

    /// [`JOURNAL_SOCKET`], or `$ALLY_JOURNAL_SOCKET` if set.
    pub fn journal_path() -> PathBuf {
        std::env::var_os(JOURNAL_SOCKET_VARIABLE)
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from(JOURNAL_SOCKET), PathBuf::from)
    }

    /// Lines lost since the broker started: the queue was full, or journald
    /// refused one.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Reads `pipe` until end of file on a task of its own, queueing its lines.
    pub fn capture(
        &self,
        origin: Arc<Origin>,
        stream: Stream,
        mut pipe: impl AsyncRead + Unpin + Send + 'static,
    ) {
        self.queue.lock().readers += 1;
        let queue = self.queue.clone();
        let mut paused = self.paused.subscribe();
        tokio::spawn(async move {
            let mut splitter = Splitter::new(MAX_LINE);
            let mut priority = stream.default_priority();
            let mut emit = |piece: line::Piece<'_>| {
                let mut text = piece.text;
                if piece.first {
                    let (prefix, rest) = priority_prefix(text);
                    priority = prefix.unwrap_or(stream.default_priority());
                    text = rest;
                }
                queue.push(Line {
                    origin: origin.clone(),
                    stream,
                    priority,
                    text: text.to_vec(),
                    continues: piece.continues,
                });
            };
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let read = tokio::select! {
                    read = pipe.read(&mut buf) => read,
                    _ = paused.wait_for(|p| *p) => break,
                };
                match read {
                    Ok(0) => break,
                    Ok(n) => splitter.push(&buf[..n], &mut emit),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!(
                            "cannot read the {} of pid {}: {e}",
                            stream.as_str(),
                            origin.pid
                        );
                        break;
                    }
                }
            }
            splitter.finish(&mut emit);
            let mut state = queue.lock();
            state.readers -= 1;
            queue.changed.notify_all();
        });
    }

    /// Stops reading every pipe (for a re-exec, which reads them on) and waits,
    /// blocking up to `timeout`, until what was read is written; whether it was.
    /// A line half read is written as it is.
    pub fn pause(&self, timeout: Duration) -> bool {
        self.paused.send_replace(true);
        self.flush(timeout)
    }

    /// Lets captures run again after [`AppLogs::pause`].
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Waits (blocking, up to `timeout`) until every captured pipe reached its
    /// end and every line was written; whether it happened.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.queue.lock();
        loop {
            if state.readers == 0 && state.lines.is_empty() && !state.writing {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .queue
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, line: Line) {
        let cost = line.text.len() + LINE_COST;
        let mut state = self.lock();
        if state.bytes + cost > self.capacity {
            drop(state);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        state.bytes += cost;
        state.lines.push_back(line);
        if state.lines.len() == 1 {
            self.changed.notify_all();
        }
    }

    /// Moves the next lines, up to [`BATCH_BYTES`] of them, into `batch`,
    /// waiting for one; the batch before them is written.
    fn next_batch(&self, batch: &mut Vec<Line>) {
        let mut state = self.lock();
        state.writing = false;
        while state.lines.is_empty() {
            self.changed.notify_all();
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let mut taken = 0;
        while taken < BATCH_BYTES
            && let Some(line) = state.lines.pop_front()
        {
            let cost = line.text.len() + LINE_COST;
            state.bytes -= cost;
            taken += cost;
            batch.push(line);
        }
        state.writing = true;
    }
}

/// The thread that writes queued lines out.
struct Writer {
    queue: Arc<Queue>,
    journal: PathBuf,
    /// Connected to journald, once it was reached.
    socket: Option<UnixDatagram>,
    unreachable_until: Option<Instant>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::new();
        let mut to_stderr = Vec::new();
        loop {
            self.queue.next_batch(&mut batch);
            for line in batch.drain(..) {
                if !self.send(&line) {
                    to_stderr.extend_from_slice(&line.stderr_line());
                }
            }
            if !to_stderr.is_empty() {
                // Whole lines in one write: never mixed with the broker's own.
                let _ = io::stderr().lock().write_all(&to_stderr);
                to_stderr.clear();
            }
        }
    }

    /// Sends the line to journald; false if journald cannot be reached.
    fn send(&mut self, line: &Line) -> bool {
        let entry = line.journal_entry();
        let mut reconnected = false;
        while let Some(socket) = self.connected() {
            match socket.send(&entry) {
                Ok(_) => return true,
                // journald is slow or stopped: wait for it while the queue
                // takes (or drops) what comes meanwhile.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(socket),
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    self.queue.dropped.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                // Gone (restarted, or stopped for good): connect again, once.
                Err(_) if !reconnected => {
                    self.socket = None;
                    reconnected = true;
                }
                Err(_) => {
                    self.socket = None;
                    break;
                }
            }
        }
        self.unreachable_until = Some(Instant::now() + RETRY_JOURNAL);
        false
    }

    fn connected(&mut self) -> Option<&UnixDatagram> {
        if self.socket.is_none() {
            if self.unreachable_until.is_some_and(|t| Instant::now() < t) {
                return None;
            }
            let socket = UnixDatagram::unbound().ok()?;
            socket.connect(&self.journal).ok()?;
            socket.set_nonblocking(true).ok()?;
            self.unreachable_until = None;
            self.socket = Some(socket);
        }
        self.socket.as_ref()
    }
}

/// Until journald's socket takes a datagram again, or a second passed.
fn wait_writable(socket: &UnixDatagram) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
    let _ = poll(&mut fds, PollTimeout::from(1000u16));
}
