//! Which config a generation runs: a revision number, bumped whenever the file
//! read at a reload differs from the one read before, and a short digest of
//! its text, shown by `ally status`.

/// A config revision; number 1 is the config `ally run` started with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Revision {
    pub number: u64,
    /// [`digest`] of the file's text; empty without a config file.
    pub digest: String,
}

impl Revision {
    /// The config `ally run` read: `text` of its file, none on the built-in defaults.
    pub fn first(text: Option<&str>) -> Revision {
        Revision {
            number: 1,
            digest: text.map(digest).unwrap_or_default(),
        }
    }

    /// The revision of `text`, read after `self`: the same if the text is.
    pub fn next(&self, text: &str) -> Revision {
        let digest = digest(text);
        if digest == self.digest {
            self.clone()
        } else {
            Revision {
                number: self.number + 1,
                digest,
            }
        }
    }
}

/// 64-bit FNV-1a of `text` in 16 hex digits: tells an operator which file a
/// generation was started from, not a check against tampering.
pub fn digest(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_fnv1a_of_the_text() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(digest(""), "cbf29ce484222325");
        assert_eq!(digest("a"), "af63dc4c8601ec8c");
        assert_eq!(digest("foobar"), "85944171f73967e8");
    }

    #[test]
    fn the_number_moves_only_when_the_text_does() {
        let first = Revision::first(Some("command = [\"/bin/a\"]\n"));
        assert_eq!(first.number, 1);
        assert_eq!(first.next("command = [\"/bin/a\"]\n"), first);
        let second = first.next("command = [\"/bin/b\"]\n");
        assert_eq!(second.number, 2);
        assert_ne!(second.digest, first.digest);
        // Back to the first text is a new revision still: it changed again.
        assert_eq!(second.next("command = [\"/bin/a\"]\n").number, 3);
        assert_eq!(Revision::first(None).digest, "");
    }
}
