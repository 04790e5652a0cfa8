//! Installing beside a cluster's own infrastructure, and the staged rollout: the chart's
//! webhook registrations and webhook configuration exactly as `helm template` renders them
//! (namespace selectors, match conditions, per-check modes), served by the real webhook here.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    ControlPlane, accepts, rejects, repo_root, run, run_ok, webhook::WebhookProcess,
};
use serde::Deserialize as _;

use crate::Env;

/// The namespaces of the infrastructure a real cluster runs, each with a workload as its
/// project ships it: no Palisade identity, some with a Secret in the environment.
const INFRASTRUCTURE: &[(&str, &str, bool)] = &[
    ("istio-system", "istiod", false),
    ("envoy-gateway-system", "envoy-gateway", false),
    ("cert-manager", "cert-manager-webhook", false),
    ("argocd", "argocd-repo-server", true),
    ("openbao", "openbao-agent-injector", false),
    ("spire", "spire-server", true),
    ("kube-public", "kube-public-probe", false),
];

fn deployment(name: &str, secret_env: bool) -> String {
    let env = if secret_env {
        "          env:\n            - name: REDIS_PASSWORD\n              valueFrom: {secretKeyRef: {name: redis, key: auth}}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n        - name: main\n          image: registry.example.com/{name}:1\n{env}"
    )
}

fn apply(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    yaml: &str,
    extra: &[&str],
) -> Result<std::process::Output> {
    let file = cp.work_dir.join(format!("staged-{ns}-{name}.yaml"));
    std::fs::write(&file, yaml)?;
    run(cp
        .kubectl()
        .args(["apply", "-n", ns])
        .args(extra)
        .arg("-f")
        .arg(&file))
}

/// The webhook configuration file and the webhook registrations the chart renders with `sets`.
fn render(env: &Env, sets: &[String]) -> Result<(String, String)> {
    let cp = &env.cp;
    let mut cmd = Command::new(env.opts.bin_dir.join("helm"));
    cmd.env("HELM_CACHE_HOME", cp.work_dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", cp.work_dir.join("helm/config"))
        .env("HELM_DATA_HOME", cp.work_dir.join("helm/data"))
        .args([
            "template",
            "palisade",
            "-n",
            "palisade-system",
            "--kube-version",
            "1.36.3",
        ])
        .arg(repo_root().join("charts/palisade"));
    for set in sets {
        cmd.args(["--set", set]);
    }
    let rendered = run_ok(&mut cmd)?;
    let mut config = None;
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        let v = serde_json::Value::deserialize(doc)?;
        if v["kind"] == "ConfigMap" && v["metadata"]["name"] == "palisade-webhook" {
            let text = v["data"]["config.yaml"].as_str().context("config.yaml")?;
            // Served here: this process's address, certificate, metrics on the HTTPS port, no
            // election and no background scan; the rest as rendered.
            let mut map: serde_yaml::Mapping = serde_yaml::from_str(text)?;
            for key in [
                "listen",
                "metricsListen",
                "tls",
                "leaderElection",
                "policyReports",
            ] {
                map.remove(key);
            }
            config = Some(serde_yaml::to_string(&map)?);
        }
    }
    Ok((config.context("no webhook ConfigMap rendered")?, rendered))
}

fn label(
    cp: &ControlPlane,
    ns: &str,
    value: &str,
    as_user: &[&str],
) -> Result<std::process::Output> {
    run(cp
        .kubectl()
        .args(as_user)
        .args(["label", "namespace", ns, "--overwrite"])
        .arg(format!("palisade.dev/enforcement{value}")))
}

#[allow(clippy::too_many_lines)]
pub fn beside_cluster_infrastructure_and_staged(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let suffix = palisade_e2e::unique_suffix();
    let (enforced, warned, audited, legacy) = (
        format!("shop-{suffix}"),
        format!("pilot-{suffix}"),
        format!("measure-{suffix}"),
        format!("legacy-{suffix}"),
    );
    for ns in INFRASTRUCTURE.iter().map(|i| i.0).chain([
        enforced.as_str(),
        warned.as_str(),
        audited.as_str(),
        legacy.as_str(),
    ]) {
        // Other tests may have made the infrastructure namespaces already.
        let _ = run(cp.kubectl().args(["create", "namespace", ns]));
    }
    // The chart's defaults, with one per-namespace mode: the identity check only warns in
    // `legacy` (its secrets check still enforces).
    let (config, rendered) = render(env, &[format!("webhook.identity.namespaces.{legacy}=Warn")])?;
    let wh = WebhookProcess::start(cp, "staged", &config)?;
    wh.register_rendered(cp, "palisade-staged", &rendered)?;
    let result = (|| -> Result<()> {
        let mut attempt = 0;
        cp.eventually(
            "the chart's registration to be used",
            Duration::from_secs(30),
            || {
                attempt += 1;
                let out = apply(
                    cp,
                    &enforced,
                    &format!("probe-{attempt}"),
                    &deployment(&format!("probe-{attempt}"), false),
                    &[],
                )
                .ok()?;
                (!out.status.success()).then_some(())
            },
        )?;

        // Argo CD's health check for Palisade's kinds, as docs/install.md says to register it: the
        // block form is a valid argocd-cm; the split key with a wildcard is not a ConfigMap key.
        let argocd_cm = repo_root().join("argocd/argocd-cm.yaml");
        accepts(
            &run(cp
                .kubectl()
                .args(["apply", "--dry-run=server", "-f"])
                .arg(&argocd_cm))?,
            "argocd/argocd-cm.yaml",
        )?;
        let split = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: argocd-cm, namespace: argocd}\ndata:\n  resource.customizations.health.palisade.dev_*: 'return {}'\n";
        rejects(
            &apply(cp, "argocd", "split-key", split, &["--dry-run=server"])?,
            "a split health key with a wildcard",
            &["a valid config key must consist of alphanumeric characters"],
        )?;
        // The infrastructure is admitted as its projects ship it ...
        for (ns, name, secret) in INFRASTRUCTURE {
            accepts(
                &apply(cp, ns, name, &deployment(name, *secret), &[])?,
                &format!("{name} in {ns}"),
            )?;
        }
        // ... while a workload in an ordinary namespace is refused for what it lacks.
        let out = apply(cp, &enforced, "web", &deployment("web", true), &[])?;
        rejects(
            &out,
            "a workload without identity, with a Secret in env",
            &[
                &format!("spiffe://cluster.local/ns/{enforced}/sa/default"),
                "env REDIS_PASSWORD",
            ],
        )?;
        // Per-namespace mode from the values: identity warns, secrets refuse.
        let out = apply(cp, &legacy, "old", &deployment("old", false), &[])?;
        accepts(
            &out,
            "a workload without identity where the identity check warns",
        )?;
        let warned_text = String::from_utf8_lossy(&out.stderr).to_string();
        if !warned_text.contains("Warning:") || !warned_text.contains("spiffe://") {
            bail!("no identity warning for {legacy}: {warned_text}");
        }
        rejects(
            &apply(cp, &legacy, "leaky", &deployment("leaky", true), &[])?,
            "a Secret in env where only the identity check warns",
            &["env REDIS_PASSWORD"],
        )?;

        // A tenant who may create and label namespaces (as namespace-provisioning tools grant)
        // cannot turn enforcement down, off, or on, nor create a namespace with it.
        let tenant = [
            "--as=alice",
            "--as-group=system:authenticated",
            "--as-group=tenants",
        ];
        let role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: staged-namespace-provisioner\nrules:\n  - apiGroups: [\"\"]\n    resources: [namespaces]\n    verbs: [get, list, create, patch, update]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: staged-namespace-provisioner\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: staged-namespace-provisioner}\nsubjects:\n  - {apiGroup: rbac.authorization.k8s.io, kind: Group, name: tenants}\n";
        accepts(
            &apply(cp, "default", "provisioner", role, &[])?,
            "the tenant's ClusterRole",
        )?;
        for value in ["=Audit", "=Warn", "=Enforce"] {
            rejects(
                &label(cp, &enforced, value, &tenant)?,
                &format!("a tenant labelling {enforced} {value}"),
                &["\"alice\" is not allowed to change enforcement"],
            )?;
        }
        let own = format!("tenant-{suffix}");
        let ns_yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {own}\n  labels: {{palisade.dev/enforcement: Audit}}\n"
        );
        let file = cp.work_dir.join(format!("staged-{own}.yaml"));
        std::fs::write(&file, &ns_yaml)?;
        rejects(
            &run(cp.kubectl().args(tenant).arg("create").arg("-f").arg(&file))?,
            "a tenant creating a namespace that audits only",
            &["is not allowed to change enforcement"],
        )?;
        if run(cp.kubectl().args(["get", "namespace", &own]))?
            .status
            .success()
        {
            bail!("the refused namespace {own} exists");
        }
        // Nor claim an exempt name the cluster does not use yet (nothing in it would be judged).
        rejects(
            &run(cp
                .kubectl()
                .args(tenant)
                .args(["create", "namespace", "spire-system"]))?,
            "a tenant creating a namespace under an exempt name",
            &["exempt from Palisade's checks"],
        )?;
        // Everything else about a namespace stays the tenant's.
        accepts(
            &run(cp
                .kubectl()
                .args(tenant)
                .args(["label", "namespace", &enforced, "team=shop"]))?,
            "a tenant's other label",
        )?;
        // The administrator may, and a value that names no mode is refused even for them.
        rejects(
            &label(cp, &warned, "=Off", &[])?,
            "an administrator's label that names no mode",
            &["is not a mode"],
        )?;
        accepts(
            &label(cp, &warned, "=Warn", &[])?,
            "an administrator's Warn",
        )?;
        accepts(
            &label(cp, &audited, "=Audit", &[])?,
            "an administrator's Audit",
        )?;

        // Warn: admitted, the client told why; Audit: admitted, nothing told, recorded.
        let out = apply(cp, &warned, "pilot", &deployment("pilot", true), &[])?;
        accepts(&out, "a non-compliant workload where the namespace warns")?;
        let told = String::from_utf8_lossy(&out.stderr).to_string();
        if !told.contains("Warning:") || !told.contains("env REDIS_PASSWORD") {
            bail!("no warning in {warned}: {told}");
        }
        let out = apply(cp, &audited, "measured", &deployment("measured", true), &[])?;
        accepts(&out, "a non-compliant workload where the namespace audits")?;
        if String::from_utf8_lossy(&out.stderr).contains("Warning:") {
            bail!(
                "an audited namespace warned: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cp.eventually("the audit record", Duration::from_secs(10), || {
            wh.log_text()
                .lines()
                .any(|l| {
                    l.contains("\"verdict\":\"audit\"")
                        && l.contains(&audited)
                        && l.contains("env REDIS_PASSWORD")
                })
                .then_some(())
        })?;
        // Every change of the label is a security event naming who made it.
        cp.eventually(
            &format!("the change of {audited}'s enforcement logged"),
            Duration::from_secs(10),
            || {
                wh.log_text()
                    .lines()
                    .any(|l| l.contains("namespace enforcement changed") && l.contains(&audited))
                    .then_some(())
            },
        )?;
        // Every namespace a label turns down is reported as the webhook sees it (also one
        // labelled before the webhook was installed), and the metrics count them.
        cp.eventually(
            "the lowered namespace reported",
            Duration::from_secs(10),
            || {
                wh.log_text()
                    .lines()
                    .any(|l| {
                        l.contains("namespace enforcement lowered by its label")
                            && l.contains(&audited)
                    })
                    .then_some(())
            },
        )?;
        let (_, metrics) = wh.curl(&["/metrics"])?;
        for mode in ["Audit", "Warn"] {
            let line = format!("palisade_webhook_namespace_enforcement{{mode=\"{mode}\"}} ");
            let count: u32 = metrics
                .lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .and_then(|n| n.trim().parse().ok())
                .with_context(|| format!("no {line} in /metrics"))?;
            if count == 0 {
                bail!("{line}0 with a namespace labelled {mode}");
            }
        }
        // Back to Enforce: refused again.
        accepts(
            &label(cp, &audited, "-", &[])?,
            "an administrator removing the label",
        )?;
        rejects(
            &apply(cp, &audited, "again", &deployment("again", true), &[])?,
            "a non-compliant workload once the label is gone",
            &["env REDIS_PASSWORD"],
        )?;

        // Opt-in: only labelled namespaces are judged.
        let (_, rendered) = render(env, &["webhook.namespaceSelection=Labelled".to_owned()])?;
        wh.register_rendered(cp, "palisade-staged", &rendered)?;
        accepts(
            &label(cp, &audited, "=Enforce", &[])?,
            "an administrator opting a namespace in",
        )?;
        cp.eventually(
            "the opt-in registration to be used",
            Duration::from_secs(30),
            || {
                let out = apply(
                    cp,
                    &enforced,
                    "unlabelled",
                    &deployment("unlabelled", true),
                    &[],
                )
                .ok()?;
                out.status.success().then_some(())
            },
        )?;
        rejects(
            &apply(cp, &audited, "opted-in", &deployment("opted-in", true), &[])?,
            "a non-compliant workload in an opted-in namespace",
            &["env REDIS_PASSWORD"],
        )?;
        Ok(())
    })();
    let result = wh.unregister_after(cp, "palisade-staged", result);
    let _ = run(cp.kubectl().args([
        "delete",
        "clusterrole,clusterrolebinding",
        "staged-namespace-provisioner",
        "--ignore-not-found",
    ]));
    // Only there if the refusal above failed.
    let _ = run(cp.kubectl().args([
        "delete",
        "namespace",
        "spire-system",
        "--ignore-not-found",
        "--wait=false",
    ]));
    for (ns, name, _) in INFRASTRUCTURE {
        let _ = run(cp.kubectl().args([
            "delete",
            "deployment",
            name,
            "-n",
            ns,
            "--ignore-not-found",
            "--wait=false",
        ]));
    }
    for ns in [&enforced, &warned, &audited, &legacy] {
        let _ = run(cp
            .kubectl()
            .args(["delete", "namespace", ns, "--wait=false"]));
    }
    result
}
