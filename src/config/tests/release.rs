//! `check`, `check_timeout` and `watch`: the release workflow's keys.

use super::*;

#[test]
fn check_is_a_command_with_a_timeout() {
    let config = parse(&with_command(
        "check = [\"/bin/app\", \"-t\"]\ncheck_timeout = \"5s\"",
    ))
    .unwrap();
    assert_eq!(
        config.check,
        Some(vec!["/bin/app".to_string(), "-t".to_string()])
    );
    assert_eq!(config.check_timeout, Duration::from_secs(5));
    let defaults = parse(&with_command("")).unwrap();
    assert_eq!(defaults.check, None);
    assert_eq!(defaults.check_timeout, DEFAULT_CHECK_TIMEOUT);
}

#[test]
fn watch_is_a_switch_or_paths() {
    assert_eq!(parse(&with_command("")).unwrap().watch, Watch::Off);
    assert_eq!(
        parse(&with_command("watch = false")).unwrap().watch,
        Watch::Off
    );
    assert_eq!(
        parse(&with_command("watch = true")).unwrap().watch,
        Watch::Command
    );
    assert_eq!(
        parse(&with_command(
            "watch = [\"/srv/web/current/bin/web\", \"/etc/web.conf\"]"
        ))
        .unwrap()
        .watch,
        Watch::Paths(vec![
            PathBuf::from("/srv/web/current/bin/web"),
            PathBuf::from("/etc/web.conf")
        ])
    );
}

#[test]
fn bad_values_name_the_key_and_what_is_expected() {
    for (text, expected) in [
        (
            "check = []",
            "/etc/ally/web.toml:2:9: key `check`: is empty",
        ),
        (
            "check = \"nginx -t\"",
            "key `check`: expected an array of strings",
        ),
        (
            "check = [\"\"]",
            "key `check[0]`: the program must not be empty",
        ),
        (
            "check_timeout = \"0s\"",
            "key `check_timeout`: must be greater than zero",
        ),
        (
            "check_timeout = 5",
            "key `check_timeout`: expected a duration string like \"5s\"",
        ),
        (
            "watch = \"yes\"",
            "/etc/ally/web.toml:2:9: key `watch`: expected true, false or an array of paths, e.g. watch = [\"/srv/web/current/bin/web\"], found string \"yes\"",
        ),
        (
            "watch = 1",
            "key `watch`: expected true, false or an array of paths",
        ),
        (
            "watch = []",
            "key `watch`: is empty: expected true, false or an array of paths",
        ),
        (
            "watch = [\"current/bin/web\"]",
            "/etc/ally/web.toml:2:10: key `watch[0]`: \"current/bin/web\" is not absolute: expected an absolute path",
        ),
        (
            "watch = [1]",
            "key `watch[0]`: expected a string, found integer 1",
        ),
    ] {
        let m = error(&with_command(text));
        assert!(m.contains(expected), "{text}: {m}");
    }
    let many = (0..=MAX_WATCH_PATHS)
        .map(|i| format!("\"/p{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let m = error(&with_command(&format!("watch = [{many}]")));
    assert!(
        m.contains("key `watch`: has 65 paths: expected at most 64"),
        "{m}"
    );
}
