//! The `usm demo` swap storm, shortened: it must swap, verify data and give everything back.
//! Needs root-free userfaultfd (user-mode-only) and a disk under /var/tmp for `O_DIRECT`.

use usm_runtime::demo::{self, DemoArgs};

#[test]
fn quick_demo_swaps_verifies_and_cleans_up() {
    let dir = tempfile::Builder::new()
        .prefix("usm-demo-test")
        .tempdir_in("/var/tmp")
        .unwrap();
    let args = DemoArgs {
        seconds: Some(2),
        swap_dir: dir.path().to_path_buf(),
        ..DemoArgs::quick()
    };
    let report = demo::run(&args).unwrap_or_else(|e| panic!("demo failed: {e}"));
    println!("{}", report.table());
    assert_eq!(report.errors, 0);
    assert!(report.pages_verified > 0, "{report:?}");
    // The final read-back alone checks every page of the working set.
    let pages = report.working_set_mib * 256;
    assert!(report.pages_verified >= pages, "{report:?}");
    assert!(
        report.swap_ins > 0,
        "working set 4x the pool must swap: {report:?}"
    );
    assert!(report.evictions > 0, "{report:?}");
    assert!(report.memory_ops > 0 && report.cpu_ops > 0, "{report:?}");
    assert!(
        report.swap_in.count > 0 && report.swap_in.p50_us > 0.0,
        "{report:?}"
    );
    assert_eq!(report.swap_slots_after_drop, 0);
    // The swap file is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "swap file left behind: {left:?}");
}

#[test]
fn invalid_arguments_fail_before_creating_a_swap_file() {
    let dir = tempfile::Builder::new()
        .prefix("usm-demo-test")
        .tempdir_in("/var/tmp")
        .unwrap();
    let args = DemoArgs {
        memory_tasks: 0,
        swap_dir: dir.path().to_path_buf(),
        ..DemoArgs::quick()
    };
    let err = demo::run(&args).unwrap_err();
    assert!(matches!(err, demo::DemoError::Invalid(_)), "{err}");
    assert!(!err.is_data_loss());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The full demo on its defaults (64 MiB pool, 256 MiB working set, 20 s storm).
/// `cargo test --release -p usm-runtime --test demo -- --ignored` (about 40 s).
#[test]
#[ignore = "full-size demo; run with --ignored (release build recommended)"]
fn full_demo_on_defaults() {
    let args = DemoArgs {
        no_progress: true,
        ..DemoArgs::default()
    };
    let report = demo::run(&args).unwrap_or_else(|e| panic!("demo failed: {e}"));
    println!("{}", report.table());
    assert_eq!(report.errors, 0);
    assert_eq!(report.working_set_mib, 4 * report.pool_mib);
    assert!(report.pages_verified >= report.working_set_mib * 256);
    assert!(report.swap_ins > 0 && report.evictions > 0, "{report:?}");
    assert_eq!(report.swap_slots_after_drop, 0);
}
