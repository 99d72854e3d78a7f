//! Client binding for the Ally socket broker: receive listening sockets that survive
//! reloads, report readiness, and stop gracefully.
//!
//! # How a reload works
//!
//! The broker (`ally run <app>`) owns the listening sockets and starts your program; your
//! program borrows the sockets. The life of one instance:
//!
//! 1. **Spawn.** The broker starts a *generation* of the program with `ALLY_ADDRESS`,
//!    `ALLY_STATE_ADDRESS` (the state socket, for fast cache and counter calls),
//!    `ALLY_APP`, `ALLY_INSTANCE`, `ALLY_GENERATION` and `ALLY_STOP_SIGNAL` in its
//!    environment. [`Ally::from_env`] connects to the broker and installs the stop-signal
//!    handler.
//! 2. **Listen.** [`Ally::listen`] asks the broker for a socket, as the type you want
//!    (`ally.listen::<tokio::net::TcpListener>("127.0.0.1:8080")`; see [`FromShared`]). The first request for an address binds it; every
//!    later request, from this or any later generation, gets a duplicate of the *same*
//!    kernel socket. Nothing is bound or closed across a reload, so no connection is
//!    refused and the accept queue is never lost.
//! 3. **Ready.** Once serving, call [`Ally::ready`]. Until then the broker treats the
//!    instance as starting; a generation that exits or is not ready within the
//!    configured `ready_timeout` fails the reload, and the old generation keeps serving.
//! 4. **Reload.** On `ally reload <app>` (or `systemctl reload`, or [`Ally::reload`]) the
//!    broker starts generation N+1 *next to* generation N. N+1 listens (getting the same
//!    sockets) and calls `ready()`; only then is N sent its stop signal. Both accept from
//!    the same queue for a moment, which is harmless: each connection goes to one of them.
//!    Replacing the binary first makes the reload an upgrade.
//! 5. **Stop.** On the stop signal, [`Ally::stopped`] resolves (and [`StopHandle`]s wake):
//!    stop accepting, finish in-flight work, close idle connections and exit. Past the
//!    configured `stop_timeout` the broker sends `SIGKILL`. Handing a server's graceful
//!    shutdown the stop future as it is loses requests on every reload; [`drain`] says
//!    why and what to do instead.
//!
//! # Frameworks
//!
//! Each integration is behind the cargo feature of its name and takes the instance's
//! [`drain::Drain`] ([`Ally::drain`]): it serves until the stop, then drains without
//! losing a request and returns.
//!
//! | feature | module | serve |
//! | --- | --- | --- |
//! | `axum` | `axum` | `ally_client::axum::serve(listener, app, ally.drain())`, or `axum::serve` with its `Listener` |
//! | `hyper` | `hyper` | `ally_client::hyper::serve(listener, service, ally.drain())` (HTTP/1 and HTTP/2) |
//! | `tonic` | `tonic` | tonic's `serve_with_incoming_shutdown` with the module's incoming stream and shutdown future |
//! | `actix-web` | `actix` | `ally_client::actix::serve(server, listener, ally.drain())`, with its `CloseWhileStopping` middleware on the `App` |
//!
//! A hand-written loop uses [`drain`]'s pieces. Each step of the drain answers a failure a
//! client that does not retry would otherwise see; the `hyper` module lists them.
//!
//! # Managed and simulate mode
//!
//! When `ALLY_ADDRESS` is set, the instance is **managed**: sockets come from the broker
//! over its private D-Bus socket. Otherwise [`Ally::from_env`] runs in **simulate mode**,
//! so the same program runs by hand or under `cargo run`: sockets are bound in the
//! process with the broker's rules (same address normalisation; asking twice for one
//! address returns a duplicate of one socket), [`Ally::ready`] does nothing, and both the
//! stop signal and `SIGINT` (Ctrl-C) request the stop. [`Ally::reload`] needs a broker.
//!
//! # When the broker restarts
//!
//! The broker may re-execute itself (`ally reexec`, after an upgrade of `ally`) or be
//! restarted by systemd after a crash. Either way its connections close, while what
//! it keeps for the instance survives: the instance id and generation, the listeners
//! (a repeated [`Ally::listen`] of an address returns the same socket), the cache and
//! counters, and the locks the instance holds. The stop signal is a signal, not a
//! message, so stopping never depends on the connection.
//!
//! Nothing is asked of the app. The next call on a closed connection (the D-Bus one or
//! one to the state socket) connects again, trying with back-off (20 ms doubling to
//! 500 ms) for up to 10 s, or for as long as `ALLY_RECONNECT_TIMEOUT` says (`30s`,
//! `500ms`; a value that is no duration makes [`Ally::connect`] fail). A call that had
//! not been sent yet is made on the new connection. A call the connection closed under
//! is repeated once on the new one if doing it twice is harmless: `listen`,
//! `listen_with`, `ready`, `report`, `status`, the cache's `get`, `exists`, `keys`,
//! `count` and `set`, the counter's `load` and `store`, the locker's `queues`. Any
//! other (`add`, `swap`, `compare_and_swap`, `set_if_absent`, `delete`, `flush`, the
//! locks, `close`, `reload`) may have taken effect, so it fails with
//! [`ErrorKind::Disconnected`] and the app decides: "the broker's connection closed
//! during Add (the broker restarted?); it was not repeated because it may have taken
//! effect". A lock being waited for is lost with its connection: that
//! [`Locker::lock`] fails the same way. When no broker answers within the timeout, the
//! call fails with the same kind and a message ending "reconnecting failed: no broker
//! answered at ..."; the next call tries again. No call hangs on a broker that is
//! gone.
//!
//! # Shared sockets and `O_NONBLOCK`
//!
//! A socket you receive shares one open file description with its duplicates in the
//! broker and in every other instance, and `O_NONBLOCK` is a flag of that description.
//! The Tokio helpers turn it on, for everyone. The std helpers leave it alone, so a
//! blocking program must expect [`std::io::ErrorKind::WouldBlock`] from `accept` or
//! `recv_from` whenever another generation is async (or won the race for a connection):
//! use [`stdnet::accept_tcp`] and its siblings, which wait with `poll(2)` and retry.
//!
//! # Example
//!
//! ```no_run
//! use tokio::io::AsyncWriteExt;
//! use tokio::net::TcpListener;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), ally_client::Error> {
//!     let ally = ally_client::Ally::from_env().await?;
//!     let listener: TcpListener = ally.listen("127.0.0.1:8080").await?;
//!     ally.ready().await?;
//!     let stopped = ally.stopped(); // 'static: it may outlive `ally`
//!     tokio::pin!(stopped);
//!     loop {
//!         tokio::select! {
//!             accepted = listener.accept() => {
//!                 let Ok((mut stream, _)) = accepted else { continue };
//!                 tokio::spawn(async move {
//!                     let _ = stream.write_all(b"hello\n").await;
//!                 });
//!             }
//!             () = &mut stopped => break,
//!         }
//!     }
//!     // Stop accepting (the next generation accepts what is queued), then drain the
//!     // connections already accepted and return.
//!     drop(listener);
//!     Ok(())
//! }
//! ```
//!
//! The examples are complete apps: `hello` (hyper; the README's quick start),
//! `axum_server`, `tonic_server`, `actix_server`, `std_server` (std threads, [`blocking`]) and
//! `datagram` (UDP and unix sockets), each draining without losing a request.
//!
//! Without an async runtime, [`blocking::Ally`] offers the same API with std types.
//! Any language with a D-Bus library can do the same as this crate: see
//! `docs/dbus-api.md`.

#[cfg(feature = "actix-web")]
pub mod actix;
mod ally;
#[cfg(feature = "axum")]
pub mod axum;
pub mod blocking;
mod direct;
pub mod drain;
pub mod error;
#[cfg(feature = "hyper")]
pub mod hyper;
mod link;
mod listen;
mod listener;
mod reconnect;
pub mod report;
mod shared;
mod status;
pub mod stdnet;
mod stop;
#[cfg(feature = "tonic")]
pub mod tonic;

pub use ally::Ally;
pub use direct::StateSocket;
pub use error::{Error, ErrorKind, Result};
pub use listener::{FromShared, FromSharedStd, ListenOptions, SeqpacketListener};
pub use report::{Report, Task};
pub use shared::{Atomic, Cache, LockGuard, Locker, Queues, Simulation};
pub use status::{InstanceStatus, ListenerStatus, Status};
pub use stop::{StopHandle, parse_signal};

/// Types of the shared state that appear in this crate's API: the limits of a
/// [`Simulation`]'s store and the entries of [`Queues`].
pub use ally_core::state::{Limits, calls::QueueEntry};
