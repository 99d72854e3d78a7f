//! The state socket's `EXTERNAL` handshake, `sasl::Handshake`. An input that starts
//! with a NUL byte is what a client sends: the credentials byte, then lines cut as
//! `state_socket` cuts them (at most `MAX_LINE` bytes, each ending in `\r\n`); any
//! other input is split into lines at each `\n`. The client may begin only after the
//! server said `OK`, and only for the peer's own uid; replies are single lines.
#![no_main]

use ally_core::sasl::{Handshake, MAX_LINE, Step};
use libfuzzer_sys::fuzz_target;

const PEER_UID: u32 = 1000;

fuzz_target!(|data: &[u8]| {
    let lines = match data.split_first() {
        Some((0, stream)) => wire_lines(stream),
        _ => data
            .split(|&b| b == b'\n')
            .map(|line| String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line)).into())
            .collect(),
    };
    let mut handshake = Handshake::new(PEER_UID, "3ab9e8d43f1d8c4b5e0e57a26a5b2c11".into());
    let mut authenticated = false;
    for line in lines {
        match handshake.line(&line) {
            Step::Reply(reply) => {
                assert!(!reply.contains(['\r', '\n']), "reply {reply:?} to {line:?}");
                if reply.starts_with("OK ") {
                    assert!(claims_peer(&line), "OK to {line:?}");
                    authenticated = true;
                } else if reply.starts_with("REJECTED") {
                    authenticated = false;
                }
            }
            Step::Begin => {
                assert!(authenticated, "began unauthenticated with {line:?}");
                return;
            }
            Step::Close => return,
        }
    }
});

/// The lines `state_socket` reads from `stream` until one is not `\r\n`-terminated.
fn wire_lines(mut stream: &[u8]) -> Vec<String> {
    let mut lines = Vec::new();
    while !stream.is_empty() {
        let window = &stream[..stream.len().min(MAX_LINE)];
        let len = window
            .iter()
            .position(|&b| b == b'\n')
            .map_or(window.len(), |i| i + 1);
        let (line, rest) = stream.split_at(len);
        let Some(text) = line.strip_suffix(b"\r\n") else {
            break;
        };
        lines.push(String::from_utf8_lossy(text).into_owned());
        stream = rest;
    }
    lines
}

/// Whether `line` claims the peer's uid: `AUTH EXTERNAL` or `DATA` with nothing (the
/// socket's own credentials) or the uid's decimal digits, hex-encoded.
fn claims_peer(line: &str) -> bool {
    let claim = line
        .strip_prefix("AUTH EXTERNAL")
        .or_else(|| line.strip_prefix("DATA"))
        .map(|rest| rest.strip_prefix(' ').unwrap_or(rest));
    let Some(claim) = claim else {
        return false;
    };
    if claim.is_empty() {
        return true;
    }
    let digits: Option<Vec<u8>> = claim
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).ok()?;
            (pair.len() == 2).then(|| u8::from_str_radix(pair, 16).ok())?
        })
        .collect();
    digits
        .and_then(|d| String::from_utf8(d).ok())
        .and_then(|s| s.parse::<u32>().ok())
        == Some(PEER_UID)
}
