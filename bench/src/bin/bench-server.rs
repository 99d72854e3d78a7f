//! The server of every benchmark scenario: the same HTTP/1.1 and gRPC logic
//! (`ally_bench::serve`), with the listening sockets got one of five ways.
//!
//! ```text
//! bench-server --mode ally|bind|inherit|reuseport|shellflip --http ADDR --grpc ADDR
//!              [--grpc-stop plain|drain] [--settle-ms N] [--shellflip-socket PATH]
//! ```
//!
//! * `ally`: sockets from the broker (`ally-client`), `ready()`, stop on the broker's signal;
//! * `bind`: binds its own sockets (`SO_REUSEADDR`): plain restart, and the data-path baseline;
//! * `inherit`: takes fds 3 (HTTP) and 4 (gRPC) from its parent (`LISTEN_FDS=2`, the
//!   systemd socket-activation model);
//! * `reuseport`: binds its own sockets with `SO_REUSEPORT` next to the old process's;
//! * `shellflip`: binds at first start; on a restart request on the shellflip
//!   coordination socket it spawns its successor, hands it the sockets, and drains
//!   once the successor reports its start-up complete.
//!
//! Every mode writes `ready pid=N` on stdout once it serves, stops accepting on
//! SIGTERM (or the restart), drains, and exits.
//!
//! Its HTTP is a hand-written minimal loop, not a framework, on purpose: every
//! mode must serve through the very same code so that only the way the sockets
//! were obtained differs, and the data-path figures measure the raw path rather
//! than a framework's overhead. How real frameworks fare is what the examples
//! (`client/examples`) and their tests show.

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use ally_bench::serve::{GrpcStop, serve_grpc, serve_http};
use ally_client::{Ally, StopHandle};
use tokio::net::TcpListener;

#[derive(Debug)]
struct Args {
    mode: String,
    http: SocketAddr,
    grpc: SocketAddr,
    grpc_stop: GrpcStop,
    shellflip_socket: std::path::PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut mode = None;
    let mut http = None;
    let mut grpc = None;
    let mut drain = true;
    let mut settle = ally_client::drain::DEFAULT_SETTLE;
    let mut socket = std::path::PathBuf::from("/tmp/bench-shellflip.sock");
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--mode" => mode = Some(value()?),
            "--http" => http = Some(value()?.parse().map_err(|e| format!("--http: {e}"))?),
            "--grpc" => grpc = Some(value()?.parse().map_err(|e| format!("--grpc: {e}"))?),
            "--grpc-stop" => {
                drain = match value()?.as_str() {
                    "plain" => false,
                    "drain" => true,
                    other => return Err(format!("--grpc-stop: {other:?} is not plain or drain")),
                }
            }
            "--settle-ms" => {
                let v = value()?;
                settle = Duration::from_millis(v.parse().map_err(|_| format!("--settle-ms {v:?}"))?)
            }
            "--shellflip-socket" => socket = value()?.into(),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Args {
        mode: mode.ok_or("--mode is required")?,
        http: http.ok_or("--http is required")?,
        grpc: grpc.ok_or("--grpc is required")?,
        grpc_stop: if drain {
            GrpcStop::Drain(settle)
        } else {
            GrpcStop::Plain
        },
        shellflip_socket: socket,
    })
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-server: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

fn bind(addr: SocketAddr, reuse_port: bool) -> Result<TcpListener, Error> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into())?)
}

fn adopt(fd: RawFd) -> Result<TcpListener, Error> {
    // SAFETY: the parent passed this fd for us to own (LISTEN_FDS protocol); we check
    // it is a socket before use.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    std.local_addr()
        .map_err(|e| format!("fd {fd} is not a listening TCP socket: {e}"))?;
    std.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std)?)
}

/// SIGTERM and SIGINT request the stop.
fn stop_on_signals() -> Result<StopHandle, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = StopHandle::new();
    for kind in [SignalKind::terminate(), SignalKind::interrupt()] {
        let mut stream = signal(kind)?;
        let handle = stop.clone();
        tokio::spawn(async move {
            if stream.recv().await.is_some() {
                handle.stop();
            }
            std::future::pending::<()>().await;
        });
    }
    Ok(stop)
}

fn announce_ready() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready pid={}", std::process::id());
    let _ = out.flush();
}

async fn run(args: Args) -> Result<(), Error> {
    let (http, grpc, stop, ally) = match args.mode.as_str() {
        "ally" => {
            let ally = Ally::from_env().await?;
            let http = ally
                .listen::<tokio::net::TcpListener>(&args.http.to_string())
                .await?;
            let grpc = ally
                .listen::<tokio::net::TcpListener>(&args.grpc.to_string())
                .await?;
            (http, grpc, ally.stop_handle(), Some(ally))
        }
        "bind" => (
            bind(args.http, false)?,
            bind(args.grpc, false)?,
            stop_on_signals()?,
            None,
        ),
        "reuseport" => (
            bind(args.http, true)?,
            bind(args.grpc, true)?,
            stop_on_signals()?,
            None,
        ),
        "inherit" => {
            let n: i32 = std::env::var("LISTEN_FDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or("inherit mode needs LISTEN_FDS=2")?;
            if n != 2 {
                return Err(format!("LISTEN_FDS={n}, expected 2").into());
            }
            (adopt(3)?, adopt(4)?, stop_on_signals()?, None)
        }
        "shellflip" => return run_shellflip(args).await,
        other => return Err(format!("unknown mode {other:?}").into()),
    };
    if let Some(ally) = &ally {
        ally.ready().await?;
    }
    announce_ready();
    serve(http, grpc, stop, args.grpc_stop).await;
    Ok(())
}

async fn serve(http: TcpListener, grpc: TcpListener, stop: StopHandle, how: GrpcStop) {
    let body: Arc<str> = format!("bench pid={}\n", std::process::id()).into();
    let http_task = tokio::spawn(serve_http(http, stop.clone(), body));
    let grpc_task = tokio::spawn(serve_grpc(grpc, stop.clone(), how));
    let _ = http_task.await;
    let _ = grpc_task.await;
}

/// Hands the listeners' fd numbers to the successor; the fds themselves are
/// inherited, their close-on-exec flag cleared just before the spawn.
struct Handover {
    fds: [RawFd; 2],
}

#[async_trait::async_trait]
impl shellflip::lifecycle::LifecycleHandler for Handover {
    async fn pre_new_process(&mut self) {
        for fd in self.fds {
            // SAFETY: plain fcntl on an fd this process owns for its whole life.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        }
    }

    async fn send_to_new_process(
        &mut self,
        mut pipe: shellflip::lifecycle::PipeWriter,
    ) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        pipe.write_all(format!("{} {}\n", self.fds[0], self.fds[1]).as_bytes())
            .await?;
        pipe.flush().await
    }

    async fn new_process_failed(&mut self) {
        for fd in self.fds {
            // SAFETY: as above.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

async fn run_shellflip(args: Args) -> Result<(), Error> {
    let (http, grpc) = match shellflip::lifecycle::receive_from_old_process() {
        Some(mut pipe) => {
            use tokio::io::AsyncBufReadExt;
            let mut line = String::new();
            tokio::io::BufReader::new(&mut pipe)
                .read_line(&mut line)
                .await?;
            let mut fds = line.split_whitespace().map(str::parse::<RawFd>);
            match (fds.next(), fds.next()) {
                (Some(Ok(h)), Some(Ok(g))) => {
                    for fd in [h, g] {
                        // SAFETY: our own inherited fds; back to close-on-exec.
                        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                    }
                    (adopt(h)?, adopt(g)?)
                }
                _ => return Err(format!("bad handover {line:?}").into()),
            }
        }
        None => {
            let _ = std::fs::remove_file(&args.shellflip_socket);
            (bind(args.http, false)?, bind(args.grpc, false)?)
        }
    };
    let config = shellflip::RestartConfig {
        enabled: true,
        coordination_socket_path: args.shellflip_socket.clone(),
        lifecycle_handler: Box::new(Handover {
            fds: [http.as_raw_fd(), grpc.as_raw_fd()],
        }),
        exit_on_error: false,
        ..Default::default()
    };
    let restart = config.try_into_restart_task()?;
    let stop = stop_on_signals()?;
    // The first poll of the restart task reports the start-up complete to the
    // predecessor, so it runs only now that the sockets serve.
    announce_ready();
    let server = tokio::spawn(serve(http, grpc, stop.clone(), args.grpc_stop));
    let restart_stop = stop.clone();
    tokio::spawn(async move {
        match restart.await {
            Ok(child) => {
                eprintln!("bench-server: restarted as pid {}", child.id());
                restart_stop.stop();
            }
            Err(e) => eprintln!("bench-server: restart task: {e}"),
        }
    });
    let _ = server.await;
    Ok(())
}
