//! Fiber behaviour on real stacks: suspend/resume, panics, locals, pooling, migration.

#![deny(unsafe_code)]

use usm_sync::Arc;
use usm_sync::atomic::{AtomicUsize, Ordering};

use usm_fibers::{Fiber, FiberError, MIN_STACK_SIZE, Outcome, StackPool, Suspend};

#[test]
fn suspends_and_resumes_with_reasons() {
    let mut pool = StackPool::new(64 * 1024, 4).unwrap();
    let steps = Arc::new(AtomicUsize::new(0));
    let s = steps.clone();
    let mut fiber = Fiber::new(&mut pool, move || {
        assert!(usm_fibers::in_fiber());
        s.fetch_add(1, Ordering::SeqCst);
        assert!(usm_fibers::suspend_current(Suspend::Yield));
        s.fetch_add(1, Ordering::SeqCst);
        assert!(usm_fibers::suspend_current(Suspend::Park));
        s.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    assert!(!usm_fibers::in_fiber());
    assert!(!usm_fibers::suspend_current(Suspend::Yield));
    assert!(matches!(fiber.resume(), Outcome::Suspended(Suspend::Yield)));
    assert_eq!(steps.load(Ordering::SeqCst), 1);
    assert!(matches!(fiber.resume(), Outcome::Suspended(Suspend::Park)));
    assert_eq!(fiber.last_suspend(), Some(Suspend::Park));
    assert!(matches!(fiber.resume(), Outcome::Finished(Ok(()))));
    assert_eq!(steps.load(Ordering::SeqCst), 3);
    assert!(fiber.is_finished());
    fiber.recycle(&mut pool);
    assert_eq!(pool.cached(), 1);
}

#[test]
fn panic_is_caught_and_reported() {
    // The panic machinery (message formatting, backtrace check) needs more than the
    // 16 KiB minimum in debug builds.
    let mut pool = StackPool::new(128 * 1024, 4).unwrap();
    let mut fiber = Fiber::new(&mut pool, || panic!("boom in a fiber")).unwrap();
    match fiber.resume() {
        Outcome::Finished(Err(payload)) => {
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom in a fiber"));
        }
        other => panic!("expected a caught panic, got {other:?}"),
    }
}

#[test]
fn stacks_are_reused_not_remapped() {
    let mut pool = StackPool::new(128 * 1024, 8).unwrap();
    for _ in 0..100 {
        let mut fiber = Fiber::new(&mut pool, || {}).unwrap();
        assert!(matches!(fiber.resume(), Outcome::Finished(Ok(()))));
        fiber.recycle(&mut pool);
    }
    assert_eq!(pool.created(), 1, "one stack mapped, reused 100 times");
}

#[test]
fn too_small_stack_is_rejected() {
    let err = StackPool::new(MIN_STACK_SIZE - 4096, 1).unwrap_err();
    assert!(StackPool::new(MIN_STACK_SIZE, 1).is_ok());
    assert!(matches!(err, FiberError::StackTooSmall { .. }));
    assert!(!err.is_retryable());
}

#[test]
fn guard_page_below_stack_is_inaccessible() {
    // The usable stack plus a PROT_NONE page: a deep recursion would fault, not corrupt.
    // Check through /proc/self/maps that a ---p mapping sits right below a pooled stack.
    let mut pool = StackPool::new(64 * 1024, 1).unwrap();
    let addr = Arc::new(AtomicUsize::new(0));
    let a = addr.clone();
    let mut fiber = Fiber::new(&mut pool, move || {
        let local = 0u8;
        a.store(&local as *const u8 as usize, Ordering::SeqCst);
    })
    .unwrap();
    fiber.resume();
    let sp = addr.load(Ordering::SeqCst);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut found = false;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let range = parts.next().unwrap();
        let perms = parts.next().unwrap();
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).unwrap(),
            usize::from_str_radix(hi, 16).unwrap(),
        );
        if (lo..hi).contains(&sp) {
            assert!(perms.starts_with("rw"), "stack mapping is {perms}");
            let below = maps
                .lines()
                .any(|l| l.starts_with(&format!("{:x}-{lo:x} ", lo - 4096)) && l.contains("---p"));
            assert!(below, "no guard page directly below the stack at {lo:x}");
            found = true;
        }
    }
    assert!(found, "stack pointer {sp:x} not in any mapping");
}

#[test]
fn locals_follow_the_fiber_across_threads() {
    let mut pool = StackPool::new(64 * 1024, 1).unwrap();
    let mut fiber = Fiber::new(&mut pool, || {
        usm_fibers::with_local::<u64, _>(|v| *v = 41).unwrap();
        usm_fibers::suspend_current(Suspend::Yield);
        // Now on another OS thread: the value is still there.
        let v = usm_fibers::with_local::<u64, _>(|v| {
            *v += 1;
            *v
        })
        .unwrap();
        assert_eq!(v, 42);
        // A nested access is refused instead of aliasing.
        usm_fibers::with_local::<u64, _>(|_| {
            assert!(usm_fibers::with_local::<u32, _>(|_| ()).is_none());
        });
    })
    .unwrap();
    assert!(usm_fibers::with_local::<u64, _>(|_| ()).is_none());
    assert!(matches!(fiber.resume(), Outcome::Suspended(Suspend::Yield)));
    let handle = std::thread::spawn(move || {
        assert!(matches!(fiber.resume(), Outcome::Finished(Ok(()))));
    });
    handle.join().unwrap();
}

#[test]
fn dropping_a_suspended_fiber_runs_destructors() {
    struct Flag(Arc<AtomicUsize>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut pool = StackPool::new(64 * 1024, 1).unwrap();
    let d = dropped.clone();
    let mut fiber = Fiber::new(&mut pool, move || {
        let _flag = Flag(d);
        usm_fibers::suspend_current(Suspend::Park);
        unreachable!("never resumed");
    })
    .unwrap();
    assert!(matches!(fiber.resume(), Outcome::Suspended(Suspend::Park)));
    drop(fiber);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
}
