//! Sizes, and the limits on connections, state and lock waiters.

use super::*;
use crate::config::raw::Scalar;
use crate::config::typed::parse_size;

#[test]
fn sizes() {
    let size = |s: &str| {
        parse_size(
            &s.parse::<i64>()
                .map(Scalar::Int)
                .unwrap_or_else(|_| Scalar::Text(s.into())),
        )
    };
    assert_eq!(parse_size(&Scalar::Int(512)), Ok(512));
    assert_eq!(size("512"), Ok(512));
    assert_eq!(size("512B"), Ok(512));
    assert_eq!(size("1KiB"), Ok(1024));
    assert_eq!(size("64MiB"), Ok(64 << 20));
    assert_eq!(size("64 MiB"), Ok(64 << 20));
    assert_eq!(size("2GiB"), Ok(2 << 30));
    assert_eq!(size("1KB"), Ok(1000));
    assert_eq!(size("3MB"), Ok(3_000_000));
    assert_eq!(size("1gb"), Ok(1_000_000_000));
    for bad in [
        "",
        "KiB",
        "1.5MiB",
        "12 parsecs",
        "-5",
        "0",
        "0KiB",
        "99999999999999999999GiB",
    ] {
        assert!(size(bad).is_err(), "{bad:?}");
    }
    assert!(parse_size(&Scalar::Int(-1)).is_err());
    assert!(parse_size(&Scalar::Int(0)).is_err());

    let m = error(&with_command("[limits]\nmax_value_bytes = \"lots\""));
    assert!(
        m.contains(
            "key `limits.max_value_bytes`: invalid size \"lots\": expected a positive size in bytes"
        ),
        "{m}"
    );
    let m = error(&with_command("[limits]\nmax_keys_per_namespace = \"10k\""));
    assert!(
        m.contains("key `limits.max_keys_per_namespace`: expected a positive integer"),
        "{m}"
    );
    let m = error(&with_command("limits = 5"));
    assert!(
        m.contains("key `limits`: expected a table ([limits]), found integer 5"),
        "{m}"
    );
}

#[test]
fn connection_and_lock_waiter_limits() {
    let config = parse(&with_command(
        "[limits]\nmax_connections = 64\nmax_connections_per_uid = 8\nhandshake_timeout = \"1s\"\nmax_lock_waiters_per_connection = 3\nmax_lock_waiters_per_lock = 5\nmax_value_bytes = \"1KiB\"",
    ))
    .unwrap();
    assert_eq!(
        config.connections,
        ConnectionLimits {
            max_connections: 64,
            max_connections_per_uid: 8,
            handshake_timeout: Duration::from_secs(1),
            max_message_bytes: 2 * (1024 + 1024) + 65536,
        },
        "max_message_bytes follows max_value_bytes unless it is set"
    );
    assert_eq!(
        (
            config.limits.max_lock_waiters_per_connection,
            config.limits.max_lock_waiters_per_lock
        ),
        (3, 5)
    );
    let config = parse(&with_command("[limits]\nmax_message_bytes = \"4MiB\"")).unwrap();
    assert_eq!(config.connections.max_message_bytes, 4 << 20);

    let m = error(&with_command("[limits]\nmax_message_bytes = \"1MiB\""));
    assert!(
        m.contains("key `limits.max_message_bytes`: 1048576 bytes is less than the largest call needs: 2164736 bytes"),
        "{m}"
    );
    let m = error(&with_command("[limits]\nmax_message_bytes = \"1GiB\""));
    assert!(m.contains("more than D-Bus allows"), "{m}");
    let m = error(&with_command("[limits]\nmax_connections = 0"));
    assert!(
        m.contains("key `limits.max_connections`: expected a positive integer, found 0"),
        "{m}"
    );
    let m = error(&with_command("[limits]\nhandshake_timeout = 10"));
    assert!(m.contains("key `limits.handshake_timeout`"), "{m}");
    let m = error(&with_command("[limits]\nmax_lock_waiters_per_lock = -1"));
    assert!(m.contains("key `limits.max_lock_waiters_per_lock`"), "{m}");
}
