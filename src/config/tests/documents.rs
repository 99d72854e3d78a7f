//! Whole files: the defaults, a file with every key, the command given on
//! the command line, and the examples the docs show.

use super::*;
use ally_core::net::Endpoint;

#[test]
fn defaults() {
    let config = Config::defaults(vec!["/bin/app".into(), "-v".into()]);
    assert_eq!(config.command, ["/bin/app", "-v"]);
    assert_eq!(config.stop_signal, Signal::SIGTERM);
    assert_eq!(config.ready_timeout, Duration::from_secs(60));
    assert_eq!(config.stop_timeout, Duration::from_secs(30));
    assert_eq!(config.restart, RestartPolicy::OnFailure);
    assert_eq!(config.restart_delay, Duration::from_secs(1));
    assert_eq!(config.max_draining, 4);
    assert_eq!(config.listener_linger, Duration::from_secs(10));
    assert!(config.listen.is_empty() && config.environment.is_empty());
    assert_eq!((config.user.as_ref(), config.group.as_ref()), (None, None));
    assert_eq!(config.working_directory, None);
    assert_eq!(config.limits.max_key_bytes, 1024);
    assert_eq!(config.limits.max_value_bytes, 1048576);
    assert_eq!(config.limits.max_keys_per_namespace, 100_000);
    assert_eq!(config.limits.max_total_bytes, 64 * 1024 * 1024);
    assert_eq!(config.limits.max_lock_waiters_per_connection, 128);
    assert_eq!(config.limits.max_lock_waiters_per_lock, 1024);
    assert_eq!(
        config.connections,
        ConnectionLimits {
            max_connections: 1024,
            max_connections_per_uid: 128,
            handshake_timeout: Duration::from_secs(10),
            max_message_bytes: 2 * (1048576 + 1024) + 65536,
        }
    );
    assert_eq!(config.state_busy_poll, Duration::ZERO);
    // A minimal file means the defaults.
    let file = Some(PathBuf::from(ORIGIN));
    assert_eq!(
        parse(r#"command = ["/bin/app", "-v"]"#).unwrap(),
        Config { file, ..config }
    );
    assert_eq!(Config::default_path("web"), Path::new("/etc/ally/web.toml"));
}

#[test]
fn full_file() {
    let text = r#"
        command = ["/usr/bin/web", "--port", "8080"]
        working_directory = "/srv/web"
        user = "root"
        group = 0
        stop_signal = "usr2"
        ready_timeout = "1m 30s"
        stop_timeout = "500ms"
        restart = "always"
        restart_delay = "2s"
        max_draining = 2
        listener_linger = "0s"

        [environment]
        LANG = "C.UTF-8"
        "x.y" = ""

        [[listen]]
        network = "tcp4"
        address = "127.0.0.1:8080"
        backlog = 128
        reuse_port = true

        [[listen]]
        network = "unix"
        address = "/run/web/web.sock"
        mode = 0o660

        [limits]
        max_key_bytes = "1KiB"
        max_value_bytes = 4096
        max_keys_per_namespace = 10
        max_total_bytes = "64MiB"
    "#;
    let config = parse(text).unwrap();
    assert_eq!(config.command, ["/usr/bin/web", "--port", "8080"]);
    assert_eq!(
        config.working_directory.as_deref(),
        Some(Path::new("/srv/web"))
    );
    let ids = crate::identity::tests::resolved(&config).unwrap();
    assert_eq!((ids.user, ids.group), (Some(0), Some(0)));
    assert_eq!(ids.user_name.as_deref(), Some("root"));
    assert_eq!(config.stop_signal, Signal::SIGUSR2);
    assert_eq!(config.ready_timeout, Duration::from_secs(90));
    assert_eq!(config.stop_timeout, Duration::from_millis(500));
    assert_eq!(config.restart, RestartPolicy::Always);
    assert_eq!(config.restart_delay, Duration::from_secs(2));
    assert_eq!(config.max_draining, 2);
    assert_eq!(config.listener_linger, Duration::ZERO);
    assert_eq!(config.environment["LANG"], "C.UTF-8");
    assert_eq!(config.environment["x.y"], "");
    assert_eq!(config.listen.len(), 2);
    assert_eq!(
        config.listen[0].addr,
        ListenAddr::parse("tcp4", "127.0.0.1:8080").unwrap()
    );
    assert_eq!(
        config.listen[0].options,
        ListenOptions {
            backlog: Some(128),
            reuse_port: true,
            mode: None
        }
    );
    assert_eq!(
        config.listen[1].addr.endpoint,
        Endpoint::Path("/run/web/web.sock".into())
    );
    assert_eq!(config.listen[1].options.mode, Some(0o660));
    assert_eq!(
        config.limits,
        Limits {
            max_key_bytes: 1024,
            max_value_bytes: 4096,
            max_keys_per_namespace: 10,
            max_total_bytes: 64 << 20,
            ..Limits::default()
        }
    );
}

#[test]
fn command_override_replaces_file_command() {
    let over = Some(vec!["/bin/other".to_string()]);
    let config =
        Config::parse(r#"command = ["/bin/app"]"#, Path::new(ORIGIN), over.clone()).unwrap();
    assert_eq!(config.command, ["/bin/other"]);
    // With an override the file need not name a command.
    let config = Config::parse(r#"restart = "never""#, Path::new(ORIGIN), over).unwrap();
    assert_eq!(config.command, ["/bin/other"]);
    assert_eq!(config.restart, RestartPolicy::Never);
}

/// The README's example, and the packaged one with every key uncommented, are
/// valid (but for the user, which need not exist here).
#[test]
fn the_documented_examples_parse() {
    let readme = include_str!("../../../README.md");
    let block = readme
        .split_once("## Configuration")
        .and_then(|(_, section)| section.split("```toml\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("a toml block in README.md's Configuration section");
    let without_user: String = block
        .lines()
        .filter(|l| !l.starts_with("user ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = parse(&without_user).unwrap();
    assert_eq!(config.state_busy_poll, Duration::ZERO);
    assert_eq!(config.start_priority, StartPriority::Normal);
    assert_eq!(config.limits.max_total_bytes, 64 << 20);
    let packaged: String = include_str!("../../../packaging/example.toml")
        .lines()
        .map(|l| {
            l.strip_prefix("# ")
                .filter(|k| k.contains(" = ") || k.starts_with('['))
                .unwrap_or(l)
        })
        .filter(|l| !l.starts_with("user =") && !l.starts_with("group ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = parse(&packaged).unwrap();
    assert_eq!(config.listen.len(), 1);
    assert_eq!(config.start_priority, StartPriority::Idle);
    assert_eq!(config.limits.max_keys_per_namespace, 100_000);
}
