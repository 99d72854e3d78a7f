//! The instances' stdout and stderr, captured by the broker: each line to
//! journald (here a socket of the test's own, `ALLY_JOURNAL_SOCKET`) with its
//! generation, or to the broker's stderr as `app[generation] pid: line`;
//! never blocking the app, every lost line counted.

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A journald that reads only when asked.
struct FakeJournal {
    path: PathBuf,
    socket: UnixDatagram,
}

type Entry = HashMap<String, Vec<u8>>;

impl FakeJournal {
    fn bind(dir: &Path) -> FakeJournal {
        let path = dir.join("journal.socket");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_nonblocking(true).unwrap();
        FakeJournal { path, socket }
    }

    fn env(&self) -> (&'static str, &str) {
        ("ALLY_JOURNAL_SOCKET", self.path.to_str().unwrap())
    }

    /// Every entry waiting on the socket.
    fn read(&self) -> Vec<Entry> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut entries = Vec::new();
        while let Ok(n) = self.socket.recv(&mut buf) {
            entries.push(parse_entry(&buf[..n]));
        }
        entries
    }
}

/// journald's native protocol: `NAME=value\n`, or `NAME\n` + u64 LE length +
/// bytes + `\n`.
fn parse_entry(mut data: &[u8]) -> Entry {
    let mut entry = Entry::new();
    while !data.is_empty() {
        let end = data.iter().position(|b| *b == b'\n').expect("a field ends");
        let field = &data[..end];
        if let Some(eq) = field.iter().position(|b| *b == b'=') {
            let name = String::from_utf8(field[..eq].to_vec()).unwrap();
            entry.insert(name, field[eq + 1..].to_vec());
            data = &data[end + 1..];
        } else {
            let name = String::from_utf8(field.to_vec()).unwrap();
            let rest = &data[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            entry.insert(name, rest[8..8 + len].to_vec());
            assert_eq!(rest[8 + len], b'\n', "a binary field ends with a newline");
            data = &rest[8 + len + 1..];
        }
    }
    assert!(
        !entry.contains_key("MESSAGE") || entry.len() >= 8,
        "{entry:?}"
    );
    entry
}

fn field<'a>(entry: &'a Entry, name: &str) -> &'a str {
    std::str::from_utf8(
        entry
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {entry:?}")),
    )
    .unwrap()
}

fn script_config(script: &Path, extra: &str) -> String {
    format!(
        "command = [{:?}]\nready = \"delay\"\nready_delay = \"100ms\"\nstop_timeout = \"5s\"\n{extra}\n",
        script.display().to_string()
    )
}

/// (instance id, pid) of the instance of `generation`.
fn instance_of(broker: &TestBroker, generation: u64) -> (u64, u32) {
    let status = broker.status();
    let instance = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["generation"] == generation)
        .unwrap_or_else(|| panic!("no instance of generation {generation}: {status}"))
        .clone();
    (
        instance["id"].as_u64().unwrap(),
        instance["pid"].as_u64().unwrap() as u32,
    )
}

const TALKER: &str = r#"
echo "hello from $ALLY_GENERATION"
echo "<3>error from $ALLY_GENERATION"
echo "warn from $ALLY_GENERATION" >&2
echo "<6>info on stderr from $ALLY_GENERATION" >&2
echo "<9>not a priority from $ALLY_GENERATION"
printf 'bad \377 byte from %s\n' "$ALLY_GENERATION"
head -c 70000 /dev/zero | tr '\0' y
echo
printf 'no newline from %s' "$ALLY_GENERATION"
exec >&-
exec sleep 1000
"#;

#[test]
fn every_line_reaches_the_journal_with_its_generation_and_priority_across_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let journal = FakeJournal::bind(dir.path());
    let script = write_script(dir.path(), "talker", TALKER);
    let broker = TestBroker::start_env("logs", &script_config(&script, ""), &[], &[journal.env()]);
    broker.wait_running(1);
    let first = instance_of(&broker, 1);
    assert!(broker.reload().status.success(), "{}", broker.logs());
    broker.wait_running(2);
    let second = instance_of(&broker, 2);

    let mut entries = Vec::new();
    wait_until("both generations' lines", Duration::from_secs(10), || {
        entries.extend(journal.read());
        entries.len() >= 2 * 9
    });
    std::thread::sleep(Duration::from_millis(200));
    entries.extend(journal.read());
    assert_eq!(entries.len(), 2 * 9, "{entries:?}");

    for (generation, (instance, pid)) in [(1u64, first), (2, second)] {
        let mine: Vec<&Entry> = entries
            .iter()
            .filter(|e| field(e, "ALLY_GENERATION") == generation.to_string())
            .collect();
        assert_eq!(mine.len(), 9, "generation {generation}: {mine:?}");
        for entry in &mine {
            assert_eq!(field(entry, "ALLY_APP"), "logs");
            assert_eq!(field(entry, "SYSLOG_IDENTIFIER"), "logs");
            assert_eq!(field(entry, "ALLY_INSTANCE"), instance.to_string());
            assert_eq!(field(entry, "OBJECT_PID"), pid.to_string());
        }
        let lines: Vec<(Vec<u8>, &str, &str)> = mine
            .iter()
            .map(|e| {
                (
                    e["MESSAGE"].clone(),
                    field(e, "PRIORITY"),
                    field(e, "ALLY_STREAM"),
                )
            })
            .collect();
        let message = |text: &str| format!("{text} from {generation}").into_bytes();
        let on_stdout: Vec<_> = lines.iter().filter(|l| l.2 == "stdout").cloned().collect();
        let on_stderr: Vec<_> = lines.iter().filter(|l| l.2 == "stderr").cloned().collect();
        assert_eq!(
            on_stdout,
            vec![
                (message("hello"), "6", "stdout"),
                (message("error"), "3", "stdout"),
                (message("<9>not a priority"), "6", "stdout"),
                (
                    [
                        &b"bad \xff byte from "[..],
                        generation.to_string().as_bytes()
                    ]
                    .concat(),
                    "6",
                    "stdout"
                ),
                (vec![b'y'; 64 * 1024], "6", "stdout"),
                (vec![b'y'; 70000 - 64 * 1024], "6", "stdout"),
                (message("no newline"), "6", "stdout"),
            ]
        );
        assert_eq!(
            on_stderr,
            vec![
                (message("warn"), "4", "stderr"),
                (message("info on stderr"), "6", "stderr"),
            ]
        );
        let split: Vec<Option<&str>> = mine
            .iter()
            .filter(|e| e["MESSAGE"].starts_with(b"yyy"))
            .map(|e| {
                e.get("ALLY_LINE_BREAK")
                    .map(|v| std::str::from_utf8(v).unwrap())
            })
            .collect();
        assert_eq!(
            split,
            vec![Some("line-max"), None],
            "the cut piece is marked"
        );
    }
    assert_eq!(broker.status()["log_lines_dropped"], 0);
    assert!(
        !broker.logs().contains("hello from"),
        "nothing went to the broker's stderr:\n{}",
        broker.logs()
    );
}

/// `app[generation] pid: ` and the line.
fn prefixed<'a>(logs: &'a str, app: &str, generation: u64, pid: u32) -> Vec<&'a str> {
    let prefix = format!("{app}[{generation}] {pid}: ");
    logs.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn without_journald_lines_go_whole_to_the_brokers_stderr_with_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    let chatter = example("chatter");
    let script = write_script(
        dir.path(),
        "two",
        &format!(
            "echo \"plain from $ALLY_GENERATION\"\n\
             {c} 300 60000 {d}/out --exit &\n\
             {c} 300 60000 {d}/err --exit >&2 &\n\
             wait\n\
             exec sleep 1000",
            c = chatter.display(),
            d = dir.path().display()
        ),
    );
    let absent = dir.path().join("no-journal.socket");
    let broker = TestBroker::start_env(
        "logs",
        &script_config(&script, ""),
        &[],
        &[("ALLY_JOURNAL_SOCKET", absent.to_str().unwrap())],
    );
    broker.wait_running(1);
    let (_, pid) = instance_of(&broker, 1);
    wait_until(
        "600 long lines in the broker's log",
        Duration::from_secs(20),
        || prefixed(&broker.logs(), "logs", 1, pid).len() >= 601,
    );
    let logs = broker.logs();
    let lines = prefixed(&logs, "logs", 1, pid);
    assert_eq!(
        lines[0],
        "plain from 1",
        "{}",
        &logs[..logs.len().min(2000)]
    );
    let mut seen = std::collections::HashSet::new();
    for line in &lines[1..] {
        assert_eq!(
            line.len(),
            59999,
            "a whole line: {}…",
            &line[..line.len().min(40)]
        );
        let (number, rest) = line["line ".len()..].split_at(7);
        assert!(rest.bytes().skip(1).all(|b| b == b'x'), "not interleaved");
        seen.insert(number.to_string());
    }
    assert_eq!(lines.len(), 601);
    assert_eq!(seen.len(), 300, "both processes' lines 0..300");
    assert_eq!(broker.status()["log_lines_dropped"], 0);
}

/// (ns to write the lines to /dev/null, ns to write them to stdout)
fn chatter_report(path: &Path) -> (u64, u64) {
    wait_for("the app's own timing", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(path).ok()?;
        let (a, b) = text.trim().split_once(' ')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    })
}

const BURST: u64 = 100_000;

/// The app's write time to its captured stdout is within a bound of its write
/// time to /dev/null: it never waited for the broker.
fn assert_never_blocked(devnull: u64, stdout: u64) {
    let ms = |ns: u64| ns as f64 / 1e6;
    eprintln!(
        "{BURST} lines of 100 bytes: /dev/null {:.1} ms, captured stdout {:.1} ms ({:.0} lines/s)",
        ms(devnull),
        ms(stdout),
        BURST as f64 / (stdout as f64 / 1e9)
    );
    // Blocked, it would never finish (the pipe holds 64 KiB); throttled to
    // what journald takes, it would take many times /dev/null's time. The
    // slack is for a loaded machine, where a pipe's wake-ups cost more.
    assert!(
        stdout < devnull * 10 + 1_000_000_000,
        "writing to the captured stdout ({:.1} ms) is far slower than to /dev/null ({:.1} ms)",
        ms(stdout),
        ms(devnull)
    );
}

fn burst_config(dir: &Path) -> String {
    format!(
        "command = [{:?}, \"{BURST}\", \"100\", {:?}]\nready = \"delay\"\nready_delay = \"100ms\"\nstop_timeout = \"5s\"\n",
        example("chatter").display().to_string(),
        dir.join("report").display().to_string()
    )
}

#[test]
fn a_journal_that_reads_nothing_never_blocks_the_app_and_every_lost_line_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let journal = FakeJournal::bind(dir.path());
    let broker = TestBroker::start_env("logs", &burst_config(dir.path()), &[], &[journal.env()]);
    let (devnull, stdout) = chatter_report(&dir.path().join("report"));
    assert_never_blocked(devnull, stdout);

    let mut received = 0u64;
    let dropped = |broker: &TestBroker| broker.status()["log_lines_dropped"].as_u64().unwrap();
    assert!(
        dropped(&broker) > 0,
        "a journal that reads nothing loses lines"
    );
    wait_until(
        "every line received or counted as dropped",
        Duration::from_secs(20),
        || {
            for entry in journal.read() {
                assert!(entry["MESSAGE"].starts_with(b"line "), "{entry:?}");
                received += 1;
            }
            received + dropped(&broker) == BURST
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        journal.read().is_empty(),
        "no line after the count was complete"
    );
    let dropped = dropped(&broker);
    eprintln!("received {received}, dropped {dropped}");
    assert_eq!(BURST - received, dropped);
    let table = stdout_of(&broker.ally(&["status", "logs"]));
    assert!(
        table.contains(&format!("output lines: {dropped} dropped")),
        "{table}"
    );
}

fn stdout_of(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", stderr(out));
    stdout(out)
}

#[test]
fn an_absent_journal_never_blocks_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("no-journal.socket");
    let broker = TestBroker::start_env(
        "logs",
        &burst_config(dir.path()),
        &[],
        &[("ALLY_JOURNAL_SOCKET", absent.to_str().unwrap())],
    );
    let (devnull, stdout) = chatter_report(&dir.path().join("report"));
    assert_never_blocked(devnull, stdout);
    let (_, pid) = instance_of(&broker, 1);
    let dropped = || broker.status()["log_lines_dropped"].as_u64().unwrap();
    wait_until(
        "every line written or counted",
        Duration::from_secs(20),
        || prefixed(&broker.logs(), "logs", 1, pid).len() as u64 + dropped() == BURST,
    );
    let logs = broker.logs();
    let lines = prefixed(&logs, "logs", 1, pid);
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("line ") && l.len() == 99)
    );
    eprintln!("to stderr {}, dropped {}", lines.len(), dropped());
}

#[test]
fn inherited_output_is_the_brokers_own_and_a_reload_can_change_it() {
    let dir = tempfile::tempdir().unwrap();
    let journal = FakeJournal::bind(dir.path());
    let script = write_script(
        dir.path(),
        "plain",
        "echo \"plain from $ALLY_GENERATION\"\necho \"oops from $ALLY_GENERATION\" >&2\nexec sleep 1000",
    );
    let inherit = "stdout = \"inherit\"\nstderr = \"inherit\"";
    let broker = TestBroker::start_env(
        "logs",
        &script_config(&script, inherit),
        &[],
        &[journal.env()],
    );
    broker.wait_running(1);
    wait_until(
        "the app's lines in the broker's log",
        Duration::from_secs(10),
        || {
            let logs = broker.logs();
            logs.lines().any(|l| l == "plain from 1") && logs.lines().any(|l| l == "oops from 1")
        },
    );
    assert!(
        journal.read().is_empty(),
        "inherited output is not captured"
    );

    std::fs::write(
        broker.config_path(),
        script_config(&script, "stderr = \"inherit\""),
    )
    .unwrap();
    assert!(broker.reload().status.success(), "{}", broker.logs());
    broker.wait_running(2);
    let mut entries = Vec::new();
    wait_until(
        "generation 2's stdout in the journal",
        Duration::from_secs(10),
        || {
            entries.extend(journal.read());
            !entries.is_empty()
        },
    );
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["MESSAGE"], b"plain from 2");
    assert_eq!(field(&entries[0], "ALLY_GENERATION"), "2");
    wait_until(
        "generation 2's stderr inherited",
        Duration::from_secs(10),
        || broker.logs().lines().any(|l| l == "oops from 2"),
    );
}
