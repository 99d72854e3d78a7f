//! The D-Bus wire as the broker's state socket speaks it: framing of whole messages
//! and the client's side of the `EXTERNAL` handshake. Shared by the broker, which
//! serves `org.ally.Cache1` and `org.ally.Atomic1` there, and by this crate's direct
//! connection to it. The messages themselves are zbus [`Message`]s.

use std::io;

use zbus::Message;
use zbus::wire::Endian;
use zbus::wire::serialized::{Context, Data};

/// The fixed part of every message: endianness, type, flags, version, body length,
/// serial, and the length of the header fields array.
pub const FIXED_HEADER: usize = 16;
/// The D-Bus specification's limit on a message.
pub const MAX_MESSAGE: usize = 128 << 20;

/// The whole length of the message that starts with `fixed`.
pub fn message_len(fixed: &[u8; FIXED_HEADER]) -> io::Result<usize> {
    let word = |at: usize| {
        let bytes = [fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]];
        match fixed[0] {
            b'l' => Ok(u32::from_le_bytes(bytes) as usize),
            b'B' => Ok(u32::from_be_bytes(bytes) as usize),
            other => Err(invalid(format!(
                "not a D-Bus message: endianness byte {other:#04x}"
            ))),
        }
    };
    let body = word(4)?;
    let fields = word(12)?;
    let header = (FIXED_HEADER + fields).next_multiple_of(8);
    let len = header.saturating_add(body);
    if len > MAX_MESSAGE {
        return Err(invalid(format!(
            "a message of {len} bytes is over the D-Bus limit of {MAX_MESSAGE}"
        )));
    }
    Ok(len)
}

/// The message held by `bytes`, exactly one whole message as [`message_len`] measured.
/// Clients that name no destination by sending an empty one (godbus's
/// `conn.Object("", path)`) are understood: on a peer-to-peer connection there is no
/// one else to send to, and zbus would refuse the message (see
/// [`without_empty_destination`]).
pub fn decode(bytes: Vec<u8>) -> zbus::Result<Message> {
    let bytes = without_empty_destination(bytes);
    let endian = if bytes.first() == Some(&b'B') {
        Endian::Big
    } else {
        Endian::Little
    };
    let data = Data::new(bytes, Context::new(endian, 0));
    // SAFETY: zbus's own socket reader makes every message it receives from the
    // peer's raw bytes through this same constructor (`from_raw_parts`), which
    // parses and checks the header; the body is checked against its signature when
    // it is deserialized. `from_bytes` is unsafe only in that the bytes come from
    // outside zbus, which is equally true of a socket's.
    unsafe { Message::from_bytes(data) }
}

/// The header field code of `DESTINATION`.
const DESTINATION: u8 = 6;

/// `bytes`, one whole message, without its `DESTINATION` header field when that holds
/// the empty string — which is no valid bus name, so zbus refuses the whole message,
/// while some clients send it to mean "none". Anything else, including bytes that do
/// not parse, is returned as it is, for the decoder to judge.
pub fn without_empty_destination(bytes: Vec<u8>) -> Vec<u8> {
    let Some(cut) = empty_destination(&bytes) else {
        return bytes;
    };
    let little = bytes[0] == b'l';
    let old_fields = read_u32(&bytes, 12, little).unwrap_or(0) as usize;
    let body = (FIXED_HEADER + old_fields).next_multiple_of(8);
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..cut.start]);
    out.extend_from_slice(&bytes[cut.end..FIXED_HEADER + old_fields]);
    let fields = (out.len() - FIXED_HEADER) as u32;
    let fields = if little {
        fields.to_le_bytes()
    } else {
        fields.to_be_bytes()
    };
    out[12..16].copy_from_slice(&fields);
    out.resize(out.len().next_multiple_of(8), 0);
    out.extend_from_slice(&bytes[body..]);
    out
}

/// The bytes to cut for an empty `DESTINATION` field: from its start to the next
/// field's, or, when it is the last, from the end of the field before it.
fn empty_destination(bytes: &[u8]) -> Option<std::ops::Range<usize>> {
    let little = match bytes.first()? {
        b'l' => true,
        b'B' => false,
        _ => return None,
    };
    let end = FIXED_HEADER.checked_add(read_u32(bytes, 12, little)? as usize)?;
    let body = end.next_multiple_of(8);
    if body > bytes.len() {
        return None;
    }
    let (mut at, mut previous_end) = (FIXED_HEADER, FIXED_HEADER);
    while at < end {
        at = at.next_multiple_of(8);
        let code = *bytes.get(at)?;
        let signature_len = *bytes.get(at + 1)? as usize;
        let signature = bytes.get(at + 2..at + 2 + signature_len)?;
        let value = at + 2 + signature_len + 1;
        let (value_end, empty_string) = match signature {
            b"s" | b"o" => {
                let value = value.next_multiple_of(4);
                let len = read_u32(bytes, value, little)? as usize;
                (value.checked_add(4 + len + 1)?, len == 0)
            }
            b"g" => (value.checked_add(*bytes.get(value)? as usize + 2)?, false),
            b"u" | b"h" => (value.next_multiple_of(4) + 4, false),
            b"y" => (value + 1, false),
            _ => return None,
        };
        if value_end > end {
            return None;
        }
        if code == DESTINATION && signature == b"s" && empty_string {
            if value_end == end {
                return Some(previous_end..end);
            }
            let next = value_end.next_multiple_of(8);
            // An array that ends inside the padding after a field is malformed.
            return (next <= end).then_some(at..next);
        }
        previous_end = value_end;
        at = value_end;
    }
    None
}

fn read_u32(bytes: &[u8], at: usize, little: bool) -> Option<u32> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if little {
        u32::from_le_bytes(word)
    } else {
        u32::from_be_bytes(word)
    })
}

/// What a client sends to authenticate as its own uid and start talking D-Bus at
/// once: the credentials byte, `AUTH EXTERNAL`, then `BEGIN`, in one write. The
/// server answers with one line, `OK <guid>` or `REJECTED ...`.
pub fn client_handshake(uid: u32) -> Vec<u8> {
    let hex: String = uid
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("\0AUTH EXTERNAL {hex}\r\nBEGIN\r\n").into_bytes()
}

/// Checks the server's answer to [`client_handshake`] (one line, without its `\r\n`).
pub fn check_handshake_reply(line: &str) -> io::Result<()> {
    if line.starts_with("OK ") {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the state socket refused the handshake: {line:?}"),
        ))
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_of(msg: &Message) -> [u8; FIXED_HEADER] {
        msg.data()[..FIXED_HEADER].try_into().unwrap()
    }

    #[test]
    fn the_length_covers_header_padding_and_body() {
        let msg = Message::method_call("/org/ally", "Add")
            .interface("org.ally.Atomic1")
            .build(&("hits", 1i64))
            .unwrap();
        assert_eq!(message_len(&fixed_of(&msg)).unwrap(), msg.data().len());
    }

    #[test]
    fn a_message_round_trips_through_its_bytes() {
        let msg = Message::method_call("/org/ally", "Set")
            .interface("org.ally.Cache1")
            .build(&("ns", "k", b"value".to_vec(), 0u64))
            .unwrap();
        let back = decode(msg.data().to_vec()).unwrap();
        assert_eq!(back.header().member().unwrap().as_str(), "Set");
        let (ns, key, value, ttl): (String, String, Vec<u8>, u64) =
            back.body().deserialize().unwrap();
        assert_eq!(
            (ns.as_str(), key.as_str(), value.as_slice(), ttl),
            ("ns", "k", &b"value"[..], 0)
        );
    }

    #[test]
    fn garbage_is_refused_before_anything_is_read_for_it() {
        let mut fixed = [0u8; FIXED_HEADER];
        fixed[0] = b'x';
        assert!(message_len(&fixed).is_err());
        let mut huge = [0u8; FIXED_HEADER];
        huge[0] = b'l';
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = message_len(&huge).unwrap_err();
        assert!(err.to_string().contains("over the D-Bus limit"), "{err}");
    }

    #[test]
    fn a_truncated_or_corrupt_message_is_an_error_not_a_panic() {
        let msg = Message::method_call("/org/ally", "Get")
            .interface("org.ally.Cache1")
            .build(&("ns", "k"))
            .unwrap();
        let bytes = msg.data().to_vec();
        let read = |bytes: Vec<u8>| -> zbus::Result<(String, String)> {
            decode(bytes)?.body().deserialize()
        };
        assert!(read(bytes.clone()).is_ok());
        assert!(read(bytes[..bytes.len() - 3].to_vec()).is_err());
        let mut corrupt = bytes.clone();
        corrupt[1] = 0;
        assert!(read(corrupt).is_err());
        let mut fields = bytes.clone();
        for b in &mut fields[FIXED_HEADER..40] {
            *b = 0xff;
        }
        assert!(read(fields).is_err());
        let mut body = bytes.clone();
        let n = body.len();
        body[n - 4..].copy_from_slice(&[0xff; 4]);
        assert!(read(body).is_err());
    }

    /// A call as godbus's `conn.Object("", "/org/ally")` makes it: a `DESTINATION`
    /// field holding the empty string, where it places it (after `PATH`).
    fn with_empty_destination(endian: Endian, fields_after: bool) -> Vec<u8> {
        let mut b = Message::method_call("/org/ally", "Add")
            .interface("org.ally.Atomic1")
            .endian(endian)
            .build(&("hits", 1i64))
            .unwrap()
            .data()
            .to_vec();
        let little = endian == Endian::Little;
        let put = |v: u32| {
            if little {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            }
        };
        let fields = read_u32(&b, 12, little).unwrap() as usize;
        let body = b.split_off((FIXED_HEADER + fields).next_multiple_of(8));
        b.truncate(FIXED_HEADER + fields);
        // The field: code, signature "s", then an empty string (length 0, NUL).
        let mut field = vec![DESTINATION, 1, b's', 0];
        field.extend(put(0));
        field.push(0);
        let at = if fields_after {
            FIXED_HEADER
        } else {
            b.len().next_multiple_of(8)
        };
        if fields_after {
            field.resize(16, 0);
            b.splice(at..at, field);
        } else {
            b.resize(at, 0);
            b.extend(field);
        }
        let fields = (b.len() - FIXED_HEADER) as u32;
        b[12..16].copy_from_slice(&put(fields));
        b.resize(b.len().next_multiple_of(8), 0);
        b.extend(body);
        b
    }

    #[test]
    fn an_empty_destination_is_read_as_none() {
        for endian in [Endian::Little, Endian::Big] {
            for fields_after in [true, false] {
                let bytes = with_empty_destination(endian, fields_after);
                let raw = unsafe {
                    Message::from_bytes(Data::new(bytes.clone(), Context::new(endian, 0)))
                };
                assert!(raw.is_err(), "zbus refuses it as it is");
                let msg = decode(bytes).unwrap();
                let header = msg.header();
                assert_eq!(header.destination(), None);
                assert_eq!(header.member().unwrap().as_str(), "Add");
                assert_eq!(header.interface().unwrap().as_str(), "org.ally.Atomic1");
                let (name, delta): (String, i64) = msg.body().deserialize().unwrap();
                assert_eq!((name.as_str(), delta), ("hits", 1));
            }
        }
    }

    #[test]
    fn a_fields_array_ending_in_padding_is_left_to_the_decoder() {
        // Found by fuzzing: the array's length ends after the empty destination's
        // value but before the padding that would lead to the next field.
        let mut bytes = with_empty_destination(Endian::Little, true);
        // The field takes bytes 16..25 (then padding to 32): end the array at 27.
        bytes[12..16].copy_from_slice(&11u32.to_le_bytes());
        assert_eq!(without_empty_destination(bytes.clone()), bytes);
        assert!(decode(bytes).is_err());
    }

    #[test]
    fn a_named_destination_and_other_messages_are_left_alone() {
        let msg = Message::method_call("/org/ally", "Add")
            .interface("org.ally.Atomic1")
            .destination("org.ally.web")
            .build(&("hits", 1i64))
            .unwrap();
        let bytes = msg.data().to_vec();
        assert_eq!(without_empty_destination(bytes.clone()), bytes);
        for n in [0, 1, 12, 16, 20, bytes.len() - 1] {
            assert_eq!(without_empty_destination(bytes[..n].to_vec()), &bytes[..n]);
        }
    }

    #[test]
    fn the_handshake_names_the_uid_in_hex_ascii() {
        assert_eq!(
            client_handshake(1000),
            b"\0AUTH EXTERNAL 31303030\r\nBEGIN\r\n".to_vec()
        );
        assert!(check_handshake_reply("OK 1234abcd").is_ok());
        assert!(check_handshake_reply("REJECTED EXTERNAL").is_err());
    }
}
