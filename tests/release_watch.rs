//! `watch`: a new release behind the command's `current` symlink reloads the
//! app exactly once, under load with no failed request; a binary still being
//! copied, or not yet executable, reloads nothing until it is complete; a
//! release that fails is not retried until the next change.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// Longer than the watch's quiet period and its second look (2 × 500 ms).
const SETTLE: Duration = Duration::from_millis(2500);

struct Releases {
    _dir: tempfile::TempDir,
    root: PathBuf,
    port: u16,
    addr: SocketAddr,
}

impl Releases {
    /// Waits until new connections reach the hello of `version`: right after a
    /// reload the old generation may still accept a few, until its stop signal
    /// arrives.
    fn serves(&self, version: &str) {
        wait_until(
            &format!("{version} serving"),
            Duration::from_secs(10),
            || http_get(self.addr).is_ok_and(|a| a.contains(&format!("version={version} "))),
        );
    }

    fn new() -> Releases {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let port = free_port();
        let releases = Releases {
            _dir: dir,
            root,
            port,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        };
        releases.add("1", &releases.body("v1"));
        symlink("releases/1", releases.root.join("current")).unwrap();
        releases
    }

    /// The script of a release that serves as `version`.
    fn body(&self, version: &str) -> String {
        format!(
            "#!/bin/sh\nexec {} --listen 127.0.0.1:{} --version {version}\n",
            hello().display(),
            self.port
        )
    }

    fn app(&self, release: &str) -> PathBuf {
        self.root.join("releases").join(release).join("app")
    }

    /// A complete release `name`.
    fn add(&self, name: &str, body: &str) {
        let app = self.app(name);
        std::fs::create_dir_all(app.parent().unwrap()).unwrap();
        std::fs::write(&app, body).unwrap();
        std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Points `current` at release `name` in one step, as deploy tools do
    /// (a new symlink renamed over the old one).
    fn switch(&self, name: &str) {
        let tmp = self.root.join("current.tmp");
        symlink(format!("releases/{name}"), &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("current")).unwrap();
    }

    fn config(&self, watch: &str) -> String {
        format!(
            "command = [{:?}]\nwatch = {watch}\nstop_timeout = \"10s\"\nready_timeout = \"10s\"\n",
            self.root.join("current/app").display().to_string()
        )
    }
}

/// Keeps checking for `SETTLE` that the broker still runs `generation` after
/// `reloads` reloads, and that the watch tried none (not even a failing one).
fn assert_no_reload(broker: &TestBroker, generation: u64, reloads: u64, why: &str) {
    let tried = reloads_logged(broker);
    let until = std::time::Instant::now() + SETTLE;
    while std::time::Instant::now() < until {
        let status = broker.status();
        assert_eq!(status["generation"], generation, "{why}: {status}");
        assert_eq!(status["reloads"], reloads, "{why}: {status}");
        assert_eq!(reloads_logged(broker), tried, "{why}: {}", broker.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn reloads_logged(broker: &TestBroker) -> usize {
    broker.logs().matches(": reloading").count()
}

#[test]
fn a_new_release_behind_the_current_symlink_reloads_once_under_load() {
    let releases = Releases::new();
    let broker = TestBroker::start("web", &releases.config("true"));
    broker.wait_running(1);
    let status = broker.status();
    assert_eq!(
        status["watch"][0],
        format!(
            "{} -> {}",
            releases.root.join("current/app").display(),
            releases.app("1").display()
        ),
        "{status}"
    );
    let load = Load::start(releases.addr, LoadMode::NewConnection, 4);
    wait_until("load", Duration::from_secs(10), || load.ok() > 50);

    releases.add("2", &releases.body("v2"));
    // A release unpacked but not switched to reloads nothing.
    assert_no_reload(&broker, 1, 0, "releases/2 is not current yet");
    releases.switch("2");
    broker.wait_running(2);
    let before = load.ok();
    wait_until("requests to v2", Duration::from_secs(10), || {
        load.ok() > before + 100
    });
    assert_no_reload(&broker, 2, 1, "one release, one reload");
    let stats = load.finish();
    eprintln!(
        "{} ok, {} failed, versions {:?}",
        stats.ok, stats.failed, stats.versions
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert!(stats.versions.contains_key("v1") && stats.versions.contains_key("v2"));
    releases.serves("v2");

    let why = format!(
        "watch: {} changed: {} now points to releases/2 ({})",
        releases.root.join("current/app").display(),
        releases.root.join("current").display(),
        releases.app("2").display()
    );
    let status = broker.status();
    assert_eq!(
        status["watch_last"],
        format!("{why}: reloaded to generation 2"),
        "{status}"
    );
    let logs = broker.logs();
    assert!(logs.contains(&format!("{why}: reloading")), "{logs}");
    assert_eq!(reloads_logged(&broker), 1, "{logs}");
}

/// Writes the first half of `body` at `path`, then, after `pause`, the rest.
fn write_in_two_parts(path: &Path, body: &str, mode: u32, pause: impl FnOnce()) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    file.write_all(first.as_bytes()).unwrap();
    file.flush().unwrap();
    pause();
    file.write_all(rest.as_bytes()).unwrap();
}

#[test]
fn a_binary_being_copied_reloads_nothing_until_it_is_complete() {
    let releases = Releases::new();
    let broker = TestBroker::start("web", &releases.config("true"));
    broker.wait_running(1);
    let app = releases.app("1");

    // Replaced in place: first gone, then copied without the x bit, then chmod.
    std::fs::remove_file(&app).unwrap();
    assert_no_reload(&broker, 1, 0, "the binary is gone");
    write_in_two_parts(&app, &releases.body("v2"), 0o644, || {
        assert_no_reload(&broker, 1, 0, "half copied")
    });
    assert_no_reload(&broker, 1, 0, "copied, not executable");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    broker.wait_running(2);
    releases.serves("v2");
    assert_no_reload(&broker, 2, 1, "one complete binary, one reload");

    // Executable from the start (as `cp` of an executable creates it), written
    // with a pause longer than the quiet period: still being written.
    std::fs::remove_file(&app).unwrap();
    write_in_two_parts(&app, &releases.body("v3"), 0o755, || {
        assert_no_reload(&broker, 2, 1, "being written")
    });
    broker.wait_running(3);
    releases.serves("v3");
    assert_no_reload(&broker, 3, 2, "one complete binary, one reload");
    let logs = broker.logs();
    assert!(logs.contains("is not executable by"), "{logs}");
    assert!(logs.contains("is still being written"), "{logs}");
    assert_eq!(reloads_logged(&broker), 2, "{logs}");
}

#[test]
fn a_failing_release_is_not_retried_until_the_next_change() {
    let releases = Releases::new();
    let broker = TestBroker::start("web", &releases.config("true"));
    broker.wait_running(1);
    releases.add("bad", "#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
    releases.switch("bad");
    wait_until("the failed reload", Duration::from_secs(20), || {
        broker.status()["watch_last"]
            .as_str()
            .unwrap()
            .contains("the reload failed")
    });
    assert_no_reload(&broker, 1, 0, "a failed release is not retried");
    assert_eq!(reloads_logged(&broker), 1, "{}", broker.logs());
    assert!(http_get(releases.addr).unwrap().contains("version=v1 "));

    releases.add("3", &releases.body("v3"));
    releases.switch("3");
    broker.wait_running(3);
    releases.serves("v3");
}

#[test]
fn watch_follows_the_config_at_each_reload() {
    let releases = Releases::new();
    let broker = TestBroker::start("web", &releases.config("false"));
    broker.wait_running(1);
    releases.add("2", &releases.body("v2"));
    releases.switch("2");
    assert_no_reload(&broker, 1, 0, "watch = false");
    assert!(broker.status()["watch"].as_array().unwrap().is_empty());

    // A list of paths, armed by the reload that reads it.
    let watched = releases.root.join("current/app");
    std::fs::write(
        broker.config_path(),
        releases.config(&format!("[{:?}]", watched.display().to_string())),
    )
    .unwrap();
    assert!(broker.reload().status.success());
    broker.wait_running(2);
    wait_until("the watch armed", Duration::from_secs(10), || {
        !broker.status()["watch"].as_array().unwrap().is_empty()
    });
    releases.add("3", &releases.body("v3"));
    releases.switch("3");
    broker.wait_running(3);
    releases.serves("v3");
}
