//! The sockets the broker holds: adopting those systemd passed, binding new
//! ones (as root, or as the instances' user where root must not), and closing
//! the ones no instance has used for `listener_linger`, unlinking only the
//! socket files the broker made.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ally_core::net::{self, Endpoint, ListenAddr, ListenOptions};

use super::{Broker, Error, Settings, Shared};
use crate::bind_as::{self, BindAs, SocketFile};
use crate::listen_policy;
use crate::systemd;

const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A socket the broker holds, with the file of a unix path socket so that
/// closing it unlinks only that file, never one another process bound since.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) fd: OwnedFd,
    unix_file: Option<SocketFile>,
}

impl Held {
    /// A socket systemd passed: its file is whatever is at its path now.
    fn adopted(fd: OwnedFd, endpoint: &Endpoint) -> Held {
        let unix_file = match endpoint {
            Endpoint::Path(path) => SocketFile::find(path),
            _ => None,
        };
        Held { fd, unix_file }
    }

    /// A socket a re-exec carried: its file is whatever is at its path now.
    pub(super) fn carried(fd: OwnedFd, endpoint: &Endpoint) -> Held {
        Held::adopted(fd, endpoint)
    }

    /// Closes the socket for good, returning the identity of the file it
    /// removed. Not done on exit: a restarted broker gets the socket back from
    /// systemd's fd store and its file must still be there.
    fn close(self) -> Option<(u64, u64)> {
        let file = self.unix_file?;
        file.remove().then(|| file.id())
    }
}

impl Broker {
    /// Takes over the sockets systemd passed: our own from the fd store after a
    /// restart, and those of a `.socket` unit, kept for the broker's life.
    pub(super) fn adopt(&self, sockets: Vec<systemd::Inherited>) {
        let mut shared = self.lock();
        for inherited in sockets {
            let systemd::Inherited {
                fd,
                key,
                aliases,
                origin,
            } = inherited;
            if shared.listeners.contains(&key) {
                systemd::unstore(&key);
                continue;
            }
            let bound = net::local_address(&fd).unwrap_or_else(|_| key.endpoint.to_string());
            let held = Held::adopted(fd, &key.endpoint);
            if origin == systemd::Origin::FdStore
                && let Some(file) = &held.unix_file
            {
                shared.socket_files.insert(file.id());
            }
            let from = match origin {
                systemd::Origin::FdStore => "the fd store",
                systemd::Origin::SocketActivation => "socket activation",
            };
            tracing::info!("adopted {key} from {from}");
            let pinned = origin == systemd::Origin::SocketActivation;
            shared
                .listeners
                .insert(key, aliases, held, bound, pinned, Instant::now());
        }
    }

    /// Binds `addr` as `settings` allow: those of the instance that asks, or of
    /// the generation about to start.
    pub(super) fn bind(
        &self,
        shared: &mut Shared,
        settings: &Settings,
        addr: &ListenAddr,
        options: &ListenOptions,
        pinned: bool,
    ) -> Result<OwnedFd, Error> {
        let config = &settings.config;
        let declared =
            pinned || listen_policy::declared(&config.listen, &config.allow_listen, addr);
        let bound = if declared {
            // A dead socket file at a declared path that the broker's user owns is
            // most likely the broker's own, from before it was restarted.
            let broker_uid = nix::unistd::geteuid().as_raw();
            let known = &shared.socket_files;
            let removable =
                |dev: u64, ino: u64, uid: u32| uid == broker_uid || known.contains(&(dev, ino));
            match bind_as::bind(addr, options, BindAs::Broker, &removable) {
                // A directory on the way that a user may change (the app's own
                // runtime directory, say): root must not bind there, but that
                // user may, as the instances' user could itself.
                Err(bind_as::Error::Denied(why)) => {
                    let creds = settings.launch.run_as.credentials();
                    let removable = |dev: u64, ino: u64, uid: u32| {
                        uid == creds.uid || known.contains(&(dev, ino))
                    };
                    bind_as::bind(addr, options, BindAs::User(&creds), &removable).map_err(|e| {
                        bind_error(e, |as_user| Error::access_denied(format!(
                            "{addr} refused: {why}, so the broker does not bind it as root, and the instances run as {}, who {as_user}; choose a path whose directories only root may change, or one the instances' user may write",
                            settings.launch.run_as.describe()
                        )))
                    })
                }
                other => other.map_err(|e| bind_error(e, Error::access_denied)),
            }
        } else {
            let creds = settings.launch.run_as.credentials();
            if creds.uid != 0
                && let Some(port) =
                    listen_policy::privileged_port(addr, bind_as::unprivileged_port_start())
            {
                return Err(Self::refused(
                    settings,
                    addr,
                    &format!(
                        "port {port} is privileged (below net.ipv4.ip_unprivileged_port_start) and the instances run as {}, who may not bind it",
                        settings.launch.run_as.describe()
                    ),
                ));
            }
            let known = &shared.socket_files;
            let removable = |dev: u64, ino: u64, _uid: u32| known.contains(&(dev, ino));
            bind_as::bind(addr, options, BindAs::User(&creds), &removable).map_err(|e| {
                bind_error(e, |why| {
                    Self::refused(
                        settings,
                        addr,
                        &format!(
                            "the instances run as {}, who {why}",
                            settings.launch.run_as.describe()
                        ),
                    )
                })
            })
        };
        let bind_as::Bound { socket, file } = bound?;
        if let Some(file) = &file {
            shared.socket_files.insert(file.id());
        }
        let bound = net::local_address(&socket).unwrap_or_else(|_| addr.endpoint.to_string());
        let bound_key = ListenAddr::parse(addr.network.as_str(), &bound).ok();
        let fd: OwnedFd = socket.into();
        let copy = dup(&fd)?;
        systemd::store(addr, &fd);
        shared.listeners.insert(
            addr.clone(),
            bound_key.into_iter().collect(),
            Held {
                fd,
                unix_file: file,
            },
            bound,
            pinned,
            Instant::now(),
        );
        Ok(copy)
    }

    fn refused(settings: &Settings, addr: &ListenAddr, why: &str) -> Error {
        Error::access_denied(listen_policy::refusal(
            addr,
            why,
            settings.config.file.as_deref(),
        ))
    }

    pub(super) async fn sweep_listeners(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            let linger = self.settings().config.listener_linger;
            let closed = {
                let mut shared = self.lock();
                let paused = shared.table.current().is_none();
                shared
                    .listeners
                    .take_expired(Instant::now(), linger, paused)
            };
            let mut removed = Vec::new();
            for (addr, held) in closed {
                tracing::info!(
                    "closing {addr}: no instance has used it for {}",
                    humantime::format_duration(linger)
                );
                systemd::unstore(&addr);
                removed.extend(held.close());
            }
            if !removed.is_empty() {
                let mut shared = self.lock();
                for id in removed {
                    shared.socket_files.remove(&id);
                }
            }
        }
    }
}

/// The broker's error for a failed bind; `denied` words a refusal.
fn bind_error(e: bind_as::Error, denied: impl FnOnce(String) -> Error) -> Error {
    match e {
        bind_as::Error::Denied(why) => denied(why),
        bind_as::Error::Address(e) => e,
    }
}

pub(super) fn dup(fd: &OwnedFd) -> Result<OwnedFd, Error> {
    fd.as_fd().try_clone_to_owned().map_err(|e| {
        Error::caused_by(
            ally_core::ErrorKind::Failed,
            format_args!("cannot duplicate socket"),
            e,
        )
    })
}
