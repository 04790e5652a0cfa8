//! A real single-node cluster: the control plane of [`crate::controlplane`] plus a kubelet,
//! containerd with runc, the CNI bridge, kube-proxy in iptables mode and kube-scheduler, all in
//! one private network and mount namespace ([`crate::netns`]) so nothing leaks onto the host.
//! Images come from a registry on the host's 127.0.0.1, reached by the node as
//! `10.200.0.1:5000` ([`REGISTRY`]); the sandbox (pause) image is built here.
//!
//! Dropping a [`Node`] stops every process it started, the pods' too, removes the cgroups the
//! kubelet made and the namespaces with their bridge, routes, iptables rules and mounts.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    ControlPlane, Options,
    controlplane::{Component, check_exited},
    netns::{Holder, NODE_IP, Relay, ns_inode},
    registry::OciRegistry,
    run, run_ok, spawn_logged,
};

/// The node's name.
pub const NODE_NAME: &str = "palisade-node";
/// How pods and the node's runtime name the registry (a relay to the host's registry).
pub const REGISTRY: &str = "10.200.0.1:5000";
/// The pod network (the bridge's subnet).
pub const POD_CIDR: &str = "10.88.0.0/16";
/// The sandbox image, built here from Kubernetes' `pause.c`.
pub const PAUSE_IMAGE: &str = "10.200.0.1:5000/pause:3.10";

/// The cluster DNS Service's address (Service `kube-system/kube-dns`, CoreDNS), which the kubelet
/// gives pods as their nameserver.
pub const DNS_IP: &str = "10.0.0.10";

/// Binaries the node needs besides the control plane's.
const NODE_BINARIES: &[&str] = &[
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "bridge",
    "host-local",
    "loopback",
    "portmap",
    "pause",
    "kubelet",
    "kube-proxy",
    "kube-scheduler",
    "coredns",
    "crane",
];

/// A running node and its control plane. Fields drop in order: the processes are stopped
/// first (in `drop`), then the control plane, the relays, the namespaces, and last the cgroups
/// and the work directory.
pub struct Node {
    components: Vec<Component>,
    cp: ControlPlane,
    /// The registry pods pull from (on the host's 127.0.0.1; [`REGISTRY`] inside).
    pub registry: OciRegistry,
    /// Relays into the node (the registry), kept open while it runs.
    _exposed: Vec<Relay>,
    holder: Arc<Holder>,
    cleanup: Cleanup,
    /// Where state and logs live.
    pub work_dir: PathBuf,
    bin_dir: PathBuf,
    /// From start to the API server's readiness, and to the node's `Ready`.
    pub timings: Timings,
}

/// Removes the node's cgroups and work directory when dropped (after everything else).
struct Cleanup {
    cgroup_root: String,
    work_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_cgroups(&self.cgroup_root);
        if std::env::var_os("PALISADE_KEEP_NODE").is_none() {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

/// How long starting took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Start to API server `/readyz`.
    pub apiserver: Duration,
    /// Start to the node `Ready`.
    pub node_ready: Duration,
    /// Start to cluster DNS (CoreDNS, as a pod) answering.
    pub dns_ready: Duration,
}

impl Node {
    /// Starts the namespaces, the control plane inside them, the registry relay, containerd,
    /// the kubelet, kube-proxy and the scheduler, and waits until the node is `Ready`.
    pub fn start(bin_dir: &Path) -> Result<Self> {
        let started = Instant::now();
        preflight(bin_dir)?;
        let work_dir = tempfile::Builder::new()
            .prefix("palisade-node-")
            .tempdir()?
            .keep();
        let cleanup = Cleanup {
            cgroup_root: format!("palisade-node-{}", std::process::id()),
            work_dir: work_dir.clone(),
        };
        let holder = Arc::new(Holder::start(&work_dir)?);
        let registry = OciRegistry::start(bin_dir, &work_dir.join("registry"))?;
        let registry_addr: SocketAddr = registry.host.parse()?;
        let exposed = vec![holder.expose(REGISTRY.parse()?, registry_addr)?];
        // The sandbox image: Kubernetes' `pause`, built here, as [`PAUSE_IMAGE`].
        push_binary_image(
            &registry,
            &work_dir,
            &bin_dir.join("pause"),
            "pause",
            ("pause", "3.10"),
            &["--entrypoint=/pause"],
        )?;
        make_cgroups(&cleanup.cgroup_root)?;
        let cp = ControlPlane::start(&Options {
            bin_dir: bin_dir.to_path_buf(),
            work_dir: Some(work_dir.join("cp")),
            keep_dir: true,
            inside: Some(Arc::clone(&holder)),
            timeout: Duration::from_mins(2),
            ..Options::new()
        })?;
        let mut node = Node {
            components: Vec::new(),
            cp,
            registry,
            _exposed: exposed,
            holder,
            cleanup,
            work_dir,
            bin_dir: bin_dir.to_path_buf(),
            timings: Timings::default(),
        };
        node.timings.apiserver = started.elapsed();
        node.start_containerd()?;
        node.start_kubelet()?;
        node.start_kube_proxy()?;
        node.start_scheduler()?;
        node.wait_ready(Duration::from_mins(2))?;
        node.timings.node_ready = started.elapsed();
        node.start_dns()?;
        node.timings.dns_ready = started.elapsed();
        Ok(node)
    }

    /// The control plane.
    pub fn cp(&self) -> &ControlPlane {
        &self.cp
    }

    /// The namespaces' holder (to connect to pods and Services from inside).
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    fn inside_kubeconfig(&self) -> PathBuf {
        self.cp
            .kubeconfig_inside()
            .unwrap_or_else(|| self.cp.kubeconfig.clone())
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> Result<()> {
        let log = self.work_dir.join(format!("{name}.log"));
        let child = spawn_logged(
            cmd.env("PATH", path_with(&self.bin_dir)).process_group(0),
            &log,
        )
        .with_context(|| format!("starting {name}"))?;
        self.components.push(Component { name, child, log });
        Ok(())
    }

    /// Fails with the component's name and log tail if any node component exited.
    pub fn check_alive(&mut self) -> Result<()> {
        check_exited(&mut self.components)
    }

    /// The last lines of a component's log (`kubelet`, `containerd`, ...).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        crate::tail_lines(&self.work_dir.join(format!("{name}.log")), lines)
    }

    fn start_containerd(&mut self) -> Result<()> {
        let dir = self.work_dir.join("containerd");
        let hosts = dir.join("certs.d").join(REGISTRY);
        std::fs::create_dir_all(&hosts)?;
        std::fs::write(
            hosts.join("hosts.toml"),
            format!(
                "server = \"http://{REGISTRY}\"\n[host.\"http://{REGISTRY}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
        let cni = self.work_dir.join("cni");
        std::fs::create_dir_all(cni.join("net.d"))?;
        std::fs::write(
            cni.join("net.d/10-palisade.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "palisade",
                "plugins": [
                    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
                     "hairpinMode": true,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                              "routes": [{"dst": "0.0.0.0/0"}],
                              "dataDir": cni.join("ipam")}},
                    {"type": "portmap", "capabilities": {"portMappings": true}}
                ]
            })
            .to_string(),
        )?;
        let bin = std::fs::canonicalize(self.bin_dir.join("runc"))?;
        let cni_bin = bin.parent().context("runc's directory")?.to_path_buf();
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{conf}"
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{certs}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = self.containerd_socket().display(),
            cni_bin = cni_bin.display(),
            conf = cni.join("net.d").display(),
            runc = bin.display(),
            certs = dir.join("certs.d").display(),
        );
        let path = dir.join("config.toml");
        std::fs::write(&path, config)?;
        let mut cmd = self.holder().command(self.bin_dir.join("containerd"));
        cmd.arg("--config").arg(&path);
        self.spawn("containerd", &mut cmd)?;
        let sock = self.containerd_socket();
        self.wait("containerd", "its socket", Duration::from_secs(30), |_| {
            sock.exists()
        })
    }

    fn containerd_socket(&self) -> PathBuf {
        self.work_dir.join("containerd/containerd.sock")
    }

    fn start_kubelet(&mut self) -> Result<()> {
        let dir = self.work_dir.join("kubelet");
        std::fs::create_dir_all(dir.join("pod-logs"))?;
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.1\n")?;
        let ca = self.cp().pki.ca_cert.clone();
        let config = format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
failSwapOn: false
podLogsDir: {logs}
resolvConf: {resolv}
containerRuntimeEndpoint: unix://{sock}
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
serializeImagePulls: false
registerNode: true
evictionHard: {{memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
protectKernelDefaults: false
clusterDomain: cluster.local
clusterDNS: [{DNS_IP}]
",
            cgroup_root = self.cleanup.cgroup_root,
            logs = dir.join("pod-logs").display(),
            resolv = resolv.display(),
            sock = self.containerd_socket().display(),
            ca = ca.display(),
        );
        let path = dir.join("config.yaml");
        std::fs::write(&path, config)?;
        let mut cmd = self.holder().command(self.bin_dir.join("kubelet"));
        cmd.arg("--config")
            .arg(&path)
            .arg("--kubeconfig")
            .arg(self.inside_kubeconfig())
            .arg(format!("--root-dir={}", dir.join("root").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg("--v=1");
        self.spawn("kubelet", &mut cmd)
    }

    fn start_kube_proxy(&mut self) -> Result<()> {
        let path = self.work_dir.join("kube-proxy.yaml");
        std::fs::write(
            &path,
            format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
clientConnection: {{kubeconfig: {kubeconfig}}}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
",
                kubeconfig = self.inside_kubeconfig().display()
            ),
        )?;
        let mut cmd = self.holder().command(self.bin_dir.join("kube-proxy"));
        cmd.arg("--config").arg(&path).arg("--v=1");
        self.spawn("kube-proxy", &mut cmd)
    }

    fn start_scheduler(&mut self) -> Result<()> {
        let kubeconfig = self.inside_kubeconfig().display().to_string();
        let mut cmd = self.holder().command(self.bin_dir.join("kube-scheduler"));
        cmd.args([
            &format!("--kubeconfig={kubeconfig}"),
            &format!("--authentication-kubeconfig={kubeconfig}"),
            &format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1",
            "--secure-port=10259",
            "--leader-elect=false",
            "--v=1",
        ]);
        self.spawn("kube-scheduler", &mut cmd)
    }

    /// CoreDNS as a pod in `kube-system` (its image built here), behind Service `kube-dns` at
    /// [`DNS_IP`]; waits until it is ready.
    fn start_dns(&mut self) -> Result<()> {
        let digest = push_binary_image(
            &self.registry,
            &self.work_dir,
            &self.bin_dir.join("coredns"),
            "coredns",
            ("coredns", "v1.15.0"),
            &["--entrypoint=/coredns"],
        )?;
        let manifest = std::fs::read_to_string(crate::repo_root().join("e2e/node/coredns.yaml"))?
            .replace("@IMAGE@", &format!("{REGISTRY}/coredns@{digest}"))
            .replace("@DNS_IP@", DNS_IP);
        let file = self.work_dir.join("coredns.yaml");
        std::fs::write(&file, manifest)?;
        run_ok(self.cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        self.wait(
            "kubelet",
            "CoreDNS to be ready",
            Duration::from_mins(2),
            |node| {
                run(node.cp().kubectl().args([
                    "get",
                    "deployment",
                    "coredns",
                    "-n",
                    "kube-system",
                    "-o",
                    "jsonpath={.status.readyReplicas}",
                ]))
                .is_ok_and(|o| o.stdout == b"1")
            },
        )
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait("kubelet", "the node to be Ready", timeout, |node| {
            run(node.cp().kubectl().args([
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]))
            .is_ok_and(|o| o.stdout == b"True")
        })
    }

    fn wait(
        &mut self,
        who: &str,
        what: &str,
        timeout: Duration,
        mut ok: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if ok(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{who}: timed out after {timeout:?} waiting for {what}; last lines of its log:\n{}",
                    self.log_tail(who, 25)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops every process inside the namespaces but the holder: the node's components first
    /// (so nothing restarts pods), then the pods' processes, then containerd and its shims.
    fn stop_processes(&mut self) {
        for c in self.components.iter_mut().rev() {
            if c.name != "containerd" {
                let _ = c.child.kill();
                let _ = c.child.wait();
            }
        }
        for _ in 0..50 {
            let pids = cgroup_pids(&self.cleanup.cgroup_root);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                kill(pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for c in &mut self.components {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        // containerd's shims outlive it: everything else left in the mount namespace.
        let (holder_pid, mnt) = (self.holder.pid, self.holder.mount_ns());
        let cp_pids = self.cp.pids();
        for _ in 0..50 {
            let left: Vec<u32> = processes()
                .into_iter()
                .filter(|&p| p != holder_pid && mnt.is_some() && ns_inode(p, "mnt") == mnt)
                .filter(|p| !cp_pids.contains(p))
                .collect();
            if left.is_empty() {
                break;
            }
            for pid in left {
                kill(pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The rest goes with the fields, in their order.
        self.stop_processes();
    }
}

/// Pushes a one-layer image holding the static binary `binary` at `/<path>` as `<repo>:<tag>`
/// for linux/amd64, with crane `mutate` arguments `config` (`--entrypoint=...`); its digest.
pub fn push_binary_image(
    registry: &OciRegistry,
    work_dir: &Path,
    binary: &Path,
    path: &str,
    repo_tag: (&str, &str),
    config: &[&str],
) -> Result<String> {
    let (repo, tag) = repo_tag;
    let dir = work_dir.join(format!("image-{repo}"));
    let inside = dir.join(path);
    std::fs::create_dir_all(inside.parent().context("a path in the image")?)?;
    std::fs::copy(std::fs::canonicalize(binary)?, &inside)?;
    let layer = work_dir.join(format!("image-{repo}.tar"));
    run_ok(
        Command::new("tar")
            .args(["--owner=0", "--group=0", "-C"])
            .arg(&dir)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
    )?;
    let mut config = config.to_vec();
    config.push("--set-platform=linux/amd64");
    registry.push_layers(repo, tag, &[&layer], &config)
}

fn preflight(bin_dir: &Path) -> Result<()> {
    for b in NODE_BINARIES {
        if !bin_dir.join(b).exists() {
            bail!(
                "{b} not found in {}: build the node with e2e/toolchain/build.sh node coredns crane",
                bin_dir.display()
            );
        }
    }
    if !rustix::process::geteuid().is_root() {
        bail!("the node needs root: it makes network and mount namespaces, cgroups and mounts");
    }
    for tool in ["iptables", "ip6tables", "conntrack"] {
        if run(Command::new(tool).arg("--version")).is_err() {
            bail!("{tool} not found: the node needs it (apt-get install iptables conntrack)");
        }
    }
    if !Path::new("/sys/fs/cgroup/memory").is_dir() {
        bail!(
            "no cgroup v1 memory controller at /sys/fs/cgroup/memory: this node harness runs the kubelet with cgroup v1"
        );
    }
    if !std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("overlay")) {
        bail!("the kernel has no overlay filesystem: containerd's overlayfs snapshotter needs it");
    }
    Ok(())
}

fn path_with(bin_dir: &Path) -> std::ffi::OsString {
    let mut path = std::ffi::OsString::from(bin_dir);
    if let Some(rest) = std::env::var_os("PATH") {
        path.push(":");
        path.push(rest);
    }
    path
}

/// The cgroup hierarchies the kubelet and runc may create the node's tree in: every v1
/// controller, the named systemd one and the v2 `unified` one.
fn hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    out.sort();
    out
}

/// Creates `root` in every hierarchy (the kubelet requires its cgroupRoot to exist); a cpuset
/// gets its parent's CPUs and memory nodes.
fn make_cgroups(root: &str) -> Result<()> {
    for h in hierarchies() {
        let dir = h.join(root);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the node's cgroup {}", dir.display()))?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                std::fs::write(dir.join(f), v.trim())
                    .with_context(|| format!("writing {}", dir.join(f).display()))?;
            }
        }
    }
    Ok(())
}

/// Every process in the node's cgroup tree (the pods').
fn cgroup_pids(root: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for h in hierarchies() {
        walk(&h.join(root), &mut |dir| {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        });
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Removes the node's cgroup tree, deepest first, in every hierarchy.
fn remove_cgroups(root: &str) {
    for h in hierarchies() {
        let mut dirs = Vec::new();
        walk(&h.join(root), &mut |d| dirs.push(d.to_path_buf()));
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    f(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), f);
            }
        }
    }
}

fn processes() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// The node's cgroups left on the host after it stopped; empty when it cleaned up.
pub fn leftovers(cgroup_root: &str) -> String {
    let mut out = String::new();
    for h in hierarchies() {
        if h.join(cgroup_root).exists() {
            let _ = writeln!(out, "cgroup {}", h.join(cgroup_root).display());
        }
    }
    out
}

impl Node {
    /// The path of a built tool (`crane`, `kubectl`, ...).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// The node's cgroup root's name (for leak checks after drop).
    pub fn cgroup_root(&self) -> &str {
        &self.cleanup.cgroup_root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_is_named_with_the_command_that_builds_it() {
        let empty = tempfile::tempdir().expect("tempdir");
        let Err(e) = Node::start(empty.path()) else {
            panic!("a node started without its binaries");
        };
        let text = format!("{e:#}");
        assert!(
            text.contains("containerd not found") && text.contains("e2e/toolchain/build.sh node"),
            "{text}"
        );
    }

    #[test]
    fn the_registry_and_the_pause_image_are_on_the_node_address() {
        let ip = NODE_IP.to_string();
        assert!(REGISTRY.starts_with(&format!("{ip}:")), "{REGISTRY}");
        assert!(
            PAUSE_IMAGE.starts_with(&format!("{REGISTRY}/")),
            "{PAUSE_IMAGE}"
        );
    }
}
