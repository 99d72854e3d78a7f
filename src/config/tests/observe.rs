//! `history` and `metrics_address`: what the broker keeps and shows of its reloads.

use super::*;

#[test]
fn history_defaults_to_a_hundred_and_is_bounded() {
    assert_eq!(parse(&with_command("")).unwrap().history, 100);
    assert_eq!(parse(&with_command("history = 3")).unwrap().history, 3);
    assert_eq!(
        parse(&with_command("history = 10000")).unwrap().history,
        10000
    );
    assert_eq!(
        error(&with_command("history = 10001")),
        "/etc/ally/web.toml:2:11: key `history`: 10001 is too large: expected at most 10000 reloads and restarts kept"
    );
    let m = error(&with_command("history = 0"));
    assert!(
        m.contains("key `history`: expected a positive integer, found 0"),
        "{m}"
    );
    let m = error(&with_command(r#"history = "5""#));
    assert!(
        m.contains("key `history`: expected a positive integer"),
        "{m}"
    );
}

#[test]
fn metrics_address_is_an_ip_and_a_port() {
    assert_eq!(parse(&with_command("")).unwrap().metrics_address, None);
    assert_eq!(
        parse(&with_command(r#"metrics_address = "127.0.0.1:9102""#))
            .unwrap()
            .metrics_address,
        Some("127.0.0.1:9102".parse().unwrap())
    );
    assert_eq!(
        parse(&with_command(r#"metrics_address = "[::1]:9102""#))
            .unwrap()
            .metrics_address,
        Some("[::1]:9102".parse().unwrap())
    );
    assert_eq!(
        error(&with_command(r#"metrics_address = "localhost:9102""#)),
        r#"/etc/ally/web.toml:2:19: key `metrics_address`: "localhost:9102" is not an IP address and port: expected a TCP address like "127.0.0.1:9102" or "[::1]:9102""#
    );
    let m = error(&with_command(r#"metrics_address = "/run/metrics.sock""#));
    assert!(m.contains("is not an IP address and port"), "{m}");
    let m = error(&with_command(r#"metrics_address = "127.0.0.1:0""#));
    assert!(m.contains("has port 0"), "{m}");
    let m = error(&with_command("metrics_address = 9102"));
    assert!(
        m.contains(r#"key `metrics_address`: expected a TCP address like "127.0.0.1:9102""#),
        "{m}"
    );
}
