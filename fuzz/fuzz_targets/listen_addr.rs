//! `ListenAddr::parse(network, address)`: the input is the network, a newline, then
//! the address. An accepted address must parse again, from its display, to itself.
#![no_main]

use ally_core::net::{ListenAddr, needs_resolver};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (network, address) = text.split_once('\n').unwrap_or((text, ""));
    // A host name would be looked up in the DNS on each run.
    if needs_resolver(network, address) {
        return;
    }
    let Ok(addr) = ListenAddr::parse(network, address) else {
        return;
    };
    assert_eq!(addr.network.as_str(), network);
    let shown = addr.endpoint.to_string();
    assert!(
        !needs_resolver(network, &shown),
        "{addr} would need the resolver"
    );
    match ListenAddr::parse(network, &shown) {
        Ok(again) => assert_eq!(again, addr, "{address:?} became {shown:?}"),
        Err(e) => panic!("{address:?} was accepted as {shown:?}, which is refused: {e}"),
    }
});
