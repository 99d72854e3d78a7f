//! `notify::parse` on any datagram an instance (or anything running as its
//! user) can send to its `NOTIFY_SOCKET`: never a panic; a datagram is refused
//! whole or read into fields whose values are within their bounds.
#![no_main]

use ally::notify::{self, Field, MAX_DATAGRAM, MAX_STATUS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match notify::parse(data) {
        Ok(message) => {
            assert!(data.len() <= MAX_DATAGRAM);
            for field in &message.fields {
                match field {
                    Field::Status(s) => {
                        assert!(s.len() <= MAX_STATUS);
                        assert!(!s.chars().any(char::is_control), "{s:?}");
                    }
                    Field::MainPid(pid) => assert!(*pid > 1),
                    Field::Errno(e) => assert!(*e >= 0),
                    Field::WatchdogTimeout(d) => assert!(!d.is_zero()),
                    _ => {}
                }
            }
            for skipped in &message.skipped {
                assert!(!skipped.is_empty());
            }
        }
        Err(refused) => {
            let text = refused.to_string();
            assert!(!text.is_empty());
        }
    }
});
