//! The webhook binary's command line.

use std::process::Command;

#[test]
fn version_names_the_crate_version_and_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade-webhook"))
        .arg("--version")
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("palisade-webhook {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want), "{text}");
    // Anything else is a usage error, not a start.
    let out = Command::new(env!("CARGO_BIN_EXE_palisade-webhook"))
        .arg("--versions")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}
