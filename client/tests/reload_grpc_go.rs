//! The `tonic_server` example under a real `ally run`, 20 reloads while grpc-go
//! clients (Debian's `golang-google-grpc-dev`) call it back to back, each on the
//! one channel it keeps, with no retry policy: not one call may fail.
//!
//! tonic's own client fails a call it makes between an old generation's `GOAWAY`
//! and the end of that connection (`reload_tonic.rs` counts those); grpc-go sends
//! such a call on a new connection by itself (its transparent retry, gRFC A6), as
//! gRPC clients in most languages do. This is what a Go service calling ours sees.

use std::process::{Command, Stdio};
use std::time::Duration;

use ally_testkit::{Broker, build_ally, example, free_port, wait_until};

const RELOADS: u32 = 20;
const CLIENTS: u32 = 8;

#[test]
fn grpc_go_clients_on_kept_channels_lose_no_call() {
    build_ally();
    let client = ally_testkit::go::grpc_load_client();
    let port = free_port();
    let config = format!(
        "command = [{:?}, \"--listen\", \"127.0.0.1:{port}\"]\nready_timeout = \"20s\"\nstop_timeout = \"20s\"\n",
        example("tonic_server").display().to_string()
    );
    let broker = Broker::start("grpc", &config);
    broker.wait_running(1);

    let load = Command::new(&client)
        .args([format!("127.0.0.1:{port}"), CLIENTS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Let every client get its channel going before the first reload.
    std::thread::sleep(Duration::from_millis(500));
    for n in 1..=RELOADS {
        let out = broker.reload();
        assert!(out.status.success(), "reload {n} failed: {out:?}");
    }
    wait_until(
        "the old generations to finish draining",
        Duration::from_secs(60),
        || broker.pids("draining").is_empty(),
    );
    let load = ally_testkit::go::finish_grpc_load(load);
    eprintln!(
        "grpc-go, {CLIENTS} kept channels, {RELOADS} reloads: {}",
        load.report
    );
    assert_eq!(load.failed, 0, "{}\n{}", load.report, broker.logs());
    assert!(load.calls >= 1000, "too few calls: {}", load.report);
    assert_eq!(broker.generation(), u64::from(RELOADS) + 1);
}
