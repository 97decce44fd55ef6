//! Coverage: managed anonymous memory over all anonymous memory of a process.
//!
//! The numbers come from the kernel, not from the tagger's bookkeeping: every VMA in
//! `/proc/<pid>/smaps` lists its resident `Anonymous:` bytes and its `VmFlags:`, where
//! `um` means "registered with a userfaultfd in MISSING mode". Coverage is
//! `sum(Anonymous of VMAs with um) / sum(Anonymous of all VMAs)`. The denominator is the
//! strict one (the process's anonymous RSS, including thread stacks and copy-on-write
//! pages of libraries' data segments, which the tagger leaves to the kernel).
//!
//! [`SmapsParser`] reads the text in pieces of any size from a fixed buffer and never
//! allocates: the tagger's message thread answers the daemon's coverage request with it,
//! and must not touch the managed heap (a program thread may hold the heap's lock while
//! it waits for a fault that only the daemon can serve).

use std::io::{self, Read};

/// A coverage measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Anonymous resident bytes in userfaultfd-registered (MISSING) VMAs.
    pub managed_anon_bytes: u64,
    /// All anonymous resident bytes.
    pub anon_bytes: u64,
    /// Number of registered VMAs.
    pub managed_vmas: u64,
    /// Number of VMAs.
    pub vmas: u64,
}

/// Size of the buffer [`Coverage::from_reader`] reads through (on the stack).
pub const SMAPS_CHUNK: usize = 4096;

impl Coverage {
    /// Parses the text of an `smaps` file. Unknown lines are ignored.
    pub fn from_smaps(text: &str) -> Coverage {
        let mut parser = SmapsParser::new();
        parser.feed(text.as_bytes());
        parser.finish()
    }

    /// Parses an `smaps` file read from `src` through a fixed buffer on the stack:
    /// allocates nothing itself (whether `src` does is up to `src`).
    pub fn from_reader(mut src: impl Read) -> io::Result<Coverage> {
        let mut parser = SmapsParser::new();
        let mut buf = [0u8; SMAPS_CHUNK];
        loop {
            match src.read(&mut buf) {
                Ok(0) => return Ok(parser.finish()),
                Ok(n) => parser.feed(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Measures process `pid` (needs ptrace-read access to it).
    pub fn of_pid(pid: u32) -> io::Result<Coverage> {
        Self::from_reader(std::fs::File::open(format!("/proc/{pid}/smaps"))?)
    }

    /// Measures the calling process.
    pub fn of_self() -> io::Result<Coverage> {
        Self::from_reader(std::fs::File::open("/proc/self/smaps")?)
    }

    /// `managed / anonymous`, or 1.0 when there is no anonymous memory at all.
    pub fn ratio(&self) -> f64 {
        if self.anon_bytes == 0 {
            1.0
        } else {
            self.managed_anon_bytes as f64 / self.anon_bytes as f64
        }
    }
}

/// What the first word of a line says the line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineKind {
    /// No word yet (or a blank line).
    Unknown,
    /// `start-end perms offset dev inode [path]` (first word has no trailing `:`).
    Header,
    /// `Anonymous: N kB`.
    Anonymous,
    /// `VmFlags: rd wr ... um ...`.
    VmFlags,
    /// Any other `Key:` line.
    Other,
}

/// The second word of an `Anonymous:` line, parsed as `str::parse::<u64>` would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Number {
    /// No byte yet.
    Empty,
    /// A leading `+` and nothing else yet.
    Plus,
    /// Digits so far.
    Digits(u64),
    /// Not a `u64`: counts as 0.
    Invalid,
}

/// Longest first word remembered in full (the keys compared are shorter).
const KEY_LEN: usize = 16;

/// Streaming `smaps` parser: [`feed`](SmapsParser::feed) the text in pieces of any size
/// (a line may span pieces), then [`finish`](SmapsParser::finish). Keeps a few words of
/// state per line and never allocates. Gives exactly what [`Coverage::from_smaps`] gives
/// for the same text (lines split at `\n`, words at ASCII whitespace).
#[derive(Clone, Debug)]
pub struct SmapsParser {
    cov: Coverage,
    /// `Anonymous:` bytes of the current VMA.
    anon: u64,
    in_vma: bool,
    // The line being read.
    kind: LineKind,
    /// Index of the word being read (or of the next one, between words).
    word: u32,
    in_word: bool,
    /// The first word: its first `KEY_LEN` bytes, its length, whether it has a `-`,
    /// its last byte.
    key: [u8; KEY_LEN],
    key_len: usize,
    key_dash: bool,
    key_last: u8,
    /// `Anonymous:` value (second word).
    number: Number,
    /// `VmFlags:` word being read: its length and whether it is `um` so far.
    flag_len: usize,
    flag_um: bool,
    /// `um` seen on this `VmFlags:` line.
    um: bool,
}

impl Default for SmapsParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SmapsParser {
    /// A parser at the start of a file.
    pub const fn new() -> SmapsParser {
        SmapsParser {
            cov: Coverage {
                managed_anon_bytes: 0,
                anon_bytes: 0,
                managed_vmas: 0,
                vmas: 0,
            },
            anon: 0,
            in_vma: false,
            kind: LineKind::Unknown,
            word: 0,
            in_word: false,
            key: [0; KEY_LEN],
            key_len: 0,
            key_dash: false,
            key_last: 0,
            number: Number::Empty,
            flag_len: 0,
            flag_um: false,
            um: false,
        }
    }

    /// Parses the next piece of the text.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.end_line();
            } else if b.is_ascii_whitespace() {
                if self.in_word {
                    self.end_word();
                }
            } else {
                self.in_word = true;
                self.word_byte(b);
            }
        }
    }

    /// The coverage of everything fed (a last line without `\n` counts).
    pub fn finish(mut self) -> Coverage {
        self.end_line();
        self.cov
    }

    fn word_byte(&mut self, b: u8) {
        match (self.word, self.kind) {
            (0, _) => {
                if self.key_len < KEY_LEN {
                    self.key[self.key_len] = b;
                }
                self.key_len += 1;
                self.key_dash |= b == b'-';
                self.key_last = b;
            }
            (1, LineKind::Anonymous) => {
                self.number = match (self.number, b) {
                    (Number::Empty, b'+') => Number::Plus,
                    (Number::Empty | Number::Plus, b'0'..=b'9') => {
                        Number::Digits(u64::from(b - b'0'))
                    }
                    (Number::Digits(v), b'0'..=b'9') => v
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(b - b'0')))
                        .map_or(Number::Invalid, Number::Digits),
                    _ => Number::Invalid,
                };
            }
            (_, LineKind::VmFlags) => {
                self.flag_um = match self.flag_len {
                    0 => b == b'u',
                    1 => self.flag_um && b == b'm',
                    _ => false,
                };
                self.flag_len += 1;
            }
            _ => {}
        }
    }

    fn end_word(&mut self) {
        self.in_word = false;
        if self.word == 0 {
            let key = &self.key[..self.key_len.min(KEY_LEN)];
            self.kind = if self.key_last != b':' {
                LineKind::Header
            } else if key == b"Anonymous:" {
                LineKind::Anonymous
            } else if key == b"VmFlags:" {
                LineKind::VmFlags
            } else {
                LineKind::Other
            };
        } else if self.kind == LineKind::VmFlags {
            self.um |= self.flag_len == 2 && self.flag_um;
            self.flag_len = 0;
            self.flag_um = false;
        }
        self.word += 1;
    }

    fn end_line(&mut self) {
        if self.in_word {
            self.end_word();
        }
        match self.kind {
            LineKind::Unknown => {}
            LineKind::Header => {
                self.in_vma = self.key_dash;
                self.anon = 0;
                if self.in_vma {
                    self.cov.vmas += 1;
                }
            }
            LineKind::Anonymous if self.in_vma => {
                let kib = match self.number {
                    Number::Digits(v) => v,
                    _ => 0,
                };
                self.anon = kib.saturating_mul(1024);
                self.cov.anon_bytes = self.cov.anon_bytes.saturating_add(self.anon);
            }
            LineKind::VmFlags if self.in_vma && self.um => {
                self.cov.managed_vmas += 1;
                self.cov.managed_anon_bytes = self.cov.managed_anon_bytes.saturating_add(self.anon);
            }
            _ => {}
        }
        self.kind = LineKind::Unknown;
        self.word = 0;
        self.in_word = false;
        self.key_len = 0;
        self.key_dash = false;
        self.key_last = 0;
        self.number = Number::Empty;
        self.flag_len = 0;
        self.flag_um = false;
        self.um = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_um_vmas_as_managed() {
        let text = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Anonymous:           512 kB
VmFlags: rd wr mr mw me ac um 
7f0000100000-7f0000200000 rw-p 00000000 00:00 0                          [stack]
Anonymous:           128 kB
VmFlags: rd wr mr mw me gd ac 
55d0-55e0 r--p 00000000 08:01 1234                       /usr/bin/true
Anonymous:             0 kB
VmFlags: rd mr mw me 
";
        let cov = Coverage::from_smaps(text);
        assert_eq!(cov.anon_bytes, 640 * 1024);
        assert_eq!(cov.managed_anon_bytes, 512 * 1024);
        assert_eq!(cov.managed_vmas, 1);
        assert_eq!(cov.vmas, 3);
        assert!((cov.ratio() - 0.8).abs() < 1e-9);
    }

    #[test]
    fn reads_own_smaps() {
        let cov = Coverage::of_self().unwrap();
        assert!(cov.vmas > 0);
        assert!(cov.anon_bytes > 0);
        assert!(cov.managed_anon_bytes <= cov.anon_bytes);
    }

    /// The line-at-a-time parser `from_smaps` had before the streaming one: the
    /// streaming parser must agree with it on any text.
    fn reference(text: &str) -> Coverage {
        let mut cov = Coverage::default();
        let mut anon = 0u64;
        let mut in_vma = false;
        for line in text.lines() {
            let mut words = line.split_ascii_whitespace();
            let Some(first) = words.next() else { continue };
            if !first.ends_with(':') {
                in_vma = first.contains('-');
                anon = 0;
                if in_vma {
                    cov.vmas += 1;
                }
                continue;
            }
            if !in_vma {
                continue;
            }
            match first {
                "Anonymous:" => {
                    let kib = words
                        .next()
                        .and_then(|w| w.parse::<u64>().ok())
                        .unwrap_or(0);
                    anon = kib.saturating_mul(1024);
                    cov.anon_bytes = cov.anon_bytes.saturating_add(anon);
                }
                "VmFlags:" if words.any(|w| w == "um") => {
                    cov.managed_vmas += 1;
                    cov.managed_anon_bytes = cov.managed_anon_bytes.saturating_add(anon);
                }
                _ => {}
            }
        }
        cov
    }

    fn chunked(text: &str, piece: usize) -> Coverage {
        let mut p = SmapsParser::new();
        for chunk in text.as_bytes().chunks(piece.max(1)) {
            p.feed(chunk);
        }
        p.finish()
    }

    #[test]
    fn any_split_of_the_text_gives_the_same_coverage() {
        let own = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let whole = Coverage::from_smaps(&own);
        assert_eq!(whole, reference(&own));
        for piece in [1, 2, 3, 7, 64, 4095, 4096] {
            assert_eq!(chunked(&own, piece), whole, "pieces of {piece}");
        }
    }

    #[test]
    fn odd_lines_parse_like_the_line_parser() {
        let text = "7f-80 rw-p 0 00:00 0\n\
                    Anonymous: +12 kB\n\
                    Anonymous:\n\
                    Anonymous: 99999999999999999999999 kB\n\
                    Anonymous: 4x kB\n\
                    Anonymous:\t\t8\r\n\
                    VmFlags: umm mu um\n\
                    \n   \n\
                    noDash header\n\
                    Anonymous: 4 kB\n\
                    VmFlags: um\n\
                    a-b c\n\
                    AnonymousX: 4 kB\n\
                    Anonymous: 16 kB\n\
                    VmFlags: rd wr u m";
        assert_eq!(Coverage::from_smaps(text), reference(text));
        let cov = Coverage::from_smaps(text);
        assert_eq!(cov.vmas, 2);
        assert_eq!(cov.managed_vmas, 1);
        assert_eq!(cov.anon_bytes, (12 + 8 + 16) * 1024);
        assert_eq!(cov.managed_anon_bytes, 8 * 1024);
    }

    proptest::proptest! {
        #[test]
        fn streaming_agrees_with_the_line_parser(
            words in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("Anonymous:".to_owned()),
                    proptest::strategy::Just("VmFlags:".to_owned()),
                    proptest::strategy::Just("um".to_owned()),
                    proptest::strategy::Just("\n".to_owned()),
                    proptest::strategy::Just("\r\n".to_owned()),
                    proptest::strategy::Just(" ".to_owned()),
                    proptest::strategy::Just("\t".to_owned()),
                    "[0-9]{1,22}",
                    "[-+a-z:]{1,20}",
                    "7f[0-9a-f]{0,4}-7f[0-9a-f]{0,4}",
                    "[ -~]{0,8}",
                ],
                0..200,
            ),
            piece in 1usize..50,
        ) {
            let text: String = words.concat();
            let expected = reference(&text);
            proptest::prop_assert_eq!(Coverage::from_smaps(&text), expected);
            proptest::prop_assert_eq!(chunked(&text, piece), expected);
        }
    }
}
