//! The operator binary's command line: `--version`, and the log format switch.

use std::process::Command;

#[test]
fn version_names_the_crate_version_and_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade-operator"))
        .arg("--version")
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("palisade-operator {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want), "{text}");
}

/// The operator without a cluster to reach logs why it stopped: JSON by default, text when asked.
#[test]
fn logs_are_json_unless_text_is_asked_for() {
    let stopped = |format: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade-operator"));
        cmd.env_remove("KUBERNETES_SERVICE_HOST")
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env("HOME", "/nonexistent")
            .env_remove("RUST_LOG");
        if let Some(f) = format {
            cmd.env("PALISADE_LOG_FORMAT", f);
        }
        let out = cmd.output().expect("run");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let json = stopped(None);
    let line = json
        .lines()
        .find(|l| l.contains("operator stopped"))
        .unwrap_or_else(|| panic!("no stop line: {json}"));
    let parsed: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    assert_eq!(parsed["level"], "ERROR");
    let text = stopped(Some("text"));
    let line = text
        .lines()
        .find(|l| l.contains("operator stopped"))
        .unwrap_or_else(|| panic!("no stop line: {text}"));
    assert!(
        serde_json::from_str::<serde_json::Value>(line).is_err(),
        "{line}"
    );
    assert!(line.contains("ERROR"), "{line}");
}
