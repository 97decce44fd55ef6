//! The daemon's swap: devices from the config (or a private temporary file), slot
//! allocation, and a few I/O threads doing `pread`/`pwrite` on the `O_DIRECT` device.
//!
//! (A first version drove `usm_swap`'s io_uring `Engine` from one thread; under load a
//! completion was occasionally never reaped and a swap-in waited forever, so the blocking
//! pool is used until that is understood — see the report.)
//!
//! # Who waits how
//! A request carries an [`IoWait`]. An I/O thread runs it and fills the `IoWait`: a
//! workee (uThread) yields until then, so its worker runs other faults meanwhile; an OS
//! thread (a fault thread, the evictor) waits on the condvar.
//!
//! # Slots
//! One slot per evicted page. A slot's owner is a [`SwapCell`](super::space::SwapCell);
//! processes that share the page after `fork` share the cell (`Arc`), so the slot is freed
//! when the last sharer drops it — the reference count of the slot is the cell's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use usm_localmanager::Unparker;
use usm_swap::{DeviceId, PageBuf, SwapDevice, SwapEntry, SwapSpace};
use usm_sync::atomic::{AtomicU64, Ordering};
use usm_sync::{Arc, Condvar, Mutex};

use super::pool::ThreadPool;

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
            // Yield rather than park: with the current scheduler a parked uThread can
            // miss an unpark from a foreign thread (seen under load); a yield loop keeps
            // the worker serving other faults and cannot lose the completion.
            usm_localmanager::yield_now();
        }
    }
}

/// Swap devices, slots and the I/O threads.
pub(crate) struct SwapStore {
    space: Mutex<SwapSpace>,
    devices: Vec<Arc<SwapDevice>>,
    io: ThreadPool,
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

/// I/O threads: each request blocks only its own thread.
const IO_THREADS: usize = 4;

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
            super::leftovers::sweep_swap_files(temp_dir);
            let path = super::leftovers::swap_file_path(temp_dir);
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
        let io =
            ThreadPool::new_named(IO_THREADS, "usm-swap-io").map_err(|e| DaemonError::Setup {
                what: "start the swap I/O threads".into(),
                source: e,
            })?;
        Ok(Arc::new(SwapStore {
            space: Mutex::new(space),
            devices,
            io,
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

    fn device(&self, e: SwapEntry) -> Option<Arc<SwapDevice>> {
        self.devices.iter().find(|d| d.id() == e.device()).cloned()
    }

    /// Starts reading `entry`; wait on the returned [`IoWait`].
    pub(crate) fn read(&self, entry: SwapEntry) -> Arc<IoWait> {
        let w = IoWait::new();
        let Some(dev) = self.device(entry) else {
            w.complete(Err(format!("no swap device for {entry:?}")));
            return w;
        };
        let w2 = w.clone();
        self.io.submit(Box::new(move || {
            let mut buf = PageBuf::page();
            let r = if dev.is_bad(entry.slot()) {
                Err(format!("swap slot {entry:?} is bad"))
            } else {
                nix::sys::uio::pread(dev.fd(), &mut buf, dev.slot_offset(entry.slot()) as i64)
                    .map_err(|e| format!("swap read {entry:?}: {e}"))
                    .and_then(|n| {
                        if n == buf.len() {
                            Ok(())
                        } else {
                            Err(format!("short swap read ({n} bytes)"))
                        }
                    })
            };
            w2.complete(r.map(|()| buf));
        }));
        w
    }

    /// Starts writing `buf` to `entry`; wait on the returned [`IoWait`].
    pub(crate) fn write(&self, entry: SwapEntry, buf: PageBuf) -> Arc<IoWait> {
        let w = IoWait::new();
        let Some(dev) = self.device(entry) else {
            w.complete(Err(format!("no swap device for {entry:?}")));
            return w;
        };
        let w2 = w.clone();
        self.io.submit(Box::new(move || {
            let r = nix::sys::uio::pwrite(dev.fd(), &buf, dev.slot_offset(entry.slot()) as i64)
                .map_err(|e| format!("swap write {entry:?}: {e}"))
                .and_then(|n| {
                    if n == buf.len() {
                        Ok(())
                    } else {
                        Err(format!("short swap write ({n} bytes)"))
                    }
                });
            w2.complete(r.map(|()| buf));
        }));
        w
    }

    /// Stops the I/O threads (after the requests queued so far) and deletes a private
    /// swap file.
    pub(crate) fn shutdown(&self) {
        self.io.shutdown();
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
