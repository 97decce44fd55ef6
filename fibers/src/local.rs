//! uThread-local storage.
//!
//! Each [`crate::Fiber`] carries a small type-indexed map. [`with_local`] reaches the map of
//! the fiber running on this thread *now* (looked up on every call through the thread's
//! current-fiber pointer, never cached), so a value follows its uThread when the uThread
//! migrates to another worker — unlike a `thread_local!`.

use std::any::{Any, TypeId};
use std::collections::HashMap;

/// The per-fiber map: one value per type.
#[derive(Default)]
pub struct LocalMap {
    values: HashMap<TypeId, Box<dyn Any + Send>>,
}

impl std::fmt::Debug for LocalMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMap")
            .field("entries", &self.values.len())
            .finish()
    }
}

impl LocalMap {
    pub(crate) fn get_or_default<T: Default + Send + 'static>(&mut self) -> &mut T {
        let entry = self
            .values
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()));
        match entry.downcast_mut::<T>() {
            Some(value) => value,
            // The map is keyed by the TypeId of the boxed value, so this cannot happen.
            None => unreachable!("uThread-local map holds a value under a foreign TypeId"),
        }
    }
}

/// Runs `f` on the current uThread's value of type `T` (created with `T::default()` on first
/// use). Returns `None` when called outside a fiber.
///
/// `f` must not suspend the fiber (it holds a borrow of the map).
pub fn with_local<T: Default + Send + 'static, R>(f: impl FnOnce(&mut T) -> R) -> Option<R> {
    crate::sys::with_current_locals(|map| f(map.get_or_default::<T>()))
}
