//! The background scan against the real API server and the PolicyReport CRD Kyverno publishes:
//! pods that ran before the webhook are reported per namespace with the mode their checks are
//! in, their images checked against an ImagePolicy over a real registry with images signed by
//! the real cosign; a forged report is put right; a deleted pod leaves the report, the last one
//! takes it; a namespace being deleted is left to its deletion.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    registry::{Layout, OciRegistry},
    run, run_ok,
    webhook::WebhookProcess,
};
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
    pod_running(name, service_account, "registry.example/app:1", env)
}

fn pod_running(name: &str, service_account: Option<&str>, image: &str, env: &str) -> String {
    let sa = service_account.map_or(String::new(), |s| format!("  serviceAccountName: {s}\n"));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{sa}  containers:\n    - name: app\n      image: {image}\n{env}"
    )
}

#[allow(clippy::too_many_lines)]
fn running_pods_are_reported_per_namespace(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let reg = OciRegistry::start(&env.opts.bin_dir, &cp.work_dir.join("registry-reports"))?;
    let public = std::fs::read_to_string(reg.key_pair("ci")?)?;
    let signed = reg.push_signed("ci", "shop/orders", "orders v1", None, Layout::Tags)?;
    reg.push("shop/unsigned", "v1", "unsigned")?;
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
        // Images under an ImagePolicy (Warn, lowered to Audit by the namespace's label): one
        // signed by its key, one not signed at all.
        let host = &reg.host;
        let policy = format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: ImagePolicy\nmetadata:\n  name: reports-{ns}\nspec:\n  mode: Warn\n  images: [{{glob: \"{host}/shop/**\"}}]\n  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}\n{}",
            crate::images::key_authority("ci", &public)
        );
        let file = cp.work_dir.join(format!("reports-policy-{ns}.yaml"));
        std::fs::write(&file, policy)?;
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        let signed_image = format!("{host}/shop/orders@{signed}");
        apply(env, ns, "signed", &pod_running("signed", Some("orders"), &signed_image, ""))?;
        let unsigned_image = format!("{host}/shop/unsigned:v1");
        apply(env, ns, "unsigned", &pod_running("unsigned", Some("orders"), &unsigned_image, ""))?;
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
            &format!(
                "policyReports: {{enabled: true, intervalSeconds: 2}}\n{}",
                reg.webhook_config()
            ),
        )?;
        let get = || -> Option<Value> {
            let out = run_ok(cp.kubectl().args(["get", "policyreport", "palisade", "-n", ns, "-o", "json"])).ok()?;
            serde_json::from_str(&out).ok()
        };
        let report = cp
            .eventually("the namespace's PolicyReport", Duration::from_secs(30), || {
                get().filter(|r| results(r).len() == 12)
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
        // Images: the signed one passes; the unsigned one fails with the policy's reason, in
        // the mode the namespace gives it; images no ImagePolicy covers get no image result.
        let signed = of("signed", "image-signature")?;
        if signed.2 != "pass" {
            bail!("the signed image: {signed:?}");
        }
        let unsigned = of("unsigned", "image-signature")?;
        if unsigned.2 != "fail"
            || unsigned.3 != "Audit"
            || !unsigned.4.contains(&format!("image policy reports-{ns} not satisfied"))
            || !unsigned.4.contains(&unsigned_image)
        {
            bail!("the unsigned image: {unsigned:?}");
        }
        if found.iter().any(|r| r.0 == "good" && r.1 == "image-signature") {
            bail!("an image result for an image no ImagePolicy covers: {found:?}");
        }
        if report["summary"]["pass"] != 9 || report["summary"]["fail"] != 3 {
            bail!("summary {}", report["summary"]);
        }
        eprintln!(
            "  the forged report replaced: 9 pass, 3 fail (Audit), each failure explained; the unsigned image: {}",
            unsigned.4
        );
        // An edit after the scan is put right at the next one (which marks a scan later on).
        let a_scan = || -> Result<()> {
            run_ok(cp.kubectl().args([
                "patch", "policyreport", "palisade", "-n", ns, "--type", "json", "-p",
                r#"[{"op": "replace", "path": "/summary/fail", "value": 0}]"#,
            ]))?;
            cp.eventually("the edited report put right", Duration::from_secs(20), || {
                get().filter(|r| r["summary"]["fail"] == 3)
            })?;
            Ok(())
        };
        a_scan()?;
        // A namespace being deleted is left as it is. Its pods go first, everything else after
        // them, so a pod bound to a node (a Node object no kubelet answers for) keeps it
        // terminating, with its report, for as long as the test needs. The API server refuses
        // every new object in it: the scans neither write a report there nor delete the one it
        // has (the deletion takes it).
        let leaving = format!("{ns}-leaving");
        let node = format!("{ns}-node");
        let node_file = cp.work_dir.join(format!("reports-{node}.yaml"));
        std::fs::write(&node_file, format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n"))?;
        run_ok(cp.kubectl().arg("create").arg("-f").arg(&node_file))?;
        run_ok(cp.kubectl().args(["create", "namespace", &leaving]))?;
        let held = format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: held\nspec:\n  nodeName: {node}\n  containers:\n    - name: app\n      image: registry.example/app:1\n");
        apply(env, &leaving, "held", &held)?;
        let leaving_report = || {
            run(cp.kubectl().args(["get", "policyreport", "palisade", "-n", &leaving]))
                .is_ok_and(|o| o.status.success())
        };
        let terminating = (|| -> Result<(bool, bool, String, String)> {
            cp.eventually("the report of the namespace to delete", Duration::from_secs(30), || {
                leaving_report().then_some(())
            })?;
            run_ok(cp.kubectl().args(["delete", "namespace", &leaving, "--wait=false"]))?;
            a_scan()?;
            let kept = leaving_report();
            // Without its report, a scan that judged the namespace would create one.
            run_ok(cp.kubectl().args(["delete", "policyreport", "palisade", "-n", &leaving]))?;
            a_scan()?;
            a_scan()?;
            Ok((
                kept,
                leaving_report(),
                run_ok(cp.kubectl().args(["get", "namespace", &leaving, "-o", "jsonpath={.status.phase}"]))?,
                run_ok(cp.kubectl().args([
                    "get", "pod", "held", "-n", &leaving, "-o",
                    "jsonpath={.status.phase} {.metadata.deletionTimestamp}",
                ]))?,
            ))
        })();
        // What the webhook logged up to now has reached the file once the log's flush interval
        // has passed.
        std::thread::sleep(palisade_webhook::log::FLUSH_AFTER * 4);
        let log = std::fs::read_to_string(&wh.log)?;
        let _ = run(cp.kubectl().args(["delete", "pod", "held", "-n", &leaving, "--grace-period=0", "--force"]));
        let _ = run(cp.kubectl().args(["delete", "node", &node, "--wait=false"]));
        let (kept, written, phase, pod) = terminating?;
        if phase != "Terminating" || !pod.starts_with("Pending ") || pod.trim_end().ends_with("Pending") {
            bail!("namespace {leaving} is {phase:?}, its pod {pod:?}: not a terminating namespace with a live pod, the check proves nothing");
        }
        if !kept {
            bail!("the report of the terminating namespace {leaving} was deleted before its pods were");
        }
        if written {
            bail!("a PolicyReport written into the terminating namespace {leaving}");
        }
        if let Some(line) = log.lines().find(|l| l.contains("not written") && l.contains(&leaving)) {
            bail!("the scan tried to write into the terminating namespace: {line}");
        }
        eprintln!("  a namespace being deleted, with a live pod: its report left to the deletion, and no scan tried to write one");
        // A pod that goes takes its results; the last one takes the report.
        run_ok(cp.kubectl().args(["delete", "pod", "leaky", "-n", ns, "--wait=false"]))?;
        cp.eventually("leaky's results gone", Duration::from_secs(30), || {
            get().filter(|r| results(r).len() == 10 && r["summary"]["fail"] == 2)
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
        run_ok(cp.kubectl().args(["delete", "imagepolicy", &format!("reports-{ns}")]))?;
        Ok(())
    })
}
