//! The Helm chart against the real control plane: lint, schema refusals, server-side dry run,
//! install, upgrade and uninstall; the operator and the webhook run as the chart's
//! ServiceAccounts (their own tokens, so only the chart's RBAC applies) and the API server's
//! audit log of their requests is compared with the rules the chart grants; the operator issues
//! the webhook certificate and patches the caBundle; and an AuthPolicy applied the way Argo CD
//! applies it shows no diff once the operator has reconciled it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use palisade_e2e::{
    accepts, controlplane::free_port, operator::OperatorProcess, rejects, repo_root, run, run_ok,
    webhook::WebhookProcess,
};
use serde::Deserialize as _;

use crate::{Env, TestFn};

mod crds;
mod staged;

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "chart::installs_runs_with_least_privilege_and_uninstalls",
        installs_runs_with_least_privilege_and_uninstalls,
    ),
    (
        "chart::beside_cluster_infrastructure_and_staged",
        staged::beside_cluster_infrastructure_and_staged,
    ),
    (
        "chart::rendered_chart_passes_its_own_admission_policy",
        rendered_chart_passes_its_own_admission_policy,
    ),
    (
        "chart::crds_upgrade_with_the_release",
        crds::crds_upgrade_with_the_release,
    ),
    (
        "chart::values_reference_is_current",
        values_reference_is_current,
    ),
];

/// docs/install.md's values reference is the one generated from values.schema.json.
fn values_reference_is_current(_env: &Env) -> Result<()> {
    use palisade_e2e::chartdoc::{BEGIN, END, values_reference};
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root().join("charts/palisade/values.schema.json"),
    )?)?;
    let want = values_reference(&schema);
    let page = std::fs::read_to_string(repo_root().join("docs/install.md"))?;
    let have = page
        .split_once(BEGIN)
        .and_then(|(_, rest)| rest.split_once(END))
        .map(|(table, _)| table.trim_start_matches('\n'))
        .context("docs/install.md has no values reference markers")?;
    if have != want {
        bail!(
            "docs/install.md's values reference is stale: paste the output of `cargo run -q -p palisade-e2e -- values-doc` between its markers"
        );
    }
    Ok(())
}

const NS: &str = "palisade-system";

/// The chart's values for cert-manager certificates, SPIRE identities and a Vault.
const FULL_VARIANT: &[&str] = &[
    "certificates.source=certManager",
    "identitySource=Spire",
    "operator.vault.address=https://openbao.example:8200",
    "operator.vault.role=palisade-operator",
    "operator.vault.serviceAccount.namespace=palisade-system",
    "operator.vault.serviceAccount.name=palisade-operator",
];
const OPERATOR_SA: &str = "system:serviceaccount:palisade-system:palisade-operator";
const WEBHOOK_SA: &str = "system:serviceaccount:palisade-system:palisade-webhook";

/// Grants this test may not exercise: reads by name of generated objects (made only while a
/// cache fills or right after an apply, so they depend on timing), kinds the examples never produce (the OPA policy
/// ConfigMap, SPIRE registrations, envoy filters), finalizers (SPIRE and Vault only), Event
/// series, key material and pull secrets read by the webhook (exercised in the image tests),
/// and pruning. Anything else granted must be used.
const NOT_EXERCISED: &[&str] = &[
    "operator get configmaps",
    "operator get security.istio.io/authorizationpolicies",
    "operator get security.istio.io/requestauthentications",
    "operator get security.istio.io/peerauthentications",
    "operator get networking.istio.io/envoyfilters",
    "operator get gateway.envoyproxy.io/backendtrafficpolicies",
    "operator get spire.spiffe.io/clusterspiffeids",
    "operator create configmaps",
    "operator patch configmaps",
    "operator delete configmaps",
    "operator patch events.k8s.io/events",
    "operator patch palisade.dev/authpolicies",
    "operator patch palisade.dev/ratelimitpolicies",
    "webhook get configmaps",
    "webhook get secrets",
    "webhook patch wgpolicyk8s.io/policyreports",
    "webhook delete wgpolicyk8s.io/policyreports",
    "webhook get serviceaccounts",
    "operator create security.istio.io/requestauthentications",
    "operator create security.istio.io/peerauthentications",
    "operator create networking.istio.io/envoyfilters",
    "operator create spire.spiffe.io/clusterspiffeids",
    "operator delete security.istio.io/authorizationpolicies",
    "operator delete security.istio.io/requestauthentications",
    "operator delete security.istio.io/peerauthentications",
    "operator delete networking.istio.io/envoyfilters",
    "operator delete gateway.envoyproxy.io/backendtrafficpolicies",
    "operator delete spire.spiffe.io/clusterspiffeids",
    "operator patch spire.spiffe.io/clusterspiffeids",
    "operator patch networking.istio.io/envoyfilters",
    "operator patch security.istio.io/peerauthentications",
    "operator patch palisade.dev/secretbindings",
    "operator patch palisade.dev/secretbindings/status",
    "operator update coordination.k8s.io/leases",
    "webhook update coordination.k8s.io/leases",
];

#[allow(clippy::too_many_lines)]
fn installs_runs_with_least_privilege_and_uninstalls(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let chart = repo_root().join("charts/palisade");
    let helm = || cp.helm();

    // The chart's CRDs are the generated ones.
    for entry in std::fs::read_dir(repo_root().join("crds"))? {
        let path = entry?.path();
        let name = path.file_name().context("file name")?;
        let copy = chart.join("files/crds").join(name);
        if std::fs::read(&path)? != std::fs::read(&copy).unwrap_or_default() {
            bail!(
                "{} differs from {}: cp crds/*.yaml charts/palisade/files/crds/",
                copy.display(),
                path.display()
            );
        }
    }
    accepts(
        &run(helm().arg("lint").arg(&chart).arg("--strict"))?,
        "helm lint",
    )?;
    // values.schema.json refuses bad values before anything is applied.
    for (set, needle) in [
        ("webhook.failurePolicy=Ignore", "value must be 'Fail'"),
        ("webhook.replicas=1", "minimum: got 1, want 2"),
        ("certificates.source=selfmade", "certificates/source"),
        (
            "webhok.replicas=3",
            "additional properties 'webhok' not allowed",
        ),
        (
            "networkPolicy.egress.enabled=true",
            "'/networkPolicy/apiServerCIDRs': minItems: got 0, want 1",
        ),
        (
            "operator.vault.adress=https://vault:8200",
            "additional properties 'adress' not allowed",
        ),
        (
            "operator.settings.meshPathNormalization=NONE",
            "meshPathNormalization",
        ),
        (
            "operator.settings.trustDomain=other.example",
            "additional properties 'trustDomain' not allowed",
        ),
        (
            "webhook.images.registryCAs.registry\\.corp=not a certificate",
            "BEGIN CERTIFICATE",
        ),
        (
            "webhook.images.registryCAFiles.registry\\.corp=/etc/ca.pem",
            "additional properties 'registryCAFiles' not allowed",
        ),
    ] {
        let out = run(helm()
            .args(["template", "x"])
            .arg(&chart)
            .args(["--set", set]))?;
        rejects(&out, &format!("helm template --set {set}"), &[needle])?;
    }
    // A CA ConfigMap is mounted where the configuration that reads it says: for the webhook's
    // client certificates, and as the operator's only Vault CA.
    for (sets, needles) in [
        (
            &["webhook.clientCAConfigMap=apiserver-webhook-ca"][..],
            [
                "clientCAFile: /etc/palisade/client-ca/ca.crt",
                "mountPath: /etc/palisade/client-ca",
                "name: apiserver-webhook-ca",
            ],
        ),
        (
            &[
                "webhook.priorityClassName=system-cluster-critical",
                "webhook.serviceAccount.annotations.iam\\.gke\\.io/gcp-service-account=wh@p.iam",
                "global.imageRegistry=mirror.example",
            ][..],
            [
                "priorityClassName: system-cluster-critical",
                "iam.gke.io/gcp-service-account: wh@p.iam",
                "aggregate-to-edit: \"true\"",
            ],
        ),
        (
            &["logging.level=debug", "logging.format=text"][..],
            [
                "value: \"debug,kube=warn\"",
                "name: PALISADE_LOG_FORMAT",
                "value: text",
            ],
        ),
        (
            &[
                "operator.vaultCAConfigMap=vault-ca",
                "operator.vault.address=https://vault.example:8200",
                "operator.vault.role=palisade-operator",
                "operator.vault.serviceAccount.namespace=palisade-system",
                "operator.vault.serviceAccount.name=palisade-operator",
            ][..],
            [
                "caFile: /etc/palisade/vault-ca/ca.crt",
                "mountPath: /etc/palisade/vault-ca",
                "name: vault-ca",
            ],
        ),
    ] {
        let mut cmd = helm();
        cmd.args(["template", "x", "--kube-version", "1.36.3"])
            .arg(&chart);
        for set in sets {
            cmd.args(["--set", set]);
        }
        let rendered = run_ok(&mut cmd)?;
        if let Some(needle) = needles.iter().find(|n| !rendered.contains(*n)) {
            bail!(
                "helm template --set {} lacks {needle:?}",
                sets.join(" --set ")
            );
        }
    }
    // A private registry's CA: a ConfigMap, mounted, named in the configuration for that host.
    let ca_file = cp.work_dir.join("chart-registry-ca.pem");
    std::fs::write(
        &ca_file,
        rcgen::generate_simple_self_signed(vec!["registry.corp.example".to_owned()])?
            .cert
            .pem(),
    )?;
    let rendered = run_ok(
        helm()
            .args(["template", "x", "--kube-version", "1.36.3"])
            .arg(&chart)
            .arg("--set-file")
            .arg(format!(
                "webhook.images.registryCAs.registry\\.corp\\.example:5000={}",
                ca_file.display()
            )),
    )?;
    for needle in [
        "registryCAFiles:\n        registry.corp.example:5000: /etc/palisade/registry-ca/0.pem",
        "mountPath: /etc/palisade/registry-ca",
        "name: x-webhook-registry-ca",
        "0.pem: \"-----BEGIN CERTIFICATE-----",
    ] {
        if !rendered.contains(needle) {
            bail!("helm template with a registry CA lacks {needle:?}");
        }
    }
    if rendered.contains("registryCAs") {
        bail!("the webhook configuration carries the chart's registryCAs value itself");
    }
    // Other tests may have made it already (the Vault tests keep their operator account there).
    if run(cp.kubectl().args(["get", "namespace", NS]))?
        .status
        .success()
    {
        eprintln!("  namespace {NS} exists already");
    } else {
        run_ok(cp.kubectl().args(["create", "namespace", NS]))?;
    }
    let key = cp.work_dir.join("chart-release-key.pub");
    std::fs::write(&key, rcgen::KeyPair::generate()?.public_key_pem())?;
    // Both certificate sources, the optional ImagePolicy and ServiceMonitor, against the real
    // schemas (cert-manager's and the Prometheus Operator's CRDs included).
    for (variant, sets) in [
        ("defaults", vec![]),
        (
            "cert-manager, SPIRE, Vault, own ImagePolicy, ServiceMonitor",
            [
                FULL_VARIANT,
                &[
                    "imagePolicy.enabled=true",
                    "metrics.serviceMonitor.enabled=true",
                    "networkPolicy.egress.enabled=true",
                    "networkPolicy.apiServerCIDRs={127.0.0.1/32}",
                ][..],
            ]
            .concat(),
        ),
    ] {
        let mut cmd = helm();
        cmd.args(["template", "palisade", "-n", NS, "--kube-version", "1.36.3"])
            .arg(&chart);
        for set in &sets {
            cmd.args(["--set", set]);
        }
        if !sets.is_empty() {
            // The cluster serves the ImagePolicy kind already (as `helm install` would see).
            cmd.args(["--api-versions", "palisade.dev/v1alpha1/ImagePolicy"])
                .arg("--set-file")
                .arg(format!("imagePolicy.publicKey={}", key.display()))
                .args([
                    "--set-json",
                    r#"networkPolicy.egress.webhook=[{"to":[{"ipBlock":{"cidr":"192.0.2.0/24"}}],"ports":[{"port":443}]}]"#,
                ]);
        }
        let rendered = run_ok(&mut cmd)?;
        let file = cp.work_dir.join("chart-rendered.yaml");
        std::fs::write(&file, &rendered)?;
        let out = run(cp
            .kubectl()
            .args(["apply", "--dry-run=server", "-o", "json", "-f"])
            .arg(&file))?;
        accepts(
            &out,
            &format!("helm template ({variant}) | kubectl apply --dry-run=server"),
        )?;
        if !sets.is_empty() {
            optional_objects_taken(variant, &serde_json::from_slice(&out.stdout)?)?;
        }
    }

    // The harness applied the CRDs before every test, so this release leaves them to it
    // (`chart::crds_upgrade_with_the_release` installs them with a release).
    let out = run(helm()
        .args(["install", "palisade", "-n", NS])
        .arg(&chart)
        .args(["--set", "crds.enabled=false"]))?;
    accepts(&out, "helm install")?;
    // NOTES.txt: what is judged, and how to measure before enforcing.
    let notes = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "The admission webhook judges every namespace except: [\"palisade-system\",\"kube-system\"",
        "palisade.dev/enforcement=Audit",
        "SecretBindings report VaultNotConfigured",
    ] {
        if !notes.contains(needle) {
            bail!("helm install's notes lack {needle:?}: {notes}");
        }
    }
    let result = installed(env, &chart, &helm);
    let uninstall = run(helm().args(["uninstall", "palisade", "-n", NS]))?;
    result?;
    accepts(&uninstall, "helm uninstall")?;
    // What uninstall leaves: the CRDs (not this release's) and the operator-issued
    // certificate Secret (not a chart object); the webhook registrations are gone.
    let left = run_ok(cp.kubectl().args([
        "get",
        "validatingwebhookconfiguration,mutatingwebhookconfiguration",
        "-l",
        "app.kubernetes.io/instance=palisade",
        "-o",
        "name",
    ]))?;
    if !left.is_empty() {
        bail!("helm uninstall left webhook registrations: {left}");
    }
    run_ok(
        cp.kubectl()
            .args(["get", "crd", "authpolicies.palisade.dev"]),
    )?;
    run_ok(
        cp.kubectl()
            .args(["get", "secret", "palisade-webhook-tls", "-n", NS]),
    )?;
    run_ok(
        cp.kubectl()
            .args(["delete", "namespace", NS, "--wait=false"]),
    )?;
    Ok(())
}

/// The optional objects were rendered and the API server took them, as the values asked.
fn optional_objects_taken(variant: &str, applied: &serde_json::Value) -> Result<()> {
    let items = applied["items"]
        .as_array()
        .context("kubectl printed no List")?;
    let find = |kind: &str, name: &str| {
        items
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .with_context(|| format!("helm template ({variant}) rendered no {kind} {name}"))
    };
    find("Certificate", "palisade-webhook")?;
    find("Issuer", "palisade-webhook-selfsigned")?;
    find("ImagePolicy", "palisade-images")?;
    find("ServiceMonitor", "palisade")?;
    // Egress: DNS and the API server for both, plus the registry rule for the webhook.
    for (name, rules) in [("palisade-webhook", 3), ("palisade-operator", 2)] {
        let spec = &find("NetworkPolicy", name)?["spec"];
        let egress = spec["egress"].as_array().map_or(0, Vec::len);
        let types = &spec["policyTypes"];
        if egress != rules
            || !types
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "Egress"))
        {
            bail!(
                "NetworkPolicy {name}: {egress} egress rules (want {rules}), policyTypes {types}"
            );
        }
    }
    Ok(())
}

/// Everything done while the release is installed.
#[allow(clippy::too_many_lines)]
fn installed(env: &Env, chart: &Path, helm: &dyn Fn() -> Command) -> Result<()> {
    let cp = &env.cp;
    let manifest = run_ok(helm().args(["get", "manifest", "palisade", "-n", NS]))?;
    for kind in [
        "kind: Deployment",
        "kind: PodDisruptionBudget",
        "kind: NetworkPolicy",
        "kind: ValidatingWebhookConfiguration",
        "kind: MutatingWebhookConfiguration",
    ] {
        if !manifest.contains(kind) {
            bail!("the release has no {kind}");
        }
    }
    // The e2e registrations use the chart's match condition for pod status updates.
    if !manifest.contains(palisade_e2e::webhook::STATUS_RELABELS) {
        bail!("the chart's status-relabels match condition differs from STATUS_RELABELS");
    }
    let granted = granted_rules(&manifest)?;
    namespace_roles_include_palisade(cp)?;

    // Each process gets its ServiceAccount's own token: nothing but the chart's RBAC applies.
    let kubeconfig_for = |sa: &str| -> Result<PathBuf> {
        let token =
            run_ok(
                cp.kubectl()
                    .args(["create", "token", sa, "-n", NS, "--duration", "1h"]),
            )?;
        let path = cp.work_dir.join(format!("kubeconfig-{sa}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{}\", certificate-authority: \"{}\"}}}}]\nusers: [{{name: u, user: {{token: \"{token}\"}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
                cp.server,
                cp.pki.ca_cert.display()
            ),
        )?;
        Ok(path)
    };
    let config_of = |name: &str| {
        run_ok(cp.kubectl().args([
            "get",
            "configmap",
            name,
            "-n",
            NS,
            "-o",
            r"jsonpath={.data.config\.yaml}",
        ]))
    };
    // The chart's configuration, with loopback addresses and a short certificate check.
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let operator_config = config_of("palisade-operator")?
        .replace("\"0.0.0.0:9090\"", &format!("\"{metrics}\""))
        .replace(
            "renewBeforeDays: 30",
            "renewBeforeDays: 30\n  checkIntervalSeconds: 1",
        );
    let op = OperatorProcess::start_as(
        cp,
        "chart",
        &operator_config,
        &kubeconfig_for("palisade-operator")?,
        metrics.clone(),
    )?;

    // The operator issues the certificate and fills in both caBundles.
    // `kubectl get <args>`, when it prints something.
    let field = |args: &[&str]| -> Option<String> {
        run_ok(cp.kubectl().arg("get").args(args))
            .ok()
            .filter(|s| !s.is_empty())
    };
    let ca = cp.eventually(
        "the operator-issued certificate",
        Duration::from_secs(30),
        || {
            field(&[
                "secret",
                "palisade-webhook-tls",
                "-n",
                NS,
                "-o",
                r"jsonpath={.data.ca\.crt}",
            ])
        },
    )?;
    let bundles = || -> Result<Vec<String>> {
        [
            "validatingwebhookconfiguration",
            "mutatingwebhookconfiguration",
        ]
        .iter()
        .map(|k| {
            run_ok(cp.kubectl().args([
                "get",
                k,
                "palisade-webhook",
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ]))
        })
        .collect()
    };
    cp.eventually(
        "caBundle patched into both configurations",
        Duration::from_secs(30),
        || bundles().ok().filter(|b| b.iter().all(|c| *c == ca)),
    )?;
    let dir = cp.work_dir.join("chart-tls");
    std::fs::create_dir_all(&dir)?;
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let b64 = run_ok(cp.kubectl().args([
            "get",
            "secret",
            "palisade-webhook-tls",
            "-n",
            NS,
            "-o",
            &format!("jsonpath={{.data.{}}}", key.replace('.', r"\.")),
        ]))?;
        std::fs::write(dir.join(key), B64.decode(b64.trim())?)?;
    }
    // The webhook, with the chart's configuration and the operator's certificate, verified as
    // the API server would: CA from the caBundle, name of the Service.
    // Its metrics port on loopback here (0.0.0.0 in the pod).
    let metrics_port = free_port()?;
    let webhook_config = config_of("palisade-webhook")?
        .lines()
        .filter(|l| !l.starts_with("listen:"))
        .map(|l| {
            if l.starts_with("metricsListen:") {
                format!("metricsListen: 127.0.0.1:{metrics_port}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/etc/palisade/tls", &dir.display().to_string());
    if !webhook_config.contains("metricsListen:") || !webhook_config.contains("policyReports:") {
        bail!(
            "the chart's webhook configuration has no metricsListen or policyReports: {webhook_config}"
        );
    }
    let wh = WebhookProcess::start_as(
        cp,
        "chart",
        &webhook_config,
        &kubeconfig_for("palisade-webhook")?,
        (&dir.join("ca.crt"), "palisade-webhook.palisade-system.svc"),
    )?;
    let (code, _) = wh.curl(&["/readyz"])?;
    if code != 200 {
        bail!(
            "the webhook does not serve the operator's certificate for its Service name ({code})"
        );
    }
    // Renewal: a Secret whose expiry cannot be read is replaced, and the caBundles follow.
    run_ok(cp.kubectl().args([
        "annotate",
        "secret",
        "palisade-webhook-tls",
        "-n",
        NS,
        "palisade.dev/not-after-",
    ]))?;
    cp.eventually("a renewed certificate", Duration::from_secs(30), || {
        bundles()
            .ok()
            .filter(|b| b.iter().all(|c| !c.is_empty() && *c != ca))
    })?;
    let ca = bundles()?.pop().unwrap_or_default();
    // Rotation: a deleted Secret is issued anew and the caBundles follow.
    run_ok(
        cp.kubectl()
            .args(["delete", "secret", "palisade-webhook-tls", "-n", NS]),
    )?;
    cp.eventually(
        "a new certificate after deletion",
        Duration::from_secs(30),
        || {
            bundles()
                .ok()
                .filter(|b| b.iter().all(|c| !c.is_empty() && *c != ca))
        },
    )?;

    // The examples, reconciled and reported by the processes running as the chart's accounts.
    // The ImagePolicy is made anew, so its status can only come from this webhook (an earlier
    // test's webhook may have reported on it, and an unchanged status is not written again).
    let examples = repo_root().join("examples");
    // The example Gateway's controller, which accepts the rate limits the operator writes.
    let eg = palisade_e2e::envoygateway::EnvoyGateway::start(
        cp,
        &env.opts.bin_dir,
        palisade_e2e::envoygateway::RateLimits::Global,
    )?;
    run_ok(
        cp.kubectl()
            .args(["delete", "imagepolicy", "shop-images", "--ignore-not-found"]),
    )?;
    for f in [
        "00-shop-namespace.yaml",
        "10-gateway.yaml",
        "30-ratelimit-orders.yaml",
        "50-imagepolicy-shop.yaml",
    ] {
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(examples.join(f)))?;
    }
    // Argo CD's way: server-side apply under its own field manager.
    let argo = |verb: &str, f: &str| {
        run(cp
            .kubectl()
            .args([
                verb,
                "--server-side",
                "--field-manager=argocd-controller",
                "-f",
            ])
            .arg(examples.join(f)))
    };
    for f in ["20-authpolicy-orders.yaml", "21-authpolicy-payments.yaml"] {
        accepts(&argo("apply", f)?, &format!("server-side apply of {f}"))?;
    }
    let ready = |kind: &str, name: &str| -> Option<String> {
        field(&[
            kind,
            name,
            "-n",
            "shop",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
        ])
        .filter(|s| s == "True")
    };
    cp.eventually("AuthPolicy orders Ready", Duration::from_secs(30), || {
        ready("authpolicy", "orders")
    })
    .map_err(|e| {
        let status = run_ok(cp.kubectl().args([
            "get",
            "authpolicy",
            "orders",
            "-n",
            "shop",
            "-o",
            "jsonpath={.status}",
        ]))
        .unwrap_or_default();
        anyhow::anyhow!("{e}: status {status}\noperator log:\n{}", op.log_tail())
    })?;
    cp.eventually(
        "RateLimitPolicy orders-api Ready",
        Duration::from_secs(30),
        || ready("ratelimitpolicy", "orders-api"),
    )
    .map_err(|e| anyhow::anyhow!("{e}\nEnvoy Gateway log:\n{}", eg.log_tail()))?;
    drop(eg);
    cp.eventually(
        "ImagePolicy shop-images reported",
        Duration::from_secs(30),
        || {
            field(&[
                "imagepolicy",
                "shop-images",
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].reason}"#,
            ])
        },
    )?;
    run_ok(cp.kubectl().args([
        "get",
        "authorizationpolicies.security.istio.io",
        "-n",
        "shop",
    ]))?;
    // The alerts and the dashboard use only metrics these processes export.
    let scraped = [
        run_ok(Command::new("curl").args(["-sf", &format!("http://{metrics}/metrics")]))?,
        run_ok(
            Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{metrics_port}/metrics")]),
        )?,
    ];
    alerts_and_dashboard_use_exported_metrics(env, chart, helm, &scraped)?;
    // No drift for Argo CD: applying the same files again would change nothing.
    for f in ["20-authpolicy-orders.yaml", "21-authpolicy-payments.yaml"] {
        let out = argo("diff", f)?;
        if !out.status.success() || !out.stdout.is_empty() {
            bail!(
                "{f} shows drift after the operator reconciled it:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // A helm upgrade with a valid change applies; an invalid one changes nothing.
    accepts(
        &run(helm()
            .args(["upgrade", "palisade", "-n", NS])
            .arg(chart)
            .args(["--set", "crds.enabled=false", "--set", "webhook.replicas=3"]))?,
        "helm upgrade",
    )?;
    rejects(
        &run(helm()
            .args(["upgrade", "palisade", "-n", NS])
            .arg(chart)
            .args(["--set", "crds.enabled=false", "--set", "webhook.replicas=1"]))?,
        "helm upgrade with replicas 1",
        &["minimum: got 1, want 2"],
    )?;
    let replicas = run_ok(cp.kubectl().args([
        "get",
        "deployment",
        "palisade-webhook",
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.replicas}",
    ]))?;
    if replicas != "3" {
        bail!("webhook replicas {replicas} after a refused upgrade, want 3");
    }

    drop(wh);
    drop(op);
    for f in [
        "20-authpolicy-orders.yaml",
        "21-authpolicy-payments.yaml",
        "30-ratelimit-orders.yaml",
        "50-imagepolicy-shop.yaml",
    ] {
        let _ = run(cp
            .kubectl()
            .args(["delete", "--ignore-not-found", "-f"])
            .arg(examples.join(f)));
    }

    // What they called, from the audit log, against what the chart grants.
    let used = used_calls(&cp.audit_log())?;
    let mut problems = Vec::new();
    for (who, call) in &used {
        if call.ends_with(" 403") {
            problems.push(format!("{who} was refused: {call}"));
        }
    }
    let used_rules: BTreeSet<String> = used
        .iter()
        .map(|(who, c)| {
            format!(
                "{who} {}",
                c.rsplit_once(' ').map_or(c.as_str(), |(r, _)| r)
            )
        })
        .collect();
    for u in &used_rules {
        if !granted.contains(u) {
            problems.push(format!("used but not granted: {u}"));
        }
    }
    let unused: Vec<&String> = granted
        .iter()
        .filter(|g| !used_rules.contains(*g) && !NOT_EXERCISED.contains(&g.as_str()))
        .collect();
    for g in &unused {
        problems.push(format!("granted but never used: {g}"));
    }
    eprintln!(
        "  calls made as the chart's ServiceAccounts: {}",
        used_rules.len()
    );
    for u in &used_rules {
        eprintln!("    {u}");
    }
    // The effective permissions the API server reports agree: no Secret listing for anyone,
    // the operator only its own certificate Secret.
    for (sa, args, want) in [
        (WEBHOOK_SA, vec!["list", "secrets", "-A"], "no"),
        (WEBHOOK_SA, vec!["get", "secrets", "-n", "shop"], "yes"),
        (
            WEBHOOK_SA,
            vec!["patch", "imagepolicies.palisade.dev"],
            "no",
        ),
        (
            OPERATOR_SA,
            vec!["get", "secrets/palisade-webhook-tls", "-n", NS],
            "yes",
        ),
        (OPERATOR_SA, vec!["get", "secrets/other", "-n", NS], "no"),
        (OPERATOR_SA, vec!["list", "secrets", "-A"], "no"),
        (
            OPERATOR_SA,
            vec!["delete", "authpolicies.palisade.dev", "-A"],
            "no",
        ),
        (
            OPERATOR_SA,
            vec!["patch", "validatingwebhookconfigurations/other"],
            "no",
        ),
    ] {
        let out = run(cp.kubectl().args(["auth", "can-i", "--as", sa]).args(&args))?;
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if said != want {
            problems.push(format!(
                "kubectl auth can-i {} as {sa}: {said}, want {want}",
                args.join(" ")
            ));
        }
    }
    let list =
        run_ok(
            cp.kubectl()
                .args(["auth", "can-i", "--list", "--as", OPERATOR_SA, "-n", NS]),
        )?;
    eprintln!("  kubectl auth can-i --list for the operator in {NS}:\n{list}");
    if !problems.is_empty() {
        bail!("RBAC and calls disagree:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// `who verb group/resource` for every rule of the release's (Cluster)Roles, `who` being
/// `operator` or `webhook` (from the role's name).
fn granted_rules(manifest: &str) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(manifest) {
        let v = serde_yaml::Value::deserialize(doc)?;
        let kind = v["kind"].as_str().unwrap_or_default();
        if kind != "ClusterRole" && kind != "Role" {
            continue;
        }
        // Roles aggregated into admin, edit and view are the users', not Palisade's.
        let aggregated = v["metadata"]["labels"].as_mapping().is_some_and(|l| {
            l.keys().any(|k| {
                k.as_str()
                    .is_some_and(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to-"))
            })
        });
        if aggregated {
            continue;
        }
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        let who = name.rsplit('-').next().unwrap_or_default();
        for rule in v["rules"].as_sequence().into_iter().flatten() {
            let strs = |k: &str| -> Vec<String> {
                rule[k]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            };
            for g in strs("apiGroups") {
                for r in strs("resources") {
                    for verb in strs("verbs") {
                        let res = if g.is_empty() {
                            r.clone()
                        } else {
                            format!("{g}/{r}")
                        };
                        out.insert(format!("{who} {verb} {res}"));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// (who, `verb group/resource[/subresource] code`) of every audited request of the two
/// ServiceAccounts (discovery and other non-resource requests left out).
fn used_calls(log: &Path) -> Result<BTreeSet<(String, String)>> {
    let text = std::fs::read_to_string(log).context("the API server's audit log")?;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let e: serde_json::Value = serde_json::from_str(line)?;
        let who = match e["user"]["username"].as_str() {
            Some(OPERATOR_SA) => "operator",
            Some(WEBHOOK_SA) => "webhook",
            _ => continue,
        };
        let Some(resource) = e["objectRef"]["resource"].as_str() else {
            continue;
        };
        let group = e["objectRef"]["apiGroup"].as_str().unwrap_or_default();
        let mut res = if group.is_empty() {
            resource.to_owned()
        } else {
            format!("{group}/{resource}")
        };
        if let Some(sub) = e["objectRef"]["subresource"].as_str() {
            res = format!("{res}/{sub}");
        }
        let verb = e["verb"].as_str().unwrap_or_default();
        let mut code = e["responseStatus"]["code"].as_i64().unwrap_or_default();
        // A 403 the authorizer allowed is an admission refusal (a write into a namespace being
        // deleted, by another test), not a permission the chart lacks: counted as a 422 would be.
        if code == 403 && e["annotations"]["authorization.k8s.io/decision"] == "allow" {
            code = 422;
        }
        // Server-side apply of a new object is audited as a patch answered 201, and authorized
        // as a create.
        if verb == "patch" && code == 201 {
            out.insert((who.to_owned(), format!("create {res} {code}")));
        }
        // A 404 on get is an answer (the Secret does not exist yet), not a refusal.
        out.insert((who.to_owned(), format!("{verb} {res} {code}")));
    }
    Ok(out)
}

/// The built-in namespace roles carry Palisade's namespaced kinds (aggregated ClusterRoles): an
/// `edit` user manages AuthPolicies, RateLimitPolicies and SecretBindings in its namespace only,
/// never their status nor ImagePolicies; a `view` user reads them and changes nothing.
fn namespace_roles_include_palisade(cp: &palisade_e2e::ControlPlane) -> Result<()> {
    cp.with_temp_ns("roles", |ns| {
        for (user, role) in [("dana", "edit"), ("vic", "view")] {
            run_ok(cp.kubectl().args([
                "create",
                "rolebinding",
                user,
                "-n",
                ns,
                "--clusterrole",
                role,
                "--user",
                user,
            ]))?;
        }
        let can = |user: &str, verb: &str, what: &str, in_ns: Option<&str>| -> Result<bool> {
            let mut cmd = cp.kubectl();
            match what.split_once('/') {
                Some((resource, sub)) => {
                    cmd.args(["auth", "can-i", verb, resource, "--subresource", sub])
                }
                None => cmd.args(["auth", "can-i", verb, what]),
            };
            cmd.args(["--as", user]);
            if let Some(n) = in_ns {
                cmd.args(["-n", n]);
            }
            let out = run(&mut cmd)?;
            Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
        };
        // Aggregation is asynchronous (the controller manager's clusterrole-aggregation).
        cp.eventually(
            "edit to include AuthPolicies",
            Duration::from_secs(30),
            || {
                can("dana", "create", "authpolicies.palisade.dev", Some(ns))
                    .ok()?
                    .then_some(())
            },
        )?;
        for (user, verb, what, in_ns, want) in [
            (
                "dana",
                "create",
                "ratelimitpolicies.palisade.dev",
                Some(ns),
                true,
            ),
            (
                "dana",
                "delete",
                "secretbindings.palisade.dev",
                Some(ns),
                true,
            ),
            (
                "dana",
                "patch",
                "authpolicies.palisade.dev/status",
                Some(ns),
                false,
            ),
            (
                "dana",
                "create",
                "authpolicies.palisade.dev",
                Some("default"),
                false,
            ),
            ("dana", "create", "imagepolicies.palisade.dev", None, false),
            ("vic", "list", "secretbindings.palisade.dev", Some(ns), true),
            (
                "vic",
                "create",
                "authpolicies.palisade.dev",
                Some(ns),
                false,
            ),
        ] {
            if can(user, verb, what, in_ns)? != want {
                bail!("{user} ({verb} {what} in {in_ns:?}): expected {want}");
            }
        }
        eprintln!("  namespace roles: edit manages, view reads Palisade's namespaced kinds");
        Ok(())
    })
}

/// Every `palisade_*` metric the chart's PrometheusRule and Grafana dashboard name is one the
/// operator or the webhook exports (`scraped`: their `/metrics`), and every metric exported has
/// `# HELP`; the PrometheusRule is accepted by its CRD's schema.
fn alerts_and_dashboard_use_exported_metrics(
    env: &Env,
    chart: &Path,
    helm: &dyn Fn() -> Command,
    scraped: &[String],
) -> Result<()> {
    let cp = &env.cp;
    let rendered = run_ok(
        helm()
            .args(["template", "palisade", "-n", NS, "--kube-version", "1.36.3"])
            .arg(chart)
            .args([
                "--set",
                "metrics.prometheusRule.enabled=true",
                "--set",
                "metrics.grafanaDashboard.enabled=true",
                "--show-only",
                "templates/prometheusrule.yaml",
                "--show-only",
                "templates/dashboard.yaml",
            ]),
    )?;
    let file = cp.work_dir.join("chart-monitoring.yaml");
    std::fs::write(&file, &rendered)?;
    accepts(
        &run(cp
            .kubectl()
            .args(["apply", "--dry-run=server", "-f"])
            .arg(&file))?,
        "the PrometheusRule and dashboard ConfigMap (server-side dry run)",
    )?;
    // The series present, and the families declared (a counter no request has touched yet has
    // its `# TYPE` and `# HELP` but no sample).
    let mut exported: BTreeSet<String> = scraped
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    for line in scraped.iter().flat_map(|t| t.lines()) {
        let mut words = line
            .strip_prefix("# TYPE ")
            .into_iter()
            .flat_map(|l| l.split(' '));
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        exported.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    let used: BTreeSet<String> = regex::Regex::new(r"palisade_[a-z_]+")?
        .find_iter(&rendered)
        .map(|m| m.as_str().to_owned())
        .filter(|m| m != "palisade_json")
        .collect();
    let missing: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    if !missing.is_empty() {
        bail!("the alerts or the dashboard use metrics nobody exports: {missing:?}");
    }
    if used.len() < 15 {
        bail!(
            "only {} metrics found in the alerts and the dashboard: {used:?}",
            used.len()
        );
    }
    for text in scraped {
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap_or_default();
            if !text.contains(&format!("# HELP {name} ")) {
                bail!("{name} has no # HELP");
            }
        }
    }
    eprintln!(
        "  alerts and dashboard: {} metrics used, each exported; every exported metric has # HELP",
        used.len()
    );
    Ok(())
}

/// The chart's rendered manifests pass Palisade's own secrets policy under conftest (the same
/// Rego the webhook runs, through the adapter in policies/conftest), in both the default and a
/// full variant; the same output with a Secret put in an environment variable fails, naming it.
fn rendered_chart_passes_its_own_admission_policy(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let chart = repo_root().join("charts/palisade");
    let conftest = |file: &Path| -> Result<std::process::Output> {
        run(Command::new(env.opts.bin_dir.join("conftest"))
            .args([
                "test",
                "--no-color",
                "--namespace",
                "palisade.conftest",
                "--policy",
            ])
            .arg(repo_root().join("policies"))
            .arg(file))
    };
    for (variant, sets) in [
        ("defaults", vec![]),
        (
            "cert-manager, SPIRE, Vault",
            [FULL_VARIANT, &["operator.vaultCAConfigMap=vault-ca"][..]].concat(),
        ),
    ] {
        let mut cmd = Command::new(env.opts.bin_dir.join("helm"));
        cmd.args(["template", "palisade", "-n", NS, "--kube-version", "1.36.3"])
            .arg(&chart);
        for set in &sets {
            cmd.args(["--set", set]);
        }
        let rendered = run_ok(&mut cmd)?;
        let file = cp.work_dir.join("conftest-chart.yaml");
        std::fs::write(&file, &rendered)?;
        accepts(
            &conftest(&file)?,
            &format!("conftest on the chart ({variant})"),
        )?;
        // A chart change that puts a Secret in the operator's environment.
        let leaky = rendered.replacen(
            "            - name: RUST_LOG\n",
            "            - name: VAULT_TOKEN\n              valueFrom: {secretKeyRef: {name: vault, key: token}}\n            - name: RUST_LOG\n",
            1,
        );
        if leaky == rendered {
            bail!("the rendered chart has no RUST_LOG variable to put a Secret beside");
        }
        let file = cp.work_dir.join("conftest-chart-leaky.yaml");
        std::fs::write(&file, &leaky)?;
        let out = conftest(&file)?;
        let said = String::from_utf8_lossy(&out.stdout);
        if out.status.success()
            || !said.contains("env VAULT_TOKEN takes key \"token\" of Secret \"vault\"")
        {
            bail!(
                "conftest passed a chart with a Secret in an environment variable ({variant}): {said}"
            );
        }
    }
    eprintln!(
        "  conftest: both chart variants pass Palisade's secrets policy; a Secret put in env fails"
    );
    Ok(())
}
