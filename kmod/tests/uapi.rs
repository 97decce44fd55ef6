//! The uapi constants and layouts against the kernel's own header (a C probe compiled
//! with the system compiler), the newer ioctls against their documented `_IOC` fields
//! and the running kernel, and the negotiation / adoption paths of the safe API.

#![deny(unsafe_code)]

mod common;

use common::{PAGE, require_root, sys};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use usm_kmod::sys::uapi::{self, *};
use usm_kmod::{
    Error, Features, Ioctls, MoveMode, OpenFlags, OpenPath, PoisonMode, RawUserfaultfd,
    RegisterMode, Resolved,
};

const HEADER: &str = "/usr/include/linux/userfaultfd.h";

/// Every value the 6.1 header has, as (C expression, our value).
fn header_values() -> Vec<(&'static str, u64)> {
    use core::mem::{offset_of, size_of};
    vec![
        ("UFFD_API", UFFD_API),
        ("UFFD_USER_MODE_ONLY", UFFD_USER_MODE_ONLY as u64),
        ("USERFAULTFD_IOC", USERFAULTFD_IOC as u64),
        ("USERFAULTFD_IOC_NEW", USERFAULTFD_IOC_NEW as u64),
        ("UFFDIO", UFFDIO as u64),
        ("_UFFDIO_REGISTER", _UFFDIO_REGISTER as u64),
        ("_UFFDIO_UNREGISTER", _UFFDIO_UNREGISTER as u64),
        ("_UFFDIO_WAKE", _UFFDIO_WAKE as u64),
        ("_UFFDIO_COPY", _UFFDIO_COPY as u64),
        ("_UFFDIO_ZEROPAGE", _UFFDIO_ZEROPAGE as u64),
        ("_UFFDIO_WRITEPROTECT", _UFFDIO_WRITEPROTECT as u64),
        ("_UFFDIO_CONTINUE", _UFFDIO_CONTINUE as u64),
        ("_UFFDIO_API", _UFFDIO_API as u64),
        ("UFFDIO_API", UFFDIO_API as u64),
        ("UFFDIO_REGISTER", UFFDIO_REGISTER as u64),
        ("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER as u64),
        ("UFFDIO_WAKE", UFFDIO_WAKE as u64),
        ("UFFDIO_COPY", UFFDIO_COPY as u64),
        ("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE as u64),
        ("UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT as u64),
        ("UFFDIO_CONTINUE", UFFDIO_CONTINUE as u64),
        ("UFFD_EVENT_PAGEFAULT", UFFD_EVENT_PAGEFAULT as u64),
        ("UFFD_EVENT_FORK", UFFD_EVENT_FORK as u64),
        ("UFFD_EVENT_REMAP", UFFD_EVENT_REMAP as u64),
        ("UFFD_EVENT_REMOVE", UFFD_EVENT_REMOVE as u64),
        ("UFFD_EVENT_UNMAP", UFFD_EVENT_UNMAP as u64),
        ("UFFD_PAGEFAULT_FLAG_WRITE", UFFD_PAGEFAULT_FLAG_WRITE),
        ("UFFD_PAGEFAULT_FLAG_WP", UFFD_PAGEFAULT_FLAG_WP),
        ("UFFD_PAGEFAULT_FLAG_MINOR", UFFD_PAGEFAULT_FLAG_MINOR),
        (
            "UFFD_FEATURE_PAGEFAULT_FLAG_WP",
            UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        ),
        ("UFFD_FEATURE_EVENT_FORK", UFFD_FEATURE_EVENT_FORK),
        ("UFFD_FEATURE_EVENT_REMAP", UFFD_FEATURE_EVENT_REMAP),
        ("UFFD_FEATURE_EVENT_REMOVE", UFFD_FEATURE_EVENT_REMOVE),
        (
            "UFFD_FEATURE_MISSING_HUGETLBFS",
            UFFD_FEATURE_MISSING_HUGETLBFS,
        ),
        ("UFFD_FEATURE_MISSING_SHMEM", UFFD_FEATURE_MISSING_SHMEM),
        ("UFFD_FEATURE_EVENT_UNMAP", UFFD_FEATURE_EVENT_UNMAP),
        ("UFFD_FEATURE_SIGBUS", UFFD_FEATURE_SIGBUS),
        ("UFFD_FEATURE_THREAD_ID", UFFD_FEATURE_THREAD_ID),
        ("UFFD_FEATURE_MINOR_HUGETLBFS", UFFD_FEATURE_MINOR_HUGETLBFS),
        ("UFFD_FEATURE_MINOR_SHMEM", UFFD_FEATURE_MINOR_SHMEM),
        ("UFFD_FEATURE_EXACT_ADDRESS", UFFD_FEATURE_EXACT_ADDRESS),
        (
            "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
            UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        ),
        ("UFFDIO_REGISTER_MODE_MISSING", UFFDIO_REGISTER_MODE_MISSING),
        ("UFFDIO_REGISTER_MODE_WP", UFFDIO_REGISTER_MODE_WP),
        ("UFFDIO_REGISTER_MODE_MINOR", UFFDIO_REGISTER_MODE_MINOR),
        ("UFFDIO_COPY_MODE_DONTWAKE", UFFDIO_COPY_MODE_DONTWAKE),
        ("UFFDIO_COPY_MODE_WP", UFFDIO_COPY_MODE_WP),
        (
            "UFFDIO_ZEROPAGE_MODE_DONTWAKE",
            UFFDIO_ZEROPAGE_MODE_DONTWAKE,
        ),
        ("UFFDIO_WRITEPROTECT_MODE_WP", UFFDIO_WRITEPROTECT_MODE_WP),
        (
            "UFFDIO_WRITEPROTECT_MODE_DONTWAKE",
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
        ),
        (
            "UFFDIO_CONTINUE_MODE_DONTWAKE",
            UFFDIO_CONTINUE_MODE_DONTWAKE,
        ),
        ("sizeof(struct uffdio_api)", size_of::<UffdioApi>() as u64),
        (
            "sizeof(struct uffdio_range)",
            size_of::<UffdioRange>() as u64,
        ),
        (
            "sizeof(struct uffdio_register)",
            size_of::<UffdioRegister>() as u64,
        ),
        ("sizeof(struct uffdio_copy)", size_of::<UffdioCopy>() as u64),
        (
            "sizeof(struct uffdio_zeropage)",
            size_of::<UffdioZeropage>() as u64,
        ),
        (
            "sizeof(struct uffdio_writeprotect)",
            size_of::<UffdioWriteprotect>() as u64,
        ),
        (
            "sizeof(struct uffdio_continue)",
            size_of::<UffdioContinue>() as u64,
        ),
        ("sizeof(struct uffd_msg)", size_of::<UffdMsg>() as u64),
        (
            "offsetof(struct uffdio_api, features)",
            offset_of!(UffdioApi, features) as u64,
        ),
        (
            "offsetof(struct uffdio_api, ioctls)",
            offset_of!(UffdioApi, ioctls) as u64,
        ),
        (
            "offsetof(struct uffdio_register, mode)",
            offset_of!(UffdioRegister, mode) as u64,
        ),
        (
            "offsetof(struct uffdio_register, ioctls)",
            offset_of!(UffdioRegister, ioctls) as u64,
        ),
        (
            "offsetof(struct uffdio_copy, src)",
            offset_of!(UffdioCopy, src) as u64,
        ),
        (
            "offsetof(struct uffdio_copy, mode)",
            offset_of!(UffdioCopy, mode) as u64,
        ),
        (
            "offsetof(struct uffdio_copy, copy)",
            offset_of!(UffdioCopy, copy) as u64,
        ),
        (
            "offsetof(struct uffdio_zeropage, zeropage)",
            offset_of!(UffdioZeropage, zeropage) as u64,
        ),
        (
            "offsetof(struct uffdio_writeprotect, mode)",
            offset_of!(UffdioWriteprotect, mode) as u64,
        ),
        (
            "offsetof(struct uffdio_continue, mapped)",
            offset_of!(UffdioContinue, mapped) as u64,
        ),
        (
            "offsetof(struct uffd_msg, arg)",
            offset_of!(UffdMsg, arg) as u64,
        ),
        (
            "offsetof(struct uffd_msg, arg.pagefault.address)",
            offset_of!(UffdMsg, arg) as u64 + offset_of!(UffdMsgPagefault, address) as u64,
        ),
        (
            "offsetof(struct uffd_msg, arg.pagefault.feat.ptid)",
            offset_of!(UffdMsg, arg) as u64 + offset_of!(UffdMsgPagefault, feat) as u64,
        ),
        (
            "offsetof(struct uffd_msg, arg.remap.to)",
            offset_of!(UffdMsg, arg) as u64 + offset_of!(UffdMsgRemap, to) as u64,
        ),
        (
            "offsetof(struct uffd_msg, arg.remap.len)",
            offset_of!(UffdMsg, arg) as u64 + offset_of!(UffdMsgRemap, len) as u64,
        ),
        (
            "offsetof(struct uffd_msg, arg.remove.end)",
            offset_of!(UffdMsg, arg) as u64 + offset_of!(UffdMsgRemove, end) as u64,
        ),
        (
            "sizeof(((struct uffd_msg *)0)->arg)",
            size_of::<UffdMsgArg>() as u64,
        ),
        ("sizeof(((struct uffd_msg *)0)->arg.fork.ufd)", 4),
    ]
}

#[test]
fn constants_and_layouts_match_the_system_header() {
    assert!(
        std::path::Path::new(HEADER).exists(),
        "{HEADER} is absent (scripts/test installs libc6-dev, which brings linux-libc-dev)"
    );
    let compiler = ["cc", "gcc", "clang"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(compiler) = compiler else {
        panic!(
            "no C compiler (cc/gcc/clang) to build the header probe (scripts/test installs gcc)"
        );
    };
    let values = header_values();
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <sys/ioctl.h>\n#include <linux/userfaultfd.h>\nint main(void) {\n",
    );
    for (expr, _) in &values {
        c.push_str(&format!(
            "  printf(\"%s=%llu\\n\", \"{expr}\", (unsigned long long)({expr}));\n"
        ));
    }
    c.push_str("  return 0;\n}\n");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("probe.c");
    let bin = dir.path().join("probe");
    std::fs::write(&src, c).unwrap();
    let out = Command::new(compiler)
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "C probe failed to build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&bin).output().unwrap();
    assert!(out.status.success());
    let got: HashMap<String, u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect();
    assert_eq!(got.len(), values.len(), "the probe printed every value");
    let mut bad = Vec::new();
    for (expr, ours) in &values {
        if got[*expr] != *ours {
            bad.push(format!("{expr}: header {:#x}, ours {ours:#x}", got[*expr]));
        }
    }
    assert!(
        bad.is_empty(),
        "mismatches against {HEADER}:\n{}",
        bad.join("\n")
    );
}

#[test]
fn newer_ioctls_recompute_from_their_ioc_fields() {
    // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr, with
    // dir = READ|WRITE = 3 for _IOWR (asm-generic/ioctl.h).
    let iowr = |nr: u64, size: u64| (3u64 << 30) | (size << 16) | (0xAA << 8) | nr;
    assert_eq!(UFFDIO_MOVE as u64, iowr(0x05, 40));
    assert_eq!(UFFDIO_MOVE, 0xc028_aa05);
    assert_eq!(UFFDIO_POISON as u64, iowr(0x08, 32));
    assert_eq!(UFFDIO_POISON, 0xc020_aa08);
    assert_eq!(uapi::UFFD_FEATURE_POISON, 1 << 14);
    assert_eq!(uapi::UFFD_FEATURE_WP_ASYNC, 1 << 15);
    assert_eq!(uapi::UFFD_FEATURE_MOVE, 1 << 16);
    assert_eq!(uapi::UFFD_FEATURE_WP_UNPOPULATED, 1 << 13);
}

#[test]
fn the_kernel_accepts_move_and_poison_and_reports_them() {
    if !require_root("the_kernel_accepts_move_and_poison_and_reports_them") {
        return;
    }
    let uffd = common::uffd(Features::MOVE | Features::POISON | Features::WP_ASYNC);
    assert!(
        uffd.features().contains(Features::WP_UNPOPULATED),
        "WP_ASYNC implies WP_UNPOPULATED"
    );
    assert!(
        uffd.api_ioctls()
            .contains(Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER)
    );
    let dst = sys::mmap_anon(3 * PAGE as usize);
    let src = sys::mmap_anon(PAGE as usize);
    sys::fill_page(src, 0x5a5a);
    let granted = uffd.register(dst, 3 * PAGE, RegisterMode::MISSING).unwrap();
    assert!(
        granted.contains(
            Ioctls::MOVE | Ioctls::POISON | Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE
        )
    );
    let r = sys::move_pages(&uffd, dst, src, PAGE, MoveMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    assert!(sys::page_is(dst, 0x5a5a));
    let r = sys::poison(&uffd, dst + PAGE, PAGE, PoisonMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    // MOVE from a hole without ALLOW_SRC_HOLES: ENOENT, an error classified as not-found.
    let e = sys::move_pages(&uffd, dst + 2 * PAGE, src, PAGE, MoveMode::empty());
    assert!(e.as_ref().is_err_and(|e| e.is_not_found()), "{e:?}");
    // With ALLOW_SRC_HOLES the hole counts as moved and the destination stays missing.
    let r = sys::move_pages(&uffd, dst + 2 * PAGE, src, PAGE, MoveMode::ALLOW_SRC_HOLES).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    // A poisoned page counts as present for a later resolve.
    let r = sys::zeropage(&uffd, dst + PAGE, PAGE, usm_kmod::ZeropageMode::empty()).unwrap();
    assert_eq!(r, Resolved::AlreadyMapped);
    sys::munmap(dst, 3 * PAGE as usize);
    sys::munmap(src, PAGE as usize);
}

#[test]
fn features_display_and_missing_feature_error() {
    let f = Features::MOVE | Features::SIGBUS;
    assert_eq!(f.to_string(), "SIGBUS | MOVE");
    assert_eq!(Features::empty().to_string(), "(none)");
    assert_eq!(
        Features::from_bits_retain(1 << 40).to_string(),
        "0x10000000000"
    );
    assert_eq!(Features::MOVE.since(), "6.8");
    assert_eq!(Features::POISON.since(), "6.6");
    assert_eq!(Features::WP_ASYNC.since(), "6.7");
    if !require_root("features_display_and_missing_feature_error (negotiation part)") {
        return;
    }
    let raw = RawUserfaultfd::open(OpenFlags::default()).unwrap();
    let err = raw
        .negotiate(
            Features::empty(),
            Features::MOVE | Features::from_bits_retain(1 << 40),
        )
        .unwrap_err();
    match &err {
        Error::MissingFeature {
            name,
            since,
            offered,
            ..
        } => {
            assert_eq!(name, "bit 40");
            assert_eq!(*since, "?");
            assert!(offered.contains(Features::MOVE));
        }
        other => panic!("expected MissingFeature, got {other:?}"),
    }
    assert!(err.is_missing_feature());
    assert!(err.to_string().contains("bit 40"), "{err}");
}

#[test]
fn negotiating_twice_is_an_api_error() {
    if !require_root("negotiating_twice_is_an_api_error") {
        return;
    }
    let raw = RawUserfaultfd::open(OpenFlags::default()).unwrap();
    let dup = raw.as_fd().try_clone_to_owned().unwrap();
    let _first = raw.negotiate(Features::empty(), Features::MOVE).unwrap();
    let again = RawUserfaultfd::from_fd(dup).unwrap();
    assert_eq!(again.path(), OpenPath::Adopted);
    let err = again
        .negotiate(Features::empty(), Features::MOVE)
        .unwrap_err();
    assert!(
        matches!(err, Error::Api { .. }) && err.is_invalid(),
        "{err:?}"
    );
}

#[test]
fn adopting_an_fd_received_over_scm_rights() {
    use nix::sys::socket::{
        AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
        sendmsg, socketpair,
    };
    use std::io::{IoSlice, IoSliceMut};
    if !require_root("adopting_an_fd_received_over_scm_rights") {
        return;
    }
    // The "tagger" side opens without negotiating and sends the fd.
    let (tagger, daemon) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let raw = RawUserfaultfd::open(OpenFlags::default()).unwrap();
    let fd = raw.into_fd();
    let fds = [fd.as_raw_fd()];
    sendmsg::<()>(
        tagger.as_raw_fd(),
        &[IoSlice::new(b"uffd")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(fd);
    // The "daemon" side receives, adopts and negotiates with its own privileges.
    let mut buf = [0u8; 8];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        daemon.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    let mut received = None;
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(v) = c {
            // The fd arrived in our table; we own it now.
            received = Some(sys::own_fd(v[0]));
        }
    }
    let uffd = RawUserfaultfd::from_fd(received.expect("an fd arrived"))
        .unwrap()
        .negotiate(Features::empty(), Features::EVENT_FORK | Features::MOVE)
        .unwrap();
    assert!(uffd.features().contains(Features::EVENT_FORK));
    let region = sys::mmap_anon(PAGE as usize);
    uffd.register(region, PAGE, RegisterMode::MISSING).unwrap();
    let r = sys::zeropage(&uffd, region, PAGE, usm_kmod::ZeropageMode::empty()).unwrap();
    assert_eq!(r, Resolved::Done(PAGE));
    assert_eq!(sys::load(region), 0);
    // Something that is not a userfaultfd is refused.
    let file = std::fs::File::open("/proc/self/stat").unwrap();
    let err = RawUserfaultfd::from_fd(OwnedFd::from(file)).unwrap_err();
    assert!(matches!(err, Error::NotUserfaultfd { .. }), "{err:?}");
    sys::munmap(region, PAGE as usize);
}

#[test]
fn user_mode_only_turns_kernel_accesses_into_efault() {
    if !require_root("user_mode_only_turns_kernel_accesses_into_efault") {
        return;
    }
    let uffd = RawUserfaultfd::open(OpenFlags {
        user_mode_only: true,
        ..OpenFlags::default()
    })
    .unwrap()
    .negotiate(Features::empty(), Features::empty())
    .unwrap();
    let region = sys::mmap_anon(PAGE as usize);
    uffd.register(region, PAGE, RegisterMode::MISSING).unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&w, b"payload").unwrap();
    // The kernel writes into the missing page on our behalf: EFAULT, no event, no wait.
    let got = sys::read_into(r.as_raw_fd(), region, 7);
    assert_eq!(got, -(libc::EFAULT as isize));
    sys::munmap(region, PAGE as usize);
}
