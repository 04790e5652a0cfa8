//! The node itself: pods run from images in the local registry, get bridge addresses, are
//! reached on their IP and through a Service (kube-proxy's rules), run the exact digest they
//! were given, and the host sees none of it.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    controlplane::default_bin_dir,
    netns::MASKED_SYSCTLS,
    node::{Node, REGISTRY, push_binary_image},
    release, repo_root, run, run_ok,
};

use crate::{Env, TestFn};

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "node::pods_run_and_services_route",
        pods_run_and_services_route,
    ),
    (
        "node::host_untouched_while_the_node_runs",
        host_untouched_while_the_node_runs,
    ),
    (
        "node::palisade_installed_by_its_chart",
        palisade_installed_by_its_chart,
    ),
];

/// What the node must not change on the host: network links, routes, firewall rules, the kernel
/// settings the kubelet writes, and the host's mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostState {
    entries: Vec<(String, String)>,
}

impl HostState {
    /// The host's state now.
    pub fn now() -> Self {
        let out = |program: &str, args: &[&str]| {
            run(Command::new(program).args(args)).map_or_else(
                |e| format!("({e})"),
                |o| String::from_utf8_lossy(&o.stdout).into_owned(),
            )
        };
        let mut entries = vec![
            ("links".to_owned(), out("ip", &["-o", "link", "show"])),
            (
                "routes".to_owned(),
                out("ip", &["route", "show", "table", "all"]),
            ),
            (
                "iptables".to_owned(),
                without_comments(&out("iptables-save", &[])),
            ),
            ("nftables".to_owned(), out("nft", &["list", "ruleset"])),
            ("mounts".to_owned(), mounts()),
        ];
        for s in MASKED_SYSCTLS.iter().chain(&["net/ipv4/ip_forward"]) {
            entries.push((
                format!("sysctl {s}"),
                std::fs::read_to_string(format!("/proc/sys/{s}")).unwrap_or_default(),
            ));
        }
        HostState { entries }
    }

    /// What differs between `self` and `later`, one block per item; empty when nothing does.
    pub fn differences(&self, later: &HostState) -> String {
        let mut out = String::new();
        for ((name, before), (_, after)) in self.entries.iter().zip(&later.entries) {
            if before != after {
                let _ = writeln!(
                    out,
                    "{name} changed:\n--- before\n{before}\n--- after\n{after}"
                );
            }
        }
        out
    }
}

/// `iptables-save` without its timestamp comments.
fn without_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The host's mount points (mount ids and propagation peers left out: they are not state).
fn mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A static HTTP server image: crane's registry (answers `GET /v2/` with 200), as user 65532.
fn push_server_image(node: &Node) -> Result<String> {
    push_binary_image(
        &node.registry,
        &node.work_dir,
        &node.registry_bin("crane"),
        "bin/server",
        ("server", "v1"),
        &[
            "--entrypoint=/bin/server,registry,serve,--address,:8080",
            "--user=65532",
        ],
    )
}

/// `GET path` over plain HTTP/1.0 on `stream`; the status code.
fn http_status(mut stream: std::net::TcpStream, path: &str) -> Result<u16> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {text:?}"))
}

/// Applies `file` (the server's Deployment) and waits for the rollout, with the pods' events
/// and the node's logs when it does not finish.
fn roll_out(node: &Node, file: &std::path::Path) -> Result<()> {
    let cp = node.cp();
    let t = Instant::now();
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(file))?;
    let rollout = run(cp.kubectl().args([
        "rollout",
        "status",
        "deployment/server",
        "-n",
        "node-smoke",
        "--timeout=120s",
    ]))?;
    if !rollout.status.success() {
        let pods = run(cp.kubectl().args(["describe", "pods", "-n", "node-smoke"]))?;
        bail!(
            "the Deployment did not roll out: {}\n{}\nkubelet:\n{}\ncontainerd:\n{}",
            String::from_utf8_lossy(&rollout.stderr),
            String::from_utf8_lossy(&pods.stdout),
            node.log_tail("kubelet", 30),
            node.log_tail("containerd", 30)
        );
    }
    eprintln!(
        "  Deployment available {:.1} s after apply",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn pods_run_and_services_route(env: &Env) -> Result<()> {
    let node = &env.node;
    let cp = node.cp();
    let digest = push_server_image(node)?;
    let image = format!("{REGISTRY}/server@{digest}");
    let yaml = format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: node-smoke}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: server, namespace: node-smoke}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: server}}}}
  template:
    metadata: {{labels: {{app: server}}}}
    spec:
      automountServiceAccountToken: false
      containers:
        - name: server
          image: {image}
          ports: [{{containerPort: 8080}}]
          resources:
            limits: {{memory: 64Mi, cpu: 200m}}
          securityContext:
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {{drop: [ALL]}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: node-smoke}}
spec:
  selector: {{app: server}}
  ports: [{{port: 80, targetPort: 8080}}]
"
    );
    let file = node.work_dir.join("node-smoke.yaml");
    std::fs::write(&file, yaml)?;
    roll_out(node, &file)?;
    let jsonpath = |what: &str| {
        run_ok(cp.kubectl().args([
            "get",
            "pods",
            "-n",
            "node-smoke",
            "-l",
            "app=server",
            "-o",
            &format!("jsonpath={{.items[0].{what}}}"),
        ]))
    };
    let pod_ip = jsonpath("status.podIP")?;
    let image_id = jsonpath("status.containerStatuses[0].imageID")?;
    if !pod_ip.starts_with("10.88.") {
        bail!("the pod's IP {pod_ip:?} is not from the bridge's subnet");
    }
    // The runtime ran exactly the digest it was given.
    if !image_id.ends_with(&digest) {
        bail!("the container runs {image_id}, not {digest}");
    }
    let holder = node.holder();
    let timeout = Duration::from_secs(5);
    let direct: SocketAddr = format!("{pod_ip}:8080").parse()?;
    let code = http_status(holder.connect(direct, timeout)?, "/v2/")?;
    if code != 200 {
        bail!("GET /v2/ on the pod's IP answered {code}");
    }
    let cluster_ip = run_ok(cp.kubectl().args([
        "get",
        "service",
        "server",
        "-n",
        "node-smoke",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]))?;
    let service: SocketAddr = format!("{cluster_ip}:80").parse()?;
    let code = through_service(node, service)?;
    if code != 200 {
        bail!("GET /v2/ through the Service answered {code}");
    }
    let bytes = memory_limit(node)?;
    eprintln!(
        "  pod {pod_ip} runs {digest} (memory limit {} bytes), answers on its IP and through Service {cluster_ip}",
        bytes.trim()
    );
    run_ok(
        cp.kubectl()
            .args(["delete", "namespace", "node-smoke", "--wait=false"]),
    )?;
    Ok(())
}

/// `GET /v2/` through a Service address, retried while kube-proxy writes its rules (shortly
/// after the endpoints appear); the status code.
fn through_service(node: &Node, service: SocketAddr) -> Result<u16> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node
            .holder()
            .connect(service, Duration::from_secs(5))
            .and_then(|s| http_status(s, "/v2/"))
        {
            Ok(code) => return Ok(code),
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "the Service {service} does not route to the pod: {e:#}\nkube-proxy:\n{}",
                    node.log_tail("kube-proxy", 20)
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// The memory limit of the server container's cgroup: the pod's 64 Mi limit, for real.
fn memory_limit(node: &Node) -> Result<String> {
    let limit = node.holder().sh(
        "cat /proc/$(pgrep -f 'bin/server registry serve' | head -1)/cgroup | sed -n 's/^[0-9]*:memory://p'",
    )?;
    let bytes = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory{}/memory.limit_in_bytes",
        limit.trim()
    ))
    .with_context(|| format!("reading the memory limit of cgroup {}", limit.trim()))?;
    if bytes.trim() != (64 * 1024 * 1024).to_string() {
        bail!(
            "the container's memory cgroup limit is {} bytes, not 64 MiB",
            bytes.trim()
        );
    }
    Ok(bytes.trim().to_owned())
}

fn host_untouched_while_the_node_runs(env: &Env) -> Result<()> {
    let now = HostState::now();
    let differences = env.host_before.differences(&now);
    if !differences.is_empty() {
        bail!("the running node changed the host:\n{differences}");
    }
    // And inside, the node did set up its own: a bridge and kube-proxy's chains.
    let inside = env
        .node
        .holder()
        .sh("ip -o link show cni0 && iptables-save -t nat | grep -c KUBE-SERVICES")?;
    if !inside.contains("cni0") {
        bail!("no bridge inside the node: {inside}");
    }
    Ok(())
}

/// The release images, pushed to the node's registry, signed and attested; `helm install` of
/// the chart with its defaults (two replicas of each Deployment); both Deployments fully
/// available (a standby operator is ready), one leader; the API server calls the webhook
/// through its Service and gets real decisions; the operator reconciles an AuthPolicy.
fn palisade_installed_by_its_chart(env: &Env) -> Result<()> {
    let node = &env.node;
    let cp = node.cp();
    let root = repo_root();
    let work = node.work_dir.join("release");
    node.registry.key_pair("release")?;
    let t = Instant::now();
    let images = release::publish(&root, &node.registry, "release", &work)?;
    eprintln!(
        "  release images pushed, signed and attested in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    cp.install_crds(&default_bin_dir())?;
    let digest = |name: &str| {
        images
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.digest.clone())
            .with_context(|| format!("no {name} image"))
    };
    let t = Instant::now();
    let install = run(Command::new(node.registry_bin("helm"))
        .env("KUBECONFIG", &cp.kubeconfig)
        .args(["install", "palisade"])
        .arg(root.join("charts/palisade"))
        .args([
            "--namespace",
            "palisade-system",
            "--create-namespace",
            "--set",
            &format!("image.registry={REGISTRY}"),
            "--set",
            &format!("image.operator.digest={}", digest("palisade-operator")?),
            "--set",
            &format!("image.webhook.digest={}", digest("palisade-webhook")?),
            "--wait",
            "--timeout",
            "4m",
        ]))?;
    if !install.status.success() {
        let pods = run(cp
            .kubectl()
            .args(["describe", "pods", "-n", "palisade-system"]))?;
        bail!(
            "helm install failed: {}\n{}\nkubelet:\n{}",
            String::from_utf8_lossy(&install.stderr),
            String::from_utf8_lossy(&pods.stdout),
            node.log_tail("kubelet", 30)
        );
    }
    let available = run_ok(cp.kubectl().args([
        "get",
        "deployments",
        "-n",
        "palisade-system",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.status.availableReplicas}/{.spec.replicas} {end}",
    ]))?;
    eprintln!(
        "  helm install --wait done in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        available.trim()
    );
    for d in available.split_whitespace() {
        let (name, counts) = d.split_once('=').unwrap_or((d, ""));
        if counts != "2/2" {
            bail!("{name}: {counts} replicas available, not 2/2");
        }
    }
    let leaders = operator_leaders(node)?;
    if leaders.len() != 1 {
        bail!(
            "{} operator replicas lead ({leaders:?}); exactly one must",
            leaders.len()
        );
    }
    webhook_decides_through_its_service(node)?;
    operator_reconciles(node)?;
    Ok(())
}

/// The operator pods whose `palisade_operator_leading` is 1, read from their metrics port.
fn operator_leaders(node: &Node) -> Result<Vec<String>> {
    let cp = node.cp();
    let pods = run_ok(cp.kubectl().args([
        "get",
        "pods",
        "-n",
        "palisade-system",
        "-l",
        "app.kubernetes.io/component=operator",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.status.podIP} {end}",
    ]))?;
    let mut leaders = Vec::new();
    for p in pods.split_whitespace() {
        let (name, ip) = p.split_once('=').unwrap_or((p, ""));
        let addr: SocketAddr = format!("{ip}:9090").parse()?;
        let mut s = node.holder().connect(addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        if text
            .lines()
            .any(|l| l.trim() == "palisade_operator_leading 1")
        {
            leaders.push(name.to_owned());
        }
    }
    Ok(leaders)
}

fn dry_run_pod(node: &Node, ns: &str, name: &str, extra: &str) -> Result<std::process::Output> {
    let yaml = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  serviceAccountName: orders
  containers:
    - name: app
      image: {REGISTRY}/server:v1
{extra}"
    );
    let file = node.work_dir.join(format!("{ns}-{name}.yaml"));
    std::fs::write(&file, yaml)?;
    run(node
        .cp()
        .kubectl()
        .args(["apply", "--dry-run=server", "-f"])
        .arg(&file))
}

/// The API server reaches the webhook through its Service: a pod with a Secret in its
/// environment is refused with Palisade's reason, a compliant one admitted.
fn webhook_decides_through_its_service(node: &Node) -> Result<()> {
    let cp = node.cp();
    let ns = "node-shop";
    run_ok(cp.kubectl().args(["create", "namespace", ns]))?;
    run_ok(
        cp.kubectl()
            .args(["label", "namespace", ns, "istio.io/dataplane-mode=ambient"]),
    )?;
    run_ok(
        cp.kubectl()
            .args(["create", "serviceaccount", "orders", "-n", ns]),
    )?;
    let secret_env = "      env:\n        - name: DB_PASSWORD\n          valueFrom: {secretKeyRef: {name: db, key: password}}\n";
    let mut attempt = 0;
    let refused = cp.eventually(
        "the webhook to refuse a Secret in env",
        Duration::from_mins(1),
        || {
            attempt += 1;
            let out = dry_run_pod(node, ns, &format!("secret-env-{attempt}"), secret_env).ok()?;
            (!out.status.success()).then_some(out)
        },
    )?;
    let why = String::from_utf8_lossy(&refused.stderr);
    if !why.contains("palisade") || !why.contains("DB_PASSWORD") {
        bail!("refused, but not by Palisade's secrets check: {why}");
    }
    let ok = dry_run_pod(node, ns, "compliant", "")?;
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
        "palisade-system",
        "-l",
        "kubernetes.io/service-name=palisade-webhook",
        "-o",
        "jsonpath={.items[*].endpoints[*].addresses[0]}",
    ]))?;
    eprintln!("  webhook answers through Service palisade-webhook (endpoints {endpoints})");
    Ok(())
}

/// An AuthPolicy applied to the node's cluster is reconciled by the installed operator.
fn operator_reconciles(node: &Node) -> Result<()> {
    let cp = node.cp();
    let file = node.work_dir.join("node-authpolicy.yaml");
    std::fs::write(
        &file,
        "apiVersion: palisade.dev/v1alpha1
kind: AuthPolicy
metadata: {name: orders, namespace: node-shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
    - from: [{serviceAccount: {name: frontend}}]
      to: [{methods: [GET], paths: [/api/orders]}]
",
    )?;
    let t = Instant::now();
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
    cp.eventually("the AuthPolicy Ready", Duration::from_mins(1), || {
        let ready = run_ok(cp.kubectl().args([
            "get",
            "authpolicy",
            "orders",
            "-n",
            "node-shop",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]))
        .ok()?;
        (ready == "True").then_some(())
    })?;
    let generated = run_ok(cp.kubectl().args([
        "get",
        "authorizationpolicies.security.istio.io",
        "-n",
        "node-shop",
        "-o",
        "name",
    ]))?;
    if generated.trim().is_empty() {
        bail!("the AuthPolicy is Ready but no AuthorizationPolicy was written");
    }
    eprintln!(
        "  AuthPolicy reconciled by the installed operator in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        generated.split_whitespace().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
