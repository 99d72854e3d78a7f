//! `sockets`, `ready` and its companions, `watchdog`, `[[listen]] name`.

use super::*;

const LISTEN: &str = "[[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:8000\"\n";

#[test]
fn the_defaults_are_dbus() {
    let c = parse(&with_command("")).unwrap();
    assert_eq!(c.sockets, Sockets::Dbus);
    assert_eq!(c.ready, Readiness::Dbus);
    assert_eq!(c.watchdog, None);
}

#[test]
fn an_unmodified_app_is_described_by_its_keys() {
    let c = parse(&with_command(&format!(
        "sockets = \"listen-fds\"\nready = \"notify\"\nwatchdog = \"10s\"\n{LISTEN}name = \"http\"\n"
    )))
    .unwrap();
    assert_eq!(c.sockets, Sockets::ListenFds);
    assert_eq!(c.ready, Readiness::Notify);
    assert_eq!(c.watchdog, Some(Duration::from_secs(10)));
    assert_eq!(c.listen[0].fd_name(), "http");

    let c = parse(&with_command("ready = \"delay\"\nready_delay = \"2s\"")).unwrap();
    assert_eq!(c.ready, Readiness::Delay(Duration::from_secs(2)));
    let c = parse(&with_command(
        "ready = \"probe\"\nready_probe = [\"curl\", \"-fsS\", \"http://127.0.0.1:9001/\"]",
    ))
    .unwrap();
    assert_eq!(
        c.ready,
        Readiness::Probe(vec![
            "curl".into(),
            "-fsS".into(),
            "http://127.0.0.1:9001/".into()
        ])
    );
}

#[test]
fn an_unnamed_socket_is_named_by_its_address_without_the_separator() {
    let c = parse(&with_command(&format!(
        "{LISTEN}[[listen]]\nnetwork = \"unix\"\naddress = \"/run/a:b.sock\"\n"
    )))
    .unwrap();
    assert_eq!(c.listen[0].fd_name(), "tcp 127.0.0.1_8000");
    assert_eq!(c.listen[1].fd_name(), "unix /run/a_b.sock");
}

#[test]
fn mistakes_are_named() {
    let cases: &[(&str, &str)] = &[
        (
            "sockets = \"fds\"",
            r#"key `sockets`: invalid sockets "fds": expected "dbus" or "listen-fds""#,
        ),
        (
            "sockets = \"listen-fds\"",
            "key `sockets`: \"listen-fds\" passes the [[listen]] sockets, and there is none",
        ),
        (
            "ready = \"soon\"",
            r#"key `ready`: invalid ready "soon": expected "dbus", "notify", "delay" or "probe""#,
        ),
        (
            "ready = \"delay\"",
            "key `ready_delay` is missing: expected how long",
        ),
        (
            "ready = \"probe\"",
            "key `ready_probe` is missing: expected the command",
        ),
        (
            "ready = \"probe\"\nready_probe = []",
            "key `ready_probe`: is empty",
        ),
        (
            "ready_delay = \"2s\"",
            r#"key `ready_delay`: is read only with ready = "delay""#,
        ),
        (
            "ready = \"notify\"\nready_probe = [\"true\"]",
            r#"key `ready_probe`: is read only with ready = "probe""#,
        ),
        (
            "watchdog = \"5s\"",
            r#"key `watchdog`: is read only with ready = "notify""#,
        ),
        (
            "ready = \"notify\"\nwatchdog = \"0s\"",
            "key `watchdog`: must be greater than zero",
        ),
        (
            "ready = \"delay\"\nready_delay = \"2m\"",
            "key `ready_delay`: 2m is not shorter than ready_timeout (1m)",
        ),
        (
            "ready = 1",
            "expected \"dbus\", \"notify\", \"delay\" or \"probe\", found integer 1",
        ),
    ];
    for (text, expected) in cases {
        let m = error(&with_command(text));
        assert!(
            m.contains(expected),
            "{text:?}:\n{m}\nshould contain\n{expected}"
        );
    }
    for (name, expected) in [
        ("a:b", "contains ':'"),
        ("", "is empty"),
        ("tab\there", "contains '\\t'"),
    ] {
        let m = error(&with_command(&format!("{LISTEN}name = {name:?}")));
        assert!(m.contains("key `listen[0].name`"), "{m}");
        assert!(m.contains(expected), "{name:?}: {m}");
    }
}
