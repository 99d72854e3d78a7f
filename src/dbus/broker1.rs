//! `org.ally.Broker1`: sockets, readiness, reloads and status.
//! The interface is documented in `docs/dbus-api.md`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use ally_core::net::{ListenAddr, ListenOptions};
use ally_core::report::AppReport;
use ally_core::state::calls::{CONNECTION_OWNER, Holder, Requires};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedVariant, Variant, interface};

use super::caller::{self, Role, Transport};
use super::errors::{Error, Result};
use super::peer::Identity;
use crate::broker::{Broker, Status};
use crate::generations::{Instance, InstanceId};

pub type InstanceEntry = (u64, u64, u32, String, u64, u64);
pub type ListenerEntry = (String, String, u32);
/// `(sequence, kind, generation, started_usec, duration_usec, success, message,
/// requested_by)`: `History()`'s `a(tstttbss)`.
pub type HistoryEntry = (u64, String, u64, u64, u64, bool, String, String);

/// Who is on the other end of a connection.
#[derive(Debug)]
pub enum Peer {
    /// A private-socket peer, pinned when it connected (see `super::peer`).
    Private {
        identity: Identity,
        /// The connection's number, for the locks taken through it.
        conn: u64,
        instance: OnceLock<InstanceId>,
        /// A role other than instance, once known: a process that is not an
        /// instance's cannot become one, so it holds for the connection's life.
        other: OnceLock<Role>,
        /// Whether the client negotiated file descriptor passing.
        unix_fds: bool,
    },
    /// A bus connection: every call may come from another sender.
    Bus,
}

impl Peer {
    pub fn private(identity: Identity, conn: u64) -> Self {
        Peer::Private {
            identity,
            conn,
            instance: OnceLock::new(),
            other: OnceLock::new(),
            unix_fds: false,
        }
    }

    /// The same peer, whose connection negotiated file descriptor passing.
    pub fn with_unix_fds(mut self) -> Self {
        if let Peer::Private { unix_fds, .. } = &mut self {
            *unix_fds = true;
        }
        self
    }
}

/// Who may call what on one connection, shared by every interface served on it.
pub struct Access {
    broker: Arc<Broker>,
    peer: Peer,
}

impl Access {
    pub fn new(broker: Arc<Broker>, peer: Peer) -> Arc<Self> {
        Arc::new(Access { broker, peer })
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    pub async fn role(&self, header: Option<&Header<'_>>, conn: &Connection) -> Result<Role> {
        if let Some(role) = self.settled_private_role().await {
            return Ok(role);
        }
        let sender = header
            .and_then(|h| h.sender())
            .ok_or_else(|| Error::access_denied("the call has no sender".into()))?;
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let creds = dbus
            .get_connection_credentials(sender.clone().into())
            .await
            .map_err(|e| {
                Error::caused_by(
                    ally_core::ErrorKind::Failed,
                    format_args!("cannot identify {sender}"),
                    e,
                )
            })?;
        let uid = creds.unix_user_id().ok_or_else(|| {
            Error::access_denied(format!("the bus does not know the uid of {sender}"))
        })?;
        // The bus's pid for a sender may since belong to another process: on a
        // bus only the uid counts, and instances use the private socket.
        Ok(self.decide(uid, &[], Transport::Bus))
    }

    /// The role of a private-socket peer (`None` on a bus), worked out once: a
    /// process that is not an instance's cannot become one, and an instance's role
    /// lasts while the instance lives. The process is the one pinned at connect
    /// time; once it has gone, only its uid counts.
    pub fn private_role(&self) -> Option<Role> {
        self.private_decision().map(|(role, _)| role)
    }

    /// The private-socket role once it is final: a process that is no instance
    /// while a spawn is in flight may be the instance being recorded.
    pub async fn settled_private_role(&self) -> Option<Role> {
        loop {
            match self.private_decision()? {
                (role, true) => return Some(role),
                (_, false) => self.broker.spawns_settled().await,
            }
        }
    }

    /// The role, and whether it is final.
    fn private_decision(&self) -> Option<(Role, bool)> {
        let Peer::Private {
            identity,
            instance,
            other,
            ..
        } = &self.peer
        else {
            return None;
        };
        if let Some(id) = instance.get() {
            if self.broker.instance_alive(*id) {
                return Some((Role::Instance(*id), true));
            }
        } else if let Some(role) = other.get() {
            return Some((*role, true));
        }
        let ancestry = if instance.get().is_some() {
            Vec::new()
        } else {
            identity.ancestry(std::process::id())
        };
        let instances = self.broker.instance_snapshot();
        let role = caller::role(
            identity.uid,
            &ancestry,
            &instances.by_pid,
            nix::unistd::geteuid().as_raw(),
            Transport::PrivateSocket,
        );
        let settled = match role {
            Role::Instance(id) => {
                let _ = instance.set(id);
                true
            }
            _ if instance.get().is_some() => true,
            _ if instances.spawning => false,
            // An instance that exited leaves a process that is no instance.
            _ => {
                let _ = other.set(role);
                true
            }
        };
        Some((role, settled))
    }

    fn decide(&self, uid: u32, ancestry: &[u32], transport: Transport) -> Role {
        caller::role(
            uid,
            ancestry,
            &self.broker.instance_pids(),
            nix::unistd::geteuid().as_raw(),
            transport,
        )
    }

    /// Refuses a call whose reply carries a file descriptor on a connection that
    /// cannot receive one: the client did not negotiate passing them.
    pub fn require_unix_fds(&self, method: &str) -> Result<()> {
        match self.peer {
            Peer::Private {
                unix_fds: false, ..
            } => Err(Error::failed(format!(
                "{method} returns a file descriptor, and this connection did not negotiate passing them: \
                 send NEGOTIATE_UNIX_FD after AUTH and before BEGIN (godbus's Auth, dbus-python, sd-bus and zbus do)"
            ))),
            _ => Ok(()),
        }
    }

    pub async fn require_instance(
        &self,
        header: Option<&Header<'_>>,
        conn: &Connection,
        method: &str,
    ) -> Result<InstanceId> {
        match self.role(header, conn).await? {
            Role::Instance(id) => Ok(id),
            Role::Admin => Err(Error::access_denied(format!(
                "{method} is for instances of {}: the caller is an admin, not one of its instances",
                self.broker.app()
            ))),
            _ => Err(self.denied(method)),
        }
    }

    /// Instances and admins.
    pub async fn require_admin(
        &self,
        header: Option<&Header<'_>>,
        conn: &Connection,
        method: &str,
    ) -> Result<Role> {
        let role = self.role(header, conn).await?;
        self.admit(role, Requires::Writer, method)?;
        Ok(role)
    }

    /// Whether a caller of `role` may make a call that `requires` this.
    pub fn admit(&self, role: Role, requires: Requires, method: &str) -> Result<()> {
        match (requires, role) {
            (_, Role::Denied) => Err(self.denied(method)),
            (Requires::Reader, _) => Ok(()),
            (Requires::Writer, Role::Instance(_) | Role::Admin) => Ok(()),
            (Requires::Operator, Role::Admin) => Ok(()),
            (Requires::Operator, Role::Instance(_)) => Err(Error::access_denied(format!(
                "{method} is for admins (root or the broker's user), not instances"
            ))),
            _ => Err(self.denied(method)),
        }
    }

    /// Checks that the caller may make a call that `requires` this.
    pub async fn require(
        &self,
        header: Option<&Header<'_>>,
        conn: &Connection,
        requires: Requires,
        method: &str,
    ) -> Result<()> {
        self.admit(self.role(header, conn).await?, requires, method)
    }

    pub async fn require_reader(
        &self,
        header: Option<&Header<'_>>,
        conn: &Connection,
        what: &str,
    ) -> Result<()> {
        self.require(header, conn, Requires::Reader, what).await
    }

    /// The lock owner and connection number of a caller that may lock: an instance
    /// owns its locks; anyone else, the connection (see `crate::state`).
    pub async fn lock_owner(
        &self,
        header: Option<&Header<'_>>,
        conn: &Connection,
        method: &str,
    ) -> Result<Holder> {
        let role = self.require_admin(header, conn, method).await?;
        let conn_id = match &self.peer {
            Peer::Private { conn, .. } => *conn,
            Peer::Bus => {
                let sender = header
                    .and_then(|h| h.sender())
                    .ok_or_else(|| Error::access_denied("the call has no sender".into()))?;
                self.broker.state().sender_conn(sender.as_str())
            }
        };
        let owner = match role {
            Role::Instance(id) => id,
            _ => CONNECTION_OWNER + conn_id,
        };
        Ok(Holder {
            owner,
            conn: conn_id,
        })
    }

    /// Who made a call, for the history: the role, and the process or bus name.
    pub fn describe_caller(&self, role: Role, header: &Header<'_>) -> String {
        let role = match role {
            Role::Instance(id) => format!("instance {id}"),
            Role::Admin => "admin".to_string(),
            Role::Reader => "reader".to_string(),
            Role::Denied => "denied".to_string(),
        };
        match &self.peer {
            Peer::Private { identity, .. } => {
                format!("D-Bus: {role}, uid {} pid {}", identity.uid, identity.pid)
            }
            Peer::Bus => match header.sender() {
                Some(sender) => format!("D-Bus: {role}, bus name {sender}"),
                None => format!("D-Bus: {role}"),
            },
        }
    }

    fn denied(&self, what: &str) -> Error {
        Error::access_denied(format!(
            "{what} denied: the caller is neither root, the broker's user, nor an instance of {}",
            self.broker.app()
        ))
    }
}

pub struct Broker1 {
    broker: Arc<Broker>,
    access: Arc<Access>,
}

impl Broker1 {
    pub fn new(access: Arc<Access>) -> Self {
        Broker1 {
            broker: access.broker().clone(),
            access,
        }
    }
}

#[interface(name = "org.ally.Broker1", introspection_docs = false)]
impl Broker1 {
    #[zbus(out_args("fd"))]
    async fn listen(
        &self,
        network: &str,
        address: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<zbus::OwnedFd> {
        let instance = self
            .access
            .require_instance(Some(&header), conn, "Listen")
            .await?;
        self.access.require_unix_fds("Listen")?;
        let addr = parse_address(network, address).await?;
        let fd = self
            .broker
            .listen(instance, &addr, &ListenOptions::default())?;
        Ok(fd.into())
    }

    #[zbus(out_args("fd"))]
    async fn listen_with(
        &self,
        network: &str,
        address: &str,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<zbus::OwnedFd> {
        let instance = self
            .access
            .require_instance(Some(&header), conn, "ListenWith")
            .await?;
        self.access.require_unix_fds("ListenWith")?;
        let options = parse_options(&options)?;
        let addr = parse_address(network, address).await?;
        let fd = self.broker.listen(instance, &addr, &options)?;
        Ok(fd.into())
    }

    async fn close(
        &self,
        network: &str,
        address: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        let instance = self
            .access
            .require_instance(Some(&header), conn, "Close")
            .await?;
        let addr = parse_address(network, address).await?;
        self.broker.close(instance, &addr)
    }

    async fn ready(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        let instance = self
            .access
            .require_instance(Some(&header), conn, "Ready")
            .await?;
        self.broker.ready(instance)
    }

    /// What the calling instance says about itself: `version`, `commit`,
    /// `tasks`, `description` (see `ally_core::report`).
    async fn report(
        &self,
        report: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        let instance = self
            .access
            .require_instance(Some(&header), conn, "Report")
            .await?;
        let update = AppReport::from_dict(&report)?;
        self.broker.report(instance, update)
    }

    #[zbus(out_args("generation"))]
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u64> {
        let role = self
            .access
            .require_admin(Some(&header), conn, "Reload")
            .await?;
        let who = self.access.describe_caller(role, &header);
        self.broker.reload_by(who).await
    }

    /// Runs the broker's binary again in this process, carrying the listeners,
    /// instances, history and shared state. On success no reply comes: the
    /// connection closes with the exec, and `Status()` on a new one shows
    /// `reexecs` one higher. On failure the broker goes on as it was.
    async fn reexecute(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        // Not for instances: it closes every connection of every instance.
        let role = self.access.role(Some(&header), conn).await?;
        self.access.admit(role, Requires::Operator, "Reexecute")?;
        let who = self.access.describe_caller(role, &header);
        self.broker.reexecute(&who).await
    }

    /// The last reloads and restarts, oldest first (config `history`).
    #[zbus(out_args("history"))]
    async fn history(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<HistoryEntry>> {
        self.access
            .require_reader(Some(&header), conn, "History")
            .await?;
        Ok(history_entries(&self.broker.history()))
    }

    /// The OpenMetrics text exposition of the broker's metrics.
    #[zbus(out_args("metrics"))]
    async fn metrics(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String> {
        self.access
            .require_admin(Some(&header), conn, "Metrics")
            .await?;
        Ok(self.broker.metrics_text())
    }

    #[zbus(out_args("status"))]
    async fn status(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<HashMap<String, OwnedVariant>> {
        self.access
            .require_reader(Some(&header), conn, "Status")
            .await?;
        status_dict(&self.broker.status())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn app(&self) -> String {
        self.broker.app().to_string()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn state(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        self.property_access(header.as_ref(), conn).await?;
        Ok(self.broker.status().phase.as_str().to_string())
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn generation(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<u64> {
        self.property_access(header.as_ref(), conn).await?;
        Ok(self.broker.status().generation)
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn instances(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<Vec<InstanceEntry>> {
        self.property_access(header.as_ref(), conn).await?;
        Ok(instance_entries(&self.broker.status().instances))
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn listeners(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<Vec<ListenerEntry>> {
        self.property_access(header.as_ref(), conn).await?;
        Ok(listener_entries(&self.broker.status()))
    }

    /// What each instance reported with `Report`, by instance id: `a{ta{sv}}`.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn reports(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<HashMap<u64, HashMap<String, OwnedVariant>>> {
        self.property_access(header.as_ref(), conn).await?;
        Ok(app_reports(&self.broker.status()))
    }

    #[zbus(signal)]
    pub async fn reload_finished(
        emitter: &SignalEmitter<'_>,
        generation: u64,
        success: bool,
        message: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn instance_state_changed(
        emitter: &SignalEmitter<'_>,
        id: u64,
        state: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn reload_progress(
        emitter: &SignalEmitter<'_>,
        generation: u64,
        phase: &str,
        detail: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn instance_reported(
        emitter: &SignalEmitter<'_>,
        id: u64,
        generation: u64,
        report: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<()>;
}

impl Broker1 {
    async fn property_access(
        &self,
        header: Option<&Header<'_>>,
        conn: &Connection,
    ) -> zbus::fdo::Result<()> {
        self.access
            .require_reader(header, conn, "reading properties")
            .await
            .map_err(|e| zbus::fdo::Error::AccessDenied(e.to_string()))
    }
}

/// Host names may need a resolver; keep that off the async workers.
async fn parse_address(network: &str, address: &str) -> Result<ListenAddr> {
    if ally_core::net::needs_resolver(network, address) {
        let (network, address) = (network.to_string(), address.to_string());
        tokio::task::spawn_blocking(move || ListenAddr::parse(&network, &address))
            .await
            .map_err(|e| Error::from_source(ally_core::ErrorKind::Failed, e))?
    } else {
        ListenAddr::parse(network, address)
    }
}

fn parse_options(options: &HashMap<String, OwnedVariant>) -> Result<ListenOptions> {
    let mut parsed = ListenOptions::default();
    for (key, value) in options {
        let wrong_type = |expected: &str| {
            Error::invalid_argument(format!(
                "option {key:?} must be of type {expected}, not {}",
                value.value_signature()
            ))
        };
        match key.as_str() {
            "backlog" => {
                let backlog = u32::try_from(value).map_err(|_| wrong_type("u"))?;
                if backlog == 0 {
                    return Err(Error::invalid_argument(
                        "option \"backlog\" must be at least 1".into(),
                    ));
                }
                parsed.backlog = Some(backlog);
            }
            "reuse_port" => {
                parsed.reuse_port = bool::try_from(value).map_err(|_| wrong_type("b"))?;
            }
            "mode" => {
                let mode = u32::try_from(value).map_err(|_| wrong_type("u"))?;
                if mode > 0o777 {
                    return Err(Error::invalid_argument(format!(
                        "option \"mode\" is {mode:#o}: expected permission bits of at most 0o777 (set-id and sticky bits mean nothing on a socket)"
                    )));
                }
                parsed.mode = Some(mode);
            }
            other => {
                return Err(Error::invalid_argument(format!(
                    "unknown option {other:?}: expected backlog (u), reuse_port (b) or mode (u)"
                )));
            }
        }
    }
    Ok(parsed)
}

fn usec(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_micros() as u64)
}

pub fn instance_entries(instances: &[Instance]) -> Vec<InstanceEntry> {
    instances
        .iter()
        .map(|i| {
            (
                i.id,
                i.generation,
                i.pid,
                i.state.as_str().to_string(),
                usec(Some(i.started)),
                usec(i.ready),
            )
        })
        .collect()
}

/// `(id, revision, digest)` of each instance: `instance_configs`, `a(tts)`.
fn instance_configs(status: &Status) -> Vec<(u64, u64, String)> {
    status
        .instance_revisions
        .iter()
        .map(|(id, r)| (*id, r.number, r.digest.clone()))
        .collect()
}

/// `(id, status, stopping, errno, main_pid)` of each instance that reported
/// anything: `instance_reports`, `a(tsbiu)`.
fn instance_reports(status: &Status) -> Vec<(u64, String, bool, i32, u32)> {
    status
        .reported
        .iter()
        .map(|(id, r)| {
            (
                *id,
                r.status.clone().unwrap_or_default(),
                r.stopping,
                r.errno.unwrap_or(-1),
                r.main_pid.unwrap_or(0),
            )
        })
        .collect()
}

pub fn history_entries(entries: &[crate::history::Entry]) -> Vec<HistoryEntry> {
    entries
        .iter()
        .map(|e| {
            (
                e.sequence,
                e.kind.as_str().to_string(),
                e.generation,
                usec(Some(e.started)),
                e.duration.as_micros() as u64,
                e.success,
                e.message.clone(),
                e.requested_by.clone(),
            )
        })
        .collect()
}

/// What each instance reported with `Report`, by id: `instance_app_reports`
/// and the `Reports` property, `a{ta{sv}}`.
fn app_reports(status: &Status) -> HashMap<u64, HashMap<String, OwnedVariant>> {
    status
        .app_reports
        .iter()
        .map(|(id, report)| (*id, report.to_dict()))
        .collect()
}

fn listener_entries(status: &Status) -> Vec<ListenerEntry> {
    status
        .listeners
        .iter()
        .map(|l| (l.network.clone(), l.address.clone(), l.refs))
        .collect()
}

fn status_dict(status: &Status) -> Result<HashMap<String, OwnedVariant>> {
    fn owned<'a>(v: impl Into<Variant<'a>>) -> Result<OwnedVariant> {
        v.into()
            .try_into_owned()
            .map_err(|e| Error::from_source(ally_core::ErrorKind::Failed, e))
    }
    Ok(HashMap::from([
        ("app".to_string(), owned(status.app.as_str())?),
        ("state".to_string(), owned(status.phase.as_str())?),
        ("generation".to_string(), owned(status.generation)?),
        ("pid".to_string(), owned(status.pid)?),
        (
            "instances".to_string(),
            owned(Variant::new(instance_entries(&status.instances)))?,
        ),
        (
            "listeners".to_string(),
            owned(Variant::new(listener_entries(status)))?,
        ),
        ("reloads".to_string(), owned(status.reloads)?),
        (
            "last_reload".to_string(),
            owned(status.last_reload.as_str())?,
        ),
        (
            "log_lines_dropped".to_string(),
            owned(status.log_lines_dropped)?,
        ),
        (
            "restart_attempt".to_string(),
            owned(status.pending_restart.map_or(0, |r| r.attempt))?,
        ),
        (
            "restart_usec".to_string(),
            owned(usec(status.pending_restart.map(|r| r.at)))?,
        ),
        (
            "config_file".to_string(),
            owned(
                status
                    .config_file
                    .as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default(),
            )?,
        ),
        (
            "config_revision".to_string(),
            owned(status.revision.number)?,
        ),
        (
            "config_digest".to_string(),
            owned(status.revision.digest.as_str())?,
        ),
        (
            "instance_configs".to_string(),
            owned(Variant::new(instance_configs(status)))?,
        ),
        (
            "instance_reports".to_string(),
            owned(Variant::new(instance_reports(status)))?,
        ),
        (
            "watch".to_string(),
            owned(Variant::new(status.watch.paths.clone()))?,
        ),
        ("watch_last".to_string(), owned(status.watch.last.as_str())?),
        (
            "instance_app_reports".to_string(),
            owned(Variant::new(app_reports(status)))?,
        ),
        ("reexecs".to_string(), owned(status.reexecs.count)?),
        (
            "reexec_error".to_string(),
            owned(status.reexecs.last_error.clone().unwrap_or_default())?,
        ),
        ("version".to_string(), owned(env!("CARGO_PKG_VERSION"))?),
    ]))
}
