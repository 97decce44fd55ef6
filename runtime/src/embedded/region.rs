//! [`Region`], [`RegionVec`], [`PinGuard`]: managed memory and safe typed views of it.

use std::marker::PhantomData;
use std::ops::Range;
use usm_sync::Arc;

use usm_kmod::PAGE_SIZE;
use usm_kmod::sys::mem::{Advice, Mapping, Protection};

use crate::embedded::EmbeddedError;
use crate::embedded::runtime::Shared;
use crate::mm::{RangeKey, RangeRelease};
use crate::sys::{sigbus, view};

/// Plain old data: any bit pattern is a valid value (so a zero-filled or swapped-in page
/// is always a valid `T`), no pointers, no drop glue, alignment at most 4096.
///
/// # Safety
/// Implement only for types meeting the description above (e.g. `#[repr(C)]` structs of
/// `Pod` fields with no padding).
pub unsafe trait Pod: Copy + Send + Sync + 'static {}

/// Managed memory: pages come from the runtime's frame pool on first touch, may be
/// evicted to swap and come back on access — transparently to the program.
///
/// Created by [`crate::embedded::Runtime::region`]. The mapping is `MADV_DONTFORK` and
/// `MADV_NOHUGEPAGE` (a forked child does not see it), registered (MISSING) on the
/// runtime's userfaultfd. Dropping it moves its pages back to the pool and frees its swap
/// slots.
pub struct Region {
    shared: Arc<Shared>,
    mapping: Option<Mapping>,
    len: usize,
    key: RangeKey,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .finish()
    }
}

impl Region {
    pub(crate) fn new(
        shared: Arc<Shared>,
        bytes: usize,
        alloc: &str,
    ) -> Result<Region, EmbeddedError> {
        if bytes == 0 {
            return Err(EmbeddedError::Config("a region needs at least one byte"));
        }
        let len = bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mapping = Mapping::anonymous(len, Protection::ReadWrite)?;
        mapping.advise(0, len, Advice::DontFork)?;
        mapping.advise(0, len, Advice::NoHugePage)?;
        let start = mapping.addr();
        let id = shared
            .next_region
            .fetch_add(1, usm_sync::atomic::Ordering::Relaxed);
        let key = shared
            .core
            .add_range(shared.pid, start, len as u64, id, alloc)?;
        if !sigbus::add_region(start, start + len as u64, shared.runtime_id) {
            let _ = shared.core.remove_range(shared.pid, start);
            return Err(EmbeddedError::Config(
                "too many regions (handler table full)",
            ));
        }
        if let Err(e) = shared
            .uffd
            .register(start, len as u64, shared.register_mode)
        {
            sigbus::remove_region(start);
            let _ = shared.core.remove_range(shared.pid, start);
            return Err(e.into());
        }
        Ok(Region {
            shared,
            mapping: Some(mapping),
            len,
            key,
        })
    }

    /// First byte.
    pub fn addr(&self) -> u64 {
        self.key.start
    }

    /// Length in bytes (a multiple of 4096).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Where page `page` of the region is now (resident, swapped, in flight, ...); `None`
    /// past the end or for a page never touched.
    pub fn page_state(&self, page: usize) -> Option<crate::mm::PageState> {
        if page >= self.len / PAGE_SIZE {
            return None;
        }
        let addr = self.key.start + (page * PAGE_SIZE) as u64;
        self.shared.core.page_state(self.shared.pid, addr)
    }

    /// Never true (a region has at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The range key (pid, start, generation) in the memory core.
    pub fn key(&self) -> RangeKey {
        self.key
    }

    fn ptr(&self) -> *mut u8 {
        self.key.start as *mut u8
    }

    fn elems<T: Pod>(&self) -> usize {
        assert!(
            std::mem::align_of::<T>() <= PAGE_SIZE,
            "Pod alignment above a page"
        );
        self.len / std::mem::size_of::<T>().max(1)
    }

    /// The whole region as `&[T]`.
    pub fn as_slice<T: Pod>(&self) -> &[T] {
        view::slice(self.ptr(), self.elems::<T>())
    }

    /// The whole region as `&mut [T]`.
    pub fn as_mut_slice<T: Pod>(&mut self) -> &mut [T] {
        let n = self.elems::<T>();
        view::slice_mut(self.ptr(), n)
    }

    /// The whole region as atomic words: shared access from many uThreads and threads
    /// through `&Region` (e.g. an `Arc<Region>`).
    pub fn as_atomic_u64(&self) -> &[usm_sync::atomic::AtomicU64] {
        view::atomic_u64(self.ptr(), self.len / 8)
    }

    /// Bytes `[range)`.
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.as_slice::<u8>()[range]
    }

    /// Bytes `[range)`, mutably.
    pub fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        &mut self.as_mut_slice::<u8>()[range]
    }

    /// Pins bytes `[range)` against eviction and faults them in, for the duration of a
    /// syscall that reads or writes them (the kernel's access to a missing page of a
    /// region fails with `EFAULT`, and some syscalls lose data then). Call from a uThread
    /// or a plain thread of the runtime's process.
    pub fn pin_for_syscall(&self, range: Range<usize>) -> PinGuard<'_> {
        let r = range.start.min(self.len)..range.end.min(self.len);
        let abs = self.key.start + r.start as u64..self.key.start + r.end as u64;
        // Pin first, then fault in: a page evicted between the two would be missing.
        self.shared.core.pin(self.shared.pid, abs.clone());
        view::prefault(self.ptr().wrapping_add(r.start), r.len());
        PinGuard {
            region: self,
            range: abs,
        }
    }

    /// Receives one datagram into bytes `[range)` of the region (pinned and faulted in
    /// first, so the kernel never meets a missing page). Returns the datagram's length.
    pub fn recv_into(
        &mut self,
        socket: &std::net::UdpSocket,
        range: Range<usize>,
    ) -> std::io::Result<usize> {
        let abs = self.key.start + range.start as u64..self.key.start + range.end as u64;
        self.shared.core.pin(self.shared.pid, abs.clone());
        view::prefault(self.ptr().wrapping_add(range.start), range.len());
        let r = socket.recv(&mut self.as_mut_slice::<u8>()[range]);
        self.shared.core.unpin(self.shared.pid, abs);
        if let Err(e) = &r
            && e.raw_os_error() == Some(libc::EFAULT)
        {
            tracing::error!("recv into a pinned, pre-faulted region buffer got EFAULT: a bug");
        }
        r
    }

    /// Sends bytes `[range)` of the region as one datagram (pinned and faulted in first).
    pub fn send_from(
        &self,
        socket: &std::net::UdpSocket,
        range: Range<usize>,
    ) -> std::io::Result<usize> {
        let guard = self.pin_for_syscall(range.clone());
        let r = socket.send(guard.region.bytes(range));
        drop(guard);
        r
    }

    /// Gives a hint in the USM hint language (`"PREFETCH=8; EVICTION=DENY"`) for bytes
    /// `[range)`: the eviction policy is told, and the memory core reads it (with
    /// `PREFETCH=N`, a swap-in also reads back up to N following swapped pages).
    pub fn hint(&self, range: Range<usize>, text: &str) -> Result<(), EmbeddedError> {
        let start = self.key.start + range.start.min(self.len) as u64;
        let len = (range.end.min(self.len) - range.start.min(self.len)) as u64;
        Ok(self.shared.core.hint(self.shared.pid, start, len, text)?)
    }

    /// Frees the region now (as dropping it does) and reports what went back.
    pub fn release(mut self) -> Result<RangeRelease, EmbeddedError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<RangeRelease, EmbeddedError> {
        let Some(mapping) = self.mapping.take() else {
            return Ok(RangeRelease::default());
        };
        sigbus::remove_region(self.key.start);
        sigbus::clear_poisoned(self.key.start, self.key.start + self.len as u64);
        let rel = self
            .shared
            .core
            .remove_range(self.shared.pid, self.key.start);
        if let Err(e) = self.shared.uffd.unregister(self.key.start, self.len as u64) {
            tracing::warn!(error = %e, "unregistering a region failed");
        }
        drop(mapping);
        Ok(rel?)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::warn!(error = %e, "releasing a region failed");
        }
    }
}

/// Pages of a region pinned against eviction until dropped.
#[derive(Debug)]
pub struct PinGuard<'a> {
    region: &'a Region,
    range: Range<u64>,
}

impl PinGuard<'_> {
    /// The pinned bytes.
    pub fn bytes(&self) -> &[u8] {
        let off = (self.range.start - self.region.key.start) as usize;
        let end = (self.range.end - self.region.key.start) as usize;
        self.region.bytes(off..end)
    }
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        self.region
            .shared
            .core
            .unpin(self.region.shared.pid, self.range.clone());
    }
}

/// A vector of `T: Pod` in managed memory. Grows by moving to a region twice the size.
pub struct RegionVec<T: Pod> {
    region: Region,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> std::fmt::Debug for RegionVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionVec")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl<T: Pod> RegionVec<T> {
    /// An empty vector with room for at least `capacity` elements.
    pub fn with_capacity(
        rt: &crate::embedded::Runtime,
        capacity: usize,
    ) -> Result<Self, EmbeddedError> {
        let bytes = capacity.max(1) * std::mem::size_of::<T>().max(1);
        Ok(RegionVec {
            region: rt.region(bytes)?,
            len: 0,
            _t: PhantomData,
        })
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements that fit without growing.
    pub fn capacity(&self) -> usize {
        self.region.len() / std::mem::size_of::<T>().max(1)
    }

    /// Appends `value`, growing if needed.
    pub fn push(&mut self, value: T) -> Result<(), EmbeddedError> {
        if self.len == self.capacity() {
            self.grow(self.len + 1)?;
        }
        let len = self.len;
        self.region.as_mut_slice::<T>()[len] = value;
        self.len += 1;
        Ok(())
    }

    /// Removes the last element.
    pub fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        Some(self.region.as_slice::<T>()[self.len])
    }

    /// Appends all of `values`.
    pub fn extend_from_slice(&mut self, values: &[T]) -> Result<(), EmbeddedError> {
        if self.len + values.len() > self.capacity() {
            self.grow(self.len + values.len())?;
        }
        let len = self.len;
        self.region.as_mut_slice::<T>()[len..len + values.len()].copy_from_slice(values);
        self.len += values.len();
        Ok(())
    }

    /// Sets the length to `new_len`, filling new elements with `value`.
    pub fn resize(&mut self, new_len: usize, value: T) -> Result<(), EmbeddedError> {
        if new_len > self.capacity() {
            self.grow(new_len)?;
        }
        if new_len > self.len {
            let len = self.len;
            self.region.as_mut_slice::<T>()[len..new_len].fill(value);
        }
        self.len = new_len;
        Ok(())
    }

    /// Empties the vector (capacity kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn grow(&mut self, at_least: usize) -> Result<(), EmbeddedError> {
        let cap = at_least.max(self.capacity() * 2);
        let bytes = cap * std::mem::size_of::<T>().max(1);
        let mut bigger = Region::new(
            self.region.shared.clone(),
            bytes,
            &self.region.shared.default_alloc.clone(),
        )?;
        bigger.as_mut_slice::<T>()[..self.len]
            .copy_from_slice(&self.region.as_slice::<T>()[..self.len]);
        self.region = bigger;
        Ok(())
    }

    /// The region holding the elements.
    pub fn region(&self) -> &Region {
        &self.region
    }
}

impl<T: Pod> std::ops::Deref for RegionVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.region.as_slice::<T>()[..self.len]
    }
}

impl<T: Pod> std::ops::DerefMut for RegionVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let len = self.len;
        &mut self.region.as_mut_slice::<T>()[..len]
    }
}
