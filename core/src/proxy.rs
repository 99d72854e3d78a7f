//! The broker's D-Bus interface `org.ally.Broker1` (see `docs/dbus-api.md`), as a zbus
//! proxy, and [`StateProxies`], which makes any call of the state table
//! ([`state::calls`](crate::state::calls)) over D-Bus.
//!
//! `ally_client::Ally` is the convenient way for an app instance; this module is for
//! tools that talk to a broker directly (the `ally` command itself uses it).
//!
//! Over the broker's private socket (a peer-to-peer connection, see [`connect`]) a proxy
//! must not cache properties: the broker's signals there carry no sender, so a cache
//! would never learn of changes. [`connect`] builds such a proxy.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use zbus::proxy::CacheProperties;
use zbus::{OwnedVariant, Type, Variant};

use zbus::Result;

use crate::report::AppReport;
use crate::state::calls::Call;

/// Object path the broker serves.
pub const PATH: &str = "/org/ally";
/// Interface name of the broker.
pub const INTERFACE: &str = "org.ally.Broker1";

/// `org.ally.Broker1`.
#[zbus::proxy(
    interface = "org.ally.Broker1",
    default_path = "/org/ally",
    async_name = "BrokerProxy"
)]
pub trait Broker {
    /// Returns (a duplicate of) the listening socket for `network` and `address`.
    fn listen(&self, network: &str, address: &str) -> zbus::Result<zbus::OwnedFd>;

    /// `Listen` with options used when the socket is created: `backlog` (u),
    /// `reuse_port` (b), `mode` (u).
    fn listen_with(
        &self,
        network: &str,
        address: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<zbus::OwnedFd>;

    /// Drops the calling instance's reference to a socket.
    fn close(&self, network: &str, address: &str) -> zbus::Result<()>;

    /// The calling instance serves.
    fn ready(&self) -> zbus::Result<()>;

    /// What the calling instance says about itself: `version` (s), `commit` (s),
    /// `tasks` (u), `description` (s); each call replaces the keys it names.
    fn report(&self, report: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    /// Starts a new generation; returns its number once it is ready.
    fn reload(&self) -> zbus::Result<u64>;

    /// A dictionary: see [`Status`] for its keys.
    fn status(&self) -> zbus::Result<HashMap<String, OwnedVariant>>;

    /// Runs the broker's binary again in place, carrying everything. No reply
    /// comes on success: the connection closes with the exec.
    fn reexecute(&self) -> zbus::Result<()>;

    /// Application name.
    #[zbus(property)]
    fn app(&self) -> zbus::Result<String>;

    /// `starting`, `running`, `reloading`, `restarting` or `stopping`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

    /// Generation of the current instance, 0 before any is ready.
    #[zbus(property)]
    fn generation(&self) -> zbus::Result<u64>;

    /// Every instance not yet reaped.
    #[zbus(property)]
    fn instances(&self) -> zbus::Result<Vec<Instance>>;

    /// The open sockets.
    #[zbus(property)]
    fn listeners(&self) -> zbus::Result<Vec<Listener>>;

    /// What each instance reported with `Report`, by instance id.
    #[zbus(property)]
    fn reports(&self) -> zbus::Result<HashMap<u64, HashMap<String, OwnedVariant>>>;

    /// A reload or crash restart ended.
    #[zbus(signal)]
    fn reload_finished(&self, generation: u64, success: bool, message: String) -> zbus::Result<()>;

    /// An instance changed state.
    #[zbus(signal)]
    fn instance_state_changed(&self, id: u64, state: String) -> zbus::Result<()>;

    /// A phase of generation `generation`'s launch: `started`, `listening`, `status`,
    /// `ready`, `draining`, `done` (see docs/dbus-api.md for each detail's keys).
    #[zbus(signal)]
    fn reload_progress(
        &self,
        generation: u64,
        phase: String,
        detail: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<()>;

    /// An instance's `Report` changed what it reports; `report` holds every key it
    /// reported so far.
    #[zbus(signal)]
    fn instance_reported(
        &self,
        id: u64,
        generation: u64,
        report: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<()>;
}

/// One entry of the `Instances` property, D-Bus type `(ttustt)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, zbus::Variant)]
pub struct Instance {
    pub id: u64,
    pub generation: u64,
    pub pid: u32,
    /// `starting`, `ready`, `draining` or `exited`.
    pub state: String,
    /// Microseconds since the Unix epoch.
    pub started_usec: u64,
    /// Microseconds since the Unix epoch; 0 if never ready.
    pub ready_usec: u64,
}

/// One entry of the `Listeners` property, D-Bus type `(ssu)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, zbus::Variant)]
pub struct Listener {
    pub network: String,
    /// The bound address (the real port for a port-0 request).
    pub address: String,
    pub references: u32,
}

/// One entry of `Status()`'s `instance_configs`, D-Bus type `(tts)`: the config
/// revision an instance was started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, zbus::Variant)]
pub struct InstanceConfig {
    /// The instance's id, as in [`Instance::id`].
    pub id: u64,
    pub revision: u64,
    /// A digest of the config file's text; empty without a config file.
    pub digest: String,
}

/// One entry of `Status()`'s `instance_reports`, D-Bus type `(tsbiu)`: what an
/// instance said on its notification socket (`ready = "notify"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, zbus::Variant)]
pub struct InstanceReport {
    /// The instance's id, as in [`Instance::id`].
    pub id: u64,
    /// Its last `STATUS=` text; empty if none.
    pub status: String,
    /// It sent `STOPPING=1`.
    pub stopping: bool,
    /// Its `ERRNO=`; -1 if none.
    pub errno: i32,
    /// The pid `MAINPID=` named; 0 if none.
    pub main_pid: u32,
}

/// One entry of `Status()`'s `instance_app_reports` (D-Bus `a{ta{sv}}`, by instance
/// id): what an instance said with `Report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceAppReport {
    /// The instance's id, as in [`Instance::id`].
    pub id: u64,
    #[serde(flatten)]
    pub report: AppReport,
}

/// The reply of `Status()`, typed. Keys the broker does not send keep their default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub app: String,
    pub state: String,
    pub generation: u64,
    /// The broker's pid.
    pub pid: u32,
    pub instances: Vec<Instance>,
    pub listeners: Vec<Listener>,
    /// Successful reloads.
    pub reloads: u64,
    /// Empty, or the last reload's result message.
    pub last_reload: String,
    /// The attempt number of a crash restart waiting for its back-off (1 for the
    /// first since the app last recovered); 0 when none is pending.
    #[serde(default)]
    pub restart_attempt: u32,
    /// When that restart runs, in microseconds since the Unix epoch; 0 when none
    /// is pending.
    #[serde(default)]
    pub restart_usec: u64,
    /// The config file the broker reads again at every reload; empty when it runs
    /// on the built-in defaults.
    #[serde(default)]
    pub config_file: String,
    /// The revision of the config the broker's next generation starts with: 1 for
    /// the one `ally run` read, bumped by each reload that finds the file changed.
    #[serde(default)]
    pub config_revision: u64,
    /// A digest of that config's text; empty without a config file.
    #[serde(default)]
    pub config_digest: String,
    /// The config revision each instance was started with.
    #[serde(default)]
    pub instance_configs: Vec<InstanceConfig>,
    /// What instances said on their notification sockets, for those that did.
    #[serde(default)]
    pub instance_reports: Vec<InstanceReport>,
    /// With `watch`: each watched path, with " -> " and where it ends if that
    /// is elsewhere; empty when nothing is watched.
    #[serde(default)]
    pub watch: Vec<String>,
    /// The last change the watch reloaded for, and what came of it.
    #[serde(default)]
    pub watch_last: String,
    /// What instances said with `Report`, for those that did, by instance id.
    #[serde(default)]
    pub instance_app_reports: Vec<InstanceAppReport>,
    /// Lines of the instances' stdout and stderr lost since the broker started
    /// (journald too slow or stopped, the broker's queue full).
    #[serde(default)]
    pub log_lines_dropped: u64,
    /// Times the broker re-executed itself since `ally run` started.
    #[serde(default)]
    pub reexecs: u64,
    /// Why the last re-exec failed, if it did; empty otherwise.
    #[serde(default)]
    pub reexec_error: String,
    /// The broker binary's version.
    #[serde(default)]
    pub version: String,
}

impl Status {
    /// Reads the dictionary `Status()` returns. Unknown keys are ignored so a newer broker
    /// can add some; a known key with the wrong type is an error.
    pub fn from_dict(dict: HashMap<String, OwnedVariant>) -> Result<Status> {
        let mut status = Status::default();
        for (key, value) in dict {
            match key.as_str() {
                "app" => status.app = field(&key, value)?,
                "state" => status.state = field(&key, value)?,
                "generation" => status.generation = field(&key, value)?,
                "pid" => status.pid = field(&key, value)?,
                "reloads" => status.reloads = field(&key, value)?,
                "last_reload" => status.last_reload = field(&key, value)?,
                "instances" => status.instances = field(&key, value)?,
                "listeners" => status.listeners = field(&key, value)?,
                "restart_attempt" => status.restart_attempt = field(&key, value)?,
                "restart_usec" => status.restart_usec = field(&key, value)?,
                "config_file" => status.config_file = field(&key, value)?,
                "config_revision" => status.config_revision = field(&key, value)?,
                "config_digest" => status.config_digest = field(&key, value)?,
                "instance_configs" => status.instance_configs = field(&key, value)?,
                "instance_reports" => status.instance_reports = field(&key, value)?,
                "watch" => status.watch = field(&key, value)?,
                "watch_last" => status.watch_last = field(&key, value)?,
                "log_lines_dropped" => status.log_lines_dropped = field(&key, value)?,
                "reexecs" => status.reexecs = field(&key, value)?,
                "reexec_error" => status.reexec_error = field(&key, value)?,
                "version" => status.version = field(&key, value)?,
                "instance_app_reports" => {
                    status.instance_app_reports = app_reports(field(&key, value)?)?
                }
                _ => {}
            }
        }
        Ok(status)
    }
}

/// The reports of `instance_app_reports` or the `Reports` property, by instance id.
pub fn app_reports(
    by_id: HashMap<u64, HashMap<String, OwnedVariant>>,
) -> Result<Vec<InstanceAppReport>> {
    let mut reports = by_id
        .into_iter()
        .map(|(id, dict)| {
            AppReport::from_broker(&dict)
                .map(|report| InstanceAppReport { id, report })
                .map_err(|e| zbus::Error::Failure(format!("instance {id}'s report: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    reports.sort_by_key(|r| r.id);
    Ok(reports)
}

fn field<T>(key: &str, value: OwnedVariant) -> Result<T>
where
    T: TryFrom<OwnedVariant>,
    T::Error: Into<zbus::Error>,
{
    T::try_from(value).map_err(|e| {
        zbus::Error::Failure(format!(
            "Status: key {key:?} has an unexpected type: {}",
            e.into()
        ))
    })
}

/// The well-known bus name of `app`'s broker on the system (or session) bus:
/// `org.ally.<app>`, with characters a bus name cannot hold replaced by `_`.
pub fn bus_name(app: &str) -> String {
    let mut name = String::from("org.ally.");
    for (i, element) in app.split('.').enumerate() {
        if i > 0 {
            name.push('.');
        }
        if element.is_empty() || element.starts_with(|c: char| c.is_ascii_digit()) {
            name.push('_');
        }
        name.extend(element.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        }));
    }
    name.truncate(255);
    name
}

/// Connects to a broker's private socket (`unix:path=...`, a peer-to-peer D-Bus
/// connection) and returns a proxy on it that does not cache properties.
///
/// `app` only names the destination of the messages; on a peer-to-peer connection the
/// broker answers whatever it is.
pub async fn connect(address: &str, app: Option<&str>) -> Result<BrokerProxy<'static>> {
    let conn = zbus::connection::Builder::address(address)
        .p2p()
        .build()
        .await?;
    proxy_on(&conn, app).await
}

/// A non-caching proxy for the broker on an existing connection.
pub async fn proxy_on(conn: &zbus::Connection, app: Option<&str>) -> Result<BrokerProxy<'static>> {
    BrokerProxy::builder(conn)
        .destination(destination(app))
        .cache_properties(CacheProperties::No)
        .build()
        .await
}

fn destination(app: Option<&str>) -> String {
    app.map_or_else(|| "org.ally.Broker".to_string(), bus_name)
}

/// The shared-state interfaces on one connection: any call of
/// [`state::calls`](crate::state::calls) made over D-Bus.
#[derive(Debug, Clone)]
pub struct StateProxies {
    conn: zbus::Connection,
    destination: String,
}

impl StateProxies {
    pub async fn on(conn: &zbus::Connection, app: Option<&str>) -> Result<StateProxies> {
        Ok(StateProxies {
            conn: conn.clone(),
            destination: destination(app),
        })
    }

    /// Makes the call `C` and waits for its reply; an error reply is
    /// [`zbus::Error::MethodError`].
    pub async fn call<C: Call>(&self, args: C::Args<'_>) -> Result<C::Reply> {
        self.call_ref::<C>(&args).await
    }

    /// [`call`](Self::call) with the arguments borrowed, so that they can be sent again
    /// (the client repeats some calls on a new connection).
    pub async fn call_ref<C: Call>(&self, args: &C::Args<'_>) -> Result<C::Reply> {
        let reply = self
            .conn
            .call_method(
                Some(self.destination.as_str()),
                PATH,
                Some(C::INTERFACE),
                C::MEMBER,
                args,
            )
            .await?;
        reply.body().deserialize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_signatures_match_the_interface() {
        assert_eq!(Instance::SIGNATURE, "(ttustt)");
        assert_eq!(Listener::SIGNATURE, "(ssu)");
        assert_eq!(<Vec<Instance>>::SIGNATURE, "a(ttustt)");
        assert_eq!(<Vec<InstanceConfig>>::SIGNATURE, "a(tts)");
    }

    #[test]
    fn bus_names_are_valid() {
        assert_eq!(bus_name("myapp"), "org.ally.myapp");
        assert_eq!(bus_name("my-app"), "org.ally.my-app");
        assert_eq!(bus_name("1web"), "org.ally._1web");
        assert_eq!(bus_name("a b.c"), "org.ally.a_b.c");
        for app in ["myapp", "1web", "a b.c", "x..y", "é"] {
            zbus::names::WellKnownName::try_from(bus_name(app))
                .unwrap_or_else(|e| panic!("{app}: {e}"));
        }
    }

    #[test]
    fn status_reads_the_dictionary() {
        let mut dict: HashMap<String, OwnedVariant> = HashMap::new();
        let put = |d: &mut HashMap<String, OwnedVariant>, k: &str, v: Variant<'_>| {
            d.insert(k.to_string(), v.try_into().unwrap());
        };
        put(&mut dict, "app", Variant::from("web"));
        put(&mut dict, "generation", Variant::from(3u64));
        put(&mut dict, "pid", Variant::from(42u32));
        put(&mut dict, "future_key", Variant::from(true));
        let instances = vec![Instance {
            id: 7,
            generation: 3,
            pid: 99,
            state: "ready".into(),
            started_usec: 1,
            ready_usec: 2,
        }];
        put(&mut dict, "instances", Variant::from(instances.clone()));
        let configs = vec![InstanceConfig {
            id: 7,
            revision: 2,
            digest: "cbf29ce484222325".into(),
        }];
        put(
            &mut dict,
            "instance_configs",
            Variant::from(configs.clone()),
        );
        put(&mut dict, "config_revision", Variant::from(2u64));
        let report = AppReport {
            version: Some("1.4".into()),
            tasks: Some(3),
            ..AppReport::default()
        };
        let mut newer = report.to_dict();
        newer.insert("future".into(), Variant::from(1u8).try_into().unwrap());
        put(
            &mut dict,
            "instance_app_reports",
            Variant::from(HashMap::from([(7u64, newer)])),
        );
        let status = Status::from_dict(dict).unwrap();
        assert_eq!(
            status.instance_app_reports,
            vec![InstanceAppReport { id: 7, report }]
        );
        assert_eq!(status.instance_configs, configs);
        assert_eq!(status.config_revision, 2);
        assert_eq!(status.app, "web");
        assert_eq!(status.generation, 3);
        assert_eq!(status.pid, 42);
        assert_eq!(status.instances, instances);
        assert!(status.listeners.is_empty());

        let mut bad: HashMap<String, OwnedVariant> = HashMap::new();
        put(&mut bad, "generation", Variant::from("three"));
        let err = Status::from_dict(bad).unwrap_err().to_string();
        assert!(err.contains("generation"), "{err}");
    }
}
