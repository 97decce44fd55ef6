//! The USM swap header: the first 4 KiB of every device.
//!
//! ```text
//! offset  size  field
//!      0     8  magic        b"USMSWAP\0"
//!      8     4  version      1 (little endian, like every field)
//!     12     4  page_size    4096
//!     16     8  device_bytes size of the device when formatted
//!     24     8  slots        data slots; slot s lives at byte (s + 1) * 4096
//!     32    16  uuid         random, identifies this format of the device
//!     48     8  created      seconds since the epoch
//!     56     8  checksum     FNV-1a 64 of bytes 0..56
//!     64  4032  zero
//! ```
//!
//! A device is only ever used when this block parses and checks out; a path without it is
//! refused ([`SwapError::NotUsmSwap`](crate::SwapError)), never written to.
//! [`format`](crate::format) writes it and itself refuses a first block holding foreign
//! data (a Linux swap signature, an ext4 superblock, anything non-zero) unless forced.

use std::path::Path;

use crate::error::{Result, SwapError};

/// Size of a page, of a slot and of the header block.
pub const PAGE_SIZE: usize = 4096;
/// Slots start after this many header pages.
pub const HEADER_PAGES: u64 = 1;
/// The magic at offset 0.
pub const MAGIC: [u8; 8] = *b"USMSWAP\0";
/// The header layout version this build writes and accepts.
pub const VERSION: u32 = 1;

/// The decoded header of a USM swap device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SwapHeader {
    /// Layout version.
    pub version: u32,
    /// Page (and slot) size in bytes.
    pub page_size: u32,
    /// Device size in bytes at format time.
    pub device_bytes: u64,
    /// Number of data slots.
    pub slots: u64,
    /// Random identity of this format.
    pub uuid: [u8; 16],
    /// Format time, seconds since the epoch.
    pub created: u64,
}

/// What a first block that is not a USM header looks like, for error messages.
pub(crate) fn describe_foreign(block: &[u8]) -> Option<&'static str> {
    if block.len() < PAGE_SIZE {
        return Some("less than one page");
    }
    if block[..8] == MAGIC {
        return None;
    }
    if &block[PAGE_SIZE - 10..PAGE_SIZE] == b"SWAPSPACE2" {
        return Some("a Linux swap signature (mkswap)");
    }
    if block[1080..1082] == [0x53, 0xEF] {
        return Some("an ext2/3/4 superblock");
    }
    if block.iter().all(|&b| b == 0) {
        return Some("only zeros");
    }
    Some("unrecognised data")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl SwapHeader {
    /// A header for a device of `device_bytes` bytes with a fresh uuid.
    pub(crate) fn for_size(path: &Path, device_bytes: u64) -> Result<Self> {
        let pages = device_bytes / PAGE_SIZE as u64;
        if pages < HEADER_PAGES + 1 {
            return Err(SwapError::TooSmall {
                path: path.into(),
                bytes: device_bytes,
            });
        }
        let mut uuid = [0u8; 16];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut uuid))
            .map_err(|e| SwapError::device("read /dev/urandom", "/dev/urandom", e))?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Self {
            version: VERSION,
            page_size: PAGE_SIZE as u32,
            device_bytes,
            slots: pages - HEADER_PAGES,
            uuid,
            created,
        })
    }

    /// Encodes into the first `PAGE_SIZE` bytes of `block` (the rest of the page zeroed).
    pub fn encode(&self, block: &mut [u8]) {
        let block = &mut block[..PAGE_SIZE];
        block.fill(0);
        block[0..8].copy_from_slice(&MAGIC);
        block[8..12].copy_from_slice(&self.version.to_le_bytes());
        block[12..16].copy_from_slice(&self.page_size.to_le_bytes());
        block[16..24].copy_from_slice(&self.device_bytes.to_le_bytes());
        block[24..32].copy_from_slice(&self.slots.to_le_bytes());
        block[32..48].copy_from_slice(&self.uuid);
        block[48..56].copy_from_slice(&self.created.to_le_bytes());
        let sum = fnv1a(&block[0..56]);
        block[56..64].copy_from_slice(&sum.to_le_bytes());
    }

    /// Decodes and validates the first block of `path`, which is `actual_bytes` long.
    pub fn decode(path: &Path, block: &[u8], actual_bytes: u64) -> Result<Self> {
        if let Some(found) = describe_foreign(block) {
            return Err(SwapError::NotUsmSwap {
                path: path.into(),
                found,
            });
        }
        let mismatch = |reason: String| SwapError::HeaderMismatch {
            path: path.into(),
            reason,
        };
        let sum = le_u64(block, 56);
        if sum != fnv1a(&block[0..56]) {
            return Err(mismatch("header checksum is wrong".into()));
        }
        let header = Self {
            version: le_u32(block, 8),
            page_size: le_u32(block, 12),
            device_bytes: le_u64(block, 16),
            slots: le_u64(block, 24),
            uuid: block[32..48].try_into().unwrap_or([0; 16]),
            created: le_u64(block, 48),
        };
        if header.version != VERSION {
            return Err(mismatch(format!(
                "version {} (this build reads {VERSION})",
                header.version
            )));
        }
        if header.page_size as usize != PAGE_SIZE {
            return Err(mismatch(format!(
                "page size {} (this build uses {PAGE_SIZE})",
                header.page_size
            )));
        }
        let needed = (header.slots + HEADER_PAGES) * PAGE_SIZE as u64;
        if header.device_bytes < needed {
            return Err(mismatch(format!(
                "{} slots do not fit in {} bytes",
                header.slots, header.device_bytes
            )));
        }
        if actual_bytes < needed {
            return Err(mismatch(format!(
                "formatted for {} bytes but the device has {actual_bytes} (truncated or shrunk)",
                header.device_bytes
            )));
        }
        Ok(header)
    }

    /// Byte offset of `slot` on the device.
    pub const fn slot_offset(slot: u64) -> u64 {
        (slot + HEADER_PAGES) * PAGE_SIZE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let h = SwapHeader::for_size(Path::new("x"), 1 << 20).unwrap();
        assert_eq!(h.slots, 255);
        let mut b = vec![0u8; PAGE_SIZE];
        h.encode(&mut b);
        assert_eq!(SwapHeader::decode(Path::new("x"), &b, 1 << 20).unwrap(), h);
    }

    #[test]
    fn corruption_and_foreign_data_are_refused() {
        let h = SwapHeader::for_size(Path::new("x"), 1 << 20).unwrap();
        let mut b = vec![0u8; PAGE_SIZE];
        h.encode(&mut b);
        b[30] ^= 1;
        assert!(matches!(
            SwapHeader::decode(Path::new("x"), &b, 1 << 20),
            Err(SwapError::HeaderMismatch { .. })
        ));
        let zeros = vec![0u8; PAGE_SIZE];
        assert!(matches!(
            SwapHeader::decode(Path::new("x"), &zeros, 1 << 20),
            Err(SwapError::NotUsmSwap {
                found: "only zeros",
                ..
            })
        ));
        let mut linux = vec![0u8; PAGE_SIZE];
        linux[PAGE_SIZE - 10..].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(
            describe_foreign(&linux),
            Some("a Linux swap signature (mkswap)")
        );
        let mut h2 = vec![0u8; PAGE_SIZE];
        h.encode(&mut h2);
        assert!(matches!(
            SwapHeader::decode(Path::new("x"), &h2, 1 << 19),
            Err(SwapError::HeaderMismatch { .. })
        ));
    }

    #[test]
    fn too_small_is_refused() {
        assert!(matches!(
            SwapHeader::for_size(Path::new("x"), 4096),
            Err(SwapError::TooSmall { .. })
        ));
    }
}
