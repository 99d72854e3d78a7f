//! Apps that talk to the broker with a D-Bus library of their own, as
//! `docs/dbus-api.md` ("Talking to the private socket") tells them: godbus and
//! dbus-python instances take their listener as a `UNIX_FD`, call without a
//! destination (godbus sends an empty one), use the state socket, and say Ready.
//! And a message the broker cannot read is answered with an error on a
//! connection that goes on, never dropped in silence.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ally_core::wire::{self, FIXED_HEADER};
use common::*;
use serde_json::Value;
use zbus::Message;
use zbus::message::Type as MessageType;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/private_socket")
}

/// `fixtures()/godbus`, built once with Debian's Go and godbus, offline.
fn godbus_app() -> PathBuf {
    ally_testkit::go::build_program(
        &fixtures().join("godbus"),
        "private_socket_godbus",
        "apt install golang-go golang-dbus-dev",
    )
}

/// The line an instance answers a connection to `port` with.
fn report(port: u16) -> Value {
    let mut line = String::new();
    std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap()
        .read_to_string(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Runs `command` (plus the address) as the app, reloads once, and checks what
/// both generations report.
fn serves_through_its_own_library(app: &str, command: &[String]) {
    let port = free_port();
    let mut command: Vec<String> = command.to_vec();
    command.push(format!("127.0.0.1:{port}"));
    let config = format!("command = {command:?}\nready_timeout = \"20s\"\n");
    let broker = TestBroker::start(app, &config);
    broker.wait_running(1);
    let first = report(port);
    assert_eq!(first["app"], app, "{first}");
    assert_eq!(first["app_property"], app, "{first}");
    assert_eq!(first["generation"], 1, "{first}");
    assert_eq!(first["counter"], 7, "{first}");
    let refusal = first["no_interface"].as_str().unwrap();
    assert!(
        refusal.contains("names no interface: name it, e.g. org.ally.Broker1.Status"),
        "{refusal}"
    );

    let out = broker.reload();
    assert!(out.status.success(), "{out:?}\n{}", broker.logs());
    broker.wait_running(2);
    let second = report(port);
    assert_eq!(second["generation"], 2, "{second}");
    assert_eq!(
        second["counter"], 14,
        "the counter lives in the broker: {second}"
    );
    let status = broker.status();
    assert_eq!(
        status["listeners"][0]["address"],
        format!("127.0.0.1:{port}"),
        "{status}"
    );
    assert!(
        !broker.logs().contains("could not be read"),
        "{}",
        broker.logs()
    );
}

#[test]
fn a_godbus_app_with_no_destination_gets_its_socket_and_state() {
    let app = godbus_app().display().to_string();
    serves_through_its_own_library("godbus", &[app]);
}

#[test]
fn a_dbus_python_app_gets_its_socket_and_state() {
    let script = fixtures().join("dbus_python.py").display().to_string();
    // Debian's python3, which has python3-dbus (a python3 earlier on PATH may not).
    serves_through_its_own_library("dbuspython", &["/usr/bin/python3".into(), script]);
}

/// A connection to `socket`, authenticated as this process's uid and begun.
fn connect(socket: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let uid = nix::unistd::getuid().as_raw();
    stream.write_all(&wire::client_handshake(uid)).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8];
    while !answer.ends_with(b"\r\n") {
        stream.read_exact(&mut byte).unwrap();
        answer.push(byte[0]);
    }
    assert!(
        answer.starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    stream
}

fn read_message(stream: &mut UnixStream) -> Message {
    let mut fixed = [0u8; FIXED_HEADER];
    stream
        .read_exact(&mut fixed)
        .expect("an answer, not a closed connection");
    let mut bytes = vec![0u8; wire::message_len(&fixed).unwrap()];
    bytes[..FIXED_HEADER].copy_from_slice(&fixed);
    stream.read_exact(&mut bytes[FIXED_HEADER..]).unwrap();
    wire::decode(bytes).unwrap()
}

/// `call`'s bytes with its destination spelled so that it is no bus name.
fn unreadable(call: &Message) -> Vec<u8> {
    let mut bytes = call.data().to_vec();
    let at = bytes.windows(10).position(|w| w == b"org.ally.x").unwrap();
    bytes[at..at + 10].copy_from_slice(b"org..allyx");
    bytes
}

#[test]
fn a_message_the_broker_cannot_read_is_answered_and_the_connection_goes_on() {
    let broker = TestBroker::start_command(
        "unreadable",
        &[hello().to_str().unwrap(), "--listen", "127.0.0.1:0"],
    );
    broker.wait_running(1);
    let runtime = broker.socket();
    let runtime = runtime.parent().unwrap();
    for (socket, interface, member) in [
        ("bus", "org.ally.Broker1", "Status"),
        ("state", "org.ally.Atomic1", "List"),
    ] {
        let mut stream = connect(&runtime.join(socket));
        let call = |destination: &str| {
            Message::method_call("/org/ally", member)
                .interface(interface)
                .destination(destination)
                .build(&())
                .unwrap()
        };
        let bad = call("org.ally.x");
        stream.write_all(&unreadable(&bad)).unwrap();
        let answer = read_message(&mut stream);
        let header = answer.header();
        assert_eq!(header.message_type(), MessageType::Error, "{socket}");
        assert_eq!(
            header.reply_serial(),
            Some(bad.primary_header().serial_num())
        );
        assert_eq!(
            header.error_name().unwrap().as_str(),
            "org.freedesktop.DBus.Error.InvalidArgs"
        );
        let text: String = answer.body().deserialize().unwrap();
        assert!(
            text.starts_with("the broker could not read this message: "),
            "{socket}: {text}"
        );

        let good = call("org.ally.unreadable");
        stream.write_all(good.data()).unwrap();
        let answer = read_message(&mut stream);
        assert_eq!(
            answer.header().message_type(),
            MessageType::MethodReturn,
            "{socket}"
        );
        assert_eq!(
            answer.header().reply_serial(),
            Some(good.primary_header().serial_num())
        );
    }
    let logs = broker.logs();
    assert!(
        logs.contains("private socket: a message of") && logs.contains("could not be read"),
        "{logs}"
    );
}

#[test]
fn listen_on_a_connection_that_cannot_receive_its_fd_says_what_to_negotiate() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("reply");
    let script = fixtures().join("no_fd_passing.py");
    let broker = TestBroker::start_command(
        "nofds",
        &[
            "/usr/bin/python3",
            script.to_str().unwrap(),
            report.to_str().unwrap(),
        ],
    );
    broker.wait_running(1);
    let reply = std::fs::read_to_string(&report).unwrap();
    assert_eq!(
        reply,
        "3 Listen returns a file descriptor, and this connection did not negotiate passing them: \
         send NEGOTIATE_UNIX_FD after AUTH and before BEGIN (godbus's Auth, dbus-python, sd-bus and zbus do)"
    );
}
