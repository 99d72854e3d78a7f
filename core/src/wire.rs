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
pub fn decode(bytes: Vec<u8>) -> zbus::Result<Message> {
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
