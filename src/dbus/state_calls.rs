//! Answers `org.ally.Cache1` and `org.ally.Atomic1` calls that arrive on the state
//! socket: one message in, its reply out, at once and without I/O. Access and
//! semantics are those of `state1` on the private socket (the same `Access`, the same
//! store); `tests/state.rs` runs one suite over both.
//!
//! Also answered, so that generic tools work: `org.freedesktop.DBus.Hello` (busctl
//! sends it first), `org.freedesktop.DBus.Peer.Ping` and
//! `org.freedesktop.DBus.Introspectable.Introspect`.

use std::sync::Arc;

use serde::Serialize;
use serde::de::Deserialize;
use zbus::message::{Body, Flags, Header, Type as MessageType};
use zbus::wire::DynamicType;
use zbus::{DBusError, Message};

use super::OBJECT_PATH;
use super::broker1::Access;
use super::caller::Role;
use super::errors::Error;

const CACHE: &str = "org.ally.Cache1";
const ATOMIC: &str = "org.ally.Atomic1";
const DBUS: &str = "org.freedesktop.DBus";
const PEER: &str = "org.freedesktop.DBus.Peer";
const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";

pub struct StateCalls {
    access: Arc<Access>,
    /// What `Hello` answers: the connection's number, as a bus would.
    unique_name: String,
}

enum Refusal {
    Ally(Error),
    Fdo(zbus::fdo::Error),
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal::Ally(e)
    }
}

impl From<ally_core::state::StateError> for Refusal {
    fn from(e: ally_core::state::StateError) -> Self {
        Refusal::Ally(e.into())
    }
}

impl From<zbus::Error> for Refusal {
    fn from(e: zbus::Error) -> Self {
        Refusal::Fdo(zbus::fdo::Error::InvalidArgs(e.to_string()))
    }
}

type Answer = Result<Message, Refusal>;

impl StateCalls {
    pub fn new(access: Arc<Access>, connection: u64) -> StateCalls {
        StateCalls {
            access,
            unique_name: format!(":ally.{connection}"),
        }
    }

    /// Whether the caller may call nothing here (it is no instance and no admin).
    pub fn denied(&self) -> bool {
        self.access.private_role() == Some(Role::Denied)
    }

    /// The reply to `message`: `None` for anything but a method call, or when the
    /// caller asked for no reply.
    pub fn answer(&self, message: &Message) -> Option<Message> {
        let header = message.header();
        if header.message_type() != MessageType::MethodCall {
            return None;
        }
        let reply = match self.dispatch(message, &header) {
            Ok(reply) => Ok(reply),
            Err(Refusal::Ally(e)) => e.create_reply(&header),
            Err(Refusal::Fdo(e)) => e.create_reply(&header),
        };
        let reply = reply.unwrap_or_else(|e| {
            tracing::warn!("cannot encode a reply on the state socket: {e}");
            zbus::fdo::Error::Failed(e.to_string())
                .create_reply(&header)
                .expect("a plain error reply encodes")
        });
        (!header.primary().flags().contains(Flags::NO_REPLY_EXPECTED)).then_some(reply)
    }

    fn dispatch(&self, message: &Message, header: &Header<'_>) -> Answer {
        let interface = header.interface().map(|i| i.as_str());
        let member = header.member().map(|m| m.as_str()).unwrap_or_default();
        let path = header.path().map(|p| p.as_str());
        match (interface, member) {
            (Some(DBUS), "Hello") => return reply(header, &self.unique_name),
            (Some(PEER), "Ping") => return reply(header, &()),
            _ => {}
        }
        if path != Some(OBJECT_PATH) {
            return Err(Refusal::Fdo(zbus::fdo::Error::UnknownObject(format!(
                "the state socket serves only {OBJECT_PATH}, not {}",
                path.unwrap_or("(none)")
            ))));
        }
        match interface {
            Some(CACHE) => self.cache(&message.body(), header, member),
            Some(ATOMIC) => self.atomic(&message.body(), header, member),
            Some(INTROSPECTABLE) if member == "Introspect" => reply(header, &introspection()),
            _ => Err(unknown(interface, member)),
        }
    }

    fn cache(&self, body: &Body, header: &Header<'_>, member: &str) -> Answer {
        let store = &self.access.broker().state().store;
        match member {
            "Set" => {
                self.write(member)?;
                let (ns, key, value, ttl): (&str, &str, Vec<u8>, u64) = args(body)?;
                reply(
                    header,
                    &store.with(|s, now| s.cache.set(ns, key, value, ttl, now))?,
                )
            }
            "Get" => {
                self.read(member)?;
                let (ns, key): (&str, &str) = args(body)?;
                let value = store.with(|s, now| s.cache.get(ns, key, now))?;
                reply(header, &(value.is_some(), value.unwrap_or_default()))
            }
            "Delete" => {
                self.write(member)?;
                let (ns, key): (&str, &str) = args(body)?;
                reply(header, &store.with(|s, now| s.cache.delete(ns, key, now))?)
            }
            "Exists" => {
                self.read(member)?;
                let (ns, key): (&str, &str) = args(body)?;
                reply(header, &store.with(|s, now| s.cache.exists(ns, key, now))?)
            }
            "Keys" => {
                self.read(member)?;
                let ns: &str = args(body)?;
                reply(header, &store.with(|s, now| s.cache.keys(ns, now))?)
            }
            "Count" => {
                self.read(member)?;
                let ns: &str = args(body)?;
                reply(header, &store.with(|s, now| s.cache.count(ns, now))?)
            }
            "Flush" => {
                self.write(member)?;
                let ns: &str = args(body)?;
                reply(header, &store.with(|s, now| s.cache.flush(ns, now))?)
            }
            "SetIfAbsent" => {
                self.write(member)?;
                let (ns, key, value, ttl): (&str, &str, Vec<u8>, u64) = args(body)?;
                reply(
                    header,
                    &store.with(|s, now| s.cache.set_if_absent(ns, key, value, ttl, now))?,
                )
            }
            "CompareAndSwap" => {
                self.write(member)?;
                let (ns, key, old, new, ttl): (&str, &str, Vec<u8>, Vec<u8>, u64) = args(body)?;
                reply(
                    header,
                    &store.with(|s, now| s.cache.compare_and_swap(ns, key, &old, new, ttl, now))?,
                )
            }
            _ => Err(unknown(Some(CACHE), member)),
        }
    }

    fn atomic(&self, body: &Body, header: &Header<'_>, member: &str) -> Answer {
        let store = &self.access.broker().state().store;
        match member {
            "Add" => {
                self.write(member)?;
                let (name, delta): (&str, i64) = args(body)?;
                reply(header, &store.with(|s, _| s.atomics.add(name, delta))?)
            }
            "Load" => {
                self.read(member)?;
                let name: &str = args(body)?;
                reply(header, &store.with(|s, _| s.atomics.load(name))?)
            }
            "Store" => {
                self.write(member)?;
                let (name, value): (&str, i64) = args(body)?;
                reply(header, &store.with(|s, _| s.atomics.store(name, value))?)
            }
            "Swap" => {
                self.write(member)?;
                let (name, value): (&str, i64) = args(body)?;
                reply(header, &store.with(|s, _| s.atomics.swap(name, value))?)
            }
            "CompareAndSwap" => {
                self.write(member)?;
                let (name, old, new): (&str, i64, i64) = args(body)?;
                reply(
                    header,
                    &store.with(|s, _| s.atomics.compare_and_swap(name, old, new))?,
                )
            }
            "List" => {
                self.read(member)?;
                reply(header, &store.with(|s, _| s.atomics.list()))
            }
            _ => Err(unknown(Some(ATOMIC), member)),
        }
    }

    fn write(&self, method: &str) -> Result<(), Refusal> {
        let role = self.role()?;
        self.access.admit_admin(role, method)?;
        Ok(())
    }

    fn read(&self, method: &str) -> Result<(), Refusal> {
        let role = self.role()?;
        Ok(self.access.admit_reader(role, method)?)
    }

    fn role(&self) -> Result<super::caller::Role, Refusal> {
        self.access.private_role().ok_or_else(|| {
            Refusal::Ally(Error::failed(
                "the state socket has a peer without credentials".into(),
            ))
        })
    }
}

fn args<'b, T>(body: &'b Body) -> Result<T, Refusal>
where
    T: Deserialize<'b> + zbus::wire::Type,
{
    body.deserialize::<T>().map_err(Refusal::from)
}

fn reply<B: Serialize + DynamicType>(header: &Header<'_>, body: &B) -> Answer {
    Ok(Message::method_return(header).build(body)?)
}

fn unknown(interface: Option<&str>, member: &str) -> Refusal {
    Refusal::Fdo(zbus::fdo::Error::UnknownMethod(format!(
        "no method {member:?} in {}: the state socket serves {CACHE} and {ATOMIC}; \
         org.ally.Broker1 and org.ally.Locker1 are on the private socket (bus)",
        interface.unwrap_or("(no interface)")
    )))
}

/// The two interfaces as their XML files describe them, in one node.
fn introspection() -> String {
    let interface = |xml: &'static str| {
        let start = xml.find("<interface").unwrap_or(0);
        let end = xml
            .rfind("</interface>")
            .map_or(xml.len(), |e| e + "</interface>".len());
        &xml[start..end]
    };
    format!(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node name=\"{OBJECT_PATH}\">\n  {}\n  {}\n</node>\n",
        interface(include_str!("../../dbus/org.ally.Cache1.xml")),
        interface(include_str!("../../dbus/org.ally.Atomic1.xml")),
    )
}
