//! The `usm doctor` probe against this machine.

#![deny(unsafe_code)]

mod common;

use usm_kmod::probe::{DAEMON_FEATURES, EMBEDDED_FEATURES, ProbeReport};
use usm_kmod::{Features, OpenPath};

#[test]
fn the_probe_reports_this_machine_in_text_and_json() {
    let report = ProbeReport::collect();
    let text = report.to_string();
    let json = serde_json::to_value(&report).unwrap();
    assert!(
        text.contains("mode embedded") && text.contains("mode swap"),
        "{text}"
    );
    assert_eq!(json["modes"].as_array().unwrap().len(), 3);
    assert_eq!(
        json["kernel"]["release"].as_str().unwrap(),
        report.kernel.release
    );
    assert_eq!(report.userfaultfd.features.len(), Features::NAMED.len());
    // Cross-check with an independent reading: the features a fresh negotiation offers.
    if let Ok(offered) = usm_kmod::uffd::available_features() {
        assert_eq!(report.userfaultfd.feature_bits, offered.bits());
        for f in &report.userfaultfd.features {
            let bit = Features::NAMED
                .iter()
                .find(|(n, _)| *n == f.name)
                .unwrap()
                .1;
            assert_eq!(f.available, offered.contains(bit), "{}", f.name);
        }
    }
    if !common::require_root("the_probe_reports_this_machine (root expectations)") {
        return;
    }
    // As root on a kernel with /dev/userfaultfd, the device path is used.
    if std::path::Path::new("/dev/userfaultfd").exists() {
        assert_eq!(
            report.userfaultfd.path,
            Some(OpenPath::DevUserfaultfd),
            "{text}"
        );
    }
    assert_eq!(report.userfaultfd.event_fork_permitted, Some(true));
    // "For whom": check the unprivileged verdict by really dropping privileges.
    let (handler, user_mode_only) = common::sys::unprivileged_userfaultfd_attempts();
    assert!(
        user_mode_only,
        "user-mode-only is always open to unprivileged users"
    );
    let sysctl = report.userfaultfd.unprivileged_sysctl;
    assert_eq!(
        handler,
        sysctl == Some(1),
        "sysctl {sysctl:?} decides handler mode"
    );
    let access = &report.userfaultfd.unprivileged_access;
    if !report
        .userfaultfd
        .dev_mode
        .as_deref()
        .is_some_and(|m| m.starts_with("0666"))
    {
        assert_eq!(access.contains("user-mode-only"), !handler, "{access}");
    }
    let offered = Features::from_bits_retain(report.userfaultfd.feature_bits);
    let embedded = report.modes.iter().find(|m| m.mode == "embedded").unwrap();
    assert_eq!(
        embedded.ready,
        offered.contains(EMBEDDED_FEATURES),
        "{text}"
    );
    let daemon = report.modes.iter().find(|m| m.mode == "daemon").unwrap();
    assert_eq!(daemon.ready, offered.contains(DAEMON_FEATURES), "{text}");
    // io_uring: whatever the kernel says must agree with the mode verdict.
    let swap = report.modes.iter().find(|m| m.mode == "swap").unwrap();
    let all_ops = report.io_uring.ops.iter().all(|(_, ok)| *ok);
    assert_eq!(swap.ready, report.io_uring.setup.ok && all_ops, "{text}");
    assert_eq!(
        json["cpu_dma_latency"]["ok"].as_bool().unwrap(),
        report.cpu_dma_latency.ok
    );
    println!("{text}");
}
