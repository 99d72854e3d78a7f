//! A server without an async runtime: std threads and [`ally_client::blocking`].
//!
//! ```text
//! std_server [--listen ADDR]
//! ```
//!
//! Each line sent on a connection comes back as `pid=P generation=G LINE`. On the stop
//! signal it stops accepting (the broker keeps the socket for the next generation),
//! keeps serving the connections it has, closes each once it has been idle for the
//! app's `drain_idle` (1 s by default; [`ally_client::drain::Drain`]), and exits.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ally_client::{StopHandle, blocking, stdnet};
use clap::Parser;

/// How often a waiting thread looks at the stop request.
const TICK: Duration = Duration::from_millis(100);
const MAX_LINE: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "A line echo server on std threads under Ally")]
struct Args {
    /// The address to serve on.
    #[arg(long, default_value = "127.0.0.1:8082")]
    listen: String,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("std_server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let ally = blocking::Ally::from_env()?;
    let listener: TcpListener = ally.listen(&args.listen)?;
    eprintln!("std_server: listening on {}", listener.local_addr()?);
    ally.ready()?;

    let drain = ally.drain();
    let stop = drain.stop_handle().clone();
    let idle = drain.idle();
    let prefix = format!(
        "pid={} generation={} ",
        std::process::id(),
        ally.generation()
    );
    let mut workers = Vec::new();
    while !stop.is_stopping() {
        // The shared socket may be non-blocking (another generation is async): wait
        // with poll(2), a tick at a time so the stop is seen.
        if !stdnet::wait_readable(&listener, Some(TICK))? {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let (stop, prefix) = (stop.clone(), prefix.clone());
                workers.push(std::thread::spawn(move || {
                    serve(stream, &stop, idle, &prefix)
                }));
            }
            // Another generation took the connection.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                eprintln!("std_server: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        workers.retain(|w| !w.is_finished());
    }
    drop(listener);
    eprintln!("std_server: stopping, {} connection(s) open", workers.len());
    for worker in workers {
        let _ = worker.join();
    }
    eprintln!("std_server: stopped");
    Ok(())
}

fn serve(mut stream: TcpStream, stop: &StopHandle, idle: Duration, prefix: &str) {
    // Accepted connections are blocking whatever the listener's flag; a read timeout
    // lets the thread see the stop.
    if stream.set_read_timeout(Some(TICK)).is_err() {
        return;
    }
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut last_read = Instant::now();
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                last_read = Instant::now();
                pending.extend_from_slice(&chunk[..n]);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let mut reply = prefix.as_bytes().to_vec();
                    reply.extend_from_slice(&line);
                    if stream.write_all(&reply).is_err() {
                        return;
                    }
                }
                if pending.len() > MAX_LINE {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if let Some(since) = stop.stopping_since()
                    && since.max(last_read).elapsed() >= idle
                {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
