//! The fiber itself and the thread's current-fiber pointers: the raw-pointer part of the
//! crate.
//!
//! # Thread state (one set per OS thread, `const`-initialised, no destructor)
//! - `yielder`: the corosensei `Yielder` of the fiber running on this thread, or null.
//!   Written by [`Fiber::resume`] before switching in and restored after it switches back;
//!   written once by the fiber body on first entry (the yielder lives at the base of the
//!   fiber's stack and does not move).
//! - `locals`: the running fiber's [`LocalMap`], or null.
//! - `on_fiber_stack`: true exactly while fiber code (not the scheduler, not the switch) runs
//!   on this thread: set when the fiber body starts and after each switch back in, cleared
//!   right before each switch out. A signal handler uses it ([`on_fiber_stack`]) to know
//!   that the interrupted code, and so the handler itself, is on the fiber's stack.
//!
//! The three live in one `const`-initialised thread-local struct of `Cell`s (no `Drop`), so
//! reaching it never runs lazy initialisation or registers a destructor: [`suspend_current`]
//! is async-signal-safe. Its address is obtained through the `#[inline(never)]`
//! `thread_state`, called again after every switch into a fiber, so no caller keeps a
//! thread-local address across a suspension (the fiber may resume on another thread). The
//! scheduler side ([`Fiber::resume`]) keeps the address across `resume`: the thread that calls
//! `resume` is the one it returns to.

use std::cell::Cell;
use std::ptr;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};

use crate::local::LocalMap;
use crate::{FiberError, StackPool, Suspend};

/// A caught panic payload, as `std::panic::catch_unwind` returns it.
pub type PanicPayload = Box<dyn std::any::Any + Send + 'static>;

type FiberYielder = Yielder<(), Suspend>;
type FiberCoroutine = Coroutine<(), Suspend, Result<(), PanicPayload>, DefaultStack>;

/// Per-thread fiber bookkeeping (see the module docs).
struct ThreadState {
    yielder: Cell<*const FiberYielder>,
    locals: Cell<*mut LocalMap>,
    on_fiber_stack: Cell<bool>,
}

thread_local! {
    static THREAD_STATE: ThreadState = const {
        ThreadState {
            yielder: Cell::new(ptr::null()),
            locals: Cell::new(ptr::null_mut()),
            on_fiber_stack: Cell::new(false),
        }
    };
}

/// This thread's fiber bookkeeping. Never inlined: every call computes the address for the
/// thread running *now*.
#[inline(never)]
fn thread_state() -> &'static ThreadState {
    let state = THREAD_STATE.with(|state| state as *const ThreadState);
    // SAFETY: the thread-local is const-initialised and has no destructor, so it is valid
    // for the whole life of this thread. Callers use the reference only on this thread and
    // never keep it across a switch into a fiber (they fetch it again after `suspend`), so it
    // never outlives the thread it belongs to.
    unsafe { &*state }
}

/// What [`Fiber::resume`] came back with.
#[derive(Debug)]
pub enum Outcome {
    /// The fiber suspended itself with this reason; resume it again later.
    Suspended(Suspend),
    /// The fiber's closure returned (`Ok`) or panicked (`Err(payload)`); its stack can be
    /// recycled.
    Finished(Result<(), PanicPayload>),
}

/// One uThread: a coroutine on a pooled stack plus its uThread-local storage.
///
/// Owned by whichever scheduler runs it; `Send` so a scheduler may migrate it between
/// workers while it is suspended with [`Suspend::Yield`] or [`Suspend::Park`] (see the crate
/// docs for the rules that makes sound).
pub struct Fiber {
    coroutine: Option<FiberCoroutine>,
    yielder: *const FiberYielder,
    locals: Box<LocalMap>,
    last_suspend: Option<Suspend>,
}

// SAFETY: the closure a fiber runs is `Send + 'static` (enforced by `Fiber::new`), and the
// crate documents that code inside a fiber must not keep thread-bound data (thread-local
// references, `!Send` values) across a suspension point. The raw `yielder` pointer points
// into the fiber's own stack, which moves with it. A fiber suspended inside a signal handler
// is never migrated by its scheduler (`Suspend::in_signal_handler`).
unsafe impl Send for Fiber {}

impl std::fmt::Debug for Fiber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fiber")
            .field("started", &!self.yielder.is_null())
            .field("finished", &self.is_finished())
            .field("last_suspend", &self.last_suspend)
            .finish()
    }
}

impl Fiber {
    /// Creates a fiber that will run `body` on a stack from `pool`. Nothing runs until the
    /// first [`Fiber::resume`]. A panic in `body` is caught and reported by `resume` as
    /// `Outcome::Finished(Err(payload))`.
    pub fn new<F>(pool: &mut StackPool, body: F) -> Result<Self, FiberError>
    where
        F: FnOnce() + Send + 'static,
    {
        let stack = pool.take()?;
        let coroutine = FiberCoroutine::with_stack(stack, move |yielder: &FiberYielder, ()| {
            let state = thread_state();
            state.yielder.set(yielder as *const FiberYielder);
            state.on_fiber_stack.set(true);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
        });
        Ok(Self {
            coroutine: Some(coroutine),
            yielder: ptr::null(),
            locals: Box::default(),
            last_suspend: None,
        })
    }

    /// Switches to the fiber until it suspends or finishes. Must not be called from inside
    /// another fiber's signal handler; calling it on a finished fiber returns
    /// `Finished(Ok(()))` without running anything.
    pub fn resume(&mut self) -> Outcome {
        let Some(coroutine) = self.coroutine.as_mut() else {
            return Outcome::Finished(Ok(()));
        };
        if coroutine.done() {
            return Outcome::Finished(Ok(()));
        }
        // The scheduler's thread: the same before and after `resume`.
        let state = thread_state();
        let saved_yielder = state.yielder.replace(self.yielder);
        let saved_locals = state.locals.replace(&mut *self.locals as *mut LocalMap);
        let result = coroutine.resume(());
        state.on_fiber_stack.set(false);
        if self.yielder.is_null() {
            // First entry: the body published its yielder.
            self.yielder = state.yielder.get();
        }
        state.yielder.set(saved_yielder);
        state.locals.set(saved_locals);
        match result {
            CoroutineResult::Yield(reason) => {
                self.last_suspend = Some(reason);
                Outcome::Suspended(reason)
            }
            CoroutineResult::Return(result) => {
                self.last_suspend = None;
                Outcome::Finished(result)
            }
        }
    }

    /// True once the closure returned or panicked.
    pub fn is_finished(&self) -> bool {
        self.coroutine.as_ref().is_none_or(|c| c.done())
    }

    /// The reason of the last suspension, `None` if never run or finished.
    pub fn last_suspend(&self) -> Option<Suspend> {
        self.last_suspend
    }

    /// Gives a finished fiber's stack back to `pool`. An unfinished fiber is dropped instead
    /// (see `Drop`).
    pub fn recycle(mut self, pool: &mut StackPool) {
        if self.is_finished()
            && let Some(coroutine) = self.coroutine.take()
        {
            pool.give_back(coroutine.into_stack());
        }
    }
}

impl Drop for Fiber {
    /// Dropping an unfinished fiber unwinds its stack (running destructors) — except when it
    /// is suspended inside a signal handler: unwinding through a signal frame is not
    /// possible, so the coroutine and its stack are leaked on purpose.
    fn drop(&mut self) {
        let Some(coroutine) = self.coroutine.take() else {
            return;
        };
        if coroutine.done() {
            return;
        }
        if self.last_suspend.is_some_and(Suspend::in_signal_handler) {
            tracing::error!("leaking a fiber suspended inside a signal handler");
            std::mem::forget(coroutine);
            return;
        }
        let state = thread_state();
        let saved_yielder = state.yielder.replace(self.yielder);
        let saved_locals = state.locals.replace(&mut *self.locals as *mut LocalMap);
        drop(coroutine);
        state.yielder.set(saved_yielder);
        state.locals.set(saved_locals);
    }
}

/// True when the code running on this thread right now is fiber code on a fiber's stack
/// (false in the scheduler and inside the switch itself). Async-signal-safe; meant for
/// signal handlers that want to switch out of the interrupted fiber.
pub fn on_fiber_stack() -> bool {
    thread_state().on_fiber_stack.get()
}

/// True when called from inside a fiber (on this thread, now).
pub fn in_fiber() -> bool {
    !thread_state().yielder.get().is_null()
}

/// Suspends the fiber running on this thread with `reason`, returning when its scheduler
/// resumes it. Returns `false` at once (nothing happens) when not inside a fiber.
///
/// # Async-signal safety
/// This may be called from a signal handler that runs on the fiber's own stack (installed
/// with `SA_NODEFER`, no alternate stack): it reads one `const`-initialised thread-local
/// pointer and performs corosensei's register switch — no allocation, no lock, no lazy
/// initialisation. After it returns, the caller is on whichever thread resumed the fiber;
/// for [`Suspend::Fault`] / [`Suspend::Preempted`] the scheduler guarantees that is the same
/// thread.
///
/// `#[inline]` on purpose: corosensei's switch balances call/return pairs per stack, and a
/// switch buried in a non-inlined helper costs a return misprediction on every switch
/// (several times the cost of the switch itself). The thread-local read stays behind the
/// `#[inline(never)]` accessor, so inlining cannot cache its address across the switch.
#[inline]
pub fn suspend_current(reason: Suspend) -> bool {
    let state = thread_state();
    let yielder = state.yielder.get();
    if yielder.is_null() {
        return false;
    }
    // SAFETY: a non-null `yielder` is only set while the fiber owning that yielder is
    // running on this thread (set by `Fiber::resume` / the fiber body, cleared when the fiber
    // switches back). The yielder lives at the base of the running fiber's stack, so it is
    // alive, and we are executing on that fiber's stack, which is what `suspend` requires.
    let yielder = unsafe { &*yielder };
    state.on_fiber_stack.set(false);
    yielder.suspend(reason);
    // Possibly another thread now: fetch its state again.
    thread_state().on_fiber_stack.set(true);
    true
}

/// Runs `f` on the current fiber's local map; `None` outside a fiber or when re-entered.
pub(crate) fn with_current_locals<R>(f: impl FnOnce(&mut LocalMap) -> R) -> Option<R> {
    // Take the pointer out while `f` runs so a nested call cannot alias the map.
    let locals = thread_state().locals.replace(ptr::null_mut());
    if locals.is_null() {
        return None;
    }
    struct Restore(*mut LocalMap);
    impl Drop for Restore {
        fn drop(&mut self) {
            // `f` does not suspend (documented on `with_local`): still the same thread.
            thread_state().locals.set(self.0);
        }
    }
    let restore = Restore(locals);
    // SAFETY: a non-null `locals` points at the running fiber's boxed map, set by
    // `Fiber::resume` for exactly the time the fiber runs on this thread; we removed it from
    // the thread-local, so this is the only reference until `restore` puts it back.
    let map = unsafe { &mut *restore.0 };
    Some(f(map))
}
