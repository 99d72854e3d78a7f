//! Writes the seed corpora, `fuzz/corpus/<target>/seed-*`, from real inputs: the
//! shipped example config, the handshakes that zbus, libdbus, sd-bus and this
//! project's client send, and state calls encoded as the client encodes them.
//! Run from `fuzz/`: `cargo run --example seeds`.

use std::path::Path;

use ally_core::wire;
use zbus::Message;
use zbus::message::Flags;
use zbus::wire::Endian;

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    write(&corpus.join("config"), configs());
    write(&corpus.join("sasl"), handshakes());
    write(&corpus.join("state_call"), state_calls());
    write(&corpus.join("listen_addr"), listen_addrs());
}

fn write(dir: &Path, seeds: Vec<(&str, Vec<u8>)>) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}

fn configs() -> Vec<(&'static str, Vec<u8>)> {
    let example = include_str!("../../packaging/example.toml");
    let uncommented: String = example
        .lines()
        .map(|l| {
            l.strip_prefix("# ")
                .filter(|l| !l.starts_with(' '))
                .unwrap_or(l)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let command = "command = [\"/srv/app/bin/app\", \"--port\", \"8080\"]\n";
    let with = |rest: &str| format!("{command}{rest}").into_bytes();
    vec![
        ("example", example.into()),
        ("example-uncommented", uncommented.into_bytes()),
        ("command", command.into()),
        ("ids", with("user = 65534\ngroup = \"65534\"\n")),
        ("root", with("user = \"root\"\n")),
        (
            "environment",
            with("environment = { LANG = \"C.UTF-8\", EMPTY = \"\" }\n"),
        ),
        (
            "durations",
            with(
                "ready_timeout = \"1m 30s\"\nstop_timeout = \"30s\"\nrestart_delay = \"250ms\"\nlistener_linger = \"0s\"\n",
            ),
        ),
        ("signals", with("stop_signal = \"usr2\"\n")),
        ("sigkill", with("stop_signal = \"SIGKILL\"\n")),
        ("restart", with("restart = \"always\"\nmax_draining = 1\n")),
        (
            "priority",
            with("start_priority = \"idle\"\nstate_busy_poll = \"1ms\"\n"),
        ),
        (
            "limits",
            with(
                "[limits]\nmax_key_bytes = \"1KiB\"\nmax_value_bytes = 1048576\nmax_keys_per_namespace = 10\nmax_total_bytes = \"64 MB\"\n",
            ),
        ),
        (
            "listen-tcp",
            with(
                "[[listen]]\nnetwork = \"tcp\"\naddress = \":8080\"\nbacklog = 1024\nreuse_port = true\n",
            ),
        ),
        (
            "listen-many",
            with(
                "[[listen]]\nnetwork = \"tcp4\"\naddress = \"127.0.0.1:80\"\n[[listen]]\nnetwork = \"tcp6\"\naddress = \"[::1]:443\"\n[[listen]]\nnetwork = \"udp\"\naddress = \"[::ffff:10.0.0.1]:53\"\n",
            ),
        ),
        (
            "listen-unix",
            with(
                "[[listen]]\nnetwork = \"unix\"\naddress = \"/run/app/./http.sock\"\nmode = 0o660\n[[listen]]\nnetwork = \"unixgram\"\naddress = \"@app-log\"\n[[listen]]\nnetwork = \"unixpacket\"\naddress = \"/run/app.seq\"\nmode = \"0600\"\n",
            ),
        ),
        (
            "listen-twice",
            with(
                "[[listen]]\nnetwork = \"tcp\"\naddress = \":80\"\n[[listen]]\nnetwork = \"tcp\"\naddress = \"[::]:80\"\n",
            ),
        ),
        (
            "listen-inline",
            with("listen = [{ network = \"udp6\", address = \"[::]:5353\" }]\n"),
        ),
        (
            "working-directory",
            with("working_directory = \"/srv/app\"\n"),
        ),
        ("unknown-key", with("ready_timeot = \"5s\"\n")),
        ("unknown-nested-key", with("[limits]\n\"max\\nkeys\" = 3\n")),
        ("syntax", b"command = [\"/bin/true\"\n".to_vec()),
        ("duplicate", with("command = [\"/bin/b\"]\n")),
        ("missing-command", b"stop_timeout = \"5s\"\n".to_vec()),
        (
            "wrong-types",
            with("max_draining = \"four\"\nrestart_delay = 5\n"),
        ),
        ("empty", Vec::new()),
    ]
}

fn handshakes() -> Vec<(&'static str, Vec<u8>)> {
    let uid = |uid: u32| -> String {
        uid.to_string()
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let me = uid(1000);
    let stream = |lines: &[&str]| {
        let mut bytes = vec![0u8];
        for line in lines {
            bytes.extend_from_slice(line.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes
    };
    let external = format!("AUTH EXTERNAL {me}");
    let data = format!("DATA {me}");
    vec![
        ("ally-client", wire::client_handshake(1000)),
        ("zbus", stream(&[&external, "NEGOTIATE_UNIX_FD", "BEGIN"])),
        (
            "libdbus",
            stream(&["AUTH", &external, "NEGOTIATE_UNIX_FD", "BEGIN"]),
        ),
        (
            "sd-bus",
            stream(&["AUTH EXTERNAL", "DATA", "NEGOTIATE_UNIX_FD", "BEGIN"]),
        ),
        (
            "sd-bus-uid",
            stream(&[&external, "NEGOTIATE_UNIX_FD", "BEGIN"]),
        ),
        ("data-later", stream(&["AUTH EXTERNAL", &data, "BEGIN"])),
        (
            "other-uid",
            stream(&[&format!("AUTH EXTERNAL {}", uid(0)), "BEGIN"]),
        ),
        (
            "rejected-then-ok",
            stream(&["AUTH DBUS_COOKIE_SHA1 31303030", &external, "BEGIN"]),
        ),
        (
            "cancel",
            stream(&["AUTH EXTERNAL", "CANCEL", &external, "BEGIN"]),
        ),
        ("error", stream(&[&external, "ERROR", "BEGIN"])),
        ("twice", stream(&[&external, &external, "BEGIN"])),
        ("begin-first", stream(&["BEGIN"])),
        ("no-crlf", b"\0AUTH EXTERNAL 31303030\nBEGIN\n".to_vec()),
        ("no-nul", b"AUTH EXTERNAL 31303030\r\nBEGIN\r\n".to_vec()),
        (
            "lines",
            format!("{external}\nNEGOTIATE_UNIX_FD\nBEGIN\n").into_bytes(),
        ),
        (
            "lines-data",
            b"AUTH EXTERNAL\nDATA 31303030\nBEGIN\n".to_vec(),
        ),
        (
            "lines-garbage",
            b"HELLO\nAUTH EXTERNAL zz\nAUTH EXTERNAL 3\nDATA\nBEGIN\n".to_vec(),
        ),
    ]
}

fn state_calls() -> Vec<(&'static str, Vec<u8>)> {
    const PATH: &str = "/org/ally";
    const CACHE: &str = "org.ally.Cache1";
    const ATOMIC: &str = "org.ally.Atomic1";
    // As the client's direct connection encodes a call.
    fn call<B>(interface: &str, member: &str, body: &B) -> Message
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        Message::method_call(PATH, member)
            .interface(interface)
            .build(body)
            .unwrap()
    }
    let bytes = |messages: &[&Message]| -> Vec<u8> {
        messages.iter().flat_map(|m| m.data().to_vec()).collect()
    };
    let value = b"value".to_vec();
    let set = call(CACHE, "Set", &("ns", "key", value.clone(), 0u64));
    let get = call(CACHE, "Get", &("ns", "key"));
    let add = call(ATOMIC, "Add", &("hits", 1i64));
    let big_endian = Message::method_call(PATH, "Load")
        .interface(ATOMIC)
        .endian(Endian::Big)
        .build(&"hits")
        .unwrap();
    let no_reply = Message::method_call(PATH, "Store")
        .interface(ATOMIC)
        .with_flags(Flags::NO_REPLY_EXPECTED)
        .build(&("hits", 7i64))
        .unwrap();
    let hello = Message::method_call("/org/freedesktop/DBus", "Hello")
        .interface("org.freedesktop.DBus")
        .destination("org.freedesktop.DBus")
        .build(&())
        .unwrap();
    let ping = Message::method_call(PATH, "Ping")
        .interface("org.freedesktop.DBus.Peer")
        .build(&())
        .unwrap();
    let introspect = Message::method_call(PATH, "Introspect")
        .interface("org.freedesktop.DBus.Introspectable")
        .build(&())
        .unwrap();
    let signal = Message::signal(PATH, CACHE, "Changed")
        .build(&("ns", "key"))
        .unwrap();
    let other_path = Message::method_call("/org/other", "Get")
        .interface(CACHE)
        .build(&("ns", "key"))
        .unwrap();
    vec![
        ("cache-set", bytes(&[&set])),
        ("cache-get", bytes(&[&get])),
        ("cache-set-get", bytes(&[&set, &get])),
        (
            "cache-set-if-absent",
            bytes(&[&call(
                CACHE,
                "SetIfAbsent",
                &("ns", "key", value.clone(), 60u64),
            )]),
        ),
        (
            "cache-cas",
            bytes(&[
                &set,
                &call(
                    CACHE,
                    "CompareAndSwap",
                    &("ns", "key", value.clone(), b"new".to_vec(), 0u64),
                ),
            ]),
        ),
        (
            "cache-delete",
            bytes(&[&set, &call(CACHE, "Delete", &("ns", "key"))]),
        ),
        (
            "cache-exists",
            bytes(&[&call(CACHE, "Exists", &("ns", "key"))]),
        ),
        (
            "cache-keys-count-flush",
            bytes(&[
                &set,
                &call(CACHE, "Keys", &"ns"),
                &call(CACHE, "Count", &"ns"),
                &call(CACHE, "Flush", &"ns"),
            ]),
        ),
        ("atomic-add", bytes(&[&add])),
        (
            "atomic-add-overflow",
            bytes(&[&call(ATOMIC, "Store", &("hits", i64::MAX)), &add]),
        ),
        (
            "atomic-load",
            bytes(&[&add, &call(ATOMIC, "Load", &"hits")]),
        ),
        (
            "atomic-swap",
            bytes(&[&call(ATOMIC, "Swap", &("hits", 3i64))]),
        ),
        (
            "atomic-cas",
            bytes(&[&call(ATOMIC, "CompareAndSwap", &("hits", 0i64, 5i64))]),
        ),
        ("atomic-list", bytes(&[&add, &call(ATOMIC, "List", &())])),
        ("big-endian", bytes(&[&big_endian])),
        ("no-reply-expected", bytes(&[&no_reply])),
        ("busctl-hello", bytes(&[&hello])),
        ("ping", bytes(&[&ping])),
        ("introspect", bytes(&[&introspect])),
        ("signal", bytes(&[&signal])),
        ("other-path", bytes(&[&other_path])),
        ("unknown-method", bytes(&[&call(CACHE, "Nope", &())])),
        (
            "wrong-arguments",
            bytes(&[&call(CACHE, "Set", &("ns", 5u32))]),
        ),
        ("truncated", set.data()[..set.data().len() - 3].to_vec()),
    ]
}

fn listen_addrs() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("tcp-port", "tcp\n:8080"),
        ("tcp-ipv4", "tcp\n127.0.0.1:80"),
        ("tcp-ipv6", "tcp\n[::1]:443"),
        ("tcp-mapped", "tcp\n[::ffff:127.0.0.1]:80"),
        ("tcp4", "tcp4\n0.0.0.0:0"),
        ("tcp4-mapped", "tcp4\n[::ffff:10.1.2.3]:65535"),
        ("tcp6", "tcp6\n[fe80::1]:8443"),
        ("tcp6-v4", "tcp6\n127.0.0.1:80"),
        ("udp", "udp\n[::]:53"),
        ("udp4", "udp4\n:5353"),
        ("udp6", "udp6\n[::]:5353"),
        ("unix", "unix\n/run/app/http.sock"),
        ("unix-dots", "unix\n//run/./app/../http.sock"),
        ("unix-relative", "unix\nrun/app.sock"),
        ("unix-directory", "unix\n/run/app/"),
        ("unixgram-abstract", "unixgram\n@app-log"),
        ("unixpacket", "unixpacket\n/run/app.seq"),
        ("abstract-empty", "unix\n@"),
        ("no-port", "tcp\n127.0.0.1"),
        ("big-port", "tcp\n127.0.0.1:99999"),
        ("ipv6-no-brackets", "tcp\n::1:80"),
        ("sctp", "sctp\n127.0.0.1:80"),
    ]
    .into_iter()
    .map(|(name, text)| (name, text.as_bytes().to_vec()))
    .collect()
}
