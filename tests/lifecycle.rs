//! Stopping, crash restarts, queued reloads and the broker's own signals.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

#[test]
fn an_old_instance_that_ignores_sigterm_is_killed_after_stop_timeout() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let flags = dir.path().join("flags");
    std::fs::write(&flags, "--ignore-stop").unwrap();
    let launcher = write_script(
        dir.path(),
        "launch",
        &format!(
            "exec {} --listen 127.0.0.1:{port} $(cat {})",
            hello().display(),
            flags.display()
        ),
    );
    let config = format!(
        "command = [{:?}]\nstop_timeout = \"2s\"\n",
        launcher.display().to_string()
    );
    let broker = TestBroker::start("stubborn", &config);
    broker.wait_running(1);
    let old = broker.pids("ready")[0];
    std::fs::write(&flags, "").unwrap();
    assert!(broker.reload().status.success());
    let signalled = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(pid_alive(old), "killed before stop_timeout");
    assert_eq!(broker.pids("draining"), vec![old]);
    wait_until("SIGKILL after stop_timeout", Duration::from_secs(5), || {
        !pid_alive(old)
    });
    let took = signalled.elapsed();
    assert!(took >= Duration::from_millis(1900), "killed after {took:?}");
    assert!(
        broker
            .logs()
            .contains("did not stop within 2s (stop_timeout); sending SIGKILL"),
        "{}",
        broker.logs()
    );
    assert!(http_get(addr(port)).unwrap().starts_with("hello "));
}

#[test]
fn a_crashed_instance_is_restarted_and_clients_in_the_gap_wait_instead_of_being_refused() {
    let port = free_port();
    let config = hello_config(port, "1", "restart_delay = \"700ms\"");
    let broker = TestBroker::start("crashy", &config);
    broker.wait_running(1);
    let pid = broker.pids("ready")[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    wait_until("the crash to be seen", Duration::from_secs(5), || {
        !pid_alive(pid)
    });
    // In the gap nothing accepts, but the socket is open: the connection
    // completes into the backlog and the request is answered by the restart.
    let started = Instant::now();
    let mut conn = HttpConnection::connect(addr(port)).expect("refused during the restart gap");
    let (body, _) = conn.request(true).expect("the request in the gap was lost");
    assert!(body.starts_with("hello "), "{body}");
    assert!(!body.contains(&format!("pid={pid} ")));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered too soon to have waited"
    );
    broker.wait_running(2);
    assert!(
        broker
            .logs()
            .contains("the current instance was killed by SIGKILL")
    );
}

#[test]
fn restart_never_stops_the_broker_with_the_app() {
    let port = free_port();
    let config = hello_config(port, "1", "restart = \"never\"");
    let mut broker = TestBroker::start("once", &config);
    broker.wait_running(1);
    let pid = broker.pids("ready")[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    wait_until("the broker to exit", Duration::from_secs(10), || {
        broker.try_wait().is_some()
    });
    assert_eq!(broker.try_wait().unwrap().code(), Some(1));
}

#[test]
fn reloads_asked_for_during_a_reload_share_one_follow_up() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("spawns");
    let launcher = write_script(
        dir.path(),
        "launch",
        &format!(
            "echo x >> {}\nexec {} --listen 127.0.0.1:{port} --ready-delay 800",
            counter.display(),
            hello().display()
        ),
    );
    let config = format!(
        "command = [{:?}]\nready_timeout = \"10s\"\n",
        launcher.display().to_string()
    );
    let broker = TestBroker::start("queue", &config);
    broker.wait_running(1);
    let results = std::thread::scope(|s| {
        let first = s.spawn(|| broker.reload());
        wait_until(
            "the first reload to be in flight",
            Duration::from_secs(5),
            || broker.status()["state"] == "reloading",
        );
        let queued: Vec<_> = (0..5).map(|_| s.spawn(|| broker.reload())).collect();
        let mut all = vec![first.join().unwrap()];
        all.extend(queued.into_iter().map(|h| h.join().unwrap()));
        all
    });
    let said: Vec<String> = results
        .iter()
        .map(|o| stdout(o).trim().to_string())
        .collect();
    assert_eq!(said[0], "queue: reloaded to generation 2", "{said:?}");
    for s in &said[1..] {
        assert_eq!(s, "queue: reloaded to generation 3", "{said:?}");
    }
    let spawns = std::fs::read_to_string(&counter).unwrap().lines().count();
    assert_eq!(spawns, 3, "one start, one reload, one follow-up");
}

#[test]
fn sighup_reloads_and_sigterm_stops_every_instance_gracefully() {
    let port = free_port();
    let mut broker = TestBroker::start("signals", &hello_config(port, "1", ""));
    broker.wait_running(1);
    broker.signal(Signal::SIGHUP);
    broker.wait_running(2);
    let pid = broker.pids("ready")[0];
    // A keep-alive client mid-conversation is answered, then told to close.
    let mut conn = HttpConnection::connect(addr(port)).unwrap();
    conn.request(false).unwrap();
    let status = broker.stop();
    assert!(status.success(), "{status}");
    assert!(!pid_alive(pid));
    let logs = broker.logs();
    assert!(logs.contains("SIGHUP: reloading"), "{logs}");
    assert!(
        logs.contains("asking instance to stop with SIGTERM"),
        "{logs}"
    );
    assert!(logs.contains("instance exited with status 0"), "{logs}");
    assert!(
        std::net::TcpStream::connect(addr(port)).is_err(),
        "the broker closed its sockets"
    );
}

#[test]
fn run_with_a_command_uses_the_defaults() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let hello = hello().display().to_string();
    let broker = TestBroker::start_command("quick", &[&hello, "--listen", &listen]);
    broker.wait_running(1);
    assert!(
        http_get(addr(port))
            .unwrap()
            .starts_with("hello version=1 ")
    );
}

#[test]
fn instances_get_their_environment_and_working_directory() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let launcher = write_script(
        dir.path(),
        "launch",
        &format!(
            "{{ pwd; echo \"$GREETING $ALLY_APP $ALLY_INSTANCE $ALLY_GENERATION $ALLY_STOP_SIGNAL\"; echo \"$ALLY_ADDRESS\"; }} > {}\nexec {} --listen 127.0.0.1:{port}",
            seen.display(),
            hello().display()
        ),
    );
    let config = format!(
        "command = [{:?}]\nworking_directory = {:?}\nenvironment = {{ GREETING = \"hi there\" }}\nstop_signal = \"SIGINT\"\n",
        launcher.display().to_string(),
        dir.path().display().to_string()
    );
    let broker = TestBroker::start("envy", &config);
    broker.wait_running(1);
    let seen = std::fs::read_to_string(&seen).unwrap();
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(
        lines[0],
        dir.path().canonicalize().unwrap().display().to_string()
    );
    assert_eq!(lines[1], "hi there envy 1 1 SIGINT");
    assert_eq!(lines[2], broker.address());
}

#[test]
fn max_draining_holds_a_reload_until_a_draining_instance_is_gone() {
    let port = free_port();
    let config = format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\", \"--ignore-stop\"]\nstop_timeout = \"2s\"\nmax_draining = 1\n",
        hello().display().to_string()
    );
    let broker = TestBroker::start("drains", &config);
    broker.wait_running(1);
    assert!(broker.reload().status.success());
    assert_eq!(broker.pids("draining").len(), 1);
    let started = Instant::now();
    let second = broker.reload();
    let waited = started.elapsed();
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        waited >= Duration::from_millis(1500),
        "the reload did not wait for the drain slot: {waited:?}"
    );
    assert!(broker.pids("draining").len() <= 1);
    assert!(
        broker
            .logs()
            .contains("1 instances are draining (max_draining); waiting for one to exit")
    );
}
