//! Devices on real files and block devices: the USM header (format, refusal, mismatch),
//! several devices with priorities, slot exhaustion, a loop device and zram.

#![deny(unsafe_code)]

mod common;

use std::path::Path;
use usm_sync::Arc;

use common::{LoopDevice, disk_tempdir, pipeline};
use usm_swap::{
    DeviceId, DeviceKind, Engine, EngineConfig, FormatOptions, IoBuf, IoOp, PAGE_SIZE, PageBuf,
    SwapDevice, SwapEntry, SwapError, SwapSpace, Zram, create_sparse_swap_file, create_swap_file,
    format,
};

fn file_device(dir: &Path, name: &str, id: u8, bytes: u64) -> Arc<SwapDevice> {
    let p = dir.join(name);
    create_swap_file(&p, bytes).unwrap();
    Arc::new(SwapDevice::open(DeviceId(id), &p).unwrap())
}

#[test]
fn a_path_without_a_usm_header_is_refused_and_left_untouched() {
    let dir = disk_tempdir();
    let p = dir.path().join("not-swap");
    let mut content = vec![0u8; 64 * 1024];
    content[..11].copy_from_slice(b"precious!!!");
    std::fs::write(&p, &content).unwrap();
    let err = SwapDevice::open(DeviceId(0), &p).unwrap_err();
    assert!(
        matches!(
            err,
            SwapError::NotUsmSwap {
                found: "unrecognised data",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("mkswap"), "{err}");
    // format refuses it too, unless forced.
    let err = format(&p, &FormatOptions::default()).unwrap_err();
    assert!(matches!(err, SwapError::ForeignData { .. }), "{err}");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        content,
        "refused path was modified"
    );
    // A Linux swap signature is recognised by name.
    let q = dir.path().join("linux-swap");
    let mut linux = vec![0u8; 64 * 1024];
    linux[PAGE_SIZE - 10..PAGE_SIZE].copy_from_slice(b"SWAPSPACE2");
    std::fs::write(&q, &linux).unwrap();
    let err = SwapDevice::open(DeviceId(0), &q).unwrap_err();
    assert!(err.to_string().contains("Linux swap"), "{err}");
    // An all-zero file is not a device until formatted; then it is.
    let z = dir.path().join("zeros");
    std::fs::write(&z, vec![0u8; 64 * 1024]).unwrap();
    assert!(matches!(
        SwapDevice::open(DeviceId(0), &z),
        Err(SwapError::NotUsmSwap {
            found: "only zeros",
            ..
        })
    ));
    let h = format(&z, &FormatOptions::default()).unwrap();
    assert_eq!(h.slots, 15);
    let d = SwapDevice::open(DeviceId(0), &z).unwrap();
    assert_eq!(d.header(), &h);
    assert_eq!(d.kind(), DeviceKind::File);
    // Forced format of foreign data works.
    format(&p, &FormatOptions { force: true }).unwrap();
    SwapDevice::open(DeviceId(1), &p).unwrap();
}

#[test]
fn header_mismatches_are_refused() {
    let dir = disk_tempdir();
    let p = dir.path().join("swap0");
    let h = create_swap_file(&p, 1 << 20).unwrap();
    assert_eq!(h.slots, 255);
    // Corrupt the version field (the checksum then fails first).
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8] = 9;
    std::fs::write(&p, &bytes).unwrap();
    let err = SwapDevice::open(DeviceId(0), &p).unwrap_err();
    assert!(
        matches!(&err, SwapError::HeaderMismatch { reason, .. } if reason.contains("checksum")),
        "{err}"
    );
    // A correct header on a device shorter than it says (truncated after formatting).
    let q = dir.path().join("swap1");
    create_swap_file(&q, 1 << 20).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&q)
        .unwrap()
        .set_len(1 << 19)
        .unwrap();
    let err = SwapDevice::open(DeviceId(0), &q).unwrap_err();
    assert!(
        matches!(&err, SwapError::HeaderMismatch { reason, .. } if reason.contains("truncated")),
        "{err}"
    );
    // create refuses an existing path.
    let err = create_swap_file(&q, 1 << 20).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
    // Too small.
    assert!(matches!(
        create_swap_file(dir.path().join("tiny"), 4096),
        Err(SwapError::TooSmall { .. })
    ));
}

#[test]
fn priorities_fill_the_highest_first_and_rotate_among_equals() {
    let dir = disk_tempdir();
    // 16 KiB + header = 4 slots... use 5 pages: 4 slots each.
    let hi_a = file_device(dir.path(), "hi-a", 0, 5 * PAGE_SIZE as u64);
    let hi_b = file_device(dir.path(), "hi-b", 1, 5 * PAGE_SIZE as u64);
    let lo = file_device(dir.path(), "lo", 2, 9 * PAGE_SIZE as u64);
    let mut space = SwapSpace::new();
    space.add(lo.clone(), -1).unwrap();
    space.add(hi_a.clone(), 5).unwrap();
    space.add(hi_b.clone(), 5).unwrap();
    assert!(matches!(
        space.add(lo.clone(), 3),
        Err(SwapError::DuplicateDevice(DeviceId(2)))
    ));
    assert_eq!(space.total_slots(), 16);
    let first: Vec<DeviceId> = (0..8).map(|_| space.alloc().unwrap().device()).collect();
    // Round-robin between the two priority-5 devices, never the low one while they have room.
    assert_eq!(
        first,
        [0, 1, 0, 1, 0, 1, 0, 1].map(DeviceId).to_vec(),
        "equal priorities must alternate"
    );
    assert_eq!(space.free_slots_on(DeviceId(0)), Some(0));
    assert_eq!(space.free_slots_on(DeviceId(1)), Some(0));
    // Both full: the low-priority device takes over.
    let run = space.alloc_run(8).unwrap();
    assert_eq!(run.first.device(), DeviceId(2));
    assert_eq!(run.len, 8);
    // Everything full: NoSpace, classified for the OOM fallback.
    let err = space.alloc().unwrap_err();
    assert!(
        err.is_no_space() && err.errno() == Some(libc::ENOSPC),
        "{err}"
    );
    let err = space.alloc_run_on(DeviceId(0), 1).unwrap_err();
    assert!(matches!(
        err,
        SwapError::NoSpace {
            device: Some(DeviceId(0))
        }
    ));
    // Freeing a slot of a high device makes it preferred again.
    let e = SwapEntry::new(DeviceId(1), 2).unwrap();
    assert!(space.free(e).unwrap());
    assert_eq!(space.alloc().unwrap(), e);

    // Real I/O across the three devices through one engine.
    let mut eng = Engine::new(&EngineConfig::default(), &space.devices()).unwrap();
    let all: Vec<SwapEntry> = (0..3u8)
        .flat_map(|d| {
            let slots = space.device(DeviceId(d)).unwrap().slots();
            (0..slots).map(move |s| SwapEntry::new(DeviceId(d), s).unwrap())
        })
        .collect();
    assert_eq!(all.len(), 16);
    let writes: Vec<_> = all.iter().map(|&e| (IoOp::Write, e)).collect();
    pipeline(&mut eng, &writes, 99, 8);
    let reads: Vec<_> = all.iter().rev().map(|&e| (IoOp::Read, e)).collect();
    pipeline(&mut eng, &reads, 99, 8);
    // A clean page swapped back in keeps its slot (reading never frees): it can be
    // evicted again without a write.
    assert!(all.iter().all(|&e| space.refcount(e) == 1));
    assert_eq!(space.free_slots(), 0);
}

#[test]
fn slot_exhaustion_and_fork_sharing_on_a_real_device() {
    let dir = disk_tempdir();
    let dev = file_device(dir.path(), "swap0", 7, 1 << 20);
    assert!(!dev.is_synchronous(), "a file is not a synchronous device");
    let mut space = SwapSpace::new();
    space.add(dev.clone(), 0).unwrap();
    let mut got = Vec::new();
    loop {
        match space.alloc_run(32) {
            Ok(run) => got.extend(run.entries()),
            Err(e) => {
                assert!(e.is_no_space(), "{e}");
                break;
            }
        }
    }
    assert_eq!(got.len() as u64, dev.slots());
    assert_eq!(space.free_slots(), 0);
    // A forked child shares a swapped page: two owners, freed by the second free only.
    let shared = got[10];
    assert_eq!(space.dup(shared).unwrap(), 2);
    assert!(!space.free(shared).unwrap());
    assert_eq!(space.refcount(shared), 1);
    assert_eq!(space.free_slots(), 0);
    assert!(space.free(shared).unwrap());
    assert_eq!(space.alloc().unwrap(), shared);
    assert!(matches!(
        space.free(SwapEntry::new(DeviceId(3), 0).unwrap()),
        Err(SwapError::UnknownDevice(DeviceId(3)))
    ));
}

#[test]
fn loop_device_over_a_file() {
    let dir = disk_tempdir();
    let backing = dir.path().join("loop-backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let lo = match LoopDevice::attach(&backing) {
        Ok(l) => l,
        // Not being root, `losetup` (util-linux `mount`) missing or a kernel without
        // loop devices (this machine's has them) fails.
        Err(why) => panic!("cannot attach a loop device (run as root): {why}"),
    };
    // Fresh (all zeros): refused until formatted.
    assert!(matches!(
        SwapDevice::open(DeviceId(0), &lo.path),
        Err(SwapError::NotUsmSwap { .. })
    ));
    let h = format(&lo.path, &FormatOptions::default()).unwrap();
    assert_eq!(h.slots, (16 << 20) / PAGE_SIZE as u64 - 1);
    let dev = Arc::new(SwapDevice::open(DeviceId(0), &lo.path).unwrap());
    assert!(!dev.is_synchronous(), "a loop device is not zram");
    assert_eq!(dev.kind(), DeviceKind::Block);
    // O_EXCL: a second exclusive open of the same block device is refused.
    let err = SwapDevice::open(DeviceId(1), &lo.path).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EBUSY), "{err}");
    let mut eng = Engine::new(&EngineConfig::default(), std::slice::from_ref(&dev)).unwrap();
    let entries: Vec<_> = (0..2000)
        .map(|s| SwapEntry::new(DeviceId(0), s * 2).unwrap())
        .collect();
    let writes: Vec<_> = entries.iter().map(|&e| (IoOp::Write, e)).collect();
    pipeline(&mut eng, &writes, 4242, 32);
    let reads: Vec<_> = entries.iter().map(|&e| (IoOp::Read, e)).collect();
    pipeline(&mut eng, &reads, 4242, 32);
    drop(eng);
    drop(dev);
}

#[test]
fn zram_as_a_ram_swap_device() {
    assert!(
        Zram::available(0),
        "/dev/zram0 or /sys/block/zram0 missing (this machine's kernel has zram built in)"
    );
    // The guard resets zram0 when dropped, also if an assertion below fails.
    let zram = Zram::configure(0, 32 << 20, None).unwrap();
    assert_eq!(zram.disksize().unwrap(), 32 << 20);
    assert!(matches!(
        SwapDevice::open(DeviceId(0), zram.path()),
        Err(SwapError::NotUsmSwap { .. })
    ));
    format(zram.path(), &FormatOptions::default()).unwrap();
    let dev = Arc::new(SwapDevice::open(DeviceId(3), zram.path()).unwrap());
    assert_eq!(dev.kind(), DeviceKind::Block);
    assert!(
        dev.is_synchronous(),
        "zram without a backing device is synchronous"
    );
    assert_eq!(dev.slots(), (32 << 20) / PAGE_SIZE as u64 - 1);
    let mut space = SwapSpace::new();
    space.add(dev.clone(), 0).unwrap();
    let mut eng = Engine::new(&EngineConfig::default(), &space.devices()).unwrap();
    let mut entries = Vec::new();
    while entries.len() < 4000 {
        entries.extend(space.alloc_run(64).unwrap().entries());
    }

    // A lone request runs inline: done before any wait, counted in flight until reaped,
    // and no io_uring_enter at all.
    let mut page = PageBuf::page();
    page.fill(0x5a);
    eng.write(entries[0], page).unwrap();
    assert_eq!(eng.stats().inline_ios, 1);
    assert_eq!(eng.in_flight(), 1);
    assert!(eng.has_capacity());
    assert!(
        !eng.ready_to_sleep(),
        "an unreaped inline completion must be reaped first"
    );
    eng.wait(1).unwrap();
    assert_eq!(
        eng.stats().enters,
        0,
        "no kernel entry for an inline request"
    );
    let mut done = Vec::new();
    assert_eq!(eng.reap(|c| done.push(c)), 1);
    assert_eq!(done[0].entry, entries[0]);
    assert_eq!(*done[0].result.as_ref().unwrap(), PAGE_SIZE as u32);
    assert_eq!(eng.in_flight(), 0);
    // A burst: only the first request (nothing else outstanding) goes inline, the others
    // through the ring; the data written inline reads back through either path.
    let mut tickets = Vec::new();
    for &e in [entries[0], entries[1], entries[0], entries[2]].iter() {
        tickets.push(eng.read(e, PageBuf::page()).unwrap());
    }
    assert_eq!(eng.stats().inline_ios, 2);
    assert!(
        eng.stats().enters > 0,
        "the rest of the burst went through the ring"
    );
    let mut reads = Vec::new();
    while reads.len() < 4 {
        eng.wait(1).unwrap();
        eng.reap(|c| reads.push(c));
    }
    for c in reads.iter().filter(|c| c.entry == entries[0]) {
        let Some(IoBuf::Owned(b)) = &c.buf else {
            panic!("owned buffer not returned")
        };
        assert!(b.iter().all(|&x| x == 0x5a), "inline write read back");
    }

    for depth in [1u32, 32] {
        let writes: Vec<_> = entries.iter().map(|&e| (IoOp::Write, e)).collect();
        pipeline(&mut eng, &writes, u64::from(depth), depth);
        let reads: Vec<_> = entries.iter().rev().map(|&e| (IoOp::Read, e)).collect();
        pipeline(&mut eng, &reads, u64::from(depth), depth);
    }
    assert!(eng.stats().inline_ios >= 8000, "depth 1 ran inline");
    drop(eng);
    // Turned off: every request goes through io_uring.
    let mut ring_only = Engine::new(
        &EngineConfig {
            inline_sync: false,
            ..EngineConfig::default()
        },
        &space.devices(),
    )
    .unwrap();
    let reads: Vec<_> = entries[..64].iter().map(|&e| (IoOp::Read, e)).collect();
    pipeline(&mut ring_only, &reads, 32, 1);
    assert_eq!(ring_only.stats().inline_ios, 0);
    assert!(ring_only.stats().enters >= 64);
    drop(ring_only);
    drop(space);
    drop(dev);
    zram.reset().unwrap();
    drop(zram);
    assert_eq!(
        std::fs::read_to_string("/sys/block/zram0/disksize")
            .unwrap()
            .trim(),
        "0",
        "zram0 not reset"
    );
}

/// `create_swap_file` writes the file out: no extent is left *unwritten*, so no first
/// write-back to a slot pays ext4's extent conversion (checked with `filefrag -v`, which
/// prints the FIEMAP flags of every extent).
#[test]
fn a_created_swap_file_has_no_unwritten_extents() {
    let dir = disk_tempdir();
    let p = dir.path().join("written");
    create_swap_file(&p, 4 << 20).unwrap();
    let out = match std::process::Command::new("filefrag")
        .arg("-v")
        .arg(&p)
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        // The swap directory is on ext4, which maps extents (FIEMAP).
        Ok(o) => panic!(
            "filefrag cannot map {}: {}",
            p.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("filefrag is not runnable (e2fsprogs): {e}"),
    };
    assert!(out.contains("extent"), "unexpected filefrag output:\n{out}");
    assert!(
        !out.contains("unwritten"),
        "the swap file still has unwritten extents:\n{out}"
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 << 20);
    SwapDevice::open(DeviceId(0), &p).unwrap();
}

/// A small ext4 file system on a file, loop-mounted (`mount -o loop`) for one test;
/// unmounted on drop (the loop device goes with it).
struct SmallExt4 {
    mnt: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallExt4 {
    fn mount(mib: u64) -> SmallExt4 {
        assert_eq!(
            nix::unistd::geteuid().as_raw(),
            0,
            "this test needs root (it mounts a small ext4 file system)"
        );
        let dir = disk_tempdir();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .output()
            .expect("mkfs.ext4 (e2fsprogs) is needed");
        assert!(out.status.success(), "mkfs.ext4: {out:?}");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount -o loop: {out:?}");
        SmallExt4 { mnt, _dir: dir }
    }
}

impl Drop for SmallExt4 {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount").arg(&self.mnt).status();
        if !matches!(ok, Ok(s) if s.success()) {
            eprintln!("warning: umount {} failed", self.mnt.display());
        }
    }
}

/// `create_sparse_swap_file` writes nothing but the header (the file is a hole, created
/// at once whatever its size); writes into the holes work; when the file system fills up
/// a write fails with `ENOSPC` as a no-space error that keeps the page (its buffer comes
/// back intact), the device counts as full from then on, and every page written before
/// reads back.
#[test]
fn a_sparse_swap_file_fills_on_demand_and_a_full_file_system_keeps_the_page() {
    let fs = SmallExt4::mount(8);
    let p = fs.mnt.join("sparse.swap");
    // 64 MiB of swap on an 8 MiB file system: only a sparse file can be that.
    let h = create_sparse_swap_file(&p, 64 << 20).unwrap();
    let m = std::fs::metadata(&p).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 <= 64 << 10,
        "a sparse swap file holds only its header: {} bytes allocated",
        m.blocks() * 512
    );
    let dev = Arc::new(SwapDevice::open(DeviceId(0), &p).unwrap());
    assert_eq!(dev.slots(), h.slots);
    let mut eng = Engine::new(
        &EngineConfig {
            depth: 16,
            ..EngineConfig::default()
        },
        std::slice::from_ref(&dev),
    )
    .unwrap();
    let mut written = Vec::new();
    let mut refused = None;
    let mut slot = 0;
    while refused.is_none() && slot < dev.slots() {
        let e = SwapEntry::new(DeviceId(0), slot).unwrap();
        let mut page = PageBuf::page();
        common::fill_page(&mut page, e, 7);
        eng.write(e, page).unwrap();
        eng.submit().unwrap();
        eng.wait(1).unwrap();
        eng.reap(|c| match c.result {
            Ok(n) => {
                assert_eq!(n as usize, PAGE_SIZE);
                written.push(c.entry);
            }
            Err(err) => {
                let Some(IoBuf::Owned(b)) = c.buf else {
                    panic!("the page of a failed write was not handed back")
                };
                common::check_page(&b, c.entry, 7).unwrap();
                refused = Some(err);
            }
        });
        slot += 1;
    }
    let err = refused.expect("64 MiB of writes fit in an 8 MiB file system?");
    assert!(
        err.is_no_space() && err.keeps_page() && !err.must_poison(),
        "a full file system is a no-space write error that keeps the page: {err}"
    );
    assert_eq!(err.errno(), Some(libc::ENOSPC), "{err}");
    // From now on the device is full: no slot is handed out, none counts as free.
    assert!(dev.is_out_of_space());
    let mut space = SwapSpace::new();
    space.add(dev.clone(), 0).unwrap();
    assert_eq!(space.free_slots(), 0);
    assert!(space.alloc().unwrap_err().is_no_space());
    assert!(
        written.len() > 256,
        "only {} pages fit before ENOSPC",
        written.len()
    );
    // Everything written before the file system filled up reads back.
    for &e in &written {
        eng.read(e, PageBuf::page()).unwrap();
        eng.submit().unwrap();
        eng.wait(1).unwrap();
        eng.reap(|c| {
            c.result.unwrap();
            let Some(IoBuf::Owned(b)) = c.buf else {
                panic!("no buffer")
            };
            common::check_page(&b, c.entry, 7).unwrap();
        });
    }
    drop(eng);
    drop(dev);
}
