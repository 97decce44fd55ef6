//! RESP (the redis serialisation protocol), the subset clients send and the replies we
//! write.
//!
//! # Requests
//! - Multibulk: `*<n>\r\n` then `n` bulk strings `$<len>\r\n<bytes>\r\n` (what `redis-cli`
//!   and `redis-benchmark` send).
//! - Inline: a line of space-separated words ending in `\n` (`PING\r\n`, telnet).
//!
//! [`parse`] looks at the bytes received so far and returns one complete command (its
//! arguments as ranges into the buffer), [`Parsed::Incomplete`], or a protocol error.
//! Limits are checked on the *declared* sizes, before any payload arrives, so an oversized
//! value costs no memory: the connection gets an error reply and is closed.

use std::ops::Range;

/// Bounds on what one request may declare.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest bulk string (key or value) in bytes.
    pub max_bulk: usize,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Longest inline command line.
    pub max_inline: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: 1 << 20,
            max_args: 1 << 16,
            max_inline: 64 << 10,
        }
    }
}

/// The outcome of [`parse`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A whole command: its arguments, and how many bytes it used.
    Command {
        /// Arguments as ranges of the buffer.
        args: Vec<Range<usize>>,
        /// Bytes consumed.
        used: usize,
    },
    /// The input breaks the protocol or a limit: reply with this and close.
    Error(String),
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_len(digits: &[u8]) -> Option<i64> {
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let (neg, digits) = match digits {
        [b'-', rest @ ..] => (true, rest),
        d => (false, d),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i64::from(d - b'0');
    }
    Some(if neg { -v } else { v })
}

/// Parses one command from the start of `buf` (see the module docs).
pub fn parse(buf: &[u8], limits: &Limits) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_multibulk(buf, limits),
        Some(_) => parse_inline(buf, limits),
    }
}

fn parse_multibulk(buf: &[u8], limits: &Limits) -> Parsed {
    let Some(eol) = find_crlf(buf, 1) else {
        return if buf.len() > 32 {
            Parsed::Error("Protocol error: invalid multibulk length".into())
        } else {
            Parsed::Incomplete
        };
    };
    let n = match parse_len(&buf[1..eol]) {
        Some(n) if n <= limits.max_args as i64 => n,
        _ => return Parsed::Error("Protocol error: invalid multibulk length".into()),
    };
    let mut pos = eol + 2;
    if n <= 0 {
        return Parsed::Command {
            args: Vec::new(),
            used: pos,
        };
    }
    let mut args = Vec::with_capacity(n as usize);
    for _ in 0..n {
        match buf.get(pos) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(&c) => {
                return Parsed::Error(format!(
                    "Protocol error: expected '$', got '{}'",
                    char::from(c).escape_default()
                ));
            }
        }
        let Some(eol) = find_crlf(buf, pos + 1) else {
            return if buf.len() - pos > 32 {
                Parsed::Error("Protocol error: invalid bulk length".into())
            } else {
                Parsed::Incomplete
            };
        };
        let len = match parse_len(&buf[pos + 1..eol]) {
            Some(l) if l >= 0 && l as usize <= limits.max_bulk => l as usize,
            Some(l) if l > 0 => {
                return Parsed::Error(format!(
                    "value of {l} bytes is larger than the limit ({} bytes)",
                    limits.max_bulk
                ));
            }
            _ => return Parsed::Error("Protocol error: invalid bulk length".into()),
        };
        let start = eol + 2;
        let end = start + len;
        if buf.len() < end + 2 {
            return Parsed::Incomplete;
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Parsed::Error("Protocol error: bulk string not terminated by CRLF".into());
        }
        args.push(start..end);
        pos = end + 2;
    }
    Parsed::Command { args, used: pos }
}

fn parse_inline(buf: &[u8], limits: &Limits) -> Parsed {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > limits.max_inline {
            Parsed::Error("Protocol error: too big inline request".into())
        } else {
            Parsed::Incomplete
        };
    };
    if nl > limits.max_inline {
        return Parsed::Error("Protocol error: too big inline request".into());
    }
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let mut args = Vec::new();
    let mut i = 0;
    while i < line_end {
        while i < line_end && buf[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < line_end && !buf[i].is_ascii_whitespace() {
            i += 1;
        }
        if i > start {
            args.push(start..i);
        }
    }
    Parsed::Command { args, used: nl + 1 }
}

/// Appends replies to an output buffer.
#[derive(Debug, Default)]
pub struct Reply {
    /// The bytes to send.
    pub out: Vec<u8>,
}

impl Reply {
    /// `+text`.
    pub fn simple(&mut self, text: &str) {
        self.out.push(b'+');
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// `-text` (an error reply; `text` starts with its code, e.g. `ERR ...`).
    pub fn error(&mut self, text: &str) {
        self.out.push(b'-');
        // An error line must not contain CR or LF.
        self.out.extend(
            text.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        self.out.extend_from_slice(b"\r\n");
    }

    /// `:n`.
    pub fn int(&mut self, n: i64) {
        self.out.push(b':');
        self.out.extend_from_slice(n.to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// `$len\r\n` — the header of a bulk string whose `len` bytes the caller appends, then
    /// [`Reply::end_bulk`].
    pub fn bulk_header(&mut self, len: usize) {
        self.out.push(b'$');
        self.out.extend_from_slice(len.to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Ends a bulk string.
    pub fn end_bulk(&mut self) {
        self.out.extend_from_slice(b"\r\n");
    }

    /// A whole bulk string.
    pub fn bulk(&mut self, bytes: &[u8]) {
        self.bulk_header(bytes.len());
        self.out.extend_from_slice(bytes);
        self.end_bulk();
    }

    /// `$-1` (nil).
    pub fn nil(&mut self) {
        self.out.extend_from_slice(b"$-1\r\n");
    }

    /// `*n` — an array header; the caller appends `n` elements.
    pub fn array(&mut self, n: usize) {
        self.out.push(b'*');
        self.out.extend_from_slice(n.to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(buf: &[u8]) -> Vec<Vec<u8>> {
        match parse(buf, &Limits::default()) {
            Parsed::Command { args, used } => {
                assert_eq!(used, buf.len());
                args.into_iter().map(|r| buf[r].to_vec()).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn multibulk_and_inline() {
        assert_eq!(
            args(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            vec![b"GET".to_vec(), b"k".to_vec()]
        );
        assert_eq!(args(b"PING\r\n"), vec![b"PING".to_vec()]);
        assert_eq!(
            args(b"  SET a  b\n"),
            vec![b"SET".to_vec(), b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(args(b"*1\r\n$0\r\n\r\n"), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let full = b"*3\r\n$3\r\nSET\r\n$5\r\nhello\r\n$5\r\nworld\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse(&full[..cut], &Limits::default()),
                Parsed::Incomplete,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn malformed_and_oversized_are_errors() {
        let l = Limits {
            max_bulk: 10,
            ..Limits::default()
        };
        for bad in [
            &b"*x\r\n"[..],
            b"*1\r\n:3\r\n",
            b"*1\r\n$-5\r\n",
            b"*1\r\n$3\r\nabcXY",
            b"*1\r\n$11\r\n",
            b"*99999999\r\n",
        ] {
            assert!(matches!(parse(bad, &l), Parsed::Error(_)), "{bad:?}");
        }
        assert!(matches!(
            parse(
                &[b'a'; 100],
                &Limits {
                    max_inline: 50,
                    ..l
                }
            ),
            Parsed::Error(_)
        ));
    }
}
