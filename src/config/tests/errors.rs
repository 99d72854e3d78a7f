//! How a refused file is reported: one line, naming the file, the key, what
//! was expected and where in the text, quoting values exactly.

use super::*;

#[test]
fn missing_or_bad_command() {
    let m = error(r#"restart = "never""#);
    assert_eq!(
        m,
        r#"/etc/ally/web.toml: key `command` is missing: expected the program to run, e.g. command = ["/usr/bin/myapp", "--flag"]"#
    );
    let m = error("command = []");
    assert!(
        m.contains("key `command`: is empty: expected the program to run"),
        "{m}"
    );
    let m = error(r#"command = "/bin/app""#);
    assert!(
        m.contains("key `command`: expected an array of strings"),
        "{m}"
    );
    let m = error(r#"command = ["/bin/app", 3]"#);
    assert!(
        m.contains("key `command[1]`: expected a string, found integer 3"),
        "{m}"
    );
    let m = error(r#"command = [""]"#);
    assert!(
        m.contains("key `command[0]`: the program must not be empty"),
        "{m}"
    );
}

#[test]
fn unknown_keys() {
    let m = error(&with_command(r#"ready_timeot = "5s""#));
    assert!(m.starts_with("/etc/ally/web.toml:2:1: unknown key `ready_timeot` (expected one of: command, working_directory, "), "{m}");
    let m = error(&with_command(
        "[[listen]]\nnetwork = \"tcp\"\naddress = \":80\"\nadress = \"x\"",
    ));
    assert!(m.contains("unknown key `listen[0].adress` (expected one of: network, address, backlog, reuse_port, mode, name)"), "{m}");
    let m = error(&with_command("[limits]\nmax_keys = 3"));
    assert!(
        m.contains("unknown key `limits.max_keys` (expected one of: max_key_bytes,"),
        "{m}"
    );
}

#[test]
fn syntax_error_has_location() {
    let m = error("command = [\"/bin/app\"]\nrestart = \"never\"\nstop_timeout = 30s\n");
    assert!(m.starts_with("/etc/ally/web.toml:3:"), "{m}");
    assert!(m.contains(": TOML syntax error: "), "{m}");
    let m = error("command = [\"/bin/app\"]\ncommand = [\"/bin/b\"]\n");
    assert!(m.contains("TOML syntax error"), "{m}");
}

#[test]
fn read_errors() {
    let m = Config::load(Path::new("/nonexistent/ally/web.toml"), None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        m,
        "/nonexistent/ally/web.toml: cannot read: No such file or directory"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.toml");
    std::fs::write(&path, "command = [\"/bin/app\"]\nmax_draining = 7\n").unwrap();
    assert_eq!(Config::load(&path, None).unwrap().max_draining, 7);
    std::fs::write(&path, b"command = [\"\xff\"]").unwrap();
    let m = Config::load(&path, None).unwrap_err().to_string();
    assert!(
        m.ends_with("cannot read: the file is not valid UTF-8"),
        "{m}"
    );
}

#[test]
fn names_and_values_with_line_breaks_stay_on_one_line() {
    let cases = [
        (
            "[limits]\n\"max\\nkeys\" = 3\n",
            "unknown key `limits.max\\nkeys`",
        ),
        (
            "environment = { \"A\\rB\" = 1 }\n",
            "key `environment.A\\rB`",
        ),
        (
            "[[listen]]\nnetwork = \"unixgram\"\naddress = \"@a\\nb\"\nmode = 0o600\n",
            "not unixgram @a\\nb",
        ),
    ];
    for (text, expected) in cases {
        let m = parse(&format!("command = [\"/bin/app\"]\n{text}"))
            .unwrap_err()
            .to_string();
        assert!(m.contains(expected), "{m:?} should contain {expected:?}");
        assert!(!m.contains(['\n', '\r']), "one line: {m:?}");
    }
}

#[test]
fn a_config_is_read_up_to_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.toml");
    let mut text = String::from("command = [\"/bin/app\"]\n#");
    text.push_str(&"x".repeat(MAX_CONFIG_BYTES as usize - text.len()));
    std::fs::write(&path, &text).unwrap();
    assert!(Config::load(&path, None).is_ok());
    text.push('x');
    std::fs::write(&path, &text).unwrap();
    let m = Config::load(&path, None).unwrap_err().to_string();
    assert!(m.contains("larger than 1048576 bytes (1 MiB)"), "{m}");
}

#[test]
fn error_display_forms() {
    let syntax = ConfigError::Syntax {
        path: ORIGIN.into(),
        location: None,
        message: "oops".into(),
    };
    assert_eq!(
        syntax.to_string(),
        "/etc/ally/web.toml: TOML syntax error: oops"
    );
    assert_eq!(syntax.path(), Path::new(ORIGIN));
}

#[test]
fn every_refusal_of_a_place_in_the_file_says_its_line_and_column() {
    let cases = [
        // From serde: an unknown key, at the key, however deep.
        (
            "[[listen]]\nnetwork = \"tcp\"\naddress = \":80\"\n  adress = \"x\"",
            "/etc/ally/web.toml:5:3: unknown key `listen[0].adress`",
        ),
        (
            "[limits]\nmax_keys = 3",
            "/etc/ally/web.toml:3:1: unknown key `limits.max_keys`",
        ),
        // From serde: a value of the wrong type, at the value.
        (
            "stop_timeout = true",
            "/etc/ally/web.toml:2:16: key `stop_timeout`: expected a duration like",
        ),
        (
            "[environment]\nA = \"x\"\nPORT =   8080",
            "/etc/ally/web.toml:4:10: key `environment.PORT`: expected a string value, found integer 8080",
        ),
        (
            "allow_listen = [\"tcp::443\",\n    443]",
            "/etc/ally/web.toml:3:5: key `allow_listen[1]`: expected an array of",
        ),
        (
            "ready_timeout = 1979-05-27",
            "/etc/ally/web.toml:2:17: key `ready_timeout`: expected a duration like \"30s\" or \"1m 30s\" (a string), found datetime",
        ),
        // From the checks of what values mean.
        (
            "[[listen]]\nnetwork = \"tcp\"\naddress = \"nope\"",
            "/etc/ally/web.toml:4:11: key `listen[0].address`: invalid tcp address \"nope\"",
        ),
        (
            "[[listen]]\nnetwork = \"tcp\"",
            "/etc/ally/web.toml:2:1: key `listen[0].address` is missing",
        ),
        (
            "[limits]\nmax_message_bytes = \"1MiB\"",
            "/etc/ally/web.toml:3:21: key `limits.max_message_bytes`: 1048576 bytes is less",
        ),
        (
            "user = -1",
            "/etc/ally/web.toml:2:8: key `user`: id -1 is out of range",
        ),
    ];
    for (rest, expected) in cases {
        let m = error(&with_command(rest));
        assert!(
            m.starts_with(expected),
            "{m:?} should start with {expected:?}"
        );
    }
    // Command-wide: where the file lacks `command`, there is no place to name.
    let m = error("restart = \"never\"");
    assert!(
        m.starts_with("/etc/ally/web.toml: key `command` is missing"),
        "{m}"
    );
}

#[test]
fn a_message_quotes_values_exactly() {
    let m = error(&with_command("working_directory = \"a  b\""));
    assert!(m.contains("\"a  b\" is not absolute"), "{m}");
    let m = error(&with_command("working_directory = 5"));
    assert!(
        m.contains("key `working_directory`: expected an absolute path, found integer 5"),
        "{m}"
    );
}

/// The fuzzer's corpus: every file is accepted, or refused with one line naming
/// the file and, where it gives one, a place inside the text.
#[test]
fn the_fuzz_corpus_is_accepted_or_refused_in_one_line() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let bytes = std::fs::read(entry.path()).unwrap();
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        if names_a_host(text) {
            continue;
        }
        if let Err(e) = parse(text) {
            let m = e.to_string();
            assert!(m.starts_with(ORIGIN) && !m.contains(['\n', '\r']), "{m:?}");
            if let Some((line, column)) = e.location() {
                assert!(line >= 1 && column >= 1, "{m:?}");
                assert!(line <= text.split('\n').count(), "{m:?}");
            }
        }
    }
}

/// Whether a `[[listen]]` address would be looked up in the DNS, which blocks.
fn names_a_host(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    let Some(listen) = table.get("listen").and_then(|l| l.as_array()) else {
        return false;
    };
    listen.iter().filter_map(|l| l.as_table()).any(|entry| {
        let field = |k: &str| entry.get(k).and_then(|v| v.as_str()).unwrap_or("");
        ally_core::net::needs_resolver(field("network"), field("address"))
    })
}
