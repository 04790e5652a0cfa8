//! The background scan against the real API server and the PolicyReport CRD Kyverno publishes:
//! pods that ran before the webhook are reported per namespace with the mode their checks are
//! in; a forged report is put right; a deleted pod leaves the report, the last one takes it.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use palisade_e2e::{run, run_ok, webhook::WebhookProcess};
use serde_json::Value;

use crate::{Env, TestFn};

pub const TESTS: &[(&str, TestFn)] = &[(
    "reports::running_pods_are_reported_per_namespace",
    running_pods_are_reported_per_namespace,
)];

/// `name: check → (result, mode, message)` of the report `palisade` in `ns`.
fn results(report: &Value) -> Vec<(String, String, String, String, String)> {
    report["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                s(&r["resources"][0]["name"]),
                s(&r["rule"]),
                s(&r["result"]),
                s(&r["properties"]["mode"]),
                s(&r["message"]),
            )
        })
        .collect()
}

fn apply(env: &Env, ns: &str, name: &str, yaml: &str) -> Result<()> {
    let file = env.cp.work_dir.join(format!("reports-{ns}-{name}.yaml"));
    std::fs::write(&file, yaml)?;
    run_ok(env.cp.kubectl().args(["apply", "-n", ns, "-f"]).arg(&file))?;
    Ok(())
}

fn pod(name: &str, service_account: Option<&str>, env: &str) -> String {
    let sa = service_account.map_or(String::new(), |s| format!("  serviceAccountName: {s}\n"));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{sa}  containers:\n    - name: app\n      image: registry.example/app:1\n{env}"
    )
}

#[allow(clippy::too_many_lines)]
fn running_pods_are_reported_per_namespace(env: &Env) -> Result<()> {
    let cp = &env.cp;
    cp.with_temp_ns("reports", |ns| {
        // Ambient: the identity check asks only for a ServiceAccount of the pod's own; the
        // namespace measures first (Audit), as a team rolling Palisade out would.
        for label in [
            "istio.io/dataplane-mode=ambient",
            "palisade.dev/enforcement=Audit",
        ] {
            run_ok(cp.kubectl().args(["label", "namespace", ns, label]))?;
        }
        run_ok(cp.kubectl().args(["create", "serviceaccount", "orders", "-n", ns]))?;
        // Pods that were there before the webhook (none judges them on their way in).
        apply(env, ns, "good", &pod("good", Some("orders"), ""))?;
        apply(env, ns, "shared", &pod("shared", None, ""))?;
        apply(
            env,
            ns,
            "leaky",
            &pod(
                "leaky",
                Some("orders"),
                "      env:\n        - name: DB_PASSWORD\n          valueFrom: {secretKeyRef: {name: db, key: password}}\n",
            ),
        )?;
        // A forged report, all pass, that a tenant wrote before the scan.
        apply(
            env,
            ns,
            "forged",
            "apiVersion: wgpolicyk8s.io/v1alpha2\nkind: PolicyReport\nmetadata:\n  name: palisade\n  labels: {app.kubernetes.io/managed-by: palisade-webhook}\nsummary: {pass: 6}\nresults:\n  - {policy: palisade, rule: secrets-in-env, result: pass, source: palisade}\n",
        )?;
        let wh = WebhookProcess::start(
            cp,
            "reports",
            "policyReports: {enabled: true, intervalSeconds: 2}",
        )?;
        let get = || -> Option<Value> {
            let out = run_ok(cp.kubectl().args(["get", "policyreport", "palisade", "-n", ns, "-o", "json"])).ok()?;
            serde_json::from_str(&out).ok()
        };
        let report = cp
            .eventually("the namespace's PolicyReport", Duration::from_secs(30), || {
                get().filter(|r| results(r).len() == 6)
            })
            .with_context(|| format!("webhook log:\n{}", wh.log_tail()))?;
        let found = results(&report);
        let of = |name: &str, check: &str| {
            found
                .iter()
                .find(|r| r.0 == name && r.1 == check)
                .cloned()
                .with_context(|| format!("no {check} result for {name}: {found:?}"))
        };
        for check in ["workload-identity", "secrets-in-env"] {
            let good = of("good", check)?;
            if good.2 != "pass" {
                bail!("the compliant pod's {check}: {good:?}");
            }
        }
        let leaky = of("leaky", "secrets-in-env")?;
        if leaky.2 != "fail" || leaky.3 != "Audit" || !leaky.4.contains("Secret \"db\"") {
            bail!("the pod with a Secret in its environment: {leaky:?}");
        }
        let shared = of("shared", "workload-identity")?;
        if shared.2 != "fail" || shared.3 != "Audit" || !shared.4.contains("`default` ServiceAccount") {
            bail!("the pod on the default ServiceAccount: {shared:?}");
        }
        if report["summary"]["pass"] != 4 || report["summary"]["fail"] != 2 {
            bail!("summary {}", report["summary"]);
        }
        eprintln!("  the forged report replaced: 4 pass, 2 fail (Audit), each failure explained");
        // An edit after the scan is put right at the next one.
        run_ok(cp.kubectl().args([
            "patch", "policyreport", "palisade", "-n", ns, "--type", "json", "-p",
            r#"[{"op": "replace", "path": "/summary/fail", "value": 0}]"#,
        ]))?;
        cp.eventually("the edited report put right", Duration::from_secs(20), || {
            get().filter(|r| r["summary"]["fail"] == 2)
        })?;
        // A pod that goes takes its results; the last one takes the report.
        run_ok(cp.kubectl().args(["delete", "pod", "leaky", "-n", ns, "--wait=false"]))?;
        cp.eventually("leaky's results gone", Duration::from_secs(30), || {
            get().filter(|r| results(r).len() == 4 && r["summary"]["fail"] == 1)
        })?;
        run_ok(cp.kubectl().args(["delete", "pods", "--all", "-n", ns, "--wait=false"]))?;
        cp.eventually("the report deleted", Duration::from_secs(30), || {
            let out = run(cp.kubectl().args(["get", "policyreport", "palisade", "-n", ns])).ok()?;
            String::from_utf8_lossy(&out.stderr).contains("NotFound").then_some(())
        })?;
        // Nothing is reported for an exempt namespace.
        let exempt = run(cp.kubectl().args(["get", "policyreport", "palisade", "-n", "kube-system"]))?;
        if exempt.status.success() {
            bail!("a report in the exempt namespace kube-system");
        }
        eprintln!("  a deleted pod's results went with it; the last pod took the report");
        drop(wh);
        Ok(())
    })
}
