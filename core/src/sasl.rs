//! The server's side of the D-Bus authentication conversation, `EXTERNAL` only, as
//! a state machine over the client's lines (without their `\r\n`). The socket's
//! credentials (`SO_PEERCRED`) are the proof; the client only names its uid.
//!
//! It accepts what the usual clients send: zbus and libdbus (`AUTH EXTERNAL <hex uid>`,
//! then `NEGOTIATE_UNIX_FD`, then `BEGIN`, one at a time), sd-bus (the same,
//! pipelined), and `AUTH EXTERNAL` with the uid in a later `DATA`.

/// What to do after a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this line (the caller adds `\r\n`) and read the next.
    Reply(String),
    /// The client authenticated and began: messages follow.
    Begin,
    /// Close the connection.
    Close,
}

/// Longest line accepted; a longer one ends the conversation.
pub const MAX_LINE: usize = 1024;
/// Lines a client may send before `BEGIN`.
const MAX_LINES: usize = 16;

pub struct Handshake {
    peer_uid: u32,
    guid: String,
    awaiting_data: bool,
    authenticated: bool,
    lines: usize,
    unix_fds: bool,
    agreed_unix_fds: bool,
}

impl Handshake {
    /// For a peer whose socket credentials say `peer_uid`; `guid` is the server's.
    pub fn new(peer_uid: u32, guid: String) -> Handshake {
        Handshake {
            peer_uid,
            guid,
            awaiting_data: false,
            authenticated: false,
            lines: 0,
            unix_fds: false,
            agreed_unix_fds: false,
        }
    }

    /// Whether the client asked for file descriptors and was told `AGREE_UNIX_FD`.
    pub fn agreed_unix_fds(&self) -> bool {
        self.agreed_unix_fds
    }

    /// Agrees to pass file descriptors when the client asks (`NEGOTIATE_UNIX_FD`).
    pub fn passing_fds(mut self) -> Handshake {
        self.unix_fds = true;
        self
    }

    pub fn line(&mut self, line: &str) -> Step {
        self.lines += 1;
        if self.lines > MAX_LINES {
            return Step::Close;
        }
        let (command, argument) = match line.split_once(' ') {
            Some((c, a)) => (c, Some(a)),
            None => (line, None),
        };
        match command {
            "AUTH" if self.authenticated => Step::Reply("ERROR already authenticated".into()),
            "AUTH" => match argument.map(|a| a.split_once(' ').unwrap_or((a, ""))) {
                Some(("EXTERNAL", "")) => {
                    self.awaiting_data = true;
                    Step::Reply("DATA".into())
                }
                Some(("EXTERNAL", claimed)) => self.external(claimed),
                _ => self.rejected(),
            },
            "DATA" if self.awaiting_data => self.external(argument.unwrap_or("")),
            "NEGOTIATE_UNIX_FD" if self.authenticated && self.unix_fds => {
                self.agreed_unix_fds = true;
                Step::Reply("AGREE_UNIX_FD".into())
            }
            "NEGOTIATE_UNIX_FD" if self.authenticated => {
                Step::Reply("ERROR file descriptors are not passed on this socket".into())
            }
            "BEGIN" if self.authenticated => Step::Begin,
            "BEGIN" => Step::Close,
            "CANCEL" | "ERROR" => self.rejected(),
            _ => Step::Reply(format!("ERROR unexpected {command:?}")),
        }
    }

    /// `EXTERNAL` with the uid the client claims, in hex-encoded ASCII digits; empty
    /// claims the socket's own.
    fn external(&mut self, claimed: &str) -> Step {
        self.awaiting_data = false;
        let matches = claimed.is_empty() || decode_uid(claimed) == Some(self.peer_uid);
        if !matches {
            return self.rejected();
        }
        self.authenticated = true;
        Step::Reply(format!("OK {}", self.guid))
    }

    fn rejected(&mut self) -> Step {
        self.awaiting_data = false;
        self.authenticated = false;
        Step::Reply("REJECTED EXTERNAL".into())
    }
}

fn decode_uid(hex: &str) -> Option<u32> {
    if !hex.len().is_multiple_of(2) || hex.len() > 20 {
        return None;
    }
    let digits: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake() -> Handshake {
        Handshake::new(1000, "0123abcd".into())
    }

    fn ok() -> Step {
        Step::Reply("OK 0123abcd".into())
    }

    #[test]
    fn zbus_and_libdbus_one_line_at_a_time() {
        let mut h = handshake();
        assert_eq!(h.line("AUTH EXTERNAL 31303030"), ok());
        assert_eq!(
            h.line("NEGOTIATE_UNIX_FD"),
            Step::Reply("ERROR file descriptors are not passed on this socket".into())
        );
        assert_eq!(h.line("BEGIN"), Step::Begin);
    }

    #[test]
    fn file_descriptors_are_agreed_only_where_they_pass() {
        let mut h = handshake().passing_fds();
        assert_eq!(
            h.line("NEGOTIATE_UNIX_FD"),
            Step::Reply("ERROR unexpected \"NEGOTIATE_UNIX_FD\"".into()),
            "not before authenticating"
        );
        assert_eq!(h.line("AUTH EXTERNAL 31303030"), ok());
        assert!(!h.agreed_unix_fds());
        assert_eq!(
            h.line("NEGOTIATE_UNIX_FD"),
            Step::Reply("AGREE_UNIX_FD".into())
        );
        assert!(h.agreed_unix_fds());
        assert_eq!(h.line("BEGIN"), Step::Begin);
    }

    #[test]
    fn empty_lines_are_errors() {
        let mut h = handshake();
        assert_eq!(h.line(""), Step::Reply("ERROR unexpected \"\"".into()));
        assert_eq!(h.line("AUTH EXTERNAL 31303030"), ok());
    }

    #[test]
    fn the_uid_may_come_in_a_later_data_line_or_not_at_all() {
        let mut h = handshake();
        assert_eq!(h.line("AUTH EXTERNAL"), Step::Reply("DATA".into()));
        assert_eq!(h.line("DATA 31303030"), ok());
        assert_eq!(h.line("BEGIN"), Step::Begin);

        let mut h = handshake();
        assert_eq!(h.line("AUTH EXTERNAL"), Step::Reply("DATA".into()));
        assert_eq!(h.line("DATA"), ok());
    }

    #[test]
    fn another_uid_or_mechanism_is_rejected_and_begin_then_closes() {
        let mut h = handshake();
        assert_eq!(
            h.line("AUTH EXTERNAL 30"),
            Step::Reply("REJECTED EXTERNAL".into())
        );
        assert_eq!(
            h.line("AUTH DBUS_COOKIE_SHA1 31303030"),
            Step::Reply("REJECTED EXTERNAL".into())
        );
        assert_eq!(h.line("AUTH"), Step::Reply("REJECTED EXTERNAL".into()));
        assert_eq!(h.line("BEGIN"), Step::Close);
    }

    #[test]
    fn garbage_gets_an_error_and_too_much_of_it_closes() {
        let mut h = handshake();
        assert_eq!(
            h.line("HELLO"),
            Step::Reply("ERROR unexpected \"HELLO\"".into())
        );
        assert_eq!(
            h.line("AUTH EXTERNAL zz"),
            Step::Reply("REJECTED EXTERNAL".into())
        );
        for _ in 0..14 {
            h.line("x");
        }
        assert_eq!(h.line("AUTH EXTERNAL 31303030"), Step::Close);
    }

    #[test]
    fn uids_decode_from_hex_ascii() {
        assert_eq!(decode_uid("30"), Some(0));
        assert_eq!(decode_uid("31303030"), Some(1000));
        assert_eq!(decode_uid("3"), None);
        assert_eq!(decode_uid("4142"), None);
        assert_eq!(decode_uid("é1"), None);
    }
}
