//! The CRDs as part of the release, on a control plane of their own (CRDs are cluster-wide, and
//! the shared one holds the harness's): an older chart whose RateLimitPolicy CRD lacks
//! `spec.backend` installs them; `helm upgrade` to this chart adds the field; the ImagePolicy
//! that needs them is created right after them and adopted by the release on the upgrade;
//! uninstalling leaves the CRDs and the policies.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    accepts,
    controlplane::{ControlPlane, Options},
    rejects, repo_root, run, run_ok,
};

use crate::Env;

const NS: &str = "palisade-system";
const RLP_CRD: &str = "ratelimitpolicies.palisade.dev";

/// The chart copied to `dir` as an older version whose RateLimitPolicy CRD has no `backend`.
fn older_chart(dir: &Path) -> Result<()> {
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(repo_root().join("charts/palisade"))
            .arg(dir),
    )?;
    let file = dir.join(format!("files/crds/{RLP_CRD}.yaml"));
    let mut crd: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&file)?)?;
    let spec = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let removed = spec
        .as_mapping_mut()
        .and_then(|m| m.remove("backend"))
        .is_some();
    if !removed {
        bail!("the RateLimitPolicy CRD has no spec.backend to take away");
    }
    std::fs::write(&file, serde_yaml::to_string(&crd)?)?;
    let chart = dir.join("Chart.yaml");
    let text = std::fs::read_to_string(&chart)?;
    std::fs::write(
        &chart,
        text.replace("\nversion: ", "\nversion: 0.0.1-old\n# was: "),
    )?;
    Ok(())
}

pub fn crds_upgrade_with_the_release(env: &Env) -> Result<()> {
    let opts = Options {
        bin_dir: env.opts.bin_dir.clone(),
        controller_manager: false,
        ..Options::new()
    };
    let cp = ControlPlane::start(&opts)?;
    let helm = || cp.helm();
    let old = cp.work_dir.join("chart-old");
    older_chart(&old)?;
    let key = cp.work_dir.join("release-key.pub");
    std::fs::write(&key, rcgen::KeyPair::generate()?.public_key_pem())?;
    let installed = run(helm()
        .args(["install", "palisade", "-n", NS, "--create-namespace"])
        .arg(&old)
        .args(["--set", "imagePolicy.enabled=true", "--set-file"])
        .arg(format!("imagePolicy.publicKey={}", key.display())))?;
    accepts(&installed, "helm install of the older chart, CRDs included")?;
    // The ImagePolicy, whose CRD came in the same step: created after it (a hook), not yet an
    // object of the release.
    run_ok(cp.kubectl().args(["get", "imagepolicy", "palisade-images"]))
        .context("the first install left Palisade's images unguarded")?;
    let manifest = run_ok(helm().args(["get", "manifest", "palisade", "-n", NS]))?;
    if manifest.contains("\nkind: ImagePolicy\n") {
        bail!("the ImagePolicy is an object of the first release, though its CRD came with it");
    }
    let crd = |jsonpath: &str| {
        run_ok(
            cp.kubectl()
                .args(["get", "crd", RLP_CRD, "-o", &format!("jsonpath={jsonpath}")]),
        )
    };
    let keep = crd(
        r"{.metadata.annotations.helm\.sh/resource-policy} {.metadata.labels.app\.kubernetes\.io/managed-by}",
    )?;
    if keep != "keep Helm" {
        bail!("the release's CRD is not kept on uninstall and owned by Helm: {keep:?}");
    }
    let backend =
        r"{.spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.backend.type}";
    if !crd(backend)?.is_empty() {
        bail!("the older chart's CRD already has spec.backend");
    }
    let policy = cp.work_dir.join("rlp.yaml");
    run_ok(cp.kubectl().args(["create", "namespace", "shop"]))?;
    std::fs::write(
        &policy,
        "apiVersion: palisade.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: api, namespace: shop}\n\
         spec:\n  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: api}\n  backend: IstioLocal\n  \
         limits: [{name: all, requests: 10, per: 1s}]\n",
    )?;
    let apply = || {
        run(cp
            .kubectl()
            .args(["apply", "--validate=strict", "-f"])
            .arg(&policy))
    };
    rejects(
        &apply()?,
        "spec.backend before the upgrade",
        &["unknown field \"spec.backend\""],
    )?;

    let upgraded = run(helm()
        .args(["upgrade", "palisade", "-n", NS, "--reuse-values"])
        .arg(repo_root().join("charts/palisade")))?;
    accepts(&upgraded, "helm upgrade to this chart")?;
    if crd(backend)? != "string" {
        bail!("helm upgrade did not bring the CRD's new field spec.backend");
    }
    // The API server serves the new schema a moment after the CRD changes.
    let stored = cp.eventually(
        "spec.backend accepted",
        std::time::Duration::from_secs(20),
        || {
            apply().ok().filter(|o| o.status.success())?;
            run_ok(cp.kubectl().args([
                "get",
                "ratelimitpolicy",
                "api",
                "-n",
                "shop",
                "-o",
                "jsonpath={.spec.backend}",
            ]))
            .ok()
            .filter(|b| b == "IstioLocal")
        },
    )?;
    eprintln!("  helm upgrade updated the CRD: spec.backend stored as {stored}");
    // The ImagePolicy: adopted by the release (its ownership was set when the hook made it).
    let manifest = run_ok(helm().args(["get", "manifest", "palisade", "-n", NS]))?;
    if !manifest.contains("\nkind: ImagePolicy\n") {
        bail!("after the upgrade the release still has no ImagePolicy");
    }
    run_ok(cp.kubectl().args(["get", "imagepolicy", "palisade-images"]))?;

    uninstall_keeps_crds_and_policies(&cp, &helm)
}

/// `helm uninstall`: the CRDs (resource-policy keep) and a policy stay; the release's own
/// ImagePolicy goes.
fn uninstall_keeps_crds_and_policies(cp: &ControlPlane, helm: &dyn Fn() -> Command) -> Result<()> {
    accepts(
        &run(helm().args(["uninstall", "palisade", "-n", NS]))?,
        "helm uninstall",
    )?;
    for crd in [
        "authpolicies.palisade.dev",
        RLP_CRD,
        "secretbindings.palisade.dev",
        "imagepolicies.palisade.dev",
    ] {
        run_ok(cp.kubectl().args(["get", "crd", crd]))
            .with_context(|| format!("helm uninstall removed CRD {crd} (resource-policy keep)"))?;
    }
    run_ok(
        cp.kubectl()
            .args(["get", "ratelimitpolicy", "api", "-n", "shop"]),
    )
    .context("the RateLimitPolicy went with the release")?;
    let left = run(cp.kubectl().args(["get", "imagepolicy", "palisade-images"]))?;
    if left.status.success() {
        bail!("helm uninstall left the release's own ImagePolicy behind");
    }
    eprintln!(
        "  helm uninstall: CRDs and the RateLimitPolicy kept, the release's ImagePolicy removed"
    );
    Ok(())
}
