//! A message the broker cannot read is answered, not dropped in silence: a method
//! call that expects a reply gets `org.freedesktop.DBus.Error.InvalidArgs` saying
//! why (or, when it names no interface, `UnknownInterface` saying what to name),
//! its connection stays open, and the log gets one line a second about such
//! messages. Only a message too long or with no D-Bus framing ends a connection
//! (`framing`), because the stream cannot be followed past it.

use std::num::NonZeroU32;

use ally_core::wire::FIXED_HEADER;
use zbus::message::{Flags, Type as MessageType};
use zbus::wire::Endian;
use zbus::{DBusError, Message};

/// The error reply to the unreadable message whose fixed header is `fixed`, when it
/// is a method call that expects one.
pub fn reply(fixed: &[u8; FIXED_HEADER], reason: &str) -> Option<Message> {
    let endian = match fixed[0] {
        b'l' => Endian::Little,
        b'B' => Endian::Big,
        _ => return None,
    };
    if fixed[1] != MessageType::MethodCall as u8
        || Flags::from_bits_truncate(fixed[2]).contains(Flags::NO_REPLY_EXPECTED)
    {
        return None;
    }
    let word = [fixed[8], fixed[9], fixed[10], fixed[11]];
    let serial = NonZeroU32::new(match endian {
        Endian::Little => u32::from_le_bytes(word),
        Endian::Big => u32::from_be_bytes(word),
    })?;
    // The reply names the call only by its serial: a stand-in call carries it.
    let call = Message::method_call("/", "Unreadable")
        .endian(endian)
        .serial(serial)
        .build(&())
        .ok()?;
    let error =
        zbus::fdo::Error::InvalidArgs(format!("the broker could not read this message: {reason}"));
    error.create_reply(&call.header()).ok()
}

/// For a method call that names no interface, which the D-Bus specification allows
/// but zbus answers only with a bare "Missing interface": the error that says what
/// to name, if the caller wants a reply. `None` for any other message.
pub fn missing_interface(message: &Message) -> Option<Option<Message>> {
    let header = message.header();
    if header.message_type() != MessageType::MethodCall || header.interface().is_some() {
        return None;
    }
    if header.primary().flags().contains(Flags::NO_REPLY_EXPECTED) {
        return Some(None);
    }
    let member = header.member().map_or("", |m| m.as_str());
    let error = zbus::fdo::Error::UnknownInterface(format!(
        "the call of {member:?} names no interface: name it, e.g. org.ally.Broker1.{member} \
         (the broker serves org.ally.Broker1, org.ally.Cache1, org.ally.Atomic1, org.ally.Locker1 \
         and the org.freedesktop.DBus interfaces Properties, Introspectable and Peer)"
    ));
    Some(error.create_reply(&header).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(msg: &Message) -> [u8; FIXED_HEADER] {
        msg.data()[..FIXED_HEADER].try_into().unwrap()
    }

    #[test]
    fn a_call_is_answered_with_its_serial_and_the_reason() {
        for endian in [Endian::Little, Endian::Big] {
            let call = Message::method_call("/org/ally", "Status")
                .endian(endian)
                .serial(NonZeroU32::new(0x0102_0304).unwrap())
                .build(&())
                .unwrap();
            let reply = reply(&fixed(&call), "invalid destination").unwrap();
            let header = reply.header();
            assert_eq!(header.message_type(), MessageType::Error);
            assert_eq!(header.reply_serial().unwrap().get(), 0x0102_0304);
            assert_eq!(
                header.error_name().unwrap().as_str(),
                "org.freedesktop.DBus.Error.InvalidArgs"
            );
            let text: String = reply.body().deserialize().unwrap();
            assert_eq!(
                text,
                "the broker could not read this message: invalid destination"
            );
        }
    }

    #[test]
    fn a_call_without_an_interface_is_told_to_name_one() {
        let call = Message::method_call("/org/ally", "Status")
            .build(&())
            .unwrap();
        let reply = missing_interface(&call).unwrap().unwrap();
        assert_eq!(
            reply.header().error_name().unwrap().as_str(),
            "org.freedesktop.DBus.Error.UnknownInterface"
        );
        let text: String = reply.body().deserialize().unwrap();
        assert!(text.contains("e.g. org.ally.Broker1.Status"), "{text}");
        let named = Message::method_call("/org/ally", "Status")
            .interface("org.ally.Broker1")
            .build(&())
            .unwrap();
        assert!(missing_interface(&named).is_none());
    }

    #[test]
    fn no_reply_where_none_is_expected() {
        let signal = Message::signal("/org/ally", "org.ally.X", "Y")
            .build(&())
            .unwrap();
        assert!(reply(&fixed(&signal), "x").is_none());
        let quiet = Message::method_call("/org/ally", "Ready")
            .with_flags(Flags::NO_REPLY_EXPECTED)
            .build(&())
            .unwrap();
        assert!(reply(&fixed(&quiet), "x").is_none());
        assert!(reply(&[0; FIXED_HEADER], "x").is_none());
    }
}
