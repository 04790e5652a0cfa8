//! `crds/` must be exactly what the types generate.

#![allow(clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;

use palisade_api::crdgen;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut stale = Vec::new();
    let mut expected = std::collections::BTreeSet::new();
    for (file, crd) in crdgen::all() {
        expected.insert(file.to_owned());
        let want = crdgen::render(&crd).expect("renders");
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if have != want {
            stale.push(file);
        }
    }
    let present: std::collections::BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        stale.is_empty() && present == expected,
        "crds/ differs from the types (stale: {stale:?}, present: {present:?}); regenerate with: {}",
        crdgen::REGENERATE
    );
}

/// The reference pages' field tables are the ones the types generate.
#[test]
fn reference_pages_match_the_types() {
    use palisade_api::crddoc;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    for (_, crd) in crdgen::all() {
        let page = crddoc::page(&crd);
        let text = std::fs::read_to_string(root.join(&page)).unwrap_or_default();
        let want = crddoc::fields(&crd);
        if crddoc::current(&text) != Some(want.trim_end_matches('\n')) {
            stale.push(page);
        }
    }
    assert!(
        stale.is_empty(),
        "stale field tables in {stale:?}; regenerate with: cargo run -p palisade-api --bin crdgen -- --docs"
    );
}
