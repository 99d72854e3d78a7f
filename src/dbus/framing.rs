//! Message sizes on a D-Bus byte stream, checked from each message's fixed header
//! before its body is read: a peer that declares more than `max_message_bytes` is
//! refused before the broker buffers any of it.

use std::io;

use ally_core::wire::{self, FIXED_HEADER};

/// The whole length of the message that starts with `fixed`, if it is at most `max`.
pub fn declared_len(fixed: &[u8; FIXED_HEADER], max: u64) -> io::Result<usize> {
    let len = wire::message_len(fixed)?;
    if len as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes is over max_message_bytes ({max})"),
        ));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed header of a little-endian message of `body` bytes, no header fields.
    fn header(body: u32) -> Vec<u8> {
        let mut bytes = vec![b'l', 1, 0, 1];
        bytes.extend(body.to_le_bytes());
        bytes.extend(7u32.to_le_bytes());
        bytes.extend(0u32.to_le_bytes());
        bytes
    }

    fn message(body: u32) -> Vec<u8> {
        let mut bytes = header(body);
        bytes.resize(FIXED_HEADER + body as usize, 0xab);
        bytes
    }

    fn fixed(bytes: &[u8]) -> [u8; FIXED_HEADER] {
        bytes[..FIXED_HEADER].try_into().unwrap()
    }

    #[test]
    fn a_message_within_the_limit_is_measured_whole() {
        assert_eq!(declared_len(&fixed(&message(100)), 116).unwrap(), 116);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_at_its_header() {
        let e = declared_len(&fixed(&header(2000)), 1024).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.to_string(),
            "a message of 2016 bytes is over max_message_bytes (1024)"
        );
        // Past the D-Bus limit, the header is refused as it is anywhere.
        let e = declared_len(&fixed(&header(0x7fff_0000)), 1024).unwrap_err();
        assert!(e.to_string().contains("over the D-Bus limit"), "{e}");
    }

    #[test]
    fn garbage_is_no_header() {
        let e = declared_len(&[b'\n'; FIXED_HEADER], 1 << 20).unwrap_err();
        assert!(e.to_string().contains("not a D-Bus message"), "{e}");
    }
}
