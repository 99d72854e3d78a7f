//! Resolving `user` and `group` at start-up, against this machine's user database.

use std::path::Path;

use super::*;

const ORIGIN: &str = "/etc/ally/web.toml";

/// What the config and the start-up lookups make of `user` and `group`: the
/// ids the instances switch to, if any, and the user's name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub user: Option<u32>,
    pub group: Option<u32>,
    pub user_name: Option<String>,
}

pub(crate) fn resolved(config: &Config) -> Result<Resolved, String> {
    let run_as = RunAs::resolve(config)?;
    let user_set = config.user.is_some();
    Ok(Resolved {
        user: user_set.then_some(run_as.uid),
        group: run_as.switch.then_some(run_as.gid),
        user_name: if user_set { run_as.name } else { None },
    })
}

fn resolve(text: &str) -> Result<Resolved, String> {
    let config = Config::parse(text, Path::new(ORIGIN), None).map_err(|e| e.to_string())?;
    resolved(&config)
}

/// The error message for `text`, checked to be one line naming the file.
fn resolve_error(text: &str) -> String {
    let message = resolve(text).expect_err("config should be refused");
    assert!(message.starts_with(ORIGIN), "{message}");
    assert!(!message.contains('\n'), "{message}");
    message
}

fn with_command(rest: &str) -> String {
    format!("command = [\"/bin/app\"]\n{rest}")
}

#[test]
fn users_and_groups() {
    let config = resolve(&with_command(r#"user = "root""#)).unwrap();
    assert_eq!((config.user, config.group), (Some(0), Some(0)));
    assert_eq!(config.user_name.as_deref(), Some("root"));
    let config = resolve(&with_command("user = 0")).unwrap();
    assert_eq!(
        (config.user, config.group, config.user_name.as_deref()),
        (Some(0), Some(0), Some("root"))
    );
    let config = resolve(&with_command(r#"user = "0""#)).unwrap();
    assert_eq!(config.user, Some(0));
    let config = resolve(&with_command(r#"group = "root""#)).unwrap();
    assert_eq!((config.user, config.group), (None, Some(0)));

    let m = resolve_error(&with_command(r#"user = "no-such-user-ally""#));
    assert!(m.contains(r#"key `user`: unknown user "no-such-user-ally": expected an existing user name or a numeric uid"#), "{m}");
    let m = resolve_error(&with_command(r#"group = "no-such-group-ally""#));
    assert!(
        m.contains(r#"key `group`: unknown group "no-such-group-ally""#),
        "{m}"
    );
    let m = resolve_error(&with_command("user = -1"));
    assert!(m.contains("key `user`: id -1 is out of range"), "{m}");
    let m = resolve_error(&with_command("user = 4294967295"));
    assert!(
        m.contains("key `user`: id 4294967295 is out of range"),
        "{m}"
    );
    let m = resolve_error(&with_command("user = true"));
    assert!(
        m.contains("key `user`: expected a user name or a numeric id, found boolean true"),
        "{m}"
    );

    // A uid without a passwd entry has no primary group to fall back on.
    let m = resolve_error(&with_command("user = 3999999"));
    assert!(
        m.contains("key `user`: uid 3999999 has no entry") && m.contains("set `group` too"),
        "{m}"
    );
    let config = resolve(&with_command("user = 3999999\ngroup = 3999999")).unwrap();
    assert_eq!(
        (config.user, config.group, config.user_name),
        (Some(3999999), Some(3999999), None)
    );
}

#[test]
fn lookup_errors_carry_line_and_column() {
    let m = resolve_error("command = [\"/bin/app\"]\n\nuser =  \"no-such-user-ally\"\n");
    assert!(
        m.starts_with("/etc/ally/web.toml:3:9: key `user`: unknown user"),
        "{m}"
    );
    let m = resolve_error("command = [\"/bin/app\"]\ngroup = \"no-such-group-ally\"\n");
    assert!(
        m.starts_with("/etc/ally/web.toml:2:9: key `group`: "),
        "{m}"
    );
}

#[test]
fn the_groups_are_resolved_before_any_spawn() {
    let root = geteuid().is_root();
    let run_as = RunAs::resolve(
        &Config::parse(&with_command("user = \"root\""), Path::new(ORIGIN), None).unwrap(),
    )
    .unwrap();
    assert!(run_as.switch);
    assert_eq!(run_as.set_groups, root);
    if root {
        let expected: Vec<u32> = getgrouplist(c"root", Gid::from_raw(0))
            .unwrap()
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        assert_eq!(run_as.groups, expected);
    }
    // A uid the database does not know, with a group: no name, no lookup of
    // its groups, and it is still the uid the instances switch to.
    let run_as = RunAs::resolve(
        &Config::parse(
            &with_command("user = 3999999\ngroup = 3999998"),
            Path::new(ORIGIN),
            None,
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (run_as.uid, run_as.gid, run_as.name.as_deref()),
        (3999999, 3999998, None)
    );
    assert!(run_as.switch);
    if root {
        assert_eq!(run_as.groups, [3999998]);
    }
    assert_eq!(run_as.describe(), "uid 3999999");
    // Without `user` and `group`, the broker's own, and no switch.
    let run_as = RunAs::resolve(&Config::defaults(vec!["/bin/app".into()])).unwrap();
    assert!(!run_as.switch);
    assert_eq!(run_as.uid, geteuid().as_raw());
}
