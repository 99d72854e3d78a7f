//! Answers `org.ally.Cache1` and `org.ally.Atomic1` calls that arrive on the state
//! socket: one message in, its reply out, at once and without I/O. Access and
//! semantics are those of `state1` on the private socket (the same `Access`, the same
//! store); `tests/state.rs` runs one suite over both.
//!
//! Also answered, so that generic tools work: `org.freedesktop.DBus.Hello` (busctl
//! sends it first), `org.freedesktop.DBus.Peer.Ping` and
//! `org.freedesktop.DBus.Introspectable.Introspect`.

use std::sync::Arc;

use ally_core::state::calls::{self, ATOMIC, CACHE, on_state_socket};
use serde::Serialize;
use zbus::message::{Flags, Header, Type as MessageType};
use zbus::wire::DynamicType;
use zbus::{DBusError, Message};

use super::OBJECT_PATH;
use super::broker1::Access;
use super::caller::Role;
use super::errors::Error;
use super::state1::Refusal;

const DBUS: &str = "org.freedesktop.DBus";
const PEER: &str = "org.freedesktop.DBus.Peer";
const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";

pub struct StateCalls {
    access: Arc<Access>,
    /// What `Hello` answers: the connection's number, as a bus would.
    unique_name: String,
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
            Some(i) if on_state_socket(i) => self.call(message, i, member),
            Some(INTROSPECTABLE) if member == "Introspect" => reply(header, &introspection()),
            _ => Err(unknown(interface, member)),
        }
    }

    /// A call of the table, if the state socket serves it and the caller may make it.
    fn call(&self, message: &Message, interface: &str, member: &str) -> Answer {
        let entry = calls::find(interface, member).filter(|e| on_state_socket(e.interface));
        let Some(calls::Entry {
            answer: calls::Answer::Now(answer),
            requires,
            ..
        }) = entry
        else {
            return Err(unknown(Some(interface), member));
        };
        self.access.broker().metrics().state_call(interface);
        self.access.admit(self.role()?, *requires, member)?;
        Ok(answer(&self.access.broker().state().store, message)?)
    }

    fn role(&self) -> Result<super::caller::Role, Refusal> {
        self.access.private_role().ok_or_else(|| {
            Refusal::Ally(Error::failed(
                "the state socket has a peer without credentials".into(),
            ))
        })
    }
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
