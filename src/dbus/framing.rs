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

/// Follows the messages in a stream, as it is read, in whatever pieces.
#[derive(Debug)]
pub struct Framing {
    max: u64,
    fixed: [u8; FIXED_HEADER],
    /// Bytes of the current message's fixed header seen so far.
    have: usize,
    /// Bytes of the current message still to come after its fixed header.
    rest: usize,
}

impl Framing {
    pub fn new(max: u64) -> Framing {
        Framing {
            max,
            fixed: [0; FIXED_HEADER],
            have: 0,
            rest: 0,
        }
    }

    /// Takes the next `bytes` read; an error as soon as a message's fixed header
    /// declares too much (or is no D-Bus header).
    pub fn advance(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.rest > 0 {
                let n = self.rest.min(bytes.len());
                self.rest -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FIXED_HEADER - self.have).min(bytes.len());
            self.fixed[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FIXED_HEADER {
                self.rest = declared_len(&self.fixed, self.max)? - FIXED_HEADER;
                self.have = 0;
            }
        }
        Ok(())
    }
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

    #[test]
    fn messages_within_the_limit_pass_in_any_pieces() {
        let stream: Vec<u8> = [message(10), message(0), message(100)].concat();
        for piece in [1, 3, 16, 17, 1000] {
            let mut framing = Framing::new(116);
            for chunk in stream.chunks(piece) {
                framing.advance(chunk).unwrap();
            }
            assert_eq!((framing.have, framing.rest), (0, 0), "pieces of {piece}");
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_at_its_header() {
        let mut framing = Framing::new(1024);
        framing.advance(&message(8)).unwrap();
        let big = header(2000);
        framing.advance(&big[..FIXED_HEADER - 1]).unwrap();
        let e = framing.advance(&big[FIXED_HEADER - 1..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.to_string(),
            "a message of 2016 bytes is over max_message_bytes (1024)"
        );
        // Past the D-Bus limit, the header is refused as it is anywhere.
        let e = Framing::new(1024)
            .advance(&header(0x7fff_0000))
            .unwrap_err();
        assert!(e.to_string().contains("over the D-Bus limit"), "{e}");
    }

    #[test]
    fn garbage_is_no_header() {
        let e = Framing::new(1 << 20).advance(&[b'\n'; 16]).unwrap_err();
        assert!(e.to_string().contains("not a D-Bus message"), "{e}");
    }
}
