//! `org.ally.Cache1`, `org.ally.Atomic1` and `org.ally.Locker1`: the application's
//! shared state (see `crate::state` and `docs/dbus-api.md`).
//!
//! There is no code per method here. Each interface implements zbus's `Interface` by
//! hand, generically over the table of `ally_core::state::calls`: a call is looked up
//! by its member (as the state socket does), the caller's role checked for what the
//! entry requires, and the entry decodes, applies and encodes. What an interface
//! introspects as is its file in `dbus/`, served as written. So adding a method is
//! its table entry plus its `<method>` in the XML; the table's tests check the two
//! agree, `tests/dbus.rs` checks the live broker against the files.

use std::collections::HashMap;
use std::fmt::Write;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ally_core::state::StateError;
use ally_core::state::calls::{
    self, ATOMIC, Answer, CACHE, CONNECTION_OWNER, Entry, Holder, LOCKER, Refused,
};
use zbus::export::async_trait::async_trait;
use zbus::message::{Flags, Header};
use zbus::names::{InterfaceName, MemberName};
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::{BoxDBusError, Connection, Message, ObjectServer, OwnedVariant, Variant, fdo};

use super::broker1::Access;
use super::errors::Error;
use crate::throttle::{self, Throttle};

static REFUSED_LOCKS: Throttle = Throttle::new(Duration::from_secs(1));

/// Why a state call got an error reply: one of Ally's, or a standard one.
pub enum Refusal {
    Ally(Error),
    Fdo(fdo::Error),
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal::Ally(e)
    }
}

impl From<Refused> for Refusal {
    fn from(e: Refused) -> Self {
        match e {
            Refused::Args(e) => Refusal::Fdo(fdo::Error::InvalidArgs(e.to_string())),
            Refused::State(error) | Refused::Held { error, .. } => Refusal::Ally(error.into()),
            Refused::Reply(e) => {
                tracing::warn!("cannot encode a reply to a state call: {e}");
                Refusal::Fdo(fdo::Error::Failed(e.to_string()))
            }
        }
    }
}

impl From<zbus::Error> for Refusal {
    fn from(e: zbus::Error) -> Self {
        Refusal::Fdo(fdo::Error::InvalidArgs(e.to_string()))
    }
}

/// One of the three interfaces: its name, its XML, and whether its calls may wait.
pub trait StateInterface: Send + Sync + 'static {
    const NAME: &'static str;
    /// Its file in `dbus/`.
    const XML: &'static str;
    /// Whether each call runs in a task of its own, so that one that waits holds up
    /// no other.
    const SPAWN: bool;
}

pub struct Cache;
pub struct Atomic;
pub struct Locker;

// Every method answers at once: run them in the dispatcher, without a task each.
impl StateInterface for Cache {
    const NAME: &'static str = CACHE;
    const XML: &'static str = include_str!("../../dbus/org.ally.Cache1.xml");
    const SPAWN: bool = false;
}

impl StateInterface for Atomic {
    const NAME: &'static str = ATOMIC;
    const XML: &'static str = include_str!("../../dbus/org.ally.Atomic1.xml");
    const SPAWN: bool = false;
}

// Lock calls may wait: each runs in a task of its own.
impl StateInterface for Locker {
    const NAME: &'static str = LOCKER;
    const XML: &'static str = include_str!("../../dbus/org.ally.Locker1.xml");
    const SPAWN: bool = true;
}

/// Serves the table's calls of interface `I`.
pub struct Served<I> {
    access: Arc<Access>,
    interface: PhantomData<fn() -> I>,
}

pub type Cache1 = Served<Cache>;
pub type Atomic1 = Served<Atomic>;
pub type Locker1 = Served<Locker>;

impl<I: StateInterface> Served<I> {
    pub fn new(access: Arc<Access>) -> Self {
        Served {
            access,
            interface: PhantomData,
        }
    }

    /// The reply to a call of `entry`, once the caller may make it.
    async fn answer(
        &self,
        entry: &Entry,
        conn: &Connection,
        call: &Message,
    ) -> Result<Message, Refusal> {
        let header = call.header();
        self.access.broker().metrics().state_call(I::NAME);
        let store = &self.access.broker().state().store;
        match entry.answer {
            Answer::Now(answer) => {
                self.access
                    .require(Some(&header), conn, entry.requires, entry.member)
                    .await?;
                Ok(answer(store, call)?)
            }
            Answer::Held(answer) => {
                let holder = self
                    .access
                    .lock_owner(Some(&header), conn, entry.member)
                    .await?;
                let result = answer(store, holder, call).await;
                if let Err(Refused::Held {
                    lock,
                    error: StateError::LimitExceeded(why),
                }) = &result
                {
                    refused_lock(entry.member, lock, holder, why);
                }
                Ok(result?)
            }
        }
    }
}

/// Logs a lock refused for a limit, at most once a second.
fn refused_lock(member: &str, lock: &str, holder: Holder, why: &str) {
    let Some(suppressed) = REFUSED_LOCKS.allow(Instant::now()) else {
        return;
    };
    let who = match holder.owner.checked_sub(CONNECTION_OWNER) {
        Some(conn) => format!("connection {conn}"),
        None => format!("instance {}", holder.owner),
    };
    tracing::warn!(
        "refused {member} of {lock:?} for {who}: {why}{}",
        throttle::more(suppressed)
    );
}

/// Sends `reply`, or the error it is, unless the caller asked for none.
pub async fn send_reply(
    conn: &Connection,
    header: &Header<'_>,
    reply: Result<Message, Refusal>,
) -> zbus::Result<()> {
    if header.primary().flags().contains(Flags::NO_REPLY_EXPECTED) {
        return Ok(());
    }
    match reply {
        Ok(reply) => conn.send(&reply).await,
        Err(Refusal::Ally(e)) => conn.reply_dbus_error(header, e).await,
        Err(Refusal::Fdo(e)) => conn.reply_dbus_error(header, e).await,
    }
}

/// The `<interface>` element of `xml`, re-indented to `level`.
fn interface_element(xml: &str, level: usize) -> String {
    let start = xml.find("<interface").unwrap_or(0);
    let end = xml
        .rfind("</interface>")
        .map_or(xml.len(), |e| e + "</interface>".len());
    let indent = &xml[xml[..start].rfind('\n').map_or(0, |n| n + 1)..start];
    let mut out = String::new();
    for line in xml[start..end].lines() {
        let line = line.strip_prefix(indent).unwrap_or(line);
        let _ = writeln!(out, "{:level$}{line}", "");
    }
    out
}

#[async_trait]
impl<I: StateInterface> Interface for Served<I> {
    fn name() -> InterfaceName<'static> {
        InterfaceName::from_static_str_unchecked(I::NAME)
    }

    fn spawn_tasks_for_methods(&self) -> bool {
        I::SPAWN
    }

    async fn get(
        &self,
        _property: &str,
        _server: &ObjectServer,
        _conn: &Connection,
        _header: Option<&Header<'_>>,
        _emitter: &SignalEmitter<'_>,
    ) -> Option<Result<OwnedVariant, BoxDBusError>> {
        None
    }

    async fn get_all(
        &self,
        _server: &ObjectServer,
        _conn: &Connection,
        _header: Option<&Header<'_>>,
        _emitter: &SignalEmitter<'_>,
    ) -> fdo::Result<HashMap<String, OwnedVariant>> {
        Ok(HashMap::new())
    }

    fn set<'call>(
        &'call self,
        _property: &'call str,
        _value: &'call Variant<'_>,
        _server: &'call ObjectServer,
        _conn: &'call Connection,
        _header: Option<&'call Header<'_>>,
        _emitter: &'call SignalEmitter<'_>,
    ) -> DispatchResult<'call> {
        DispatchResult::NotFound
    }

    async fn set_mut(
        &mut self,
        _property: &str,
        _value: &Variant<'_>,
        _server: &ObjectServer,
        _conn: &Connection,
        _header: Option<&Header<'_>>,
        _emitter: &SignalEmitter<'_>,
    ) -> Option<Result<(), BoxDBusError>> {
        None
    }

    fn call<'call>(
        &'call self,
        _server: &'call ObjectServer,
        conn: &'call Connection,
        call: &'call Message,
        member: MemberName<'call>,
    ) -> DispatchResult<'call> {
        let Some(entry) = calls::find(I::NAME, member.as_str()) else {
            return DispatchResult::NotFound;
        };
        DispatchResult::Async(Box::pin(async move {
            let reply = self.answer(entry, conn, call).await;
            send_reply(conn, &call.header(), reply)
                .await
                .map_err(|e| Box::new(fdo::Error::Failed(e.to_string())) as BoxDBusError)
        }))
    }

    fn call_mut<'call>(
        &'call mut self,
        _server: &'call ObjectServer,
        _conn: &'call Connection,
        _call: &'call Message,
        _member: MemberName<'call>,
    ) -> DispatchResult<'call> {
        DispatchResult::NotFound
    }

    fn introspect_to_writer(&self, writer: &mut dyn Write, level: usize) {
        let _ = writer.write_str(&interface_element(I::XML, level));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Broker;
    use crate::config::Config;
    use crate::dbus::OBJECT_PATH;
    use crate::dbus::broker1::Peer;
    use crate::dbus::peer::Identity;
    use ally_core::state::calls::{TABLE, disagreements};

    fn access() -> Arc<Access> {
        let config = Config::defaults(vec!["/bin/true".into()]);
        let run_as = crate::identity::RunAs::resolve(&config).expect("our own ids");
        let state = crate::state::State::new(&config.limits);
        let broker = Broker::new(
            "served",
            config,
            Default::default(),
            run_as,
            "unix:path=/nonexistent".into(),
            String::new(),
            state,
        )
        .expect("a broker without listeners");
        Access::new(broker, Peer::private(Identity::uid_only(0), 1))
    }

    fn served(interface: &dyn Interface, level: usize) -> String {
        let mut xml = String::new();
        interface.introspect_to_writer(&mut xml, level);
        xml
    }

    /// A client connected to the three interfaces, as the private socket serves them.
    async fn client() -> (Connection, Connection) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let access = access();
        let server = zbus::connection::Builder::unix_stream(theirs)
            .server(zbus::Guid::generate())
            .p2p()
            .serve_at(OBJECT_PATH, Cache1::new(access.clone()))
            .serve_at(OBJECT_PATH, Atomic1::new(access.clone()))
            .serve_at(OBJECT_PATH, Locker1::new(access))
            .build();
        let client = zbus::connection::Builder::unix_stream(ours).p2p().build();
        let (server, client) = tokio::join!(server, client);
        (server.unwrap(), client.unwrap())
    }

    async fn call<B>(
        conn: &Connection,
        interface: &str,
        member: &str,
        body: &B,
    ) -> Result<Message, String>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        conn.call_method(None::<&str>, OBJECT_PATH, Some(interface), member, body)
            .await
            .map_err(|e| match e {
                zbus::Error::MethodError(name, _, _) => name.to_string(),
                zbus::Error::FDO(e) => zbus::DBusError::name(&*e).to_string(),
                e => panic!("{interface}.{member}: {e}"),
            })
    }

    /// What is introspected is the XML file's element, and it agrees with the table.
    #[test]
    fn each_interface_introspects_as_its_file() {
        let access = access();
        let interfaces: [(&str, &str, Box<dyn Interface>); 3] = [
            (CACHE, Cache::XML, Box::new(Cache1::new(access.clone()))),
            (ATOMIC, Atomic::XML, Box::new(Atomic1::new(access.clone()))),
            (LOCKER, Locker::XML, Box::new(Locker1::new(access))),
        ];
        for (name, file, interface) in interfaces {
            let xml = served(&*interface, 2);
            assert_eq!(disagreements(name, &xml), Vec::<String>::new());
            assert!(xml.starts_with(&format!("  <interface name=\"{name}\">\n    <method ")));
            assert!(xml.ends_with("\n  </interface>\n"), "{xml}");
            let lines = |xml: &str| -> Vec<String> {
                let element =
                    &xml[xml.find("<interface").unwrap()..xml.find("</interface>").unwrap()];
                element.lines().map(|l| l.trim().to_string()).collect()
            };
            assert_eq!(lines(&xml), lines(file));
        }
    }

    /// Every entry of the table is dispatched to (an entry with arguments refuses an
    /// empty body as the entry's decoding does; one without answers), and nothing else.
    #[tokio::test]
    async fn every_entry_of_the_table_is_served_as_it_says() {
        let (_server, conn) = client().await;
        for entry in TABLE {
            let reply = call(&conn, entry.interface, entry.member, &()).await;
            if entry.arg_names.is_empty() {
                assert!(reply.is_ok(), "{entry:?}: {reply:?}");
            } else {
                assert_eq!(
                    reply.err().as_deref(),
                    Some("org.freedesktop.DBus.Error.InvalidArgs"),
                    "{entry:?}"
                );
            }
        }
        for interface in [CACHE, ATOMIC, LOCKER] {
            assert_eq!(
                call(&conn, interface, "Nothing", &())
                    .await
                    .err()
                    .as_deref(),
                Some("org.freedesktop.DBus.Error.UnknownMethod")
            );
        }
        call(&conn, CACHE, "Set", &("ns", "k", b"v".as_slice(), 0u64))
            .await
            .unwrap();
        let got = call(&conn, CACHE, "Get", &("ns", "k")).await.unwrap();
        assert_eq!(
            got.body().deserialize::<(bool, Vec<u8>)>().unwrap(),
            (true, b"v".to_vec())
        );
        let locked = call(&conn, LOCKER, "Lock", &("x", 0u64)).await.unwrap();
        assert!(locked.body().deserialize::<bool>().unwrap());
        assert_eq!(
            call(&conn, LOCKER, "ForceUnlock", &("",))
                .await
                .err()
                .as_deref(),
            Some("org.ally.Error.InvalidArgument")
        );
    }
}
