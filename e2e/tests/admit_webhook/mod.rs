//! The admission webhook called by the real API server: workload identity required, no secrets
//! in environment variables, every workload kind and ephemeral containers checked, malformed
//! reviews refused with a 400.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use palisade_e2e::{
    ControlPlane, accepts, rejects, run, run_ok,
    spire::{Spire, TRUST_DOMAIN},
    webhook::{SCOPE_LABEL, WebhookProcess},
};

use crate::{Env, TestFn};

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "admit_webhook::spire_registrations_give_identity",
        spire_registrations_give_identity,
    ),
    (
        "admit_webhook::identity_secrets_and_workloads",
        identity_secrets_and_workloads,
    ),
    (
        "admit_webhook::svid_from_the_workload_api_serves_the_api_server",
        svid_from_the_workload_api_serves_the_api_server,
    ),
    (
        "admit_webhook::restart_under_load_admits_nothing_wrongly",
        restart_under_load_admits_nothing_wrongly,
    ),
    (
        "admit_webhook::sigterm_drains_before_closing",
        sigterm_drains_before_closing,
    ),
];

fn apply(cp: &ControlPlane, ns: &str, name: &str, yaml: &str) -> Result<std::process::Output> {
    let file = cp.work_dir.join(format!("{ns}-{name}.yaml"));
    std::fs::write(&file, yaml)?;
    run(cp.kubectl().args(["apply", "-n", ns, "-f"]).arg(&file))
}

fn pod(name: &str, sa: Option<&str>, env: &str) -> String {
    let sa = sa
        .map(|s| format!("  serviceAccountName: {s}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{sa}  containers:\n    - name: app\n      image: registry.example.com/shop/app:1\n{env}"
    )
}

const SECRET_ENV: &str = "      env:\n        - name: DB_PASSWORD\n          valueFrom: {secretKeyRef: {name: db, key: password}}\n";

fn namespace(cp: &ControlPlane, ns: &str, mesh: bool) -> Result<()> {
    run_ok(
        cp.kubectl()
            .args(["label", "namespace", ns, &format!("{SCOPE_LABEL}=on")]),
    )?;
    if mesh {
        run_ok(
            cp.kubectl()
                .args(["label", "namespace", ns, "istio.io/dataplane-mode=ambient"]),
        )?;
    }
    run_ok(
        cp.kubectl()
            .args(["create", "serviceaccount", "orders", "-n", ns]),
    )?;
    Ok(())
}

/// A new webhook registration takes a moment to be used: wait until a request is refused.
fn wait_enforced(cp: &ControlPlane, ns: &str) -> Result<()> {
    let mut attempt = 0;
    cp.eventually("the webhook to be called", Duration::from_secs(30), || {
        attempt += 1;
        let name = format!("probe-{attempt}");
        let out = apply(cp, ns, &name, &pod(&name, None, "")).ok()?;
        (!out.status.success()).then_some(())
    })
}

fn identity_secrets_and_workloads(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let wh = WebhookProcess::start(cp, "admit", "")?;
    wh.register(cp, "palisade-e2e")?;
    let result = cp.with_temp_ns("wh", |ns| {
        namespace(cp, ns, true)?;
        wait_enforced(cp, ns)?;

        // Default ServiceAccount: refused, naming the identity it would have had.
        let out = apply(cp, ns, "default-sa", &pod("default-sa", None, ""))?;
        rejects(&out, "pod under the default ServiceAccount", &[
            &format!("spiffe://cluster.local/ns/{ns}/sa/default"),
            "serviceAccountName",
        ])?;

        // Secret from env: refused, naming the container and the variable.
        let out = apply(cp, ns, "secret-env", &pod("secret-env", Some("orders"), SECRET_ENV))?;
        rejects(&out, "pod with a Secret in env", &["container \"app\": env DB_PASSWORD", "secretKeyRef"])
            .or_else(|_| rejects(&out, "pod with a Secret in env", &["container \"app\": env DB_PASSWORD"]))?;

        // Compliant pod: admitted.
        let out = apply(cp, ns, "good", &pod("good", Some("orders"), ""))?;
        accepts(&out, "compliant pod")?;

        // Dry runs are decided like real requests and leave nothing behind.
        let dry = |name: &str, sa: Option<&str>| -> Result<std::process::Output> {
            let file = cp.work_dir.join(format!("{ns}-{name}.yaml"));
            std::fs::write(&file, pod(name, sa, ""))?;
            run(cp.kubectl().args(["apply", "--dry-run=server", "-n", ns, "-f"]).arg(&file))
        };
        rejects(&dry("dry-bad", None)?, "dry-run pod under the default ServiceAccount", &[
            &format!("spiffe://cluster.local/ns/{ns}/sa/default"),
        ])?;
        accepts(&dry("dry-good", Some("orders"))?, "compliant dry-run pod")?;
        if run(cp.kubectl().args(["get", "pod", "dry-good", "-n", ns]))?.status.success() {
            bail!("a dry-run pod was stored");
        }
        // (log lines reach the file within the log's flush interval)
        cp.eventually("the dry run's security event, with dry_run=true", Duration::from_secs(10), || {
            wh.log_text().lines().any(|l| l.contains("\"name\":\"dry-good\"") && l.contains("\"dry_run\":true")).then_some(())
        })?;

        // Ephemeral containers go through pods/ephemeralcontainers and are checked too.
        let out = run(cp.kubectl().args([
            "debug", "good", "-n", ns, "--image=busybox", "-c", "dbg",
            "--env=TOKEN=AKIAIOSFODNN7EXAMPLE",
        ]))?;
        rejects(&out, "kubectl debug with a secret in env", &["dbg", "aws-access-key"])?;

        // A Deployment is checked at every level: refused when its template is not compliant,
        // and when it is, its ReplicaSet and Pods are admitted by the same checks.
        let bad = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bad\nspec:\n  selector: {matchLabels: {app: bad}}\n  template:\n    metadata: {labels: {app: bad}}\n    spec:\n      containers: [{name: app, image: r/app:1}]\n";
        let out = apply(cp, ns, "bad-deploy", bad)?;
        rejects(&out, "Deployment under the default ServiceAccount", &["Deployment", "spiffe://"])?;
        let good = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      serviceAccountName: orders\n      containers: [{name: app, image: r/app:1}]\n";
        accepts(&apply(cp, ns, "good-deploy", good)?, "compliant Deployment")?;
        cp.eventually("the Deployment's pod", Duration::from_secs(30), || {
            let out = run_ok(cp.kubectl().args(["get", "pods", "-n", ns, "-l", "app=web", "-o", "name"])).ok()?;
            (!out.trim().is_empty()).then_some(())
        })?;
        // A ReplicationController's template is refused as a Deployment's is.
        let rc = "apiVersion: v1\nkind: ReplicationController\nmetadata:\n  name: bad-rc\nspec:\n  replicas: 1\n  selector: {app: bad-rc}\n  template:\n    metadata: {labels: {app: bad-rc}}\n    spec:\n      containers: [{name: app, image: r/app:1}]\n";
        let out = apply(cp, ns, "bad-rc", rc)?;
        rejects(&out, "ReplicationController under the default ServiceAccount", &["ReplicationController", "spiffe://"])?;
        for kind in ["\"kind\":\"Deployment\"", "\"kind\":\"ReplicaSet\"", "\"kind\":\"Pod\""] {
            cp.eventually(&format!("an allow decision for {kind} in the security log"), Duration::from_secs(10), || {
                wh.log_text().lines().any(|l| l.contains(kind) && l.contains(ns) && l.contains("\"verdict\":\"allow\"")).then_some(())
            })?;
        }

        // A namespace without mesh labels: refused with the would-be SPIFFE ID.
        cp.with_temp_ns("wh-nomesh", |bare| {
            namespace(cp, bare, false)?;
            let out = apply(cp, bare, "nomesh", &pod("nomesh", Some("orders"), ""))?;
            rejects(&out, "pod in a namespace without mesh", &[
                &format!("spiffe://cluster.local/ns/{bare}/sa/orders"),
                "istio-injection=enabled",
            ])
        })?;

        // Malformed reviews get a 400 with a JSON reason.
        let (code, body) = wh.curl(&["/validate", "-X", "POST", "-H", "Content-Type: application/json", "-d", "{\"kind\": 7}"])?;
        if code != 400 || !body.contains("\"error\"") {
            bail!("malformed review answered {code}: {body}");
        }
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e", result)
}

/// With failurePolicy Fail, a webhook that is down refuses: while it is killed and restarted
/// under a stream of non-compliant pods, not one of them gets in; compliant pods go through again
/// once it is back.
fn restart_under_load_admits_nothing_wrongly(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let first = WebhookProcess::start(cp, "restart-a", "")?;
    first.register(cp, "palisade-e2e-restart")?;
    let result = cp.with_temp_ns("wh-restart", |ns| {
        namespace(cp, ns, true)?;
        wait_enforced(cp, ns)?;
        let port = first.port;
        let mut first = Some(first);
        let mut second = None;
        let mut refused = 0;
        for i in 0..40 {
            if i == 10 {
                // Crash mid-stream.
                drop(first.take());
            }
            if i == 25 {
                second = Some(WebhookProcess::start_on(cp, "restart-b", "", port)?);
            }
            let name = format!("bad-{i}");
            let out = apply(cp, ns, &name, &pod(&name, None, SECRET_ENV))?;
            if out.status.success() {
                bail!(
                    "non-compliant pod {name} was admitted (webhook {})",
                    if first.is_some() || second.is_some() {
                        "up"
                    } else {
                        "down"
                    }
                );
            }
            refused += 1;
        }
        let left = run_ok(cp.kubectl().args(["get", "pods", "-n", ns, "-o", "name"]))?;
        if left.lines().any(|l| l.contains("bad-")) {
            bail!("non-compliant pods exist: {left}");
        }
        cp.eventually(
            "compliant pods admitted again",
            Duration::from_secs(30),
            || {
                let out =
                    apply(cp, ns, "good-after", &pod("good-after", Some("orders"), "")).ok()?;
                out.status.success().then_some(())
            },
        )?;
        eprintln!("  {refused} non-compliant pods refused across a webhook crash and restart");
        Ok(())
    });
    let _ = run(cp.kubectl().args([
        "delete",
        "validatingwebhookconfiguration",
        "palisade-e2e-restart",
    ]));
    result
}

/// SIGTERM (a pod deleted, a rollout) first drains: `/readyz` fails at once so endpoints move
/// away, while the API server's requests, on its open connections and on new ones, are still
/// answered with real decisions for `drainSeconds`; only then does the process exit, cleanly.
fn sigterm_drains_before_closing(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let mut wh = WebhookProcess::start(cp, "drain", "drainSeconds: 4")?;
    wh.register(cp, "palisade-e2e-drain")?;
    let result = cp.with_temp_ns("wh-drain", |ns| {
        namespace(cp, ns, true)?;
        wait_enforced(cp, ns)?;
        let out = apply(cp, ns, "before", &pod("before", Some("orders"), ""))?;
        if !out.status.success() {
            bail!("a compliant pod was refused before the drain: {}", String::from_utf8_lossy(&out.stderr));
        }
        wh.sigterm()?;
        let signalled = Instant::now();
        cp.eventually("/readyz failing after SIGTERM", Duration::from_secs(2), || {
            let (code, _) = wh.curl(&["/readyz"]).ok()?;
            (code == 503).then_some(())
        })?;
        // Still deciding, both ways, through the API server.
        let good = apply(cp, ns, "during", &pod("during", Some("orders"), ""))?;
        if !good.status.success() {
            bail!(
                "a compliant pod was refused while the webhook drained: {}",
                String::from_utf8_lossy(&good.stderr)
            );
        }
        let bad = apply(cp, ns, "bad-during", &pod("bad-during", None, SECRET_ENV))?;
        let why = String::from_utf8_lossy(&bad.stderr).into_owned();
        if bad.status.success() || !why.contains("palisade") {
            bail!("a non-compliant pod was not refused by the draining webhook: {why}");
        }
        let answered_within = signalled.elapsed();
        if answered_within >= Duration::from_secs(4) {
            bail!("the checks took {answered_within:?}: longer than the drain, nothing was shown");
        }
        let status = wh.wait_exit(Duration::from_secs(20))?;
        let exited_after = signalled.elapsed();
        eprintln!(
            "  SIGTERM: /readyz 503 at once, decisions served, exit {status} after {:.1} s (drain 4 s)",
            exited_after.as_secs_f64()
        );
        if !status.success() {
            bail!("the webhook exited with {status} after draining");
        }
        if exited_after < Duration::from_secs(4) {
            bail!("the webhook exited {exited_after:?} after SIGTERM: before its drain ended");
        }
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-drain", result)
}

/// With SPIRE as identity source, a pod is admitted when a ClusterSPIFFEID selects it.
fn spire_registrations_give_identity(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let wh = WebhookProcess::start(cp, "spire", "identitySource: Spire")?;
    wh.register(cp, "palisade-e2e-spire")?;
    let result = cp.with_temp_ns("wh-spire", |ns| {
        namespace(cp, ns, false)?;
        wait_enforced(cp, ns)?;
        let id = format!(
            "apiVersion: spire.spiffe.io/v1alpha1\nkind: ClusterSPIFFEID\nmetadata:\n  name: {ns}-orders\nspec:\n  spiffeIDTemplate: \"spiffe://{{{{ .TrustDomain }}}}/ns/{{{{ .PodMeta.Namespace }}}}/sa/{{{{ .PodSpec.ServiceAccountName }}}}\"\n  podSelector: {{matchLabels: {{app: orders}}}}\n  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}\n"
        );
        accepts(&apply(cp, ns, "csid", &id)?, "ClusterSPIFFEID")?;
        let labelled = |name: &str, app: &str| {
            pod(name, Some("orders"), "").replace(&format!("  name: {name}\n"), &format!("  name: {name}\n  labels: {{app: {app}}}\n"))
        };
        cp.eventually("a selected pod admitted", Duration::from_secs(30), || {
            let out = apply(cp, ns, "selected", &labelled("selected", "orders")).ok()?;
            out.status.success().then_some(())
        })?;
        let out = apply(cp, ns, "unselected", &labelled("unselected", "web"))?;
        rejects(&out, "pod no ClusterSPIFFEID selects", &["ClusterSPIFFEID", &format!("spiffe://cluster.local/ns/{ns}/sa/orders")])?;
        let _ = run(cp.kubectl().args(["delete", "clusterspiffeid", &format!("{ns}-orders")]));
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-spire", result)
}

/// With `tls.workloadApiSocket`, the webhook serves the X.509-SVID a real SPIRE agent hands it:
/// the API server, trusting only SPIRE's bundle, calls it; when the agent rotates the SVID the
/// webhook serves the new one without a restart.
fn svid_from_the_workload_api_serves_the_api_server(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let spire = Spire::start(&env.opts.bin_dir)?;
    let id = format!("spiffe://{TRUST_DOMAIN}/ns/palisade-system/sa/palisade-webhook");
    // A short lifetime so the agent rotates it within the test (at half its life).
    spire.register_this_user(&id, &["localhost"], 30)?;
    let wh = WebhookProcess::start_svid(cp, "svid", "", &spire.workload_api, &spire.bundle)
        .map_err(|e| anyhow::anyhow!("{e:#}\nagent log:\n{}", spire.log_tail("agent")))?;
    cp.eventually(
        &format!("the webhook saying it serves {id}"),
        Duration::from_secs(10),
        || wh.log_text().contains(&id).then_some(()),
    )
    .map_err(|e| anyhow::anyhow!("{e:#}: {}", wh.log_tail()))?;
    wh.register(cp, "palisade-e2e-svid")?;
    let result = cp.with_temp_ns("wh-svid", |ns| {
        namespace(cp, ns, true)?;
        // The API server reaches the webhook over the SVID (failurePolicy Fail: a TLS failure
        // would refuse with a call error, not with the webhook's reason).
        cp.eventually(
            "a denial from the SVID-served webhook",
            Duration::from_secs(30),
            || {
                let out = apply(cp, ns, "default-sa", &pod("default-sa", None, "")).ok()?;
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                err.contains(&format!("spiffe://cluster.local/ns/{ns}/sa/default"))
                    .then_some(())
            },
        )?;
        cp.eventually("the SVID rotated", Duration::from_mins(1), || {
            wh.log_text().contains("X.509-SVID rotated").then_some(())
        })?;
        let out = apply(cp, ns, "good", &pod("good", Some("orders"), ""))?;
        accepts(&out, "compliant pod after the rotation")?;
        let (code, _) = wh.curl(&["/healthz"])?;
        if code != 200 {
            bail!("the rotated SVID does not verify against the bundle ({code})");
        }
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-svid", result)
}
