//! Echo over a UDP socket and a unix stream socket, both taken from the broker.
//!
//! ```text
//! datagram [--udp ADDR] [--unix PATH]
//! ```
//!
//! Each UDP datagram comes back prefixed with `pid=P `; each line sent on the unix
//! socket (default `$XDG_RUNTIME_DIR/ally-datagram.sock`, else
//! `/tmp/ally-datagram-<uid>.sock`) comes back as `pid=P <line>`. On the stop signal it
//! stops receiving and accepting, lets open unix connections finish (closing them after a
//! second of idleness) and exits. Datagrams not yet read stay in the shared socket for
//! the next generation.

use std::process::ExitCode;
use std::time::Duration;

use ally_client::{Ally, StopHandle};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};

const IDLE_AFTER_STOP: Duration = Duration::from_secs(1);
const MAX_LINE: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "Echo over a UDP socket and a unix stream socket taken from the broker")]
struct Args {
    /// The UDP address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    udp: String,
    /// The unix socket's path [default: $XDG_RUNTIME_DIR/ally-datagram.sock]
    #[arg(long)]
    unix: Option<String>,
}

fn default_unix_path() -> String {
    match std::env::var("XDG_RUNTIME_DIR") {
        Ok(dir) if !dir.is_empty() => format!("{dir}/ally-datagram.sock"),
        _ => format!("/tmp/ally-datagram-{}.sock", nix::unistd::getuid()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let unix = args.unix.unwrap_or_else(default_unix_path);
    match run(&args.udp, &unix).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datagram: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(udp_addr: &str, unix_path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let ally = Ally::from_env().await?;
    let udp: UdpSocket = ally.listen(udp_addr).await?;
    let unix: UnixListener = ally.listen(unix_path).await?;
    let pid = std::process::id();
    eprintln!(
        "datagram: udp on {} unix on {unix_path} pid={pid} generation={} ({})",
        udp.local_addr()?,
        ally.generation(),
        if ally.is_managed() {
            "managed"
        } else {
            "simulate mode"
        },
    );
    ally.ready().await?;
    let stop = ally.stop_handle();

    let udp_task = tokio::spawn(echo_udp(udp, stop.clone()));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = unix.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(echo_lines(stream, stop.clone()));
                }
                Err(e) => {
                    eprintln!("datagram: accept: {e}");
                    sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(unix);
    eprintln!(
        "datagram: stopping, {} connection(s) open",
        connections.len()
    );
    udp_task.await?;
    while connections.join_next().await.is_some() {}
    eprintln!("datagram: stopped pid={pid}");
    Ok(())
}

async fn echo_udp(socket: UdpSocket, stop: StopHandle) {
    let prefix = format!("pid={} ", std::process::id());
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, peer)) => {
                    let mut reply = Vec::with_capacity(prefix.len() + n);
                    reply.extend_from_slice(prefix.as_bytes());
                    reply.extend_from_slice(&buf[..n]);
                    if let Err(e) = socket.send_to(&reply, peer).await {
                        eprintln!("datagram: send to {peer}: {e}");
                    }
                }
                Err(e) => {
                    eprintln!("datagram: udp receive: {e}");
                    sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.stopped() => return,
        }
    }
}

async fn echo_lines(mut stream: UnixStream, stop: StopHandle) {
    let prefix = format!("pid={} ", std::process::id());
    let mut buf = Vec::with_capacity(1024);
    let mut last_activity = Instant::now();
    loop {
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let mut reply = Vec::with_capacity(prefix.len() + end + 1);
            reply.extend_from_slice(prefix.as_bytes());
            reply.extend_from_slice(&buf[..=end]);
            buf.drain(..=end);
            if stream.write_all(&reply).await.is_err() {
                return;
            }
        }
        if buf.len() > MAX_LINE {
            return;
        }
        let idle_deadline = stop
            .stopping_since()
            .map(|since| Instant::from_std(since).max(last_activity) + IDLE_AFTER_STOP);
        tokio::select! {
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => last_activity = Instant::now(),
            },
            _ = stop.stopped(), if idle_deadline.is_none() => {}
            _ = sleep_until(idle_deadline.unwrap_or_else(Instant::now)), if idle_deadline.is_some() => {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}
