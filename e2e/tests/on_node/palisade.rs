//! Palisade installed on the node by its chart, from its release images: full availability of
//! both Deployments, the webhook reached through its Service, the operator reconciling, and
//! day-2 operations (a webhook rollout under load, the leader pod deleted, `helm upgrade`).

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    process::{Command, Output},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    node::{Node, REGISTRY, push_binary_image},
    repo_root, run, run_ok,
    shop::{self, Installation, NS, helm, helm_succeeded},
};

use crate::Env;

/// The namespace the tests' workloads go to.
const SHOP: &str = "node-shop";

/// Installs Palisade once (the first test to need it does), with a namespace for the tests'
/// pods; later callers get the same installation.
pub(crate) fn installed(env: &Env) -> Result<&Installation> {
    env.installed
        .get_or_init(|| install(&env.node).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("Palisade could not be installed on the node: {e}"))
}

fn install(node: &Node) -> Result<Installation> {
    let inst = shop::install(node)?;
    let cp = node.cp();
    // Namespace, ServiceAccount and the label that gives pods a mesh identity.
    run_ok(cp.kubectl().args(["create", "namespace", SHOP]))?;
    run_ok(cp.kubectl().args([
        "label",
        "namespace",
        SHOP,
        "istio.io/dataplane-mode=ambient",
    ]))?;
    run_ok(
        cp.kubectl()
            .args(["create", "serviceaccount", "orders", "-n", SHOP]),
    )?;
    Ok(inst)
}

/// `name=available/desired` of both Deployments.
fn availability(node: &Node) -> Result<Vec<(String, String)>> {
    let text = run_ok(node.cp().kubectl().args([
        "get",
        "deployments",
        "-n",
        NS,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.status.availableReplicas}/{.spec.replicas} {end}",
    ]))?;
    Ok(text
        .split_whitespace()
        .map(|d| {
            let (n, c) = d.split_once('=').unwrap_or((d, ""));
            (n.to_owned(), c.to_owned())
        })
        .collect())
}

fn fully_available(node: &Node) -> Result<()> {
    let all = availability(node)?;
    if all.len() != 2 {
        bail!("expected two Deployments in {NS}, found {all:?}");
    }
    for (name, counts) in &all {
        if counts != "2/2" {
            bail!("{name}: {counts} replicas available, not 2/2");
        }
    }
    Ok(())
}

/// Waits until every webhook pod left is one of the current template: a `helm upgrade --wait`
/// returns when the new pods are ready, while the old ones still answer the API server's open
/// connections through their preStop and drain, with the old configuration.
pub fn old_webhook_pods_gone(node: &Node) -> Result<()> {
    node.cp()
        .eventually("the old webhook pods gone", Duration::from_mins(2), || {
            let pods = run_ok(node.cp().kubectl().args([
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                "app.kubernetes.io/component=webhook",
                "-o",
                "jsonpath={range .items[*]}{.metadata.deletionTimestamp}|{end}",
            ]))
            .ok()?;
            let all: Vec<&str> = pods.split_terminator('|').collect();
            (all.len() == 2 && all.iter().all(|d| d.is_empty())).then_some(())
        })
}

/// The release images, pushed to the node's registry, signed and attested; `helm install` of
/// the chart with its defaults (two replicas of each Deployment); both Deployments fully
/// available (a standby operator is ready), one leader; the API server calls the webhook
/// through its Service and gets real decisions; the operator reconciles an AuthPolicy.
pub fn installed_by_its_chart(env: &Env) -> Result<()> {
    let node = &env.node;
    installed(env)?;
    fully_available(node)?;
    let leaders = operator_leaders(node)?;
    if leaders.len() != 1 {
        bail!(
            "{} operator replicas lead ({leaders:?}); exactly one must",
            leaders.len()
        );
    }
    eprintln!(
        "  both Deployments 2/2 available; operator leader {}",
        leaders[0]
    );
    webhook_decides_through_its_service(node)?;
    let took = reconciled(node, "orders")?;
    eprintln!(
        "  AuthPolicy reconciled by the installed operator in {:.1} s",
        took.as_secs_f64()
    );
    Ok(())
}

/// The operator pods whose `palisade_operator_leading` is 1, read from their metrics port.
fn operator_leaders(node: &Node) -> Result<Vec<String>> {
    Ok(operator_metrics(node)?
        .into_iter()
        .filter(|(_, text)| {
            text.lines()
                .any(|l| l.trim() == "palisade_operator_leading 1")
        })
        .map(|(name, _)| name)
        .collect())
}

/// `(pod, /metrics text)` of every running operator pod that answers.
fn operator_metrics(node: &Node) -> Result<Vec<(String, String)>> {
    let pods = run_ok(node.cp().kubectl().args([
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/component=operator",
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.status.podIP} {end}",
    ]))?;
    let mut out = Vec::new();
    for p in pods.split_whitespace() {
        let (name, ip) = p.split_once('=').unwrap_or((p, ""));
        let Ok(addr) = format!("{ip}:9090").parse::<SocketAddr>() else {
            continue;
        };
        let Ok(mut s) = node.holder().connect(addr, Duration::from_secs(5)) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        out.push((name.to_owned(), text));
    }
    Ok(out)
}

/// The sum of the leader's samples of metric family `family` (e.g.
/// `palisade_operator_api_writes_total`), and the leader's name.
pub(crate) fn leader_sum(node: &Node, family: &str) -> Result<(String, f64)> {
    let all = operator_metrics(node)?;
    let (name, text) = all
        .iter()
        .find(|(_, t)| t.lines().any(|l| l.trim() == "palisade_operator_leading 1"))
        .context("no operator pod leads")?;
    let sum = text
        .lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Ok((name.clone(), sum))
}

/// A pod created with `--dry-run=server` (admission runs, nothing is stored).
fn dry_run_pod(node: &Node, name: &str, extra: &str) -> Result<Output> {
    dry_run(
        node,
        &format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {SHOP}}}
spec:
  serviceAccountName: orders
  containers:
    - name: app
      image: {REGISTRY}/server:v1
{extra}"
        ),
    )
}

/// `kubectl create --dry-run=server` of `yaml`: admission runs, nothing is stored.
pub(crate) fn dry_run(node: &Node, yaml: &str) -> Result<Output> {
    let mut child = node
        .cp()
        .kubectl()
        .args(["create", "--dry-run=server", "-o", "name", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(yaml.as_bytes())?;
    Ok(child.wait_with_output()?)
}

const SECRET_ENV: &str = "      env:\n        - name: DB_PASSWORD\n          valueFrom: {secretKeyRef: {name: db, key: password}}\n";

/// The API server reaches the webhook through its Service: a pod with a Secret in its
/// environment is refused with Palisade's reason, a compliant one admitted.
fn webhook_decides_through_its_service(node: &Node) -> Result<()> {
    let cp = node.cp();
    let mut attempt = 0;
    let refused = cp.eventually(
        "the webhook to refuse a Secret in env",
        Duration::from_mins(1),
        || {
            attempt += 1;
            let out = dry_run_pod(node, &format!("secret-env-{attempt}"), SECRET_ENV).ok()?;
            (!out.status.success()).then_some(out)
        },
    )?;
    let why = String::from_utf8_lossy(&refused.stderr);
    if !why.contains("palisade") || !why.contains("DB_PASSWORD") {
        bail!("refused, but not by Palisade's secrets check: {why}");
    }
    let ok = dry_run_pod(node, "compliant", "")?;
    if !ok.status.success() {
        bail!(
            "a compliant pod was refused: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }
    let endpoints = run_ok(cp.kubectl().args([
        "get",
        "endpointslices",
        "-n",
        NS,
        "-l",
        "kubernetes.io/service-name=palisade-webhook",
        "-o",
        "jsonpath={.items[*].endpoints[*].addresses[0]}",
    ]))?;
    eprintln!(
        "  the API server gets decisions through Service palisade-webhook (endpoints {endpoints})"
    );
    Ok(())
}

/// Applies an AuthPolicy `name` in the shop namespace and waits until it is Ready and its
/// AuthorizationPolicy exists; how long that took. The namespace is in the ambient mesh, so the
/// policy keeps to what ztunnel enforces (identities and ports).
fn reconciled(node: &Node, name: &str) -> Result<Duration> {
    let cp = node.cp();
    let file = node.work_dir.join(format!("authpolicy-{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "apiVersion: palisade.dev/v1alpha1
kind: AuthPolicy
metadata: {{name: {name}, namespace: {SHOP}}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  rules:
    - from: [{{serviceAccount: {{name: frontend}}}}]
      to: [{{ports: [8080]}}]
"
        ),
    )?;
    let t = Instant::now();
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
    cp.eventually(
        &format!("AuthPolicy {name} Ready"),
        Duration::from_mins(1),
        || {
            let ready = run_ok(cp.kubectl().args([
                "get",
                "authpolicy",
                name,
                "-n",
                SHOP,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]))
            .ok()?;
            (ready == "True").then_some(())
        },
    )?;
    let took = t.elapsed();
    let generated = run_ok(cp.kubectl().args([
        "get",
        "authorizationpolicies.security.istio.io",
        "-n",
        SHOP,
        "-l",
        &format!("palisade.dev/owner-name={name}"),
        "-o",
        "name",
    ]))?;
    if generated.trim().is_empty() {
        bail!("AuthPolicy {name} is Ready but no AuthorizationPolicy was written for it");
    }
    Ok(took)
}

/// Counts of a stream of admissions.
#[derive(Default)]
struct Stream {
    compliant_admitted: AtomicU32,
    compliant_refused: AtomicU32,
    violating_refused: AtomicU32,
    violating_admitted: AtomicU32,
}

/// A compliant and a violating pod, again and again, until `stop`; at most 2,000 of each.
fn stream_pods(
    node: &Node,
    stop: &AtomicBool,
    counts: &Stream,
    errors: &std::sync::Mutex<Vec<String>>,
) {
    for i in 0..2_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(out) = dry_run_pod(node, &format!("good-{i}"), "") {
            if out.status.success() {
                counts.compliant_admitted.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.compliant_refused.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = errors.lock() {
                    e.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
        }
        if let Ok(out) = dry_run_pod(node, &format!("bad-{i}"), SECRET_ENV) {
            let why = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                counts.violating_admitted.fetch_add(1, Ordering::Relaxed);
            } else if why.contains("DB_PASSWORD") {
                counts.violating_refused.fetch_add(1, Ordering::Relaxed);
            } else {
                // Refused, but not for its violation: the webhook could not be reached.
                counts.violating_refused.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = errors.lock() {
                    e.push(why.into_owned());
                }
            }
        }
    }
}

/// `kubectl rollout restart` of the webhook while compliant and violating pods keep coming: no
/// request is refused because the webhook could not be reached (preStop, drain, graceful
/// close), and no violating pod is admitted.
pub fn webhook_rollout_under_a_stream_of_pods(env: &Env) -> Result<()> {
    /// Rollouts in a row, each under the same stream of pod creations.
    const ROLLOUTS: usize = 3;
    let node = &env.node;
    installed(env)?;
    let cp = node.cp();
    let counts = Stream::default();
    let errors = std::sync::Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    let rollout = std::thread::scope(|s| {
        s.spawn(|| stream_pods(node, &stop, &counts, &errors));
        // Some traffic before the rollouts, some after; several rollouts in a row, as each
        // closes a different set of the API server's keep-alive connections.
        std::thread::sleep(Duration::from_secs(3));
        let result = (0..ROLLOUTS).try_for_each(|_| {
            run_ok(cp.kubectl().args([
                "rollout",
                "restart",
                "deployment/palisade-webhook",
                "-n",
                NS,
            ]))?;
            run_ok(cp.kubectl().args([
                "rollout",
                "status",
                "deployment/palisade-webhook",
                "-n",
                NS,
                "--timeout=180s",
            ]))?;
            // The old pods' grace periods end after the new ones are ready.
            std::thread::sleep(Duration::from_secs(15));
            Ok::<_, anyhow::Error>(())
        });
        stop.store(true, Ordering::Relaxed);
        result
    });
    rollout.context("the webhook rollout")?;
    let get = |c: &AtomicU32| c.load(Ordering::Relaxed);
    let unreachable = errors.lock().map(|e| e.clone()).unwrap_or_default();
    eprintln!(
        "  {ROLLOUTS} webhook rollouts in {:.0} s under load: {} compliant admitted, {} compliant refused, {} violating refused ({} of them not for the violation), {} violating admitted",
        t.elapsed().as_secs_f64(),
        get(&counts.compliant_admitted),
        get(&counts.compliant_refused),
        get(&counts.violating_refused),
        unreachable.len() - get(&counts.compliant_refused) as usize,
        get(&counts.violating_admitted),
    );
    if get(&counts.violating_admitted) > 0 {
        bail!(
            "{} violating pods were admitted during the rollout",
            get(&counts.violating_admitted)
        );
    }
    if !unreachable.is_empty() {
        bail!(
            "{} requests were refused because the webhook could not answer, e.g.: {}",
            unreachable.len(),
            unreachable[0]
        );
    }
    if get(&counts.compliant_admitted) < 10 {
        bail!("too few requests during the rollout to show anything");
    }
    fully_available(node)
}

/// The leader pod deleted (as a node drain or an eviction does): the standby takes the Lease
/// and converges an AuthPolicy created right after the deletion.
pub fn operator_leader_deleted_standby_converges(env: &Env) -> Result<()> {
    let node = &env.node;
    installed(env)?;
    let cp = node.cp();
    let leaders = operator_leaders(node)?;
    let [leader] = leaders.as_slice() else {
        bail!("expected one leader, found {leaders:?}");
    };
    let t = Instant::now();
    run_ok(
        cp.kubectl()
            .args(["delete", "pod", leader, "-n", NS, "--wait=false"]),
    )?;
    let took = reconciled(node, "failover")?;
    let new_leaders = operator_leaders(node)?;
    eprintln!(
        "  leader {leader} deleted: AuthPolicy created meanwhile Ready {:.1} s later, led by {new_leaders:?}",
        t.elapsed().as_secs_f64().max(took.as_secs_f64())
    );
    if new_leaders.iter().any(|l| l == leader) {
        bail!("the deleted pod {leader} still leads");
    }
    cp.eventually(
        "both operator replicas available again",
        Duration::from_mins(2),
        || fully_available(node).ok(),
    )?;
    Ok(())
}

/// `helm upgrade` with new images (a new digest for each) and a changed configuration: both
/// Deployments roll and complete, with the standby operator ready throughout.
pub fn helm_upgrade_with_new_images_and_config(env: &Env) -> Result<()> {
    let node = &env.node;
    let before = installed(env)?;
    let crane =
        |args: &[&str]| run_ok(Command::new(node.bin("crane")).args(args).arg("--insecure"));
    let mut digests = Vec::new();
    for (name, digest) in [
        ("palisade-operator", &before.operator),
        ("palisade-webhook", &before.webhook),
    ] {
        let from = format!("{}/{name}@{digest}", node.registry.host);
        let to = format!("{}/{name}:upgrade", node.registry.host);
        crane(&[
            "mutate",
            &from,
            "--label",
            "palisade.dev/upgrade-test=1",
            "-t",
            &to,
        ])?;
        digests.push(crane(&["digest", &to])?.trim().to_owned());
    }
    let t = Instant::now();
    let out = run(helm(node)
        .args(["upgrade", "palisade"])
        .arg(repo_root().join("charts/palisade"))
        .args([
            "--namespace",
            NS,
            "--reuse-values",
            "--set",
            &format!("image.operator.digest={}", digests[0]),
            "--set",
            &format!("image.webhook.digest={}", digests[1]),
            "--set",
            "operator.concurrency=16",
            "--set",
            "webhook.drainSeconds=3",
            "--wait",
            "--timeout",
            "4m",
        ]))?;
    helm_succeeded(node, "upgrade", &out)?;
    old_webhook_pods_gone(node)?;
    fully_available(node)?;
    let images = run_ok(node.cp().kubectl().args([
        "get",
        "pods",
        "-n",
        NS,
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={range .items[*]}{.spec.containers[0].image} {end}",
    ]))?;
    for d in &digests {
        let n = images
            .split_whitespace()
            .filter(|i| i.ends_with(d.as_str()))
            .count();
        if n < 2 {
            bail!("after the upgrade {n} running pods use {d}: {images}");
        }
    }
    eprintln!(
        "  helm upgrade (two new images, new configuration) complete in {:.1} s, both Deployments 2/2",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// An ImagePolicy with `pinDigest`: the pod of a Deployment naming a tag runs exactly the digest
/// the webhook verified (its spec pinned, its container's `imageID` the same); the tag moved to
/// an unsigned image afterwards changes nothing that runs, and the replacement of a deleted pod
/// (which would pull the moved tag) is refused.
pub fn pinned_digest_is_what_runs(env: &Env) -> Result<()> {
    let node = &env.node;
    installed(env)?;
    let cp = node.cp();
    let public = node.registry.key_pair("shop")?;
    let signed = push_binary_image(
        &node.registry,
        &node.work_dir,
        &node.bin("crane"),
        "bin/server",
        ("shop/server", "v1"),
        &[
            "--entrypoint=/bin/server,registry,serve,--address,:8080",
            "--user=65532",
        ],
    )?;
    node.registry.sign("shop", "shop/server", &signed)?;
    let key = std::fs::read_to_string(&public)?;
    let policy = format!(
        "apiVersion: palisade.dev/v1alpha1
kind: ImagePolicy
metadata: {{name: node-shop-images}}
spec:
  images: [{{glob: \"{REGISTRY}/shop/**\"}}]
  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {SHOP}}}}}
  mode: Enforce
  pinDigest: true
  authorities:
    - name: shop-ci
      transparencyLog: Ignore
      key:
        publicKey: |
{key}
",
        key = key
            .lines()
            .map(|l| format!("          {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let deployment = format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: pinned, namespace: {SHOP}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: pinned}}}}
  template:
    metadata: {{labels: {{app: pinned}}}}
    spec:
      serviceAccountName: orders
      containers:
        - name: server
          image: {REGISTRY}/shop/server:v1
"
    );
    let file = node.work_dir.join("pinned.yaml");
    std::fs::write(&file, format!("{policy}---\n{deployment}"))?;
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
    let pod_field = |what: &str| {
        run_ok(cp.kubectl().args([
            "get",
            "pods",
            "-n",
            SHOP,
            "-l",
            "app=pinned",
            "--field-selector=status.phase=Running",
            "-o",
            &format!("jsonpath={{.items[*].{what}}}"),
        ]))
    };
    let running = cp.eventually("the pinned pod running", Duration::from_mins(2), || {
        let name = pod_field("metadata.name").ok()?;
        (!name.is_empty()).then_some(name)
    })?;
    let spec_image = pod_field("spec.containers[0].image")?;
    let image_id = pod_field("status.containerStatuses[0].imageID")?;
    // `repo:tag@digest`: the tag is kept for people, the digest is what the runtime pulls.
    let pinned = spec_image.starts_with(&format!("{REGISTRY}/shop/server"))
        && spec_image.ends_with(&format!("@{signed}"));
    if !pinned {
        bail!("the admitted pod names {spec_image}, not the verified digest {signed}");
    }
    if !image_id.ends_with(&signed) {
        bail!("the container runs {image_id}, not the verified {signed}");
    }
    // The tag moves to an unsigned image.
    let moved = push_binary_image(
        &node.registry,
        &node.work_dir,
        &node.bin("pause"),
        "bin/other",
        ("shop/server", "v1"),
        &["--entrypoint=/bin/other"],
    )?;
    let still = pod_field("status.containerStatuses[0].imageID")?;
    if !still.ends_with(&signed) {
        bail!("after the tag moved to {moved}, the container runs {still}");
    }
    run_ok(
        cp.kubectl()
            .args(["delete", "pod", &running, "-n", SHOP, "--wait=false"]),
    )?;
    // The replacement is either refused (the webhook resolved the moved tag, or its two calls
    // resolved it differently) or admitted pinned to the digest verified before (the tag's
    // resolution still cached): never the moved image.
    let outcome = cp
        .eventually(
            "the replacement pod decided",
            Duration::from_mins(1),
            || {
                let events = run_ok(cp.kubectl().args([
                    "get",
                    "events",
                    "-n",
                    SHOP,
                    "--field-selector=reason=FailedCreate",
                    "-o",
                    "jsonpath={.items[*].message}",
                ]))
                .ok()?;
                // Refused for the image: not signed by `shop-ci`, or (when the mutating and the
                // validating call resolved the tag differently) not pinned to what verified.
                if events.contains("palisade denied Pod") {
                    return Some(format!(
                        "refused: {}",
                        events.split('.').next().unwrap_or_default()
                    ));
                }
                let name = pod_field("metadata.name").ok()?;
                let id = pod_field("status.containerStatuses[0].imageID").ok()?;
                (!name.is_empty() && name != running && !id.is_empty())
                    .then(|| format!("admitted pinned, running {id}"))
            },
        )
        .with_context(|| {
            let get = |args: &[&str]| {
                run(cp.kubectl().args(args)).map_or_else(
                    |e| format!("{e:#}"),
                    |o| String::from_utf8_lossy(&o.stdout).into_owned(),
                )
            };
            format!(
                "events: {}\npods: {}",
                get(&[
                    "get",
                    "events",
                    "-n",
                    SHOP,
                    "-o",
                    "custom-columns=REASON:.reason,OBJECT:.involvedObject.name,MESSAGE:.message"
                ]),
                get(&["get", "pods", "-n", SHOP, "-l", "app=pinned", "-o", "wide"]),
            )
        })?;
    let now = pod_field("status.containerStatuses[0].imageID")?;
    if now.contains(&moved) || !now.split_whitespace().all(|id| id.ends_with(&signed)) {
        bail!("after the tag moved to {moved}, pods run {now:?}");
    }
    eprintln!(
        "  pod pinned to {signed} and running it; tag moved to {moved}: replacement {outcome}"
    );
    run_ok(
        cp.kubectl()
            .args(["delete", "deployment", "pinned", "-n", SHOP]),
    )?;
    run_ok(
        cp.kubectl()
            .args(["delete", "imagepolicy", "node-shop-images"]),
    )?;
    Ok(())
}
