//! The stack pool.
//!
//! ```text
//!   high addresses
//!   +--------------------+  <- stack base (initial stack pointer, 16-byte aligned)
//!   |  usable stack      |     `size` bytes rounded up to pages; signal frames of the
//!   |  (grows down)      |     fault path land here too
//!   +--------------------+
//!   |  guard page        |     PROT_NONE: an overflow faults instead of corrupting memory
//!   +--------------------+  <- mmap start
//!   low addresses
//! ```
//!
//! The mapping itself is corosensei's `DefaultStack` (mmap + mprotect, unmapped on drop).
//! The pool only keeps finished stacks for reuse; it belongs to one worker thread, so it
//! needs no synchronisation. Stacks are not zeroed on reuse.

use corosensei::stack::DefaultStack;

use crate::FiberError;

/// Smallest usable stack accepted: a signal frame with AVX-512 state needs ~3.4 KiB and
/// the fault path's handler runs on the uThread stack.
pub const MIN_STACK_SIZE: usize = 16 * 1024;

/// Default usable stack size of a pool.
pub const DEFAULT_STACK_SIZE: usize = 256 * 1024;

/// A per-worker pool of guard-paged stacks of one size.
pub struct StackPool {
    stack_size: usize,
    max_cached: usize,
    free: Vec<DefaultStack>,
    created: u64,
}

impl std::fmt::Debug for StackPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackPool")
            .field("stack_size", &self.stack_size)
            .field("cached", &self.free.len())
            .field("created", &self.created)
            .finish()
    }
}

impl StackPool {
    /// A pool of `stack_size`-byte stacks keeping at most `max_cached` idle ones.
    pub fn new(stack_size: usize, max_cached: usize) -> Result<Self, FiberError> {
        if stack_size < MIN_STACK_SIZE {
            return Err(FiberError::StackTooSmall {
                requested: stack_size,
                minimum: MIN_STACK_SIZE,
            });
        }
        Ok(Self {
            stack_size,
            max_cached,
            free: Vec::new(),
            created: 0,
        })
    }

    /// Usable size of the stacks of this pool.
    pub fn stack_size(&self) -> usize {
        self.stack_size
    }

    /// Number of idle stacks ready for reuse.
    pub fn cached(&self) -> usize {
        self.free.len()
    }

    /// Number of stacks this pool has mapped since it was created.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// Maps stacks until `count` are cached (warm-up, so the first spawns are pooled too).
    pub fn prefill(&mut self, count: usize) -> Result<(), FiberError> {
        while self.free.len() < count.min(self.max_cached) {
            let stack = self.map_new()?;
            self.free.push(stack);
        }
        Ok(())
    }

    pub(crate) fn take(&mut self) -> Result<DefaultStack, FiberError> {
        match self.free.pop() {
            Some(stack) => Ok(stack),
            None => self.map_new(),
        }
    }

    pub(crate) fn give_back(&mut self, stack: DefaultStack) {
        if self.free.len() < self.max_cached {
            self.free.push(stack);
        }
        // Otherwise dropping it unmaps it.
    }

    fn map_new(&mut self) -> Result<DefaultStack, FiberError> {
        let stack =
            DefaultStack::new(self.stack_size).map_err(|source| FiberError::StackAlloc {
                size: self.stack_size,
                source,
            })?;
        self.created += 1;
        Ok(stack)
    }
}
