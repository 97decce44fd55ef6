//! Embedded runtime on the real kernel: fast-path faults, plain-thread faults, swap
//! round trips, region drop accounting.

use std::time::Duration;

use usm_runtime::embedded::{Region, RegionVec, Runtime};

const PAGE: usize = 4096;

fn swap_dir() -> tempfile::TempDir {
    // /var/tmp is on the ext4 disk here (O_DIRECT works; tmpfs would refuse it).
    tempfile::Builder::new()
        .prefix("usm-embedded-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn runtime(frames: usize, swap_mib: u64, dir: &tempfile::TempDir) -> Runtime {
    let mut b = Runtime::builder().workers(2).pool_frames(frames);
    if swap_mib > 0 {
        b = b.create_swap_file(dir.path().join("swap0"), swap_mib << 20);
    }
    b.build().unwrap()
}

#[test]
fn first_touch_in_a_uthread_maps_zeroed_frames() {
    let dir = swap_dir();
    let rt = runtime(256, 0, &dir);
    let mut region = rt.region(64 * PAGE).unwrap();
    let (region, sum) = rt
        .block_on(move || {
            let words = region.as_mut_slice::<u64>();
            let zero = words.iter().step_by(512).all(|&w| w == 0);
            for (i, w) in words.iter_mut().enumerate() {
                *w = i as u64;
            }
            let sum: u64 = words.iter().sum();
            assert!(zero, "fresh pages read as zero");
            (region, sum)
        })
        .unwrap();
    let n = (64 * PAGE / 8) as u64;
    assert_eq!(sum, n * (n - 1) / 2);
    let stats = rt.stats();
    assert!(stats.mm.pages_mapped >= 64, "{stats:?}");
    assert!(stats.mm.fast_map.count >= 1);
    let sched_faults: u64 = stats.sched.iter().map(|c| c.faults).sum();
    assert!(sched_faults >= 1, "faults went through PFQ");
    let rel = region.release().unwrap();
    assert_eq!(rel.frames, 64);
    assert!(rt.quiesce(Duration::from_secs(5)));
    let census = rt.check_conservation().unwrap();
    assert_eq!(census.mapped, 0);
    assert_eq!(census.taken, 0);
}

#[test]
fn faults_from_a_plain_thread_wait_on_a_futex() {
    let dir = swap_dir();
    let rt = runtime(256, 0, &dir);
    let mut region = rt.region(16 * PAGE).unwrap();
    let region = std::thread::spawn(move || {
        let bytes = region.as_mut_slice::<u8>();
        for p in 0..16 {
            bytes[p * PAGE + 7] = p as u8 + 1;
        }
        for p in 0..16 {
            assert_eq!(bytes[p * PAGE + 7], p as u8 + 1);
        }
        region
    })
    .join()
    .unwrap();
    // And from the test thread itself.
    assert_eq!(region.as_slice::<u8>()[5 * PAGE + 7], 6);
    let stats = rt.stats();
    assert!(stats.mm.sync_wait.count >= 16, "{:?}", stats.mm.sync_wait);
}

#[test]
fn pages_survive_eviction_and_swap_in_and_drop_returns_everything() {
    let dir = swap_dir();
    let rt = runtime(256, 64, &dir);
    let frames = rt.pool_frames();
    let pages = 4 * frames;
    let mut region = rt.region(pages * PAGE).unwrap();
    let region = rt
        .block_on(move || {
            let words = region.as_mut_slice::<u64>();
            for p in 0..pages {
                words[p * 512] = 0xABCD_0000 + p as u64;
                words[p * 512 + 511] = p as u64;
            }
            for p in 0..pages {
                assert_eq!(words[p * 512], 0xABCD_0000 + p as u64, "page {p}");
                assert_eq!(words[p * 512 + 511], p as u64, "page {p}");
            }
            region
        })
        .unwrap();
    let stats = rt.stats();
    assert!(
        stats.mm.evicted > 0 && stats.mm.swap_ins_done > 0,
        "{stats:#?}"
    );
    assert!(stats.swap_slots_used > 0);
    drop(region);
    assert!(rt.quiesce(Duration::from_secs(10)));
    assert_eq!(
        rt.stats().swap_slots_used,
        0,
        "swap device empty after drop"
    );
    let census = rt.check_conservation().unwrap();
    assert_eq!(census.free, frames, "pool full after drop: {census}");
}

#[test]
fn region_vec_grows_and_keeps_its_elements() {
    let dir = swap_dir();
    let rt = runtime(256, 0, &dir);
    let v: RegionVec<u32> = RegionVec::with_capacity(&rt, 10).unwrap();
    let v = rt
        .block_on(move || {
            let mut v = v;
            for i in 0..5000u32 {
                v.push(i * 3).unwrap();
            }
            assert_eq!(v.len(), 5000);
            assert_eq!(v[4999], 4999 * 3);
            assert_eq!(v.pop(), Some(4999 * 3));
            v
        })
        .unwrap();
    assert!(v.capacity() >= 5000);
    assert_eq!(
        v.iter().map(|&x| x as u64).sum::<u64>(),
        (0..4999u64).map(|i| i * 3).sum::<u64>()
    );
    let _unused: Option<Region> = None;
}

/// Records the write bit of every fault it serves (first-fit otherwise).
struct Recorder(usm_sync::Arc<usm_sync::Mutex<Vec<(u64, bool)>>>);

impl usm_policies::AllocPolicy for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn alloc(
        &mut self,
        fault: &usm_kmod::event::Fault,
        cx: &mut dyn usm_policies::Cx,
    ) -> usm_policies::Decision {
        self.0.lock().unwrap().push((fault.addr, fault.write));
        match cx.take_frame() {
            Some(f) => usm_policies::Decision::Map(usm_policies::Mapping::one(fault.addr, f)),
            None => usm_policies::Decision::Oom,
        }
    }
}

#[test]
fn the_handler_reports_reads_and_writes_from_the_fault_error_code() {
    let log = usm_sync::Arc::new(usm_sync::Mutex::new(Vec::new()));
    let mut reg = usm_policies::Registry::with_builtins();
    let l = log.clone();
    reg.register_alloc("recorder", usm_policies::Param::None, move |_| {
        Ok(Box::new(Recorder(l.clone())))
    })
    .unwrap();
    let rt = Runtime::builder()
        .workers(1)
        .pool_frames(64)
        .build_with_registry(reg)
        .unwrap();
    let region = usm_sync::Arc::new(rt.region_with_policy(4 * PAGE, "recorder").unwrap());
    let r = region.clone();
    rt.block_on(move || {
        let w = r.as_atomic_u64();
        let _ = w[0].load(usm_sync::atomic::Ordering::Relaxed); // read fault, page 0
        w[WORDS_PER_PAGE].store(1, usm_sync::atomic::Ordering::Relaxed); // write fault, page 1
    })
    .unwrap();
    // A plain thread too: page 2 read, page 3 write.
    let _ = region.as_atomic_u64()[2 * WORDS_PER_PAGE].load(usm_sync::atomic::Ordering::Relaxed);
    region.as_atomic_u64()[3 * WORDS_PER_PAGE].store(1, usm_sync::atomic::Ordering::Relaxed);
    let base = region.addr();
    let seen: Vec<(u64, bool)> = log
        .lock()
        .unwrap()
        .iter()
        .map(|&(a, w)| ((a - base) / PAGE as u64, w))
        .collect();
    assert_eq!(seen, vec![(0, false), (1, true), (2, false), (3, true)]);
}

const WORDS_PER_PAGE: usize = PAGE / 8;
