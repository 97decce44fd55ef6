//! `include/usm.h` is what cbindgen generates from the crate today.

use std::path::Path;

#[test]
fn checked_in_header_matches_cbindgen() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates usm.h")
        .write(&mut fresh);
    let fresh = String::from_utf8(fresh).unwrap();
    let path = crate_dir.join("include/usm.h");
    if std::env::var_os("USM_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    // The two-argument form USM documents, beside the explicit-length one.
    assert!(
        fresh.contains("int usm_hint(void *addr, const char *hint);"),
        "{fresh}"
    );
    assert!(
        fresh.contains("int usm_hint_range(void *addr, size_t len, const char *hint);"),
        "{fresh}"
    );
    // Every example the header gives is a hint the daemon's parser accepts.
    let mut examples = 0;
    for quoted in fresh.split('"').skip(1).step_by(2) {
        if quoted.contains('=') {
            usm_policies::Hint::parse(quoted)
                .unwrap_or_else(|e| panic!("usm.h's example {quoted:?} is refused: {e}"));
            examples += 1;
        }
    }
    assert!(examples >= 3, "{fresh}");
    assert_eq!(
        checked_in, fresh,
        "include/usm.h is stale: run USM_BLESS=1 cargo test -p usm-capi --test header"
    );
}
