//! Finding the mapping (VMA) that holds an address in `/proc/<pid>/maps`, streamed.
//!
//! Every line of `maps` starts with `START-END ` in hexadecimal. [`VmaFinder`] is fed the
//! text in pieces of any size (a line may be split anywhere) and keeps only the numbers
//! of the line it is reading: it never allocates, so a program thread of a tagged
//! process can use it from a buffer on its stack without touching the managed heap
//! (`usm_hint(addr, hint)` in `libusm.so` finds the mapping holding `addr` this way).

use std::ops::Range;

/// Where the parser is in the current line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// Reading the start address.
    Start,
    /// Reading the end address.
    End,
    /// Past the addresses: skipping to the end of the line.
    Rest,
}

/// Streaming search for the VMA holding one address.
#[derive(Clone, Debug)]
pub struct VmaFinder {
    addr: u64,
    field: Field,
    start: u64,
    end: u64,
    /// The line being read is malformed (overflow, a stray byte): it is skipped.
    bad: bool,
    found: Option<Range<u64>>,
}

impl VmaFinder {
    /// A search for the mapping that holds `addr`.
    pub fn new(addr: u64) -> Self {
        VmaFinder {
            addr,
            field: Field::Start,
            start: 0,
            end: 0,
            bad: false,
            found: None,
        }
    }

    /// Feeds the next bytes of the file. Returns true once the mapping is found (the rest
    /// of the file need not be read).
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.found.is_some() {
                return true;
            }
            if b == b'\n' {
                self.end_line();
                continue;
            }
            match self.field {
                Field::Start | Field::End => {
                    let digit = (b as char).to_digit(16).map(u64::from);
                    match (digit, b) {
                        (Some(d), _) => {
                            let v = if self.field == Field::Start {
                                &mut self.start
                            } else {
                                &mut self.end
                            };
                            match v.checked_mul(16).and_then(|x| x.checked_add(d)) {
                                Some(n) => *v = n,
                                None => self.bad = true,
                            }
                        }
                        (None, b'-') if self.field == Field::Start => self.field = Field::End,
                        (None, b' ') if self.field == Field::End => {
                            self.field = Field::Rest;
                            self.check();
                        }
                        _ => {
                            self.bad = true;
                            self.field = Field::Rest;
                        }
                    }
                }
                Field::Rest => {}
            }
        }
        self.found.is_some()
    }

    /// The end of the file: a last line without `\n` counts too.
    pub fn finish(mut self) -> Option<Range<u64>> {
        if self.found.is_none() && self.field == Field::End {
            self.check();
        }
        self.found
    }

    fn check(&mut self) {
        if !self.bad && self.start <= self.addr && self.addr < self.end {
            self.found = Some(self.start..self.end);
        }
    }

    fn end_line(&mut self) {
        if self.field == Field::End {
            self.check();
        }
        self.field = Field::Start;
        self.start = 0;
        self.end = 0;
        self.bad = false;
    }
}

/// The mapping holding `addr` in the text of a `maps` file.
pub fn vma_in(text: &str, addr: u64) -> Option<Range<u64>> {
    let mut f = VmaFinder::new(addr);
    f.feed(text.as_bytes());
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1234   /usr/bin/prog
7f0000000000-7f0000400000 rw-p 00000000 00:00 0 
7ffd1000-7ffd3000 rw-p 00000000 00:00 0                  [stack]";

    #[test]
    fn finds_the_mapping_in_any_split() {
        for addr in [
            0x7f00_0000_0000u64,
            0x7f00_003f_ffff,
            0x7ffd_2fff,
            0x55d0_c0a0_0000,
        ] {
            let want = vma_in(MAPS, addr);
            assert!(want.is_some(), "{addr:#x}");
            for chunk in 1..MAPS.len() {
                let mut f = VmaFinder::new(addr);
                for piece in MAPS.as_bytes().chunks(chunk) {
                    if f.feed(piece) {
                        break;
                    }
                }
                assert_eq!(f.finish(), want, "{addr:#x} in pieces of {chunk}");
            }
        }
        assert_eq!(
            vma_in(MAPS, 0x7f00_0000_1234),
            Some(0x7f00_0000_0000..0x7f00_0040_0000)
        );
    }

    #[test]
    fn an_unmapped_address_or_garbage_finds_nothing() {
        assert_eq!(vma_in(MAPS, 0x7f00_0040_0000), None);
        assert_eq!(vma_in(MAPS, 0), None);
        assert_eq!(vma_in("zz-ff r\n1000-", 0x1000), None);
        assert_eq!(vma_in("ffffffffffffffffff-0 x\n", 0x10), None);
        assert_eq!(vma_in("1000-2000", 0x1800), Some(0x1000..0x2000));
    }

    #[test]
    fn this_process_heap_is_found() {
        let v = vec![7u8; 1 << 20];
        let addr = v.as_ptr() as u64;
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        let r = vma_in(&text, addr).expect("a Vec lives in a mapping");
        assert!(r.contains(&addr) && r.end - r.start >= 1 << 20, "{r:?}");
    }
}
