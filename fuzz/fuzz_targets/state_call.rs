//! What the state socket does with a client's bytes after the handshake: cut them
//! into messages by their fixed header (`wire::message_len`), then answer each with
//! `state_socket::reply_to`, as an admin, on a fresh connection to the process's broker, or, when it cannot
//! be read, with `unreadable::reply`; the connection goes on either way. A reply
//! must be a message that its own framing measures and decodes again.
#![no_main]

use std::sync::{Arc, OnceLock};

use ally::broker::Broker;
use ally::config::Config;
use ally::dbus::broker1::{Access, Peer};
use ally::dbus::peer::Identity;
use ally::dbus::state_calls::StateCalls;
use ally::dbus::state_socket::reply_to;
use ally::dbus::unreadable;
use ally::identity::RunAs;
use ally_core::wire::{self, FIXED_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let calls = state_calls();
    let mut stream = data;
    while let Some(fixed) = stream.first_chunk::<FIXED_HEADER>() {
        let Ok(len) = wire::message_len(fixed) else {
            return;
        };
        assert!(len >= FIXED_HEADER, "{len} bytes for {fixed:?}");
        if len > stream.len() {
            return;
        }
        let (message, rest) = stream.split_at(len);
        stream = rest;
        let reply = reply_to(&calls, message.to_vec())
            .unwrap_or_else(|reason| unreadable::reply(fixed, &reason));
        if let Some(reply) = reply {
            let bytes = reply.data().to_vec();
            let fixed = bytes.first_chunk::<FIXED_HEADER>().expect("a fixed header");
            assert_eq!(wire::message_len(fixed).unwrap(), bytes.len());
            wire::decode(bytes).expect("the reply decodes");
        }
    }
});

/// A connection of its own to the one broker of this process (a broker holds a
/// thread for its instances' output: one per input would exhaust them).
fn state_calls() -> StateCalls {
    static BROKER: OnceLock<Arc<Broker>> = OnceLock::new();
    let broker = BROKER
        .get_or_init(|| {
            let config = Config::defaults(vec!["/bin/true".into()]);
            let run_as = RunAs::resolve(&config).expect("the fuzzer's own ids");
            let state = ally::state::State::new(&config.limits);
            Broker::new(
                "fuzz",
                config,
                Default::default(),
                run_as,
                "unix:path=/nonexistent".into(),
                String::new(),
                state,
            )
            .expect("a broker without listeners")
        })
        .clone();
    let connection = broker.state().new_conn();
    // No process to read; uid 0 makes the caller an admin, who may call all.
    let peer = Peer::private(Identity::uid_only(0), connection);
    StateCalls::new(Access::new(broker, peer), connection)
}
