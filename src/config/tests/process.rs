//! The keys about the app's processes: timing, priority, signals, restarts,
//! where and as whom they run, and the app's name.

use super::*;

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
fn drain_idle_defaults_to_a_second_and_stays_within_stop_timeout() {
    let drain_idle = |v: &str| parse(&with_command(v)).map(|c| c.drain_idle);
    assert_eq!(drain_idle("").unwrap(), DEFAULT_DRAIN_IDLE);
    assert_eq!(drain_idle("").unwrap(), Duration::from_secs(1));
    assert_eq!(
        drain_idle(r#"drain_idle = "250ms""#).unwrap(),
        Duration::from_millis(250)
    );
    // Compared with stop_timeout wherever either is written.
    assert_eq!(
        drain_idle("drain_idle = \"40s\"\nstop_timeout = \"1m\"").unwrap(),
        Duration::from_secs(40)
    );
    let m = error(&with_command("drain_idle = \"40s\""));
    assert_eq!(
        m,
        "/etc/ally/web.toml:2:14: key `drain_idle`: 40s is longer than stop_timeout (30s): an instance would be killed before an idle connection could be closed; expected at most stop_timeout"
    );
    let m = error(&with_command(r#"drain_idle = "0s""#));
    assert!(
        m.contains("key `drain_idle`: must be greater than zero"),
        "{m}"
    );
    let m = error(&with_command("drain_idle = 1"));
    assert!(
        m.contains(r#"key `drain_idle`: expected a duration string like "1s""#),
        "{m}"
    );
}

#[test]
fn stdout_and_stderr_go_to_the_journal_or_are_inherited() {
    let config = parse(&with_command("")).unwrap();
    assert_eq!(
        (config.stdout, config.stderr),
        (Output::Journal, Output::Journal)
    );
    let config = parse(&with_command("stdout = \"inherit\"\nstderr = \"journal\"")).unwrap();
    assert_eq!(
        (config.stdout, config.stderr),
        (Output::Inherit, Output::Journal)
    );
    let m = error(&with_command(r#"stderr = "syslog""#));
    assert_eq!(
        m,
        r#"/etc/ally/web.toml:2:10: key `stderr`: invalid output "syslog": expected "journal" or "inherit""#
    );
    let m = error(&with_command("stdout = false"));
    assert!(
        m.contains(r#"key `stdout`: expected "journal" or "inherit", found boolean false"#),
        "{m}"
    );
}
