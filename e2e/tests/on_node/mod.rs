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
    netns::MASKED_SYSCTLS,
    node::{Node, REGISTRY, push_binary_image},
    run, run_ok,
};

use crate::{Env, TestFn};

pub mod faults;
pub mod palisade;
pub mod shop;

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
        palisade::installed_by_its_chart,
    ),
    (
        "node::pinned_digest_is_what_runs",
        palisade::pinned_digest_is_what_runs,
    ),
    (
        "node::example_shop_uses_its_secret_binding",
        shop::example_shop_uses_its_secret_binding,
    ),
    (
        "node::cluster_dns_resolves_services",
        shop::cluster_dns_resolves_services,
    ),
    (
        "node::vault_sealed_while_the_shop_uses_its_binding",
        shop::vault_sealed_while_the_shop_uses_its_binding,
    ),
    (
        "node::webhook_killed_and_registry_stopped_under_a_stream_of_pods",
        faults::webhook_killed_and_registry_stopped_under_a_stream_of_pods,
    ),
    (
        "node::apiserver_restart_and_compaction_while_converging",
        faults::apiserver_restart_and_compaction_while_converging,
    ),
    (
        "node::webhook_rollout_under_a_stream_of_pods",
        palisade::webhook_rollout_under_a_stream_of_pods,
    ),
    (
        "node::operator_leader_deleted_standby_converges",
        palisade::operator_leader_deleted_standby_converges,
    ),
    (
        "node::helm_upgrade_with_new_images_and_config",
        palisade::helm_upgrade_with_new_images_and_config,
    ),
    // Last: it moves the installation to SPIRE as its identity source.
    (
        "node::orders_receives_its_svid_from_spire",
        shop::orders_receives_its_svid_from_spire,
    ),
];

/// Tests left out of the default run, with the reason printed at start-up.
pub const IGNORED: &[(&str, &str)] = &[];

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
        &node.bin("crane"),
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

/// The quick start on a node, after the tests' own node has stopped: `palisade-e2e up --node`
/// comes up with Palisade installed by its chart and the example shop running (every shop pod
/// Running and ready), and on SIGTERM stops leaving nothing on the host. The elapsed times.
pub fn up_node_runs_the_shop_and_stops_cleanly(host_before: &HostState) -> Result<String> {
    use std::io::BufRead as _;
    let state = tempfile::tempdir()?;
    let stderr_path = state.path().join("up.stderr");
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade-e2e"))
        .args(["up", "--node", "--state"])
        .arg(state.path().join("up"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()?;
    let cgroup_root = format!("/palisade-node-{}", child.id());
    let stdout = child.stdout.take().context("stdout")?;
    let mut kubeconfig = None;
    for line in std::io::BufReader::new(stdout).lines() {
        if let Some(path) = line?.trim().strip_prefix("export KUBECONFIG=") {
            kubeconfig = Some(path.to_owned());
            break;
        }
    }
    let up_after = t.elapsed();
    let checked = kubeconfig
        .context("up printed no kubeconfig")
        .and_then(|k| {
            let kubectl = palisade_e2e::controlplane::default_bin_dir().join("kubectl");
            run_ok(Command::new(kubectl).env("KUBECONFIG", k).args([
                "get",
                "pods",
                "-n",
                "shop",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.status.containerStatuses[0].ready} {end}",
            ]))
        });
    let _ = run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let t_stop = Instant::now();
    let status = child.wait()?;
    let stopped_after = t_stop.elapsed();
    let pods = checked
        .with_context(|| format!("up --node:\n{}", palisade_e2e::tail_lines(&stderr_path, 30)))?;
    let ready: Vec<&str> = pods.split_whitespace().collect();
    if ready.len() != 3 || !ready.iter().all(|p| p.ends_with("=true")) {
        bail!(
            "the shop's pods after up --node: {pods:?}\n{}",
            palisade_e2e::tail_lines(&stderr_path, 30)
        );
    }
    if !status.success() {
        bail!("up --node exited with {status} on SIGTERM");
    }
    let left = palisade_e2e::node::leftovers(&cgroup_root);
    let differences = host_before.differences(&HostState::now());
    if !left.is_empty() || !differences.is_empty() {
        bail!("up --node left on the host:\n{left}{differences}");
    }
    Ok(format!(
        "node, Palisade and the shop up after {:.1} s, 3 shop pods ready; stopped in {:.1} s, host unchanged",
        up_after.as_secs_f64(),
        stopped_after.as_secs_f64()
    ))
}
