//! `[[listen]]` and `[[allow_listen]]` entries and the modes of their sockets.

use super::*;
use ally_core::net::Endpoint;

#[test]
fn listen_entries() {
    let config = parse(&with_command(
        "[[listen]]\nnetwork = \"udp6\"\naddress = \"[::1]:5353\"\n[[listen]]\nnetwork = \"unix\"\naddress = \"@ally-test\"",
    ))
    .unwrap();
    assert_eq!(
        config.listen[0].addr,
        ListenAddr::parse("udp6", "[::1]:5353").unwrap()
    );
    assert_eq!(config.listen[0].options, ListenOptions::default());
    assert_eq!(
        config.listen[1].addr.endpoint,
        Endpoint::Abstract(b"ally-test".to_vec())
    );

    let listen = |body: &str| {
        error(&with_command(&format!(
            "[[listen]]\nnetwork = \"tcp\"\naddress = \":80\"\n[[listen]]\n{body}"
        )))
    };
    let m = listen("network = \"tcp\"\naddress = \"localhost\"");
    assert!(
        m.contains("key `listen[1].address`: invalid tcp address \"localhost\": missing port"),
        "{m}"
    );
    let m = listen("network = \"sctp\"\naddress = \":80\"");
    assert!(
        m.contains("key `listen[1].network`: unknown network \"sctp\": expected one of tcp,"),
        "{m}"
    );
    let m = listen("network = \"tcp\"");
    assert!(
        m.contains("key `listen[1].address` is missing: expected an address like"),
        "{m}"
    );
    let m = listen("address = \":80\"");
    assert!(
        m.contains("key `listen[1].network` is missing: expected one of tcp,"),
        "{m}"
    );
    let m = listen("network = \"tcp\"\naddress = \":80\"");
    assert!(
        m.contains("key `listen[1]`: tcp ") && m.contains("is already listed as listen[0]"),
        "{m}"
    );
    let m = listen("network = \"tcp\"\naddress = \":81\"\nbacklog = 0");
    assert!(
        m.contains("key `listen[1].backlog`: expected a positive integer, found 0"),
        "{m}"
    );
    let m = listen("network = \"tcp\"\naddress = \":81\"\nbacklog = 4294967296");
    assert!(
        m.contains("key `listen[1].backlog`: 4294967296 is too large"),
        "{m}"
    );
    let m = listen("network = \"udp\"\naddress = \":81\"\nbacklog = 10");
    assert!(
        m.contains("key `listen[1].backlog`: applies only to connection-oriented networks"),
        "{m}"
    );
    let m = listen("network = \"tcp\"\naddress = \":81\"\nreuse_port = \"yes\"");
    assert!(
        m.contains("key `listen[1].reuse_port`: expected true or false, found string \"yes\""),
        "{m}"
    );
    let m = listen("network = \"tcp\"\naddress = \":81\"\nmode = 0o660");
    assert!(
        m.contains("key `listen[1].mode`: applies only to filesystem unix sockets"),
        "{m}"
    );
    let m = error(&with_command("[listen]\nnetwork = \"tcp\""));
    assert!(
        m.contains("key `listen`: expected an array of tables: [[listen]]"),
        "{m}"
    );
}

#[test]
fn allow_listen_entries() {
    let config = parse(&with_command(
        r#"allow_listen = ["tcp::443", "tcp:127.0.0.1:81", "unix:/run/web/"]"#,
    ))
    .unwrap();
    assert_eq!(
        config.allow_listen,
        vec![
            Allowed::parse("tcp::443").unwrap(),
            Allowed::parse("tcp:127.0.0.1:81").unwrap(),
            Allowed::parse("unix:/run/web/").unwrap(),
        ]
    );
    assert_eq!(config.file.as_deref(), Some(Path::new(ORIGIN)));
    let m = error(&with_command(r#"allow_listen = "tcp::443""#));
    assert!(
        m.contains("key `allow_listen`: expected an array of \"NETWORK:ADDRESS\" strings"),
        "{m}"
    );
    let m = error(&with_command(r#"allow_listen = ["tcp::443", 443]"#));
    assert!(
        m.contains("key `allow_listen[1]`: expected an array of"),
        "{m}"
    );
    let m = error(&with_command(r#"allow_listen = ["tcp:443"]"#));
    assert!(
        m.contains("key `allow_listen[0]`: invalid tcp address \"443\": missing port"),
        "{m}"
    );
    let m = error(&with_command(r#"allow_listen = ["unix:/run/../etc/"]"#));
    assert!(
        m.contains("key `allow_listen[0]`: ") && m.contains("`..`"),
        "{m}"
    );
    let m = error(&with_command(r#"allow_listen = [":443"]"#));
    assert!(
        m.contains("key `allow_listen[0]`: unknown network \"\""),
        "{m}"
    );
}

#[test]
fn modes() {
    for (text, mode) in [
        ("0o660", 0o660),
        ("\"0660\"", 0o660),
        ("\"660\"", 0o660),
        ("\"0o600\"", 0o600),
        ("0o777", 0o777),
        ("0", 0),
    ] {
        let config = parse(&with_command(&format!(
            "[[listen]]\nnetwork = \"unix\"\naddress = \"/run/ally-test.sock\"\nmode = {text}"
        )))
        .unwrap();
        assert_eq!(config.listen[0].options.mode, Some(mode), "{text}");
    }
    for (text, expect) in [
        ("660", "660 (0o1224) is more than 0o777"),
        ("0o1777", "1023 (0o1777) is more than 0o777"),
        ("\"0689\"", "invalid mode \"0689\""),
        ("\"\"", "invalid mode \"\""),
        ("-1", "-1 is out of range"),
        ("true", "found boolean true"),
    ] {
        let m = error(&with_command(&format!(
            "[[listen]]\nnetwork = \"unix\"\naddress = \"/run/ally-test.sock\"\nmode = {text}"
        )));
        assert!(
            m.contains("key `listen[0].mode`: ") && m.contains(expect),
            "{m}"
        );
        assert!(
            m.contains("expected octal permission bits like 0o660 or \"0660\""),
            "{m}"
        );
    }
}
