//! `palisade sbom` on workloads running Palisade's released images, an image whose signed SBOM
//! lists a vulnerable crate, and an image without any SBOM: the first are not affected, the
//! second is, the third is unknown — each by the SBOM attestations verified with the release key.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    ControlPlane,
    advisories::snapshot_dir,
    operator::workspace_bin,
    registry::{OciRegistry, Signer},
    release::Published,
    run, run_ok,
};
use serde_json::Value;

fn deployment(name: &str, image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      containers: [{{name: main, image: \"{image}\"}}]\n"
    )
}

pub fn query_finds_affected_workloads(
    cp: &ControlPlane,
    reg: &OciRegistry,
    signer: &Signer,
    public: &Path,
    images: &[Published],
) -> Result<()> {
    // A service built with smallvec 1.6.0 (RUSTSEC-2021-0003), its SBOM signed with the release
    // key; and one nobody attested.
    let legacy = reg.push("shop-legacy", "1", "legacy service")?;
    let bom = serde_json::json!({
        "bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
        "components": [
            {"type": "library", "name": "smallvec", "version": "1.6.0", "purl": "pkg:cargo/smallvec@1.6.0"},
            {"type": "library", "name": "serde", "version": "1.0.200", "purl": "pkg:cargo/serde@1.0.200"},
        ]
    });
    reg.attest_with(
        signer,
        "shop-legacy",
        &legacy,
        "cyclonedx",
        &bom.to_string(),
    )?;
    reg.push("shop-unsigned", "1", "nobody attested this")?;
    let operator = images
        .iter()
        .find(|p| p.name == "palisade-operator")
        .context("no operator image")?;
    cp.with_temp_ns("sbom", |ns| {
        let manifests = [
            deployment("operator", &format!("{}@{}", operator.reference.rsplit_once(':').map_or(operator.reference.as_str(), |(r, _)| r), operator.digest)),
            // By digest: a tag that no kubelet reported a digest for is unknown.
            deployment("legacy", &format!("{}/shop-legacy@{legacy}", reg.host)),
            deployment("unsigned", &format!("{}/shop-unsigned:1", reg.host)),
        ]
        .join("---\n");
        let file = cp.work_dir.join(format!("{ns}-sbom.yaml"));
        std::fs::write(&file, manifests)?;
        run_ok(cp.kubectl().args(["apply", "-n", ns, "-f"]).arg(&file))?;
        cp.eventually("the three workloads' pods", std::time::Duration::from_secs(30), || {
            let out = run_ok(cp.kubectl().args(["get", "pods", "-n", ns, "-o", "name"])).ok()?;
            (out.lines().count() == 3).then_some(())
        })?;
        let sbom = |args: &[&str]| -> Result<(i32, Value)> {
            let out = run(Command::new(workspace_bin("palisade")?)
                .env("KUBECONFIG", &cp.kubeconfig)
                .args(["sbom", "-n", ns, "-o", "json", "--insecure-registry", &reg.host, "--key"])
                .arg(public)
                .args(args))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let v: Value = serde_json::from_str(&text).with_context(|| {
                format!("palisade sbom {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr))
            })?;
            Ok((out.status.code().unwrap_or(-1), v))
        };
        let status = |v: &Value, workload: &str| -> String {
            v.as_array()
                .into_iter()
                .flatten()
                .find(|a| a["workload"] == format!("Deployment {ns}/{workload}"))
                .map_or_else(
                    || "missing".to_owned(),
                    |a| a["status"].as_str().unwrap_or_default().to_owned(),
                )
        };
        let db = snapshot_dir();
        for (question, args) in [
            ("advisory", vec!["--advisory", "RUSTSEC-2021-0003", "--advisory-db", db.to_str().unwrap_or_default()]),
            ("package range", vec!["--package", "smallvec", "--range", "<1.6.1"]),
        ] {
            let (code, v) = sbom(&args)?;
            let got = ["operator", "legacy", "unsigned"].map(|w| status(&v, w));
            if got != ["not-affected", "affected", "unknown"] || code != 1 {
                bail!("palisade sbom ({question}): {got:?}, exit {code}: {v}");
            }
            eprintln!("  palisade sbom ({question}): operator not affected, legacy affected, unsigned unknown");
        }
        // A package nobody has: the verified ones are not affected, the unsigned one is still
        // unknown (exit 1: "not affected" cannot be said of every workload).
        let (code, v) = sbom(&["--package", "no-such-crate-anywhere"])?;
        let got = ["operator", "legacy", "unsigned"].map(|w| status(&v, w));
        if got != ["not-affected", "not-affected", "unknown"] || code != 1 {
            bail!("palisade sbom (a package nobody has): {got:?}, exit {code}: {v}");
        }
        // Listing: the operator's crates from its verified SBOM.
        let (_, v) = sbom(&[])?;
        let listed = v.to_string();
        if !listed.contains("\"ring ") || !listed.contains("\"smallvec 1.6.0\"") {
            bail!("palisade sbom did not list the components: {v}");
        }
        // Another key: nothing verifies, so every workload is unknown, none "not affected".
        let other = cp.work_dir.join("sbom-other.pub");
        std::fs::write(&other, rcgen::KeyPair::generate()?.public_key_pem())?;
        let out = run(Command::new(workspace_bin("palisade")?)
            .env("KUBECONFIG", &cp.kubeconfig)
            .args(["sbom", "-n", ns, "-o", "json", "--insecure-registry", &reg.host, "--key"])
            .arg(&other)
            .args(["--package", "smallvec"]))?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let got = ["operator", "legacy", "unsigned"].map(|w| status(&v, w));
        if got != ["unknown", "unknown", "unknown"] {
            bail!("palisade sbom with a key that signed nothing: {got:?}: {v}");
        }
        Ok(())
    })
}
