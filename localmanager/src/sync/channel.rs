//! A bounded multi-producer single-consumer channel.
//!
//! The queue is a `VecDeque` behind a shim mutex held for a push or a pop only. A full
//! channel parks senders, an empty one parks the receiver (see the waiting protocol in
//! [`crate::sync`]). Dropping the last sender wakes the receiver (it then drains what is
//! left and gets [`RecvError`]); dropping the receiver wakes all senders (they get their
//! value back in [`SendError`]).

use std::collections::VecDeque;

use usm_sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex};

use crate::sync::lock;
use crate::sync::waiter::{WaitList, Waiter};

struct Chan<T> {
    queue: Mutex<VecDeque<T>>,
    capacity: usize,
    receiver_waiters: WaitList,
    sender_waiters: WaitList,
    senders: AtomicUsize,
    receiver_alive: AtomicBool,
}

/// Creates a channel holding at most `capacity` (≥ 1) values.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let chan = Arc::new(Chan {
        queue: Mutex::new(VecDeque::with_capacity(capacity.max(1))),
        capacity: capacity.max(1),
        receiver_waiters: WaitList::new(),
        sender_waiters: WaitList::new(),
        senders: AtomicUsize::new(1),
        receiver_alive: AtomicBool::new(true),
    });
    (Sender { chan: chan.clone() }, Receiver { chan })
}

/// The receiver is gone; the value comes back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the receiver was dropped")]
pub struct SendError<T>(pub T);

/// Why `try_send` failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError<T> {
    /// The channel is full.
    #[error("the channel is full")]
    Full(T),
    /// The receiver is gone.
    #[error("the receiver was dropped")]
    Disconnected(T),
}

/// Every sender is gone and the channel is empty.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("every sender was dropped")]
pub struct RecvError;

/// Why `try_recv` failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// Nothing queued now.
    #[error("the channel is empty")]
    Empty,
    /// Empty and every sender is gone.
    #[error("every sender was dropped")]
    Disconnected,
}

/// The sending half; clone it for more producers.
pub struct Sender<T> {
    chan: Arc<Chan<T>>,
}

/// The receiving half.
pub struct Receiver<T> {
    chan: Arc<Chan<T>>,
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.chan.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            chan: self.chan.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.chan.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.chan.receiver_waiters.wake_all();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.chan.receiver_alive.store(false, Ordering::SeqCst);
        self.chan.sender_waiters.wake_all();
    }
}

impl<T> Sender<T> {
    /// Queues `value` unless the channel is full or the receiver is gone.
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        crate::preempt_point();
        if !self.chan.receiver_alive.load(Ordering::SeqCst) {
            return Err(TrySendError::Disconnected(value));
        }
        {
            let mut queue = lock(&self.chan.queue);
            if queue.len() >= self.chan.capacity {
                return Err(TrySendError::Full(value));
            }
            queue.push_back(value);
        }
        self.chan.receiver_waiters.wake_one();
        Ok(())
    }

    /// Queues `value`, parking while the channel is full.
    pub fn send(&self, mut value: T) -> Result<(), SendError<T>> {
        loop {
            match self.try_send(value) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(v)) => return Err(SendError(v)),
                Err(TrySendError::Full(v)) => value = v,
            }
            let waiter = Waiter::current();
            let id = self.chan.sender_waiters.register(waiter.clone());
            let can_go = lock(&self.chan.queue).len() < self.chan.capacity
                || !self.chan.receiver_alive.load(Ordering::SeqCst);
            if can_go {
                if !self.chan.sender_waiters.remove(id) {
                    self.chan.sender_waiters.wake_one();
                }
                continue;
            }
            waiter.wait();
            self.chan.sender_waiters.remove(id);
        }
    }
}

impl<T> Receiver<T> {
    /// Takes the oldest value if there is one.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        crate::preempt_point();
        let popped = lock(&self.chan.queue).pop_front();
        match popped {
            Some(value) => {
                self.chan.sender_waiters.wake_one();
                Ok(value)
            }
            None if self.chan.senders.load(Ordering::SeqCst) == 0 => {
                // A last send may have raced with the last sender's drop: look once more.
                match lock(&self.chan.queue).pop_front() {
                    Some(value) => Ok(value),
                    None => Err(TryRecvError::Disconnected),
                }
            }
            None => Err(TryRecvError::Empty),
        }
    }

    /// Takes the oldest value, parking while the channel is empty.
    pub fn recv(&self) -> Result<T, RecvError> {
        loop {
            match self.try_recv() {
                Ok(value) => return Ok(value),
                Err(TryRecvError::Disconnected) => return Err(RecvError),
                Err(TryRecvError::Empty) => {}
            }
            let waiter = Waiter::current();
            let id = self.chan.receiver_waiters.register(waiter.clone());
            let can_go =
                !lock(&self.chan.queue).is_empty() || self.chan.senders.load(Ordering::SeqCst) == 0;
            if can_go {
                self.chan.receiver_waiters.remove(id);
                continue;
            }
            waiter.wait();
            self.chan.receiver_waiters.remove(id);
        }
    }

    /// Number of values queued now.
    pub fn len(&self) -> usize {
        lock(&self.chan.queue).len()
    }

    /// True when nothing is queued now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
