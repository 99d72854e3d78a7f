//! Reloads under continuous load refuse and lose nothing, switch the answers to
//! the new version, and leave no old instance behind.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const RELOADS: usize = 20;

fn reload_under_load(mode: LoadMode) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // The command runs through a symlink re-pointed before each reload, as an
    // upgrade through a `current` release link would.
    let version_file = dir.path().join("version");
    std::fs::write(&version_file, "v0").unwrap();
    let launcher = write_script(
        dir.path(),
        "launch",
        &format!(
            "exec {} --listen 127.0.0.1:{port} --version \"$(cat {})\"",
            hello().display(),
            version_file.display()
        ),
    );
    let config = format!(
        "command = [{:?}]\nstop_timeout = \"10s\"\nready_timeout = \"10s\"\n",
        launcher.display().to_string()
    );
    let broker = TestBroker::start("web", &config);
    broker.wait_running(1);
    let first_pid = broker.pids("ready")[0];

    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let load = Load::start(addr, mode, 4);
    wait_until("the load to get going", Duration::from_secs(10), || {
        load.ok() > 50
    });
    let mut old_pids = vec![first_pid];
    for n in 1..=RELOADS {
        std::fs::write(&version_file, format!("v{n}")).unwrap();
        let out = broker.reload();
        assert!(out.status.success(), "reload {n} failed: {}", stderr(&out));
        assert_eq!(
            stdout(&out).trim(),
            format!("web: reloaded to generation {}", n + 1)
        );
        old_pids.extend(broker.pids("ready"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let before_last = load.ok();
    wait_until(
        "requests after the last reload",
        Duration::from_secs(10),
        || load.ok() > before_last + 100,
    );
    let stats = load.finish();
    eprintln!(
        "{mode:?}: {} ok, {} failed, {} retried on closed keep-alive connections, versions {:?}",
        stats.ok, stats.failed, stats.retried, stats.versions
    );
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert!(
        stats.ok > 1000,
        "too little load to prove anything: {}",
        stats.ok
    );
    assert!(stats.versions.contains_key("v0"));
    assert!(stats.versions.contains_key(&format!("v{RELOADS}")));
    assert!(
        stats.versions.len() > RELOADS / 2,
        "answers did not follow the reloads: {:?}",
        stats.versions
    );

    let last = http_get(addr).unwrap();
    assert!(last.contains(&format!("version=v{RELOADS} ")), "{last}");
    let current = broker.pids("ready");
    assert_eq!(current.len(), 1);
    wait_until(
        "every old instance to exit",
        Duration::from_secs(15),
        || {
            old_pids
                .iter()
                .filter(|p| !current.contains(p))
                .all(|p| !pid_alive(*p))
        },
    );
    let status = broker.status();
    assert_eq!(status["generation"], RELOADS as u64 + 1);
    assert_eq!(status["reloads"], RELOADS as u64);
    assert_eq!(status["instances"].as_array().unwrap().len(), 1);
}

#[test]
fn new_connection_per_request() {
    reload_under_load(LoadMode::NewConnection);
}

#[test]
fn keep_alive_connections() {
    reload_under_load(LoadMode::KeepAlive);
}
