//! What the broker binds on an instance's behalf: an address the operator
//! declared (`[[listen]]`, `allow_listen`) with the broker's rights, anything
//! else only as the instance's own user could. Most of these run an instance as
//! `nobody`, so they need root.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! needs_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root to run an instance as nobody");
            return;
        }
    };
}

/// A temporary directory anyone may write (the reports of a nobody instance).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

/// The probe with `args`, started once the broker's socket is reachable: the
/// broker's temporary directory opens to nobody only after it serves.
fn probe_command(report: &Path, args: &[String]) -> Vec<String> {
    let mut command = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        r#"p=${ALLY_ADDRESS#unix:path=}; until [ -S "$p" ]; do sleep 0.01; done; exec "$@""#.into(),
        "sh".into(),
        probe().display().to_string(),
        "--report".into(),
        report.display().to_string(),
    ];
    command.extend(args.iter().cloned());
    command
}

/// Starts a broker whose instances run as `user` (none: the broker's own).
fn start(app: &str, user: Option<&str>, command: &[String], extra: &str) -> TestBroker {
    let user = user.map_or(String::new(), |u| format!("user = {u:?}\n"));
    let config = format!("command = {command:?}\n{user}restart = \"never\"\n{extra}");
    let broker = TestBroker::start(app, &config);
    std::fs::set_permissions(broker.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    broker
}

fn listen(network: &str, address: &str) -> Vec<String> {
    vec!["--listen".into(), network.into(), address.into()]
}

fn listen_mode(address: &str, mode: u32) -> Vec<String> {
    vec![
        "--listen-option".into(),
        "unix".into(),
        address.into(),
        "mode".into(),
        format!("u:{mode}"),
    ]
}

fn listens(report: &Path) -> Vec<Value> {
    wait_for_report(report, "waiting", 1)
        .into_iter()
        .filter(|r| r["op"] == "listen")
        .collect()
}

fn assert_refused(r: &Value, kind: &str, words: &[&str]) {
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["kind"], kind, "{r}");
    let message = r["error"].as_str().unwrap();
    eprintln!("refused: {message}");
    for word in words {
        assert!(message.contains(word), "{r} should say {word:?}");
    }
}

fn mode_and_owner(path: &Path) -> (u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.uid())
}

/// Removes a socket file a failing run of the old code left in a system directory.
fn remove_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

const RACE_ATTEMPTS: usize = 10_000;

/// The chmod attack: a nobody instance renames a symlink to a root-owned file
/// over each socket file the broker binds for it, hoping that the broker then
/// changes the mode through the symlink.
fn race(app: &str, allow: bool) {
    let dir = open_dir();
    let report = dir.path().join("report");
    // Only root may change the way to the racer's own directory: for a declared
    // address the broker refuses a way someone else could redirect.
    let race_parent = tempfile::tempdir().unwrap();
    std::fs::set_permissions(race_parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let race_dir = race_parent.path().join("race");
    std::fs::create_dir(&race_dir).unwrap();
    chown(&race_dir, NOBODY);
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    let command = probe_command(
        &report,
        &[
            // Ready first: the race may outlast ready_timeout.
            "--ready".into(),
            "--race-symlink".into(),
            race_dir.display().to_string(),
            secret.display().to_string(),
            RACE_ATTEMPTS.to_string(),
        ],
    );
    let extra = if allow {
        format!(
            "allow_listen = [\"unix:{}/\"]\nlistener_linger = \"0s\"\n",
            race_dir.display()
        )
    } else {
        "listener_linger = \"0s\"\n".to_string()
    };
    let broker = start(app, Some("nobody"), &command, &extra);
    let racer = wait_for_report(&report, "racing", 1)
        .iter()
        .find(|r| r["op"] == "racing")
        .and_then(|r| r["pid"].as_u64())
        .unwrap() as u32;
    let mut outcome = None;
    wait_until("the race to finish", Duration::from_secs(600), || {
        outcome = json_lines(&report).into_iter().find(|r| r["op"] == "race");
        outcome.is_some() || mode_and_owner(&secret) != (0o600, 0) || !pid_alive(racer)
    });
    assert_eq!(
        mode_and_owner(&secret),
        (0o600, 0),
        "the broker changed a root-owned file through a symlink; logs:\n{}",
        broker.logs()
    );
    let outcome = outcome.unwrap_or_else(|| {
        panic!(
            "the racer died: {:?}; logs:\n{}",
            json_lines(&report),
            broker.logs()
        )
    });
    eprintln!("{outcome}");
    assert_eq!(outcome["attempts"], RACE_ATTEMPTS, "{outcome}");
    assert_eq!(outcome["bound"], RACE_ATTEMPTS, "{outcome}");
    // The racer did land its symlink where the sockets were.
    assert!(outcome["swapped"].as_u64().unwrap() > 0, "{outcome}");
}

#[test]
fn a_symlink_renamed_over_a_new_socket_changes_nothing() {
    needs_root!();
    race("race", false);
}

#[test]
fn a_symlink_renamed_over_a_declared_socket_changes_nothing() {
    needs_root!();
    race("racedecl", true);
}

#[test]
fn a_privileged_port_needs_the_operator() {
    needs_root!();
    let dir = open_dir();
    let report = dir.path().join("report");
    let free = free_port();
    let mut args = listen("tcp", "127.0.0.1:81");
    args.extend(listen("tcp", &format!("127.0.0.1:{free}")));
    let command = probe_command(&report, &args);
    let broker = start("port", Some("nobody"), &command, "");
    let r = listens(&report);
    let config = broker.dir.path().join("port.toml");
    assert_refused(
        &r[0],
        "AccessDenied",
        &[
            "tcp 127.0.0.1:81",
            "port 81",
            "allow_listen",
            &config.display().to_string(),
        ],
    );
    assert_eq!(
        r[1]["ok"], true,
        "an unprivileged port is nobody's: {}",
        r[1]
    );
    drop(broker);

    let report = dir.path().join("report2");
    let command = probe_command(&report, &listen("tcp", "127.0.0.1:81"));
    let _broker = start(
        "portok",
        Some("nobody"),
        &command,
        "allow_listen = [\"tcp:127.0.0.1:81\"]\n",
    );
    let r = listens(&report);
    assert_eq!(r[0]["ok"], true, "allow_listen declares it: {}", r[0]);
    assert_eq!(r[0]["local"], "127.0.0.1:81");
}

#[test]
fn unix_sockets_are_made_as_the_instance_user() {
    needs_root!();
    let dir = open_dir();
    let report = dir.path().join("report");
    let own = dir.path().join("own");
    std::fs::create_dir(&own).unwrap();
    chown(&own, NOBODY);
    let declared = tempfile::tempdir().unwrap();
    let tag = std::process::id();
    let in_etc = PathBuf::from(format!("/etc/ally-security-test-{tag}.sock"));
    let in_root = PathBuf::from(format!("/root/ally-security-test-{tag}.sock"));
    let mine = own.join("mine.sock");
    let allowed = declared.path().join("allowed.sock");
    let mut args = listen("unix", &in_etc.display().to_string());
    args.extend(listen("unixgram", &in_root.display().to_string()));
    args.extend(listen_mode(&mine.display().to_string(), 0o640));
    args.extend(listen_mode(&allowed.display().to_string(), 0o660));
    let command = probe_command(&report, &args);
    let extra = format!("allow_listen = [\"unix:{}/\"]\n", declared.path().display());
    let _broker = start("unixdir", Some("nobody"), &command, &extra);
    let r = listens(&report);
    let etc_exists = std::fs::symlink_metadata(&in_etc).is_ok();
    let root_exists = std::fs::symlink_metadata(&in_root).is_ok();
    remove_socket(&in_etc);
    remove_socket(&in_root);
    assert_refused(
        &r[0],
        "AccessDenied",
        &[&in_etc.display().to_string(), "nobody", "allow_listen"],
    );
    assert_refused(
        &r[1],
        "AccessDenied",
        &[&in_root.display().to_string(), "allow_listen"],
    );
    assert!(!etc_exists && !root_exists, "a refused socket left a file");
    assert_eq!(r[2]["ok"], true, "{}", r[2]);
    assert_eq!(mode_and_owner(&mine), (0o640, NOBODY), "as nobody would");
    assert_eq!(r[3]["ok"], true, "{}", r[3]);
    assert_eq!(
        mode_and_owner(&allowed),
        (0o660, 0),
        "declared: as the broker"
    );
}

#[test]
fn set_id_bits_are_refused() {
    let dir = open_dir();
    let report = dir.path().join("report");
    let socket = dir.path().join("m.sock");
    let mut args = listen_mode(&socket.display().to_string(), 0o6777);
    let ok = dir.path().join("ok.sock");
    args.extend(listen_mode(&ok.display().to_string(), 0o777));
    let command = probe_command(&report, &args);
    let _broker = start("modes", None, &command, "");
    let r = listens(&report);
    assert_refused(
        &r[0],
        "InvalidArgument",
        &["option \"mode\"", "0o6777", "0o777"],
    );
    assert!(std::fs::symlink_metadata(&socket).is_err());
    assert_eq!(r[1]["ok"], true, "{}", r[1]);
    assert_eq!(mode_and_owner(&ok).0, 0o777);
}

#[test]
fn a_dead_socket_the_broker_did_not_make_stays() {
    let dir = open_dir();
    let report = dir.path().join("report");
    let victim = dir.path().join("victim.sock");
    drop(std::os::unix::net::UnixListener::bind(&victim).unwrap());
    let inode = std::fs::symlink_metadata(&victim).unwrap().ino();
    let command = probe_command(&report, &listen("unix", &victim.display().to_string()));
    let _broker = start("stale", None, &command, "");
    let r = listens(&report);
    assert_refused(
        &r[0],
        "AddressInUse",
        &[&victim.display().to_string(), "did not create"],
    );
    assert_eq!(std::fs::symlink_metadata(&victim).unwrap().ino(), inode);
}

#[test]
fn a_declared_socket_in_a_directory_a_user_controls_is_that_users() {
    needs_root!();
    let dir = open_dir();
    let report = dir.path().join("report");
    // The app's own directory: it could swap it for a symlink to /etc, so root
    // does not bind there; the app's user may, as it could itself.
    let apps = dir.path().join("apps");
    std::fs::create_dir(&apps).unwrap();
    chown(&apps, NOBODY);
    // Another user's directory, closed to the app: no one binds there for it.
    let others = dir.path().join("others");
    std::fs::create_dir(&others).unwrap();
    std::fs::set_permissions(&others, std::fs::Permissions::from_mode(0o755)).unwrap();
    chown(&others, 4242);
    let in_apps = apps.join("web.sock");
    let in_others = others.join("web.sock");
    let mut args = listen_mode(&in_apps.display().to_string(), 0o660);
    args.extend(listen("unix", &in_others.display().to_string()));
    let command = probe_command(&report, &args);
    let extra = format!(
        "allow_listen = [\"unix:{}/\", \"unix:{}/\"]\n",
        apps.display(),
        others.display()
    );
    let _broker = start("declaredown", Some("nobody"), &command, &extra);
    let r = listens(&report);
    assert_eq!(r[0]["ok"], true, "{}", r[0]);
    assert_eq!(
        mode_and_owner(&in_apps),
        (0o660, NOBODY),
        "as the app's user"
    );
    assert_refused(
        &r[1],
        "AccessDenied",
        &[
            &in_others.display().to_string(),
            "not bind it as root",
            "nobody",
        ],
    );
    assert!(std::fs::symlink_metadata(&in_others).is_err());
}
