//! Waiters and wait lists shared by the primitives.

use std::collections::VecDeque;

use usm_sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex};

use crate::sync::lock;
use crate::task::Task;

/// Someone blocked on a primitive.
#[derive(Clone)]
pub(crate) enum Waiter {
    /// A uThread: woken by unparking it.
    UThread(Arc<Task>),
    /// An OS thread outside any uThread: woken with `Thread::unpark`.
    Thread(std::thread::Thread),
}

impl Waiter {
    /// The caller as a waiter.
    pub(crate) fn current() -> Waiter {
        match crate::sys::current::current_task_arc() {
            Some(task) => Waiter::UThread(task),
            None => Waiter::Thread(std::thread::current()),
        }
    }

    /// Wakes it (any thread).
    pub(crate) fn wake(&self) {
        match self {
            Waiter::UThread(task) => task.unpark(),
            Waiter::Thread(thread) => thread.unpark(),
        }
    }

    /// Blocks the caller, which must be the thread or uThread this waiter describes.
    pub(crate) fn wait(&self) {
        match self {
            Waiter::UThread(_) => {
                crate::park();
            }
            Waiter::Thread(_) => std::thread::park(),
        }
    }
}

/// A FIFO of registered waiters, each with an id so it can deregister.
pub(crate) struct WaitList {
    waiters: Mutex<VecDeque<(u64, Waiter)>>,
    /// Number of registered waiters, readable without the lock (SeqCst, see `wake_one`).
    len: AtomicUsize,
    next_id: AtomicU64,
}

impl WaitList {
    pub(crate) fn new() -> Self {
        Self {
            waiters: Mutex::new(VecDeque::new()),
            len: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
        }
    }

    pub(crate) fn register(&self, waiter: Waiter) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut waiters = lock(&self.waiters);
        waiters.push_back((id, waiter));
        self.len.store(waiters.len(), Ordering::SeqCst);
        id
    }

    /// Removes `id` if still registered; `false` if a waker already popped it.
    pub(crate) fn remove(&self, id: u64) -> bool {
        let mut waiters = lock(&self.waiters);
        match waiters.iter().position(|(w, _)| *w == id) {
            Some(pos) => {
                waiters.remove(pos);
                self.len.store(waiters.len(), Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Pops and wakes the oldest waiter; `false` if there was none.
    ///
    /// Lock-free when nobody is registered. Callers change their condition with a SeqCst
    /// write before calling this, and waiters register (SeqCst `len` store) before
    /// re-checking the condition with a SeqCst read, so either the waker sees `len > 0` or
    /// the waiter sees the new condition.
    pub(crate) fn wake_one(&self) -> bool {
        if self.len.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let popped = {
            let mut waiters = lock(&self.waiters);
            let popped = waiters.pop_front();
            self.len.store(waiters.len(), Ordering::SeqCst);
            popped
        };
        match popped {
            Some((_, waiter)) => {
                waiter.wake();
                true
            }
            None => false,
        }
    }

    /// Wakes everyone registered now.
    pub(crate) fn wake_all(&self) {
        if self.len.load(Ordering::SeqCst) == 0 {
            return;
        }
        let all = {
            let mut waiters = lock(&self.waiters);
            self.len.store(0, Ordering::SeqCst);
            std::mem::take(&mut *waiters)
        };
        for (_, waiter) in all {
            waiter.wake();
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len.load(Ordering::SeqCst) == 0
    }
}
