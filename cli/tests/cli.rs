//! The `palisade` binary on the example shop: exit codes, `test` suites that pass and fail, and
//! the verdicts and decisions it prints being the cluster components' own.

use std::{path::Path, process::Command};

#[allow(clippy::expect_used)] // a test helper: a binary that does not run fails the test
fn palisade(args: &[&str]) -> (i32, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .current_dir(root)
        .output()
        .expect("run palisade");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shop_suite_passes_and_a_wrong_one_fails_case_by_case() {
    let (code, out, err) = palisade(&["test", "cli/tests/shop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS")).count(),
        8,
        "{out}"
    );
    let (code, out, err) = palisade(&["test", "cli/tests/wrong"]);
    assert_eq!(code, 1, "{out}{err}");
    let fails: Vec<_> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 4, "{out}");
    assert!(fails[0].contains("deny (expected allow)"), "{}", fails[0]);
    assert!(fails[1].contains("the message lacks"), "{}", fails[1]);
    assert!(fails[2].contains("differs from"), "{}", fails[2]);
    assert!(fails[3].contains("deny (expected allow)"), "{}", fails[3]);
}

#[test]
fn admit_exits_non_zero_when_the_webhook_would_refuse() {
    let (code, out, _) = palisade(&[
        "admit",
        "-f",
        "examples/00-shop-namespace.yaml",
        "-f",
        "cli/tests/shop/workloads/compliant.yaml",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verdict: allow"), "{out}");
    let (code, out, _) = palisade(&[
        "admit",
        "-f",
        "examples/00-shop-namespace.yaml",
        "-f",
        "cli/tests/shop/workloads/secret-in-env.yaml",
        "-o",
        "json",
    ]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["verdict"], "deny");
    assert_eq!(v[0]["rules"][0], "secrets-in-env/env-from-secret");
}

#[test]
fn admit_reads_the_webhook_configuration_and_namespace_modes() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("webhook.yaml");
    std::fs::write(&config, "secretsInEnv: {mode: Warn}\n").expect("write");
    let (code, out, err) = palisade(&[
        "admit",
        "-f",
        "examples/00-shop-namespace.yaml",
        "-f",
        "cli/tests/shop/workloads/secret-in-env.yaml",
        "--webhook-config",
        config.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verdict: warn"), "{out}");
    // An unknown key is refused, as the webhook refuses it.
    std::fs::write(&config, "secretsInEnvv: {mode: Warn}\n").expect("write");
    let (code, _, err) = palisade(&[
        "admit",
        "-f",
        "cli/tests/shop/workloads/secret-in-env.yaml",
        "--webhook-config",
        config.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn render_reports_what_would_not_be_enforced() {
    let dir = tempfile::tempdir().expect("tmp");
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: api, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: api}}\n  jwt: {issuer: https://id.example, \
         jwksUri: https://id.example/jwks, maxTokenLifetime: 10m}\n  rules: [{from: [{spiffeId: \
         spiffe://cluster.local/ns/shop/sa/web}]}]\n",
    )
    .expect("write");
    let path = policy.to_str().expect("utf-8");
    let (code, out, err) = palisade(&["render", "-f", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("# Unsupported NotEnforcedWithoutExternal"),
        "{out}"
    );
    assert!(out.contains("kind: RequestAuthentication"), "{out}");
    let (code, _, _) = palisade(&["render", "-f", path, "--fail-on-unenforced"]);
    assert_eq!(code, 1);
    // The examples are enforced as written.
    let (code, out, _) = palisade(&["render", "-f", "examples", "--fail-on-unenforced"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("name: palisade-payments-allow"), "{out}");
}

#[test]
fn bad_input_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("x.yaml");
    std::fs::write(&file, "just: a map\n").expect("write");
    let (code, _, err) = palisade(&["render", "-f", file.to_str().expect("utf-8")]);
    assert_eq!(code, 2);
    assert!(err.contains("not a Kubernetes object"), "{err}");
    let (code, _, err) = palisade(&[
        "who-can",
        "-f",
        "examples",
        "--namespace",
        "shop",
        "--from",
        "orders",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("namespace/serviceaccount"), "{err}");
}
