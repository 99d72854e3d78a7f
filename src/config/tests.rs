//! The config's messages, key by key.

use super::raw::Scalar;
use super::typed::parse_size;
use super::*;
use ally_core::net::Endpoint;

const ORIGIN: &str = "/etc/ally/web.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(ORIGIN), None)
}

/// The error message for `text`, checked to be one line naming the file.
fn error(text: &str) -> String {
    let message = parse(text)
        .expect_err("config should be refused")
        .to_string();
    assert!(message.starts_with(ORIGIN), "{message}");
    assert!(!message.contains('\n'), "{message}");
    message
}

fn with_command(rest: &str) -> String {
    format!("command = [\"/bin/app\"]\n{rest}")
}

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
    assert!(m.contains("unknown key `listen[0].adress` (expected one of: network, address, backlog, reuse_port, mode)"), "{m}");
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
fn durations() {
    let m = error(&with_command(r#"ready_timeout = "30 parsecs""#));
    assert_eq!(
        m,
        r#"/etc/ally/web.toml:2:17: key `ready_timeout`: invalid duration "30 parsecs": expected a duration like "30s" or "1m 30s""#
    );
    let m = error(&with_command("restart_delay = 5"));
    assert!(
        m.contains(r#"key `restart_delay`: expected a duration string like "5s", found integer 5"#),
        "{m}"
    );
    let m = error(&with_command("stop_timeout = true"));
    assert!(
        m.contains("key `stop_timeout`: expected a duration like"),
        "{m}"
    );
    assert!(m.contains("found boolean true"), "{m}");
    let m = error(&with_command(r#"stop_timeout = "0s""#));
    assert!(
        m.contains("key `stop_timeout`: must be greater than zero"),
        "{m}"
    );
    let m = error(&with_command(r#"ready_timeout = "400 years""#));
    assert!(
        m.contains("key `ready_timeout`") && m.contains("too long"),
        "{m}"
    );
    assert_eq!(
        parse(&with_command(r#"listener_linger = "1m""#))
            .unwrap()
            .listener_linger,
        Duration::from_secs(60)
    );
}

/// The README's example, and the packaged one with every key uncommented, are
/// valid (but for the user, which need not exist here).
#[test]
fn the_documented_examples_parse() {
    let readme = include_str!("../../README.md");
    let block = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a toml block in README.md");
    let without_user: String = block
        .lines()
        .filter(|l| !l.starts_with("user ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = parse(&without_user).unwrap();
    assert_eq!(config.state_busy_poll, Duration::ZERO);
    assert_eq!(config.start_priority, StartPriority::Normal);
    assert_eq!(config.limits.max_total_bytes, 64 << 20);
    let packaged: String = include_str!("../../packaging/example.toml")
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

#[test]
fn start_priority_is_normal_or_idle() {
    let priority = |v: &str| parse(&with_command(&format!("start_priority = {v:?}")));
    assert_eq!(
        parse(&with_command("")).unwrap().start_priority,
        StartPriority::Normal
    );
    assert_eq!(
        priority("idle").unwrap().start_priority,
        StartPriority::Idle
    );
    assert_eq!(
        priority("normal").unwrap().start_priority,
        StartPriority::Normal
    );
    let m = priority("low").unwrap_err().to_string();
    assert!(
        m.contains(
            r#"key `start_priority`: invalid start priority "low": expected "normal" or "idle""#
        ),
        "{m}"
    );
    let m = error(&with_command("start_priority = 19"));
    assert!(m.contains("key `start_priority`"), "{m}");
}

#[test]
fn state_busy_poll_is_bounded_and_can_be_off() {
    let busy_poll = |v: &str| parse(&with_command(&format!("state_busy_poll = {v:?}")));
    assert_eq!(
        busy_poll("20us").unwrap().state_busy_poll,
        Duration::from_micros(20)
    );
    assert_eq!(busy_poll("0s").unwrap().state_busy_poll, Duration::ZERO);
    let m = busy_poll("5ms").unwrap_err().to_string();
    assert!(
        m.contains("key `state_busy_poll`: 5ms is too long: expected at most 1ms"),
        "{m}"
    );
    let m = busy_poll("fast").unwrap_err().to_string();
    assert!(m.contains("key `state_busy_poll`: invalid duration"), "{m}");
}

#[test]
fn signals() {
    for (name, signal) in [
        ("SIGTERM", Signal::SIGTERM),
        ("TERM", Signal::SIGTERM),
        ("sigusr2", Signal::SIGUSR2),
        ("Int", Signal::SIGINT),
        ("SIGQUIT", Signal::SIGQUIT),
    ] {
        let config = parse(&with_command(&format!("stop_signal = {name:?}"))).unwrap();
        assert_eq!(config.stop_signal, signal, "{name}");
    }
    for name in ["SIGKILL", "kill", "STOP"] {
        let m = error(&with_command(&format!("stop_signal = {name:?}")));
        assert!(
            m.contains("key `stop_signal`: SIG") && m.contains("cannot be caught"),
            "{m}"
        );
    }
    let m = error(&with_command(r#"stop_signal = "SIGFOO""#));
    assert!(
        m.contains(
            r#"key `stop_signal`: unknown signal "SIGFOO": expected a signal name like "SIGTERM""#
        ),
        "{m}"
    );
    let m = error(&with_command("stop_signal = 15"));
    assert!(
        m.contains("key `stop_signal`: expected a signal name") && m.contains("found integer 15"),
        "{m}"
    );
}

#[test]
fn restart_and_counts() {
    for policy in RestartPolicy::ALL {
        let config = parse(&with_command(&format!("restart = \"{policy}\""))).unwrap();
        assert_eq!(config.restart, policy);
    }
    let m = error(&with_command(r#"restart = "sometimes""#));
    assert!(m.contains(r#"key `restart`: invalid restart policy "sometimes": expected "on-failure", "always" or "never""#), "{m}");
    let m = error(&with_command("max_draining = 0"));
    assert!(
        m.contains("key `max_draining`: expected a positive integer, found 0"),
        "{m}"
    );
    let m = error(&with_command(r#"max_draining = "4""#));
    assert!(
        m.contains(r#"key `max_draining`: expected a positive integer, found string "4""#),
        "{m}"
    );
}

#[test]
fn working_directory_and_environment() {
    let m = error(&with_command(r#"working_directory = "srv/web""#));
    assert!(
        m.contains(
            r#"key `working_directory`: "srv/web" is not absolute: expected an absolute path"#
        ),
        "{m}"
    );
    let m = error(&with_command("[environment]\n\"A=B\" = \"x\""));
    assert!(
        m.contains("key `environment.A=B`: invalid variable name \"A=B\""),
        "{m}"
    );
    let m = error(&with_command("[environment]\n\"\" = \"x\""));
    assert!(
        m.contains("key `environment.`: invalid variable name \"\""),
        "{m}"
    );
    let m = error(&with_command("[environment]\nPORT = 8080"));
    assert!(
        m.contains("key `environment.PORT`: expected a string value, found integer 8080"),
        "{m}"
    );
    let m = error(&with_command(r#"environment = ["A=B"]"#));
    assert!(
        m.contains("key `environment`: expected a table of strings"),
        "{m}"
    );
}

#[test]
fn users_and_groups_are_kept_as_written_with_their_place() {
    let config = parse(&with_command("user = \"nobody\"\ngroup = 0")).unwrap();
    assert_eq!(
        config.user,
        Some(Located {
            value: Principal::Name("nobody".into()),
            location: Some((2, 8)),
        })
    );
    assert_eq!(config.group.map(|g| g.value), Some(Principal::Id(0)));
    let config = parse(&with_command("user = \"65534\"")).unwrap();
    assert_eq!(config.user.map(|u| u.value), Some(Principal::Id(65534)));
    let m = error(&with_command("user = -1"));
    assert!(m.contains("key `user`: id -1 is out of range"), "{m}");
    let m = error(&with_command("user = 4294967295"));
    assert!(
        m.contains("key `user`: id 4294967295 is out of range"),
        "{m}"
    );
    let m = error(&with_command("user = true"));
    assert!(
        m.contains("key `user`: expected a user name or a numeric id, found boolean true"),
        "{m}"
    );
    let m = error(&with_command("group = \"\""));
    assert!(m.contains("key `group`: invalid group name \"\""), "{m}");
}

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

#[test]
fn app_names() {
    for good in [
        "web",
        "my-app",
        "my_app",
        "a.b-c",
        "App2",
        "x",
        &"a".repeat(64),
    ] {
        assert_eq!(validate_app_name(good), Ok(()), "{good}");
    }
    for bad in [
        "",
        ".web",
        "-web",
        "web.",
        "a..b",
        "2web",
        "a.2b",
        "we b",
        "we/b",
        "wéb",
        "a:b",
        &"a".repeat(65),
    ] {
        let m = validate_app_name(bad).expect_err(bad);
        assert!(m.starts_with("invalid app name"), "{m}");
    }
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
