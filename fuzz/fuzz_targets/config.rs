//! `Config::parse` on any UTF-8 text (the raw serde document, then the typed
//! checks). Every error is one line that names the file, and a line and column
//! inside the text when it gives one; a config accepted has a command and
//! distinct listen addresses. Users and groups are not looked up here: that is
//! `identity::RunAs::resolve`, at start-up.
#![no_main]

use std::path::Path;

use ally::config::Config;
use ally_core::net::needs_resolver;
use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "/etc/ally/fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if names_a_host(text) {
        return;
    }
    match Config::parse(text, Path::new(ORIGIN), None) {
        Ok(config) => {
            assert!(!config.command.is_empty() && !config.command[0].is_empty());
            for (i, entry) in config.listen.iter().enumerate() {
                assert!(!config.listen[..i].iter().any(|e| e.addr == entry.addr));
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with(ORIGIN), "{message:?}");
            assert!(!message.contains(['\n', '\r']), "{message:?}");
            if let Some((line, column)) = e.location() {
                assert!(line >= 1 && column >= 1, "{message:?}");
                assert!(line <= text.lines().count().max(1) + 1, "{message:?}");
            }
        }
    }
});

/// Whether a `[[listen]]` address would be looked up in the DNS on each run.
fn names_a_host(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    let Some(listen) = table.get("listen").and_then(|l| l.as_array()) else {
        return false;
    };
    listen.iter().filter_map(|l| l.as_table()).any(|entry| {
        let field = |k: &str| entry.get(k).and_then(|v| v.as_str()).unwrap_or("");
        needs_resolver(field("network"), field("address"))
    })
}
