//! A reload reads the config file again: the new generation runs with what the
//! operator edited (command, environment, `[[listen]]`, `drain_idle`), `ally
//! status` says which config revision each generation runs, and a config that
//! no longer reads fails the reload while the old generation serves on.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ally_client::ErrorKind;
use ally_testkit::load::field;
use common::*;

fn config_path(broker: &TestBroker) -> PathBuf {
    broker.dir.path().join(format!("{}.toml", broker.app))
}

fn edit(broker: &TestBroker, text: &str) {
    std::fs::write(config_path(broker), text).unwrap();
}

fn local(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// `version=V` from the hello example's answer on `port`.
fn version_on(port: u16) -> String {
    let body = http_get(local(port)).unwrap_or_else(|e| panic!("GET on port {port}: {e}"));
    field(&body, "version")
        .unwrap_or_else(|| panic!("no version in {body:?}"))
        .to_string()
}

/// Waits until new connections on `port` reach the hello of `version`: right
/// after a reload the old generation may still accept a few, until its stop
/// signal arrives.
fn serves_version(port: u16, version: &str) {
    wait_until(
        &format!("version {version} on port {port}"),
        Duration::from_secs(10),
        || version_on(port) == version,
    );
}

fn reload_ok(broker: &TestBroker) {
    let out = broker.reload();
    assert!(
        out.status.success(),
        "reload failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// A hello on `port` whose version comes from the environment.
fn env_config(port: u16, version: &str) -> String {
    format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\"]\nstop_timeout = \"10s\"\nenvironment = {{ HELLO_VERSION = {version:?} }}\n",
        hello().display().to_string()
    )
}

#[test]
fn an_edited_environment_reaches_the_new_generation() {
    let port = free_port();
    let broker = TestBroker::start("web", &env_config(port, "one"));
    broker.wait_running(1);
    assert_eq!(version_on(port), "one");
    let old = broker.pids("ready");

    edit(&broker, &env_config(port, "two"));
    reload_ok(&broker);
    assert_eq!(broker.generation(), 2);
    serves_version(port, "two");
    assert_ne!(broker.pids("ready"), old, "a new instance serves");
    assert!(
        broker.logs().contains("changed environment"),
        "{}",
        broker.logs()
    );
}

#[test]
fn edited_command_arguments_apply_at_the_reload() {
    let port = free_port();
    let broker = TestBroker::start("web", &hello_config(port, "one", ""));
    broker.wait_running(1);
    assert_eq!(version_on(port), "one");

    edit(&broker, &hello_config(port, "two", ""));
    reload_ok(&broker);
    serves_version(port, "two");
    // A crash restart runs the reloaded command too.
    let pid = broker.pids("ready")[0];
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    wait_until("a restarted generation", Duration::from_secs(20), || {
        let s = broker.status();
        s["state"] == "running" && s["generation"].as_u64() >= Some(3)
    });
    assert_eq!(version_on(port), "two");
}

#[test]
fn an_added_listen_entry_is_bound_before_the_generation_starts_and_a_removed_one_lingers() {
    let (first, second) = (free_port(), free_port());
    let listen =
        |port: u16| format!("[[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n");
    let config = |serve: u16, entries: &str| {
        format!(
            "listener_linger = \"1s\"\n{}",
            hello_config(serve, "v", entries)
        )
    };
    let broker = TestBroker::start("web", &config(first, &listen(first)));
    broker.wait_running(1);
    let listeners = |broker: &TestBroker| -> Vec<String> {
        broker.status()["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["address"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(listeners(&broker), vec![format!("127.0.0.1:{first}")]);

    // The new entry is bound by the broker, and the new generation serves on it.
    edit(&broker, &config(second, &listen(second)));
    reload_ok(&broker);
    serves_version(second, "v");
    let logs = broker.logs();
    let added = format!("listening on tcp 127.0.0.1:{second} ([[listen]] added by the reload)");
    let bound = logs
        .find(&added)
        .unwrap_or_else(|| panic!("{added:?} not in:\n{logs}"));
    let started = logs.find("started generation 2").unwrap();
    assert!(
        bound < started,
        "bound before generation 2 started:\n{logs}"
    );

    // The removed one lingers for listener_linger once no instance holds it, then closes.
    wait_until(
        "the removed listener closed",
        Duration::from_secs(20),
        || listeners(&broker) == vec![format!("127.0.0.1:{second}")],
    );
    assert!(
        std::net::TcpStream::connect(local(first)).is_err(),
        "nothing listens on the removed address"
    );
    assert!(broker.logs().contains(&format!(
        "tcp 127.0.0.1:{first} is no longer in [[listen]]: it closes once no instance has used it for 1s"
    )));
}

/// Reloads a config that does not read, with a client that never retries on
/// the port meanwhile: the reload fails with the config's error on the CLI and
/// over D-Bus, and the old generation serves every request.
fn assert_refused(broker: &TestBroker, port: u16, text: &str, expected: &str) {
    let old = broker.pids("ready");
    let revision = broker.status()["config_revision"].clone();
    edit(broker, text);
    let load = Load::start(local(port), LoadMode::NewConnection, 2);
    wait_until("load", Duration::from_secs(10), || load.ok() > 20);

    let out = broker.reload();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the CLI must fail: {}",
        stdout(&out)
    );
    let message = stderr(&out);
    let file = config_path(broker).display().to_string();
    assert_eq!(
        message.trim_end(),
        format!("ally: reload of web failed: the config was not reloaded: {file}:{expected}"),
    );
    let ally = ally_client::blocking::Ally::connect(&broker.address()).unwrap();
    let err = ally.reload().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReloadFailed, "{err}");
    assert!(
        err.to_string().contains(&format!("{file}:{expected}")),
        "{err}"
    );

    let before = load.ok();
    wait_until("more requests", Duration::from_secs(5), || {
        load.ok() > before + 20
    });
    let stats = load.finish();
    eprintln!(
        "refused reload ({expected}): {} requests on new connections, {} failed",
        stats.ok, stats.failed
    );
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert_eq!(broker.pids("ready"), old, "the old instance still serves");
    let status = broker.status();
    assert_eq!(status["state"], "running");
    assert_eq!(status["generation"], 1);
    assert_eq!(status["instances"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["config_revision"], revision, "{status}");
    assert!(
        status["last_reload"]
            .as_str()
            .unwrap()
            .contains(&format!("{file}:{expected}")),
        "{status}"
    );
    assert!(broker.logs().contains(&format!("{file}:{expected}")));
}

#[test]
fn a_config_that_no_longer_reads_fails_the_reload_and_the_old_generation_serves_on() {
    let port = free_port();
    let good = hello_config(port, "good", "");
    let broker = TestBroker::start("web", &good);
    broker.wait_running(1);

    let syntax = format!("{good}stop_signal = \"SIGTERM\n");
    assert_refused(
        &broker,
        port,
        &syntax,
        "5:23: TOML syntax error: invalid basic string, expected `\"`",
    );
    let invalid = format!("{good}stop_signal = \"SIGFOO\"\n");
    assert_refused(
        &broker,
        port,
        &invalid,
        "5:15: key `stop_signal`: unknown signal \"SIGFOO\": expected a signal name like \"SIGTERM\", \"TERM\" or \"SIGUSR2\"",
    );

    edit(&broker, &hello_config(port, "fixed", ""));
    reload_ok(&broker);
    serves_version(port, "fixed");
    assert_eq!(broker.status()["config_revision"], 2);
}

/// A launcher that writes the instance's ALLY_DRAIN_IDLE to a file named after
/// its generation, then runs hello.
fn drain_idle_app(dir: &Path, port: u16) -> PathBuf {
    write_script(
        dir,
        "launch",
        &format!(
            "echo \"${{ALLY_DRAIN_IDLE-unset}}\" > {dir}/drain_idle.$ALLY_GENERATION\nexec {hello} --listen 127.0.0.1:{port}",
            dir = dir.display(),
            hello = hello().display()
        ),
    )
}

#[test]
fn every_instance_gets_the_drain_idle_time_in_milliseconds() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let launcher = drain_idle_app(dir.path(), port);
    let config = |extra: &str| format!("command = [{:?}]\n{extra}", launcher.display().to_string());
    let broker = TestBroker::start("web", &config(""));
    broker.wait_running(1);
    let seen = |generation: u64| {
        let path = dir.path().join(format!("drain_idle.{generation}"));
        std::fs::read_to_string(path).unwrap().trim().to_string()
    };
    assert_eq!(seen(1), "1000", "the default, 1s");

    edit(&broker, &config("drain_idle = \"250ms\"\n"));
    reload_ok(&broker);
    assert_eq!(seen(2), "250");
}

#[test]
fn status_shows_the_config_revision_of_each_generation() {
    let port = free_port();
    // Generation 1 keeps serving while generation 2 starts, so both show.
    let config = |version: &str| hello_config(port, version, "");
    let broker = TestBroker::start("web", &config("one"));
    broker.wait_running(1);
    let status = broker.status();
    let file = config_path(&broker).display().to_string();
    assert_eq!(status["config_file"], file.as_str());
    assert_eq!(status["config_revision"], 1);
    let first_digest = status["config_digest"].as_str().unwrap().to_string();
    assert_eq!(first_digest.len(), 16, "{status}");
    let revision_of = |status: &serde_json::Value, pid: u64| {
        let id = status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["pid"] == pid)
            .unwrap()["id"]
            .clone();
        status["instance_configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no config for instance {id}: {status}"))["revision"]
            .as_u64()
            .unwrap()
    };
    let old = broker.pids("ready")[0] as u64;
    assert_eq!(revision_of(&status, old), 1);

    // The same file again is the same revision.
    reload_ok(&broker);
    let status = broker.status();
    assert_eq!(status["config_revision"], 1, "{status}");
    let same = broker.pids("ready")[0] as u64;
    assert_eq!(revision_of(&status, same), 1);

    edit(&broker, &config("two"));
    reload_ok(&broker);
    let status = broker.status();
    assert_eq!(status["config_revision"], 2, "{status}");
    assert_ne!(status["config_digest"], first_digest.as_str());
    let new = broker.pids("ready")[0] as u64;
    assert_eq!(revision_of(&status, new), 2);

    let table = stdout(&broker.ally(&["status", "web"]));
    assert!(
        table.contains(&format!("config: {file}, revision 2 (")),
        "{table}"
    );
    assert!(table.contains("CONFIG"), "{table}");
}

#[test]
fn without_a_config_file_a_reload_restarts_the_same_command() {
    let port = free_port();
    let hello = hello().display().to_string();
    let listen = format!("127.0.0.1:{port}");
    let broker =
        TestBroker::start_command("web", &[&hello, "--listen", &listen, "--version", "cli"]);
    broker.wait_running(1);
    reload_ok(&broker);
    serves_version(port, "cli");
    let status = broker.status();
    assert_eq!(status["generation"], 2);
    assert_eq!(status["config_file"], "");
    assert_eq!(status["config_revision"], 1);
    let table = stdout(&broker.ally(&["status", "web"]));
    assert!(
        table.contains("config: none (built-in defaults), revision 1"),
        "{table}"
    );
}

/// The uid and gid a process runs with, from /proc.
fn ids_of(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let first = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    };
    (first("Uid:"), first("Gid:"))
}

/// A reload that sets `user` runs the new generation as that user, which can
/// reach the broker's sockets to call `Ready`, as if the broker had started
/// with it.
#[test]
fn a_user_set_at_a_reload_runs_the_new_generation_and_may_reach_the_broker() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching the instances' user needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let port = free_port();
    let broker = TestBroker::start("web", &hello_config(port, "root", ""));
    broker.wait_running(1);
    assert_eq!(ids_of(broker.pids("ready")[0]), (0, 0));
    // The test's temporary directory holds the runtime directory: let others pass.
    std::fs::set_permissions(broker.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();

    edit(
        &broker,
        &hello_config(port, "nobody", "user = \"nobody\"\n"),
    );
    reload_ok(&broker);
    serves_version(port, "nobody");
    assert_eq!(
        ids_of(broker.pids("ready")[0]),
        (nobody.uid.as_raw(), nobody.gid.as_raw())
    );

    // And back: the broker's sockets are the broker's user's alone again.
    edit(&broker, &hello_config(port, "root again", ""));
    reload_ok(&broker);
    assert_eq!(ids_of(broker.pids("ready")[0]), (0, 0));
    let socket = std::fs::symlink_metadata(broker.socket()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((socket.uid(), socket.mode() & 0o777), (0, 0o600));
}

/// An old generation is asked to stop with the signal it was started with
/// (its `ALLY_STOP_SIGNAL`), not the one the reload brought: SIGUSR2 would
/// kill an app that waits for SIGTERM. (The broker takes the reload's settings
/// only after the old generation was asked to stop; this keeps that order.)
#[test]
fn an_old_generation_stops_with_its_own_stop_signal() {
    let port = free_port();
    let broker = TestBroker::start("web", &hello_config(port, "term", ""));
    broker.wait_running(1);
    let old = broker.pids("ready")[0];
    edit(
        &broker,
        &format!(
            "stop_signal = \"SIGUSR2\"\n{}",
            hello_config(port, "usr2", "")
        ),
    );
    reload_ok(&broker);
    serves_version(port, "usr2");
    wait_until("the old instance exited", Duration::from_secs(20), || {
        !pid_alive(old)
    });
    let exited = format!("instance=1 pid={old} generation=1");
    let exit = wait_for("its exit logged", Duration::from_secs(5), || {
        let logs = broker.logs();
        let line = logs.lines().find(|l| l.ends_with(&exited))?;
        Some(line.to_string())
    });
    assert!(exit.contains("instance exited with status 0"), "{exit}");
    let logs = broker.logs();
    assert!(
        logs.contains(&format!(
            "asking instance to stop with SIGTERM instance=1 pid={old}"
        )),
        "{logs}"
    );
}

/// A reload's generation that is not ready in time is stopped as it expects:
/// with the stop signal of the config it was started with.
#[test]
fn a_generation_that_fails_its_reload_stops_with_its_own_stop_signal() {
    let port = free_port();
    let broker = TestBroker::start("web", &hello_config(port, "term", ""));
    broker.wait_running(1);
    let never_ready = format!(
        "stop_signal = \"SIGUSR2\"\n{}",
        hello_config(port, "usr2", "")
            .replace("\"10s\"", "\"1s\"")
            .replace("\"usr2\"]", "\"usr2\", \"--ready-delay\", \"600000\"]")
    );
    edit(&broker, &never_ready);
    let out = broker.reload();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let message = stderr(&out);
    assert!(
        message.contains("was not ready within 1s (ready_timeout); it was killed, by its stop signal SIGUSR2 and then SIGKILL after 1s (stop_timeout)"),
        "{message}"
    );
    assert!(
        broker
            .logs()
            .contains("asking instance to stop with SIGUSR2 instance=2"),
        "{}",
        broker.logs()
    );
    assert_eq!(version_on(port), "term");
}

/// A reload whose generation cannot start leaves the broker with the config it
/// had: a crash restart of the old generation runs the old command.
#[test]
fn a_failed_reload_keeps_the_config_the_broker_had() {
    let port = free_port();
    let broker = TestBroker::start("web", &hello_config(port, "old", ""));
    broker.wait_running(1);
    edit(&broker, "command = [\"/nonexistent/web\"]\n");
    let out = broker.reload();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("could not start"), "{}", stderr(&out));
    assert_eq!(broker.status()["config_revision"], 1);

    signal(broker.pids("ready")[0], nix::sys::signal::Signal::SIGKILL);
    wait_until("a restarted generation", Duration::from_secs(20), || {
        let s = broker.status();
        s["state"] == "running" && s["generation"].as_u64() >= Some(3)
    });
    assert_eq!(version_on(port), "old");
}

/// `ally run APP --config FILE -- COMMAND`: a reload reads the file again, and
/// the command line's command still replaces the file's.
#[test]
fn a_command_given_on_the_command_line_still_replaces_the_files() {
    let port = free_port();
    let hello = hello().display().to_string();
    let listen = format!("127.0.0.1:{port}");
    let file = |version: &str| {
        format!(
            "command = [\"/nonexistent/web\"]\nenvironment = {{ HELLO_VERSION = {version:?} }}\n"
        )
    };
    let broker = TestBroker(
        Launch::new("web")
            .config(&file("one"))
            .command(&[&hello, "--listen", &listen])
            .start(),
    );
    broker.wait_running(1);
    assert_eq!(version_on(port), "one");
    edit(&broker, &file("two"));
    reload_ok(&broker);
    serves_version(port, "two");
}

/// A `[[listen]]` entry whose options change keeps its socket (closing it would
/// refuse connections), and the broker says so. A `[limits]` change waits for the
/// broker's restart, and the broker says that too.
#[test]
fn changed_listen_options_and_limits_keep_what_serves_and_say_so() {
    let port = free_port();
    let config = |backlog: u32, keys: u32| {
        format!(
            "[limits]\nmax_keys_per_namespace = {keys}\n[[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:{port}\"\nbacklog = {backlog}\n"
        )
    };
    let text = |backlog, keys| format!("{}{}", hello_config(port, "v", ""), config(backlog, keys));
    let broker = TestBroker::start("web", &text(16, 100));
    broker.wait_running(1);
    edit(&broker, &text(32, 200));
    reload_ok(&broker);
    serves_version(port, "v");
    let logs = broker.logs();
    let file = config_path(&broker).display().to_string();
    assert!(
        logs.contains(&format!(
            "{file}: the options of [[listen]] tcp 127.0.0.1:{port} changed; its socket stays open as it was bound"
        )),
        "{logs}"
    );
    assert!(
        logs.contains(&format!(
            "{file}: `limits` changed; the broker keeps its old value until it restarts"
        )),
        "{logs}"
    );
    let listeners = broker.status()["listeners"].as_array().unwrap().len();
    assert_eq!(listeners, 1);
}

/// An added `[[listen]]` entry the broker cannot bind fails the reload before
/// anything starts, naming the entry; the old generation serves on.
#[test]
fn an_added_listen_entry_that_cannot_be_bound_fails_the_reload() {
    let port = free_port();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let broker = TestBroker::start("web", &hello_config(port, "v", ""));
    broker.wait_running(1);
    edit(
        &broker,
        &hello_config(
            port,
            "v2",
            &format!("[[listen]]\nnetwork = \"tcp\"\naddress = \"127.0.0.1:{taken_port}\"\n"),
        ),
    );
    let out = broker.reload();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let file = config_path(&broker).display().to_string();
    let message = stderr(&out);
    assert!(
        message.starts_with(&format!(
            "ally: reload of web failed: the config was not reloaded: {file}: key `listen[0]` (tcp 127.0.0.1:{taken_port}): "
        )),
        "{message}"
    );
    assert!(message.contains("in use"), "{message}");
    assert_eq!(version_on(port), "v");
    let status = broker.status();
    assert_eq!(status["generation"], 1);
    assert_eq!(status["config_revision"], 1);
    assert_eq!(status["listeners"].as_array().unwrap().len(), 1, "{status}");
}
