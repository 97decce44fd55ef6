//! The daemon's swap: devices from the config (or a private temporary file), slot
//! allocation, and one I/O thread that owns the io_uring [`Engine`].
//!
//! # Who waits how
//! A request carries an [`IoWait`]. The I/O thread queues it on the engine, submits, and
//! reaps completions; each completion fills its `IoWait` and wakes the waiter: a workee
//! (uThread) parked with [`usm_localmanager::park`] is unparked, so its worker runs other
//! faults meanwhile; an OS thread (the evictor) waits on the condvar.
//!
//! # Slots
//! One slot per evicted page. A slot's owner is a [`SwapCell`](super::space::SwapCell);
//! processes that share the page after `fork` share the cell (`Arc`), so the slot is freed
//! when the last sharer drops it — the reference count of the slot is the cell's.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use usm_sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use usm_sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use usm_localmanager::Unparker;
use usm_swap::{DeviceId, Engine, EngineConfig, IoBuf, PageBuf, SwapDevice, SwapEntry, SwapSpace};

use super::DaemonError;
use crate::config::SwapSpec;

/// The outcome of one swap I/O: the page (read: its content; write: the page written).
pub(crate) type IoResult = Result<PageBuf, String>;

/// A rendezvous for one I/O request.
#[derive(Default)]
pub(crate) struct IoWait {
    result: Mutex<Option<IoResult>>,
    cv: Condvar,
    unparker: Mutex<Option<Unparker>>,
}

impl IoWait {
    /// A wait for the calling uThread (unparked on completion) or OS thread (condvar).
    pub(crate) fn new() -> Arc<IoWait> {
        let w = IoWait::default();
        if let Ok(mut u) = w.unparker.lock() {
            *u = usm_localmanager::current();
        }
        Arc::new(w)
    }

    fn complete(&self, r: IoResult) {
        if let Ok(mut slot) = self.result.lock() {
            *slot = Some(r);
        }
        self.cv.notify_all();
        if let Ok(u) = self.unparker.lock() {
            if let Some(u) = u.as_ref() {
                u.unpark();
            }
        }
    }

    /// Waits for the completion: parks a uThread (the worker keeps running others),
    /// blocks an OS thread.
    pub(crate) fn wait(&self) -> IoResult {
        loop {
            if let Ok(mut slot) = self.result.lock() {
                if let Some(r) = slot.take() {
                    return r;
                }
                if !usm_localmanager::in_uthread() {
                    let Ok((mut slot, _)) = self.cv.wait_timeout(slot, Duration::from_millis(50))
                    else {
                        return Err("swap I/O wait poisoned".into());
                    };
                    if let Some(r) = slot.take() {
                        return r;
                    }
                    continue;
                }
            } else {
                return Err("swap I/O wait poisoned".into());
            }
            usm_localmanager::park();
        }
    }
}

enum IoReq {
    Read(SwapEntry, Arc<IoWait>),
    Write(SwapEntry, PageBuf, Arc<IoWait>),
}

/// Swap devices, slots and the I/O thread.
pub(crate) struct SwapStore {
    space: Mutex<SwapSpace>,
    tx: Mutex<Option<mpsc::Sender<IoReq>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    used: AtomicU64,
    total: u64,
    /// A private swap file to delete at drop (`usm exec` without a swap device).
    temp: Option<PathBuf>,
}

impl std::fmt::Debug for SwapStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapStore")
            .field("used", &self.used.load(Ordering::Relaxed))
            .field("total", &self.total)
            .finish()
    }
}

impl SwapStore {
    /// Opens the configured devices; with none, creates a private swap file of
    /// `temp_bytes` under `temp_dir` (deleted when the store drops).
    pub(crate) fn open(
        specs: &[SwapSpec],
        temp_dir: &Path,
        temp_bytes: u64,
    ) -> Result<Arc<SwapStore>, DaemonError> {
        let mut space = SwapSpace::new();
        let mut temp = None;
        if specs.is_empty() {
            std::fs::create_dir_all(temp_dir).map_err(|e| DaemonError::Setup {
                what: format!("create {}", temp_dir.display()),
                source: e,
            })?;
            let path = temp_dir.join(format!("usm-swap-{}.img", std::process::id()));
            let _ = std::fs::remove_file(&path);
            usm_swap::create_swap_file(&path, temp_bytes.max(16 << 20))?;
            let dev = SwapDevice::open(DeviceId(0), &path).inspect_err(|_| {
                let _ = std::fs::remove_file(&path);
            })?;
            space.add(Arc::new(dev), 0)?;
            temp = Some(path);
        } else {
            for (i, spec) in specs.iter().enumerate() {
                let id = u8::try_from(i).map_err(|_| DaemonError::Config {
                    line: spec.line,
                    why: "too many swap devices".into(),
                })?;
                let dev = SwapDevice::open(DeviceId(id), &spec.path)?;
                space.add(Arc::new(dev), spec.priority)?;
            }
        }
        let total = space.total_slots();
        let devices = space.devices();
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("usm-swap-io".into())
            .spawn(move || {
                let engine = match Engine::new(&EngineConfig::default(), &devices) {
                    Ok(e) => {
                        let _ = ready_tx.send(Ok(()));
                        e
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                io_loop(engine, rx);
            })
            .map_err(|e| DaemonError::Setup {
                what: "spawn the swap I/O thread".into(),
                source: e,
            })?;
        let cleanup = |path: &Option<PathBuf>| {
            if let Some(p) = path {
                let _ = std::fs::remove_file(p);
            }
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                cleanup(&temp);
                return Err(e.into());
            }
            Err(_) => {
                cleanup(&temp);
                return Err(DaemonError::Setup {
                    what: "start the swap I/O thread".into(),
                    source: std::io::Error::other("thread ended"),
                });
            }
        }
        Ok(Arc::new(SwapStore {
            space: Mutex::new(space),
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            used: AtomicU64::new(0),
            total,
            temp,
        }))
    }

    /// Allocates one slot (`None`: swap full).
    pub(crate) fn alloc(&self) -> Option<SwapEntry> {
        let e = self.space.lock().ok()?.alloc().ok()?;
        self.used.fetch_add(1, Ordering::Relaxed);
        Some(e)
    }

    /// Frees a slot.
    pub(crate) fn free(&self, e: SwapEntry) {
        if let Ok(mut s) = self.space.lock() {
            if s.free(e).is_ok() {
                self.used.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Slots in use.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// All slots.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    fn send(&self, req: IoReq) -> bool {
        let Ok(tx) = self.tx.lock() else {
            return false;
        };
        tx.as_ref().is_some_and(|tx| tx.send(req).is_ok())
    }

    /// Starts reading `entry`; wait on the returned [`IoWait`].
    pub(crate) fn read(&self, entry: SwapEntry) -> Arc<IoWait> {
        let w = IoWait::new();
        if !self.send(IoReq::Read(entry, w.clone())) {
            w.complete(Err("the swap I/O thread has stopped".into()));
        }
        w
    }

    /// Starts writing `buf` to `entry`; wait on the returned [`IoWait`].
    pub(crate) fn write(&self, entry: SwapEntry, buf: PageBuf) -> Arc<IoWait> {
        let w = IoWait::new();
        if !self.send(IoReq::Write(entry, buf, w.clone())) {
            w.complete(Err("the swap I/O thread has stopped".into()));
        }
        w
    }

    /// Stops the I/O thread (after the requests queued so far) and deletes a private file.
    pub(crate) fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        if let Some(p) = &self.temp {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for SwapStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn io_loop(mut engine: Engine, rx: mpsc::Receiver<IoReq>) {
    let mut waiting: HashMap<u64, Arc<IoWait>> = HashMap::new();
    // Requests beyond the ring's depth wait here, in order: a full ring is back-pressure,
    // never a failure (a failed read would poison a page).
    let mut backlog: VecDeque<IoReq> = VecDeque::new();
    let mut open = true;
    loop {
        let busy = engine.in_flight() > 0 || !backlog.is_empty();
        let timeout = if busy {
            Duration::from_micros(30)
        } else {
            Duration::from_millis(200)
        };
        if open {
            match rx.recv_timeout(timeout) {
                Ok(r) => backlog.push_back(r),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
            backlog.extend(rx.try_iter());
        }
        if !open && engine.in_flight() == 0 && backlog.is_empty() {
            return;
        }
        while engine.has_capacity() {
            let Some(req) = backlog.pop_front() else { break };
            let full = |e: &usm_swap::SwapError| matches!(e, usm_swap::SwapError::QueueFull { .. });
            match req {
                IoReq::Read(e, w) => match engine.read(e, PageBuf::page()) {
                    Ok(t) => {
                        waiting.insert(t.0, w);
                    }
                    Err(rej) if full(&rej.error) => {
                        backlog.push_front(IoReq::Read(e, w));
                        break;
                    }
                    Err(rej) => w.complete(Err(rej.error.to_string())),
                },
                IoReq::Write(e, b, w) => match engine.write(e, b) {
                    Ok(t) => {
                        waiting.insert(t.0, w);
                    }
                    Err(rej) if full(&rej.error) => {
                        backlog.push_front(IoReq::Write(e, rej.buf, w));
                        break;
                    }
                    Err(rej) => w.complete(Err(rej.error.to_string())),
                },
            }
        }
        if let Err(e) = engine.submit() {
            tracing::warn!("swap submit failed: {e}");
        }
        if engine.in_flight() > 0 {
            if !open {
                let _ = engine.wait(1);
            } else {
                let _ = engine.enter_for_completions();
            }
            engine.reap(|c| {
                let Some(w) = waiting.remove(&c.ticket.0) else {
                    return;
                };
                let buf = match c.buf {
                    Some(IoBuf::Owned(b)) => Some(b),
                    _ => None,
                };
                match (c.result, buf) {
                    (Ok(_), Some(b)) => w.complete(Ok(b)),
                    (Ok(_), None) => w.complete(Err("completion without its buffer".into())),
                    (Err(e), _) => w.complete(Err(e.to_string())),
                }
            });
        }
    }
}
