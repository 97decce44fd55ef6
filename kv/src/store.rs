//! The key-value store: shards of (hash index, slab of items), each in its own memory.
//!
//! # Layout of one shard
//! ```text
//!  index memory: [hash u64 | item offset u64] x capacity   open addressing, linear probing
//!                 hash 0 = empty slot; deletion shifts the run back (no tombstones)
//!  data memory:  | slab page | slab page | ...  ->  bump pointer `top`
//!                 a slab page of class c holds chunks of size_c:
//!                 [key_len u32 | val_len u32 | key | value | unused]
//! ```
//! Both memories are [`Memory`]: managed [`Region`]s in USM mode (pages may be evicted to
//! swap and come back on access), plain anonymous memory in kernel mode. Only the free
//! lists (chunk offsets per size class) and counters live on the heap.
//!
//! # Concurrency
//! A shard is behind a uThread-aware mutex (`usm_runtime::embedded::sync::Mutex`): a
//! uThread that faults on a swapped-out page while holding it parks, its worker serves
//! other connections, and uThreads wanting the same shard park on the mutex — never the
//! worker. From OS threads (kernel mode) the same mutex blocks the thread.
//!
//! # Digest
//! [`Store::digest`] combines a 128-bit hash of every (key, value) pair with wrapping
//! addition, so the result does not depend on order, shard count or placement: two stores
//! with the same contents have the same digest ([`item_digest`] computes one pair's share).

use std::ops::Range;

use usm_runtime::embedded::Region;
use usm_runtime::embedded::sync::Mutex;

use crate::KvError;

/// Bytes in front of every item: key length, value length (u32 little endian each).
const HEADER: usize = 8;
/// A slab page (chunks of one class are carved this many bytes at a time).
const SLAB_PAGE: usize = 64 << 10;
/// Smallest chunk.
const MIN_CHUNK: usize = 32;
/// An index entry.
const ENTRY: usize = 16;
/// Index slots of a new shard (it doubles at 3/4 load, up to twice `max_keys / shards`).
const INITIAL_SLOTS: usize = 1024;

/// Memory a shard lives in.
pub trait Memory: Send + 'static {
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Never empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes `[range)`.
    fn bytes(&self, range: Range<usize>) -> &[u8];
    /// Bytes `[range)`, mutably.
    fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8];
}

impl Memory for Region {
    fn len(&self) -> usize {
        Region::len(self)
    }
    fn bytes(&self, range: Range<usize>) -> &[u8] {
        Region::bytes(self, range)
    }
    fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        Region::bytes_mut(self, range)
    }
}

/// Plain anonymous memory (kernel mode): zero pages on demand, the kernel's to swap.
#[derive(Debug)]
pub struct Plain(Box<[u8]>);

impl Plain {
    /// `bytes` of zeroed memory (a lazily populated anonymous mapping for large sizes).
    pub fn new(bytes: usize) -> Plain {
        Plain(vec![0u8; bytes].into_boxed_slice())
    }
}

impl Memory for Plain {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.0[range]
    }
    fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        &mut self.0[range]
    }
}

/// Creates memory of the given size (a shard's data, a shard's index and each larger
/// index it grows into).
pub type MemoryFactory<M> = Box<dyn Fn(usize) -> Result<M, KvError> + Send + Sync>;

/// Sizes of the store.
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// Shards (a power of two).
    pub shards: usize,
    /// Keys the store may hold (each shard's index grows up to twice its share in slots).
    pub max_keys: usize,
    /// Bytes of item data (keys, values, headers, slab slack) over all shards.
    pub max_data: usize,
    /// Largest value.
    pub max_value: usize,
    /// Largest key.
    pub max_key: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            shards: 32,
            max_keys: 4 << 20,
            max_data: 4 << 30,
            max_value: 1 << 20,
            max_key: 64 << 10,
        }
    }
}

/// 64-bit hash of a key (nonzero: 0 marks an empty index slot).
pub fn key_hash(key: &[u8]) -> u64 {
    let h = mix(key, 0x243f_6a88_85a3_08d3);
    if h == 0 { 1 } else { h }
}

fn mix(bytes: &[u8], seed: u64) -> u64 {
    const M: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(M);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(M).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(M);
    h ^= h >> 32;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 29)
}

/// One pair's share of [`Store::digest`].
pub fn item_digest(key: &[u8], value: &[u8]) -> u128 {
    let k1 = mix(key, 1);
    let k2 = mix(key, 2);
    let v1 = mix(value, k1);
    let v2 = mix(value, k2 ^ 0x5555);
    (u128::from(v1) << 64) | u128::from(v2 ^ k1.rotate_left(17))
}

/// Chunk sizes: from [`MIN_CHUNK`] growing by 1.25x, the last one fitting the largest item.
fn classes(max_item: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut s = MIN_CHUNK;
    while s < max_item {
        v.push(s);
        s = ((s + s / 4) + 7) & !7;
    }
    v.push((max_item + 7) & !7);
    v
}

/// Why a write was refused (the server turns it into an error reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The item is larger than the largest chunk.
    TooLarge,
    /// The shard's data memory is used up.
    OutOfMemory,
    /// The shard's index is full.
    IndexFull,
}

struct Shard<M: Memory> {
    index: M,
    data: M,
    mask: usize,
    live: usize,
    top: usize,
    free: Vec<Vec<u64>>,
    bytes_used: usize,
}

/// Where a key was found.
struct Slot {
    pos: usize,
    offset: usize,
}

impl<M: Memory> Shard<M> {
    fn new(index: M, data: M, classes: usize) -> Shard<M> {
        let slots = index.len() / ENTRY;
        Shard {
            index,
            data,
            mask: slots - 1,
            live: 0,
            top: 0,
            free: vec![Vec::new(); classes],
            bytes_used: 0,
        }
    }

    fn entry(&self, pos: usize) -> (u64, usize) {
        let b = self.index.bytes(pos * ENTRY..pos * ENTRY + ENTRY);
        let mut h = [0u8; 8];
        let mut o = [0u8; 8];
        h.copy_from_slice(&b[..8]);
        o.copy_from_slice(&b[8..]);
        (u64::from_le_bytes(h), u64::from_le_bytes(o) as usize)
    }

    fn set_entry(&mut self, pos: usize, hash: u64, offset: usize) {
        let b = self.index.bytes_mut(pos * ENTRY..pos * ENTRY + ENTRY);
        b[..8].copy_from_slice(&hash.to_le_bytes());
        b[8..].copy_from_slice(&(offset as u64).to_le_bytes());
    }

    fn header(&self, offset: usize) -> (usize, usize) {
        let b = self.data.bytes(offset..offset + HEADER);
        let k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let v = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        (k, v)
    }

    fn key_at(&self, offset: usize) -> &[u8] {
        let (k, _) = self.header(offset);
        self.data.bytes(offset + HEADER..offset + HEADER + k)
    }

    fn value_at(&self, offset: usize) -> &[u8] {
        let (k, v) = self.header(offset);
        let start = offset + HEADER + k;
        self.data.bytes(start..start + v)
    }

    fn find(&self, hash: u64, key: &[u8]) -> Result<Slot, usize> {
        let mut pos = hash as usize & self.mask;
        loop {
            let (h, offset) = self.entry(pos);
            if h == 0 {
                return Err(pos);
            }
            if h == hash && self.key_at(offset) == key {
                return Ok(Slot { pos, offset });
            }
            pos = (pos + 1) & self.mask;
        }
    }

    fn alloc(&mut self, class: usize, chunk: usize) -> Result<usize, Refused> {
        if let Some(off) = self.free[class].pop() {
            return Ok(off as usize);
        }
        let carve = chunk.max(SLAB_PAGE / chunk * chunk);
        if self.top + carve > self.data.len() {
            if self.top + chunk > self.data.len() {
                return Err(Refused::OutOfMemory);
            }
            let off = self.top;
            self.top += chunk;
            return Ok(off);
        }
        let base = self.top;
        self.top += carve;
        // Hand out the first chunk; the rest go on the free list (last first, so chunks
        // are used in address order).
        for i in (1..carve / chunk).rev() {
            self.free[class].push((base + i * chunk) as u64);
        }
        Ok(base)
    }

    fn write_item(&mut self, offset: usize, key: &[u8], value: &[u8]) {
        let b = self
            .data
            .bytes_mut(offset..offset + HEADER + key.len() + value.len());
        b[..4].copy_from_slice(&(key.len() as u32).to_le_bytes());
        b[4..8].copy_from_slice(&(value.len() as u32).to_le_bytes());
        b[HEADER..HEADER + key.len()].copy_from_slice(key);
        b[HEADER + key.len()..].copy_from_slice(value);
    }

    /// Moves every entry into `bigger` (twice the slots; hashes are in the entries, so no
    /// key is read).
    fn grow_into(&mut self, bigger: M) {
        let old = std::mem::replace(&mut self.index, bigger);
        let old_slots = self.mask + 1;
        self.mask = self.index.len() / ENTRY - 1;
        for pos in 0..old_slots {
            let b = old.bytes(pos * ENTRY..pos * ENTRY + ENTRY);
            let h = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            if h == 0 {
                continue;
            }
            let off = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
            let mut p = h as usize & self.mask;
            while self.entry(p).0 != 0 {
                p = (p + 1) & self.mask;
            }
            self.set_entry(p, h, off as usize);
        }
    }

    /// Removes the entry at `pos`, shifting the rest of its run back.
    fn remove_at(&mut self, pos: usize) {
        let mut hole = pos;
        let mut j = pos;
        loop {
            j = (j + 1) & self.mask;
            let (h, off) = self.entry(j);
            if h == 0 {
                break;
            }
            let home = h as usize & self.mask;
            // The entry at j may stay iff its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.set_entry(hole, h, off);
                hole = j;
            }
        }
        self.set_entry(hole, 0, 0);
        self.live -= 1;
    }
}

/// Counters of the whole store.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StoreStats {
    /// Keys.
    pub keys: usize,
    /// Bytes of keys + values + headers.
    pub bytes_used: usize,
    /// Bytes of data memory carved into slabs.
    pub bytes_carved: usize,
}

/// The store (see the module docs).
pub struct Store<M: Memory> {
    shards: Vec<Mutex<Shard<M>>>,
    factory: MemoryFactory<M>,
    config: StoreConfig,
    classes: Vec<usize>,
    max_slots_per_shard: usize,
    data_per_shard: usize,
}

impl<M: Memory> std::fmt::Debug for Store<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<M: Memory> Store<M> {
    /// A store of `config`'s sizes whose shards live in memory from `factory`.
    pub fn new(config: StoreConfig, factory: MemoryFactory<M>) -> Result<Store<M>, KvError> {
        if !config.shards.is_power_of_two() {
            return Err(KvError::Config("shards must be a power of two".into()));
        }
        let max_slots_per_shard = (config.max_keys.div_ceil(config.shards) * 2)
            .next_power_of_two()
            .max(64);
        let data_per_shard = config.max_data.div_ceil(config.shards).max(SLAB_PAGE);
        let classes = classes(HEADER + config.max_key + config.max_value);
        let mut store = Store {
            shards: Vec::with_capacity(config.shards),
            factory,
            config,
            classes,
            max_slots_per_shard,
            data_per_shard,
        };
        for _ in 0..config.shards {
            let shard = store.fresh_shard()?;
            store.shards.push(Mutex::new(shard));
        }
        Ok(store)
    }

    fn fresh_shard(&self) -> Result<Shard<M>, KvError> {
        let index = (self.factory)(INITIAL_SLOTS.min(self.max_slots_per_shard) * ENTRY)?;
        let data = (self.factory)(self.data_per_shard)?;
        Ok(Shard::new(index, data, self.classes.len()))
    }

    /// The sizes in use.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard<M>> {
        &self.shards[(hash >> 40) as usize & (self.shards.len() - 1)]
    }

    /// Appends the value of `key` to `out` when present; `true` if it was.
    pub fn get_into(&self, key: &[u8], out: &mut impl FnMut(&[u8])) -> bool {
        let h = key_hash(key);
        let shard = self.shard(h).lock();
        match shard.find(h, key) {
            Ok(slot) => {
                out(shard.value_at(slot.offset));
                true
            }
            Err(_) => false,
        }
    }

    /// Whether `key` is present.
    pub fn exists(&self, key: &[u8]) -> bool {
        let h = key_hash(key);
        self.shard(h).lock().find(h, key).is_ok()
    }

    /// Sets `key` to `value`. With `only` = `Some(true)` only if absent (NX), `Some(false)`
    /// only if present (XX). Returns whether it was written.
    pub fn set(&self, key: &[u8], value: &[u8], only: Option<bool>) -> Result<bool, Refused> {
        if key.len() > self.config.max_key || value.len() > self.config.max_value {
            return Err(Refused::TooLarge);
        }
        let size = HEADER + key.len() + value.len();
        let class = self.classes.partition_point(|&c| c < size);
        let chunk = *self.classes.get(class).ok_or(Refused::TooLarge)?;
        let h = key_hash(key);
        let mut guard = self.shard(h).lock();
        let shard = &mut *guard;
        match shard.find(h, key) {
            Ok(slot) => {
                if only == Some(true) {
                    return Ok(false);
                }
                let (k, v) = shard.header(slot.offset);
                let old_size = HEADER + k + v;
                let old_class = self.classes.partition_point(|&c| c < old_size);
                if old_class == class {
                    shard.write_item(slot.offset, key, value);
                } else {
                    let off = shard.alloc(class, chunk)?;
                    shard.write_item(off, key, value);
                    shard.free[old_class].push(slot.offset as u64);
                    shard.set_entry(slot.pos, h, off);
                }
                shard.bytes_used = shard.bytes_used - old_size + size;
                Ok(true)
            }
            Err(mut pos) => {
                if only == Some(false) {
                    return Ok(false);
                }
                if (shard.live + 1) * 4 > (shard.mask + 1) * 3 {
                    let slots = (shard.mask + 1) * 2;
                    if slots > self.max_slots_per_shard {
                        return Err(Refused::IndexFull);
                    }
                    let bigger = (self.factory)(slots * ENTRY).map_err(|e| {
                        tracing::warn!(error = %e, slots, "growing a shard's index failed");
                        Refused::IndexFull
                    })?;
                    shard.grow_into(bigger);
                    // The key was absent; it still is: its slot is the first empty one.
                    pos = h as usize & shard.mask;
                    while shard.entry(pos).0 != 0 {
                        pos = (pos + 1) & shard.mask;
                    }
                }
                let off = shard.alloc(class, chunk)?;
                shard.write_item(off, key, value);
                shard.set_entry(pos, h, off);
                shard.live += 1;
                shard.bytes_used += size;
                Ok(true)
            }
        }
    }

    /// Deletes `key`; `true` if it was present.
    pub fn del(&self, key: &[u8]) -> bool {
        let h = key_hash(key);
        let mut guard = self.shard(h).lock();
        let shard = &mut *guard;
        match shard.find(h, key) {
            Ok(slot) => {
                let (k, v) = shard.header(slot.offset);
                let class = self.classes.partition_point(|&c| c < HEADER + k + v);
                shard.free[class].push(slot.offset as u64);
                shard.bytes_used -= HEADER + k + v;
                shard.remove_at(slot.pos);
                true
            }
            Err(_) => false,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().live).sum()
    }

    /// No keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters.
    pub fn stats(&self) -> StoreStats {
        let mut s = StoreStats::default();
        for shard in &self.shards {
            let g = shard.lock();
            s.keys += g.live;
            s.bytes_used += g.bytes_used;
            s.bytes_carved += g.top;
        }
        s
    }

    /// Removes every key: each shard gets fresh memory (the old is released whole).
    pub fn flush(&self) -> Result<(), KvError> {
        for shard in &self.shards {
            let fresh = self.fresh_shard()?;
            let old = std::mem::replace(&mut *shard.lock(), fresh);
            drop(old);
        }
        Ok(())
    }

    /// The order-independent digest of every (key, value) pair (module docs); reads every
    /// item. An empty store digests to 0.
    pub fn digest(&self) -> u128 {
        let mut d = 0u128;
        for shard in &self.shards {
            let g = shard.lock();
            for pos in 0..=g.mask {
                let (h, off) = g.entry(pos);
                if h != 0 {
                    d = d.wrapping_add(item_digest(g.key_at(off), g.value_at(off)));
                }
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_keys: usize, max_data: usize) -> Store<Plain> {
        let config = StoreConfig {
            shards: 4,
            max_keys,
            max_data,
            max_value: 4096,
            max_key: 256,
        };
        Store::new(config, Box::new(|n| Ok(Plain::new(n)))).unwrap()
    }

    #[test]
    fn set_get_overwrite_delete_against_a_model() {
        let s = store(4096, 8 << 20);
        let mut model = std::collections::HashMap::new();
        let mut x = 12345u64;
        for step in 0..40_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = format!("k{}", x % 1500).into_bytes();
            match x % 7 {
                0 | 1 => {
                    assert_eq!(s.del(&key), model.remove(&key).is_some(), "step {step}");
                }
                _ => {
                    let len = (x >> 20) as usize % 3000;
                    let value: Vec<u8> = (0..len).map(|i| (i as u64 ^ step) as u8).collect();
                    assert_eq!(s.set(&key, &value, None), Ok(true));
                    model.insert(key, value);
                }
            }
        }
        assert_eq!(s.len(), model.len());
        let mut want = 0u128;
        for (k, v) in &model {
            let mut got = Vec::new();
            assert!(s.get_into(k, &mut |b| got.extend_from_slice(b)));
            assert_eq!(&got, v);
            want = want.wrapping_add(item_digest(k, v));
        }
        assert_eq!(s.digest(), want);
        s.flush().unwrap();
        assert_eq!((s.len(), s.digest()), (0, 0));
    }

    #[test]
    fn limits_are_refusals() {
        let s = store(64, 256 << 10);
        assert_eq!(s.set(b"k", &[0; 5000], None), Err(Refused::TooLarge));
        assert_eq!(s.set(&[b'k'; 300], b"v", None), Err(Refused::TooLarge));
        assert_eq!(s.set(b"a", b"1", Some(false)), Ok(false));
        assert_eq!(s.set(b"a", b"1", Some(true)), Ok(true));
        assert_eq!(s.set(b"a", b"2", Some(true)), Ok(false));
        let mut refused = None;
        for i in 0..10_000 {
            if let Err(e) = s.set(format!("key{i}").as_bytes(), &[1; 4000], None) {
                refused = Some(e);
                break;
            }
        }
        assert!(matches!(
            refused,
            Some(Refused::OutOfMemory | Refused::IndexFull)
        ));
        // What was stored before is intact.
        let mut got = Vec::new();
        assert!(s.get_into(b"a", &mut |b| got.extend_from_slice(b)));
        assert_eq!(got, b"1");
    }
}
