//! The `Driver` hook: polled every round and before parking, and its fds wake a parked
//! worker.

#![deny(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;
use usm_sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use usm_sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};
use usm_localmanager::{Builder, Driver, DriverContext, Unparker};

/// A driver that completes "I/O" signalled on an eventfd by unparking the waiting uThread.
struct EventDriver {
    fd: Arc<EventFd>,
    waiting: Arc<Mutex<Option<Unparker>>>,
    polls: Arc<AtomicUsize>,
    completions: Arc<AtomicUsize>,
}

impl Driver for EventDriver {
    fn poll(&mut self, cx: &mut DriverContext<'_>) -> usize {
        assert_eq!(cx.worker(), 0);
        self.polls.fetch_add(1, Ordering::Relaxed);
        match self.fd.read() {
            Ok(_) => {
                if let Some(unparker) = self.waiting.lock().unwrap().take() {
                    unparker.unpark();
                }
                self.completions.fetch_add(1, Ordering::Relaxed);
                1
            }
            Err(nix::errno::Errno::EAGAIN) => 0,
            Err(e) => panic!("eventfd read: {e}"),
        }
    }

    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.fd.as_fd()]
    }
}

#[test]
fn a_driver_fd_wakes_the_parked_worker_and_poll_resumes_the_uthread() {
    let fd = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap());
    let waiting = Arc::new(Mutex::new(None));
    let polls = Arc::new(AtomicUsize::new(0));
    let completions = Arc::new(AtomicUsize::new(0));
    let factory = {
        let (fd, waiting, polls, completions) = (
            fd.clone(),
            waiting.clone(),
            polls.clone(),
            completions.clone(),
        );
        Arc::new(move |worker: usize| -> Box<dyn Driver> {
            assert_eq!(worker, 0);
            Box::new(EventDriver {
                fd: fd.clone(),
                waiting: waiting.clone(),
                polls: polls.clone(),
                completions: completions.clone(),
            })
        })
    };
    let rt = Builder::new().workers(1).driver(factory).build().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (w, d) = (waiting.clone(), done.clone());
    let io_waiter = rt
        .spawn(move || {
            *w.lock().unwrap() = Some(usm_localmanager::current().unwrap());
            while !d.load(Ordering::SeqCst) {
                usm_localmanager::park();
            }
        })
        .unwrap();
    // Let the worker go idle and block (no timers, no driver timeout: only an fd wakes it).
    while waiting.lock().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    let parks_before = rt.counters()[0].worker_parks;
    assert!(parks_before >= 1, "the worker parked");
    let polls_before = polls.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        polls.load(Ordering::Relaxed),
        polls_before,
        "a parked worker does not spin on its driver"
    );
    done.store(true, Ordering::SeqCst);
    fd.write(1).unwrap(); // the "completion"
    io_waiter.join().unwrap();
    assert_eq!(completions.load(Ordering::Relaxed), 1);
    assert!(polls.load(Ordering::Relaxed) > polls_before);
}
