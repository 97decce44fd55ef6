//! Loom model of the frame arenas: two workers' lArenas refill from and spill to one
//! sArena concurrently. Runs the real `usm_kmod::pool::arena` code (built on `usm_sync`,
//! which is loom under `--cfg loom`; the batch is 2 there).
//!
//! Checked in every interleaving: no frame is handed to two owners at once, none is lost
//! or duplicated (at the end the sArena holds every frame exactly once).
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p usm-loom-tests --release --test arena`

#![deny(unsafe_code)]
#![cfg(loom)]

use usm_kmod::FrameNo;
use usm_kmod::pool::arena::{ARENA_BATCH, LocalArena, SharedArena};
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, Ordering};

/// One flag per frame: set while some worker holds it outside every arena.
struct Owned(Vec<AtomicBool>);

impl Owned {
    fn new(n: usize) -> Owned {
        Owned((0..n).map(|_| AtomicBool::new(false)).collect())
    }
    fn take(&self, f: FrameNo) {
        assert!(
            !self.0[f.index()].swap(true, Ordering::SeqCst),
            "{f} handed out twice"
        );
    }
    fn give(&self, f: FrameNo) {
        assert!(
            self.0[f.index()].swap(false, Ordering::SeqCst),
            "{f} given back but not held"
        );
    }
}

fn assert_all_home(shared: &SharedArena, n: usize) {
    let mut frames = shared.snapshot();
    frames.sort_unstable();
    assert_eq!(
        frames,
        (0..n as u32).map(FrameNo).collect::<Vec<_>>(),
        "frames lost or duplicated"
    );
    assert_eq!(shared.len(), n);
}

#[test]
fn refill_and_spill_from_two_workers_conserve_frames() {
    assert_eq!(ARENA_BATCH, 2, "the model assumes the loom batch size");
    loom::model(|| {
        // 2 batches + 1: the workers compete for the last refill.
        let n = 2 * ARENA_BATCH + 1;
        let shared = Arc::new(SharedArena::with_frames((0..n as u32).map(FrameNo)));
        let owned = Arc::new(Owned::new(n));
        let worker = |shared: Arc<SharedArena>, owned: Arc<Owned>| {
            move || {
                let mut local = LocalArena::new(shared);
                // Three takes: a refill, a pop, a second refill (which may find the
                // sArena empty: the other worker took the rest).
                let mut held = Vec::new();
                for _ in 0..3 {
                    if let Some(f) = local.pop() {
                        owned.take(f);
                        held.push(f);
                    }
                }
                // Giving them back takes the lArena to 2 * batch: a spill.
                for f in held {
                    owned.give(f);
                    local.push(f);
                }
                assert!(local.len() < 2 * local.batch());
                // Dropping the lArena drains it to the sArena.
            }
        };
        let a = usm_sync::thread::spawn(worker(Arc::clone(&shared), Arc::clone(&owned)));
        let b = usm_sync::thread::spawn(worker(Arc::clone(&shared), Arc::clone(&owned)));
        a.join().unwrap();
        b.join().unwrap();
        assert_all_home(&shared, n);
    });
}

#[test]
fn racing_refills_split_one_batch_without_loss() {
    loom::model(|| {
        let n = ARENA_BATCH + 1;
        let shared = Arc::new(SharedArena::with_frames((0..n as u32).map(FrameNo)));
        let spawn = |shared: Arc<SharedArena>| {
            usm_sync::thread::spawn(move || {
                let mut local = LocalArena::new(shared);
                let got = local.refill();
                assert_eq!(got, local.len());
                // Handed back undropped, so the frames stay out while the other refills.
                local
            })
        };
        let a = spawn(Arc::clone(&shared));
        let b = spawn(Arc::clone(&shared));
        let (la, lb) = (a.join().unwrap(), b.join().unwrap());
        assert_eq!(
            la.len() + lb.len() + shared.len(),
            n,
            "no frame lost or duplicated"
        );
        assert!(la.len() <= ARENA_BATCH && lb.len() <= ARENA_BATCH);
        assert!(
            la.len() + lb.len() >= ARENA_BATCH,
            "the first refill got a full batch"
        );
        drop((la, lb));
        assert_all_home(&shared, n);
    });
}

/// The pool's own protocol on top of the arenas: two workers take a frame through their
/// lArena (Free → Taken), release it to the zeroing queue (→ Zeroing) while the other
/// serves the queue (`zero_some`: → Free, back to the sArena). No frame is lost, none is
/// taken twice, and the census adds up at the end. (The pool has no userfaultfd here, so
/// cleaning a slot is a plain write.)
#[test]
fn take_release_and_zeroing_from_two_workers_conserve_frames() {
    use usm_kmod::pool::{FramePool, FrameState, LockMode, PoolConfig};
    loom::model(|| {
        let pool = FramePool::new(
            PoolConfig {
                frames: 3,
                lock: LockMode::Unlocked,
            },
            None,
        )
        .unwrap();
        let spawn = |pool: Arc<FramePool>| {
            let mut local = pool.local_arena();
            usm_sync::thread::spawn(move || {
                let f = pool
                    .take(&mut local)
                    .unwrap()
                    .expect("3 frames for 2 workers");
                assert_eq!(pool.desc(f).unwrap().state(), FrameState::Taken);
                pool.release(f).unwrap();
                pool.zero_some(1).unwrap();
            })
        };
        let a = spawn(Arc::clone(&pool));
        let b = spawn(Arc::clone(&pool));
        a.join().unwrap();
        b.join().unwrap();
        while pool.zero_some(8).unwrap() > 0 {}
        let c = pool.check_conservation().unwrap();
        assert_eq!(c.free, 3, "{c}");
        assert_eq!(c.free_local + c.free_shared, 3, "{c}");
    });
}
