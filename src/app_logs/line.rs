//! The pure part of capturing an instance's output: cutting a byte stream into
//! lines of bounded length, the `<N>` priority prefix, and what one line
//! becomes for journald (its native protocol) or for the broker's stderr.

/// The longest piece of a line written as one entry; a longer line is written
/// as several, every one but the last marked `ALLY_LINE_BREAK=line-max`.
pub const MAX_LINE: usize = 64 * 1024;

/// One piece of output, as [`Splitter`] hands it out.
#[derive(Debug, PartialEq, Eq)]
pub struct Piece<'a> {
    pub text: &'a [u8],
    /// The first piece of its line: where a `<N>` prefix may be.
    pub first: bool,
    /// The line goes on in the next piece: it was cut at the bound.
    pub continues: bool,
}

/// Cuts bytes into lines at `\n` (which is not part of the line) and at
/// `max` bytes.
#[derive(Debug)]
pub struct Splitter {
    pending: Vec<u8>,
    max: usize,
    /// The pending bytes start a line (no piece of it was handed out yet).
    first: bool,
}

impl Splitter {
    pub fn new(max: usize) -> Splitter {
        Splitter {
            pending: Vec::new(),
            max: max.max(1),
            first: true,
        }
    }

    /// Hands every piece `bytes` completes to `emit`.
    pub fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(Piece<'_>)) {
        while let Some(end) = bytes.iter().position(|b| *b == b'\n') {
            self.extend(&bytes[..end], emit);
            self.hand_out(false, emit);
            bytes = &bytes[end + 1..];
        }
        self.extend(bytes, emit);
    }

    /// At end of file: a last line without its newline is still a line.
    pub fn finish(&mut self, emit: &mut impl FnMut(Piece<'_>)) {
        if !self.pending.is_empty() {
            self.hand_out(false, emit);
        }
    }

    fn extend(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(Piece<'_>)) {
        while self.pending.len() + bytes.len() > self.max {
            let room = self.max - self.pending.len();
            self.pending.extend_from_slice(&bytes[..room]);
            self.hand_out(true, emit);
            bytes = &bytes[room..];
        }
        self.pending.extend_from_slice(bytes);
    }

    fn hand_out(&mut self, continues: bool, emit: &mut impl FnMut(Piece<'_>)) {
        emit(Piece {
            text: &self.pending,
            first: self.first,
            continues,
        });
        self.pending.clear();
        self.first = !continues;
    }
}

/// The syslog priority a line starts with as sd-daemon(3) defines it — `<0>`
/// to `<7>` — and the rest of the line; none without one.
pub fn priority_prefix(line: &[u8]) -> (Option<u8>, &[u8]) {
    match line {
        [b'<', digit @ b'0'..=b'7', b'>', rest @ ..] => (Some(digit - b'0'), rest),
        _ => (None, line),
    }
}

/// Which of an instance's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// The priority of a line without a `<N>` prefix: info, or warning on stderr.
    pub fn default_priority(self) -> u8 {
        match self {
            Stream::Stdout => 6,
            Stream::Stderr => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Who wrote a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub app: String,
    pub generation: u64,
    pub instance: u64,
    pub pid: u32,
}

/// One line (or piece of one) to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub origin: std::sync::Arc<Origin>,
    pub stream: Stream,
    pub priority: u8,
    /// As the instance wrote it, `<N>` prefix and newline removed; any bytes.
    pub text: Vec<u8>,
    pub continues: bool,
}

impl Line {
    /// The datagram for journald's native protocol (systemd's
    /// JOURNAL_NATIVE_PROTOCOL): `NAME=value\n` per field, and `NAME\n`, the
    /// length as 64-bit little endian, the bytes and `\n` for a value that may
    /// hold any byte — the message always, as tracing-journald does.
    pub fn journal_entry(&self) -> Vec<u8> {
        let origin = &*self.origin;
        let mut entry = Vec::with_capacity(self.text.len() + 160);
        put_binary(&mut entry, "MESSAGE", &self.text);
        put(&mut entry, "PRIORITY", &self.priority.to_string());
        put(&mut entry, "SYSLOG_IDENTIFIER", &origin.app);
        put(&mut entry, "ALLY_APP", &origin.app);
        put(
            &mut entry,
            "ALLY_GENERATION",
            &origin.generation.to_string(),
        );
        put(&mut entry, "ALLY_INSTANCE", &origin.instance.to_string());
        put(&mut entry, "ALLY_STREAM", self.stream.as_str());
        put(&mut entry, "OBJECT_PID", &origin.pid.to_string());
        if self.continues {
            put(&mut entry, "ALLY_LINE_BREAK", "line-max");
        }
        entry
    }

    /// The line for the broker's stderr when there is no journald:
    /// `web[7] 4242: text`, with ` [line continues]` on a piece cut at the bound.
    pub fn stderr_line(&self) -> Vec<u8> {
        let origin = &*self.origin;
        let mut line =
            format!("{}[{}] {}: ", origin.app, origin.generation, origin.pid).into_bytes();
        line.extend_from_slice(&self.text);
        if self.continues {
            line.extend_from_slice(b" [line continues]");
        }
        line.push(b'\n');
        line
    }
}

fn put(entry: &mut Vec<u8>, name: &str, value: &str) {
    if value.contains('\n') {
        return put_binary(entry, name, value.as_bytes());
    }
    entry.extend_from_slice(name.as_bytes());
    entry.push(b'=');
    entry.extend_from_slice(value.as_bytes());
    entry.push(b'\n');
}

fn put_binary(entry: &mut Vec<u8>, name: &str, value: &[u8]) {
    entry.extend_from_slice(name.as_bytes());
    entry.push(b'\n');
    entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    entry.extend_from_slice(value);
    entry.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(max: usize, chunks: &[&[u8]]) -> Vec<(String, bool, bool)> {
        let mut splitter = Splitter::new(max);
        let mut out = Vec::new();
        let mut emit = |p: Piece<'_>| {
            out.push((
                String::from_utf8_lossy(p.text).into_owned(),
                p.first,
                p.continues,
            ))
        };
        for chunk in chunks {
            splitter.push(chunk, &mut emit);
        }
        splitter.finish(&mut emit);
        out
    }

    fn whole(text: &str) -> (String, bool, bool) {
        (text.to_string(), true, false)
    }

    #[test]
    fn lines_are_cut_at_newlines_whatever_the_chunks() {
        assert_eq!(
            pieces(100, &[b"one\ntw", b"o\n", b"\nthree"]),
            vec![whole("one"), whole("two"), whole(""), whole("three")]
        );
        assert_eq!(
            pieces(100, &[b"a\n"]),
            vec![whole("a")],
            "no empty line at EOF"
        );
        assert_eq!(pieces(100, &[]), Vec::<(String, bool, bool)>::new());
    }

    #[test]
    fn a_long_line_is_cut_at_the_bound_and_marked() {
        assert_eq!(
            pieces(4, &[b"abcd\n", b"abcdefghij\nxy"]),
            vec![
                whole("abcd"),
                ("abcd".into(), true, true),
                ("efgh".into(), false, true),
                ("ij".into(), false, false),
                whole("xy"),
            ]
        );
        assert_eq!(
            pieces(4, &[b"ab", b"cdef", b"gh"]),
            vec![("abcd".into(), true, true), ("efgh".into(), false, false)],
            "a piece of exactly the bound at EOF ends the line"
        );
    }

    #[test]
    fn priority_prefixes_are_those_of_sd_daemon() {
        assert_eq!(
            priority_prefix(b"<3>disk full"),
            (Some(3), &b"disk full"[..])
        );
        assert_eq!(priority_prefix(b"<7>"), (Some(7), &b""[..]));
        for kept in [&b"<8>x"[..], b"<>x", b"<12>x", b" <3>x", b"<3x", b"3>x"] {
            assert_eq!(priority_prefix(kept), (None, kept), "{kept:?}");
        }
    }

    fn line(text: &[u8], continues: bool) -> Line {
        Line {
            origin: std::sync::Arc::new(Origin {
                app: "web".into(),
                generation: 7,
                instance: 12,
                pid: 4242,
            }),
            stream: Stream::Stderr,
            priority: 4,
            text: text.to_vec(),
            continues,
        }
    }

    #[test]
    fn a_journal_entry_has_the_fields_and_any_bytes_length_prefixed() {
        let entry = line(b"bad \xff byte", false).journal_entry();
        let mut expected = b"MESSAGE\n".to_vec();
        expected.extend_from_slice(&10u64.to_le_bytes());
        expected.extend_from_slice(b"bad \xff byte\n");
        expected.extend_from_slice(
            b"PRIORITY=4\nSYSLOG_IDENTIFIER=web\nALLY_APP=web\nALLY_GENERATION=7\nALLY_INSTANCE=12\nALLY_STREAM=stderr\nOBJECT_PID=4242\n",
        );
        assert_eq!(entry, expected);
        let entry = line(b"x", true).journal_entry();
        assert!(entry.ends_with(b"OBJECT_PID=4242\nALLY_LINE_BREAK=line-max\n"));
    }

    #[test]
    fn a_stderr_line_names_the_app_generation_and_pid() {
        assert_eq!(line(b"hello", false).stderr_line(), b"web[7] 4242: hello\n");
        assert_eq!(
            line(b"abc", true).stderr_line(),
            b"web[7] 4242: abc [line continues]\n"
        );
    }
}
