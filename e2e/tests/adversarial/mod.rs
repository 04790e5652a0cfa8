//! Attacks on the admission webhook that need the real API server, controllers or registries
//! (the rest are in `webhook/tests/adversarial/`): a hostile registry, controllers that must
//! finish what a later policy refuses, pinned digests, cross-tenant cache poisoning and key
//! rotation.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    ControlPlane, accepts,
    hostile::{BEHAVIOURS, HostileRegistry, SECRET},
    registry::{Layout, OciRegistry},
    rejects, run, run_ok,
    webhook::{SCOPE_LABEL, WebhookProcess},
};

use crate::{Env, TestFn};

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "adversarial::hostile_registry_refused_in_bounded_memory",
        hostile_registry_refused_in_bounded_memory,
    ),
    (
        "adversarial::controllers_finish_what_a_later_policy_refuses",
        controllers_finish_what_a_later_policy_refuses,
    ),
    (
        "adversarial::pins_tenants_and_rotated_keys",
        pins_tenants_and_rotated_keys,
    ),
    (
        "adversarial::relabels_through_status_or_while_terminating",
        relabels_through_status_or_while_terminating,
    ),
];

/// A key no image here is signed with.
const UNUSED_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEBQW6/eeRFL8B5FuFXYZU8ZDw9SSL
BNiuXO8dnyJ0mCZGp3h7zvJ00Yk0L60m7+4FTONy5ueB9Ske4sx5851LKA==
-----END PUBLIC KEY-----";

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}", " ".repeat(by)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn apply(cp: &ControlPlane, ns: &str, name: &str, yaml: &str) -> Result<std::process::Output> {
    let file = cp.work_dir.join(format!("adv-{ns}-{name}.yaml"));
    std::fs::write(&file, yaml)?;
    run(cp.kubectl().args(["apply", "-n", ns, "-f"]).arg(&file))
}

/// An ImagePolicy `name` over `glob` in namespace `ns`, requiring `key` (PEM), with `extra`
/// spec lines.
fn image_policy(
    cp: &ControlPlane,
    name: &str,
    ns: &str,
    glob: &str,
    key: &str,
    extra: &str,
) -> Result<()> {
    let yaml = format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: ImagePolicy\nmetadata:\n  name: {name}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}\n{extra}  authorities:\n    - name: ci\n      transparencyLog: Ignore\n      key:\n{key}\n",
        key = if key.starts_with("secretRef") {
            format!("        {key}")
        } else {
            format!("        publicKey: |\n{}", indent(key, 10))
        }
    );
    let file = cp.work_dir.join(format!("adv-policy-{name}.yaml"));
    std::fs::write(&file, yaml)?;
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
    Ok(())
}

fn pod_yaml(name: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  serviceAccountName: orders\n  containers:\n    - name: app\n      image: {image}\n"
    )
}

/// Labels `ns` for the ambient mesh, creates ServiceAccount `orders` and, with `scoped`, puts
/// the namespace under the e2e webhook registration.
fn prepare(cp: &ControlPlane, ns: &str, scoped: bool) -> Result<()> {
    run_ok(
        cp.kubectl()
            .args(["label", "namespace", ns, "istio.io/dataplane-mode=ambient"]),
    )?;
    if scoped {
        run_ok(
            cp.kubectl()
                .args(["label", "namespace", ns, &format!("{SCOPE_LABEL}=on")]),
        )?;
    }
    run_ok(
        cp.kubectl()
            .args(["create", "serviceaccount", "orders", "-n", ns]),
    )?;
    Ok(())
}

/// Waits until a pod named `probe-*` running `image` is refused (the policy is in force).
fn wait_refused(cp: &ControlPlane, ns: &str, image: &str) -> Result<()> {
    let mut attempt = 0;
    cp.eventually(
        "the ImagePolicy to be enforced",
        Duration::from_secs(30),
        || {
            attempt += 1;
            let name = format!("probe-{attempt}");
            let out = apply(cp, ns, &name, &pod_yaml(&name, image)).ok()?;
            (!out.status.success()).then_some(())
        },
    )
}

/// Peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")
}

/// Every image of the hostile registry is refused with its own reason, in time, without the
/// registry's words in the denial, and the webhook's memory stays bounded while it is sent
/// endless and giant bodies.
fn hostile_registry_refused_in_bounded_memory(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let reg = HostileRegistry::start()?;
    let wh = WebhookProcess::start(cp, "hostile", &reg.webhook_config())?;
    wh.register(cp, "palisade-e2e-hostile")?;
    let result = cp.with_temp_ns("hostile", |ns| {
        prepare(cp, ns, true)?;
        image_policy(cp, &format!("hostile-{ns}"), ns, &format!("{}/**", reg.host), UNUSED_KEY, "")?;
        wait_refused(cp, ns, &format!("{}/chatty/app:v1", reg.host))?;
        let before = peak_rss_kib(wh.pid())?;
        for round in 0..3 {
            for (repo, reason) in BEHAVIOURS {
                let name = format!("{repo}-{round}");
                let started = std::time::Instant::now();
                let out = apply(cp, ns, &name, &pod_yaml(&name, &format!("{}/{repo}/app:v1", reg.host)))?;
                rejects(&out, &format!("image from the {repo} registry"), &[reason])?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                if stderr.contains(SECRET) {
                    bail!("the denial repeats what the registry wrote: {stderr}");
                }
                if started.elapsed() > Duration::from_secs(6) {
                    bail!("{repo}: refused only after {:?}", started.elapsed());
                }
            }
        }
        // A fetch that ran out of time lets go of its connection: nothing keeps it waiting.
        cp.eventually("the stalled signature fetches were given up", Duration::from_secs(15), || {
            (reg.stalled.load(std::sync::atomic::Ordering::SeqCst) == 0).then_some(())
        })?;
        let peak = peak_rss_kib(wh.pid())?;
        eprintln!(
            "  hostile registry: {} behaviours x 3 refused; {} MiB sent by the registry; webhook peak RSS {} MiB (before: {} MiB)",
            BEHAVIOURS.len(),
            reg.bytes_sent.load(std::sync::atomic::Ordering::Relaxed) >> 20,
            peak >> 10,
            before >> 10
        );
        if peak > 64 << 10 {
            bail!("webhook peak RSS {} MiB under the hostile registry (limit 64 MiB)", peak >> 10);
        }
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-hostile", result)
}

fn replicas(cp: &ControlPlane, ns: &str, selector: &str) -> Result<Vec<(String, String)>> {
    let out = run_ok(cp.kubectl().args([
        "get",
        "replicasets",
        "-n",
        ns,
        "-l",
        selector,
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name}={.spec.replicas}{"\n"}{end}"#,
    ]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(n, r)| (n.to_owned(), r.to_owned()))
        .collect())
}

/// Through the real controller-manager: objects made before a policy (a Deployment with a
/// Secret in env, a Job whose image a policy covers, a Deployment whose registry is gone) are
/// rolled out, scaled down and deleted by their controllers once the webhook refuses them.
#[allow(clippy::too_many_lines)]
fn controllers_finish_what_a_later_policy_refuses(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let wh = WebhookProcess::start(cp, "wedge", "")?;
    wh.register(cp, "palisade-e2e-wedge")?;
    let result = cp.with_temp_ns("wedge", |ns| {
        prepare(cp, ns, false)?;
        // An image policy whose registry is down (nothing listens on port 1).
        image_policy(cp, &format!("outage-{ns}"), ns, "127.0.0.1:1/**", UNUSED_KEY, "")?;
        let deployment = |name: &str, strategy: &str, replicas: u32, image: &str, env: &str| {
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  strategy: {{type: {strategy}}}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      serviceAccountName: orders\n      containers:\n        - name: app\n          image: {image}\n{env}"
            )
        };
        let secret_env = "          env: [{name: DB, valueFrom: {secretKeyRef: {name: db, key: pw}}}]\n";
        // Before the webhook applies to the namespace: a non-compliant Deployment, a Job
        // running an image of the unreachable registry, and a Deployment from there too.
        accepts(&apply(cp, ns, "leaky", &deployment("leaky", "Recreate", 2, "registry.example.com/shop/web:1", secret_env))?, "leaky Deployment before the policy")?;
        accepts(&apply(cp, ns, "outage", &deployment("outage", "Recreate", 3, "127.0.0.1:1/shop/web:1", ""))?, "Deployment before the outage policy")?;
        let job = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: batch\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      serviceAccountName: orders\n      containers:\n        - name: app\n          image: 127.0.0.1:1/shop/batch:1\n";
        accepts(&apply(cp, ns, "batch", job)?, "Job before the policy")?;
        cp.eventually("the controllers to create the pods", Duration::from_secs(30), || {
            let pods = run_ok(cp.kubectl().args(["get", "pods", "-n", ns, "-o", "name"])).ok()?;
            (pods.lines().count() >= 6).then_some(())
        })?;
        run_ok(cp.kubectl().args(["label", "namespace", ns, &format!("{SCOPE_LABEL}=on")]))?;
        // The webhook now refuses new objects like these.
        cp.eventually("the webhook to refuse a leaky pod", Duration::from_secs(30), || {
            let out = apply(cp, ns, "probe", &format!("{}{}", pod_yaml("probe", "registry.example.com/shop/web:1"), secret_env.replacen("          ", "      ", 1))).ok()?;
            (!out.status.success()).then_some(())
        })?;

        // 1. The rollout that fixes the violation finishes: the old ReplicaSet goes to zero.
        accepts(&apply(cp, ns, "leaky", &deployment("leaky", "Recreate", 2, "registry.example.com/shop/web:1", ""))?, "the fixed Deployment")?;
        cp.eventually("the old ReplicaSet to scale to zero and a new one to run", Duration::from_mins(1), || {
            let rs = replicas(cp, ns, "app=leaky").ok()?;
            (rs.len() == 2 && rs.iter().filter(|(_, r)| r == "0").count() == 1 && rs.iter().any(|(_, r)| r == "2"))
                .then_some(())
        })?;
        // 2. A registry outage does not stop scaling down.
        run_ok(cp.kubectl().args(["scale", "deployment", "outage", "-n", ns, "--replicas=1"]))?;
        cp.eventually("the Deployment whose registry is down to scale down", Duration::from_mins(1), || {
            let rs = replicas(cp, ns, "app=outage").ok()?;
            (rs.len() == 1 && rs[0].1 == "1").then_some(())
        })?;
        let pods = |selector: &str| {
            run_ok(cp.kubectl().args(["get", "pods", "-n", ns, "-l", selector, "-o", "name"]))
                .map(|o| o.lines().count())
        };
        cp.eventually("its surplus pods to go", Duration::from_mins(1), || (pods("app=outage").ok()? == 1).then_some(()))?;
        // 3. The Job can be deleted: its controller removes the tracking finalizer from pods
        //    the webhook would refuse now.
        run_ok(cp.kubectl().args(["delete", "job", "batch", "-n", ns, "--wait=false"]))?;
        cp.eventually("the Job's pods to be deleted", Duration::from_mins(1), || {
            (pods("batch.kubernetes.io/job-name=batch").ok()? == 0).then_some(())
        })?;
        eprintln!("  controllers: rollout finished, scale-down during a registry outage, Job deleted");
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-wedge", result)
}

/// With a real registry and real cosign signatures: a covered image must be pinned when the
/// policy says so; a dry run naming a missing repository with a victim's digest does not make
/// the victim's pods refused; and a rotated key stops verifying what the old one signed.
#[allow(clippy::too_many_lines)]
fn pins_tenants_and_rotated_keys(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let reg = OciRegistry::start(&env.opts.bin_dir, &cp.work_dir.join("registry-adversarial"))?;
    let public = std::fs::read_to_string(reg.key_pair("ci")?)?;
    reg.key_pair("next")?;
    let next = std::fs::read_to_string(reg.dir_key("next"))?;
    let digest = reg.push_signed("ci", "shop/orders", "orders v1", None, Layout::Tags)?;
    let wh = WebhookProcess::start(
        cp,
        "adv-images",
        &format!("{}\n", reg.webhook_config()).replace(
            "]}",
            "], negativeCacheTTLSeconds: 300, materialRefreshSeconds: 2}",
        ),
    )?;
    // The validating hook alone: nothing pins, so only digests get in under pinDigest.
    wh.register(cp, "palisade-e2e-adv-images")?;
    let result = cp.with_temp_ns("advimg", |ns| {
        prepare(cp, ns, true)?;
        let host = &reg.host;
        // The key lives in a Secret, so it can be rotated.
        run_ok(cp.kubectl().args(["create", "namespace", "palisade-system"])).ok();
        let secret = format!("adv-key-{ns}");
        let key_file = cp.work_dir.join(format!("{secret}.pub"));
        std::fs::write(&key_file, &public)?;
        run_ok(cp.kubectl().args(["create", "secret", "generic", &secret, "-n", "palisade-system"]).arg(format!("--from-file=cosign.pub={}", key_file.display())))?;
        let policy = format!("adv-{ns}");
        image_policy(cp, &policy, ns, &format!("{host}/shop/**"), &format!("secretRef: {{name: {secret}, namespace: palisade-system}}"), "  pinDigest: true\n")?;
        let by_digest = format!("{host}/shop/orders@{digest}");
        wait_refused(cp, ns, &format!("{host}/shop/unsigned:v1"))?;

        // pinDigest without the mutating hook: the signed tag is refused, its digest admitted.
        let out = apply(cp, ns, "tag", &pod_yaml("tag", &format!("{host}/shop/orders:v1")))?;
        rejects(&out, "signed image by tag under pinDigest", &["is not pinned to the digest that verified", &digest])?;
        // Poisoning attempt: a dry run naming a repository that does not exist, with the
        // victim's digest, is refused ...
        let file = cp.work_dir.join(format!("adv-{ns}-poison.yaml"));
        std::fs::write(&file, pod_yaml("poison", &format!("{host}/shop/missing@{digest}")))?;
        let out = run(cp.kubectl().args(["apply", "--dry-run=server", "-n", ns, "-f"]).arg(&file))?;
        rejects(&out, "a digest in a repository that does not exist", &["no signature"])?;
        // ... and the victim's own pod, in the same second, is not.
        accepts(&apply(cp, ns, "victim", &pod_yaml("victim", &by_digest))?, "the signed digest in its own repository")?;

        // The key is rotated: what the old key signed stops verifying within the refresh
        // interval, although its verdict was cached for ten minutes.
        std::fs::write(&key_file, &next)?;
        let rotated = run_ok(cp.kubectl().args(["create", "secret", "generic", &secret, "-n", "palisade-system", "--dry-run=client", "-o", "yaml"]).arg(format!("--from-file=cosign.pub={}", key_file.display())))?;
        let rotated_file = cp.work_dir.join(format!("{secret}.yaml"));
        std::fs::write(&rotated_file, rotated)?;
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(&rotated_file))?;
        let rotated_at = std::time::Instant::now();
        let mut attempt = 0;
        let out = cp.eventually("the rotated key to refuse the old signature", Duration::from_secs(30), || {
            attempt += 1;
            let name = format!("after-rotation-{attempt}");
            let out = apply(cp, ns, &name, &pod_yaml(&name, &by_digest)).ok()?;
            (!out.status.success()).then_some(out)
        })?;
        rejects(&out, "an image signed by the revoked key", &["authority ci"])?;
        eprintln!("  key rotation: the old signature refused {:.1} s after the Secret changed (refresh every 2 s)", rotated_at.elapsed().as_secs_f64());
        let _ = run(cp.kubectl().args(["delete", "secret", &secret, "-n", "palisade-system"]));
        let _ = run(cp.kubectl().args(["delete", "imagepolicy", &policy]));
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-adv-images", result)
}

/// Through the real API server: a pod cannot leave the ambient mesh by relabelling itself
/// through its `status` subresource, or while it terminates (it may run for its whole grace
/// period); a plain status update and the removal of a finalizer still go through.
fn relabels_through_status_or_while_terminating(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let wh = WebhookProcess::start(cp, "relabel", "")?;
    wh.register(cp, "palisade-e2e-relabel")?;
    let result = cp.with_temp_ns("relabel", |ns| {
        prepare(cp, ns, true)?;
        accepts(&apply(cp, ns, "app", &pod_yaml("app", "registry.example.com/shop/app:1"))?, "a pod in the ambient mesh")?;
        let patch = |sub: Option<&str>, body: &str| {
            let mut c = cp.kubectl();
            c.args(["patch", "pod", "app", "-n", ns, "--type=merge", "-p", body]);
            if let Some(sub) = sub {
                c.arg(format!("--subresource={sub}"));
            }
            run(&mut c)
        };
        let opt_out = r#"{"metadata":{"labels":{"istio.io/dataplane-mode":"none"}}}"#;
        rejects(&patch(Some("status"), opt_out)?, "a status update that opts the pod out of the mesh", &["istio.io/dataplane-mode=none"])?;
        accepts(&patch(Some("status"), r#"{"status":{"conditions":[{"type":"PodScheduled","status":"False","reason":"Test"}]}}"#)?, "a plain status update")?;
        // Terminating, held by a finalizer.
        accepts(&patch(None, r#"{"metadata":{"finalizers":["palisade.dev/e2e-hold"]}}"#)?, "adding a finalizer")?;
        run_ok(cp.kubectl().args(["delete", "pod", "app", "-n", ns, "--wait=false"]))?;
        rejects(&patch(None, opt_out)?, "a terminating pod opting out of the mesh", &["istio.io/dataplane-mode=none"])?;
        accepts(&patch(None, r#"{"metadata":{"finalizers":null}}"#)?, "removing the finalizer of a terminating pod")?;
        let labels = run(cp.kubectl().args(["get", "pod", "app", "-n", ns, "-o", "jsonpath={.metadata.labels}"]))?;
        if labels.status.success() {
            bail!("the terminating pod is still there: {}", String::from_utf8_lossy(&labels.stdout));
        }
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-relabel", result)
}
