//! A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver and
//! kube-controller-manager, started from the binaries `e2e/toolchain/build.sh` builds, with fresh
//! certificates and free ports. Dropping a [`ControlPlane`] stops every process it started.
//!
//! Failures say which component failed and show the end of its log: a busy port, a missing
//! binary, a component that exits while starting.

use std::{
    fmt::Write as _,
    fs::File,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{
    netns::{Holder, NODE_IP, Relay},
    pki::Pki,
};

/// What to start and where.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory holding `etcd`, `kube-apiserver`, `kube-controller-manager`, `kubectl`.
    pub bin_dir: PathBuf,
    /// Where certificates, logs, etcd data and the kubeconfig go; a fresh temporary directory,
    /// made when the control plane starts, when `None`. Removed on drop when `keep_dir` is false.
    pub work_dir: Option<PathBuf>,
    /// Keep `work_dir` after stopping.
    pub keep_dir: bool,
    /// The API server's port; a free one when `None`.
    pub apiserver_port: Option<u16>,
    /// Start kube-controller-manager (namespaces, ServiceAccounts, garbage collection,
    /// Deployment → ReplicaSet → Pod).
    pub controller_manager: bool,
    /// How long to wait for readiness.
    pub timeout: Duration,
    /// Run inside a node's namespaces: the API server on the node's address (so pods reach it
    /// through the `kubernetes` Service), reached from the host through a relay.
    pub inside: Option<Arc<Holder>>,
}

impl Options {
    /// Defaults: binaries from [`default_bin_dir`], a fresh temporary directory, a free port,
    /// controller-manager on, 60 s to become ready.
    pub fn new() -> Self {
        Options {
            bin_dir: default_bin_dir(),
            work_dir: None,
            keep_dir: false,
            apiserver_port: None,
            controller_manager: true,
            timeout: Duration::from_mins(1),
            inside: None,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options::new()
    }
}

/// `$PALISADE_CACHE/bin`, or `~/.cache/palisade-e2e/bin`, as `e2e/toolchain/build.sh` fills it.
pub fn default_bin_dir() -> PathBuf {
    let cache = std::env::var_os("PALISADE_CACHE").map_or_else(
        || {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/palisade-e2e")
        },
        PathBuf::from,
    );
    cache.join("bin")
}

/// A process started from a built binary, with its log.
pub(crate) struct Component {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

/// Fails with the name and log tail of the first of `components` that has exited.
pub(crate) fn check_exited(components: &mut [Component]) -> Result<()> {
    for c in components {
        if let Some(status) = c.child.try_wait()? {
            bail!(
                "{} exited ({status}) — last lines of {}:\n{}",
                c.name,
                c.log.display(),
                tail(&c.log, 15)
            );
        }
    }
    Ok(())
}

/// A running control plane. Stops everything on drop.
pub struct ControlPlane {
    /// Behind a lock so that a component can be restarted through a shared reference.
    components: std::sync::Mutex<Vec<Component>>,
    /// Each component's arguments, to restart it as it was started.
    args: Vec<(&'static str, Vec<String>)>,
    /// Path of an admin kubeconfig for this control plane.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// Certificates (the CA can sign serving certificates for test webhooks).
    pub pki: Pki,
    /// Where logs and state live.
    pub work_dir: PathBuf,
    bin_dir: PathBuf,
    keep_dir: bool,
    /// Seconds from start to API server readiness.
    pub ready_after: Duration,
    /// The node's namespaces, when it runs inside them.
    inside: Option<Arc<Holder>>,
    /// Relays from the host into the namespaces (the API server's).
    _relays: Vec<Relay>,
}

/// The API server's port inside a node's namespaces.
pub const INSIDE_APISERVER_PORT: u16 = 6443;

impl ControlPlane {
    /// Starts etcd, kube-apiserver and (optionally) kube-controller-manager and waits until the
    /// API server's `/readyz` succeeds and, with the controller-manager, until it has created
    /// the `default` ServiceAccount.
    pub fn start(opts: &Options) -> Result<Self> {
        let started = Instant::now();
        for bin in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kubectl",
        ] {
            let path = opts.bin_dir.join(bin);
            if !path.exists() {
                bail!(
                    "{bin} not found at {}: build the toolchain first with e2e/toolchain/build.sh k8s",
                    path.display()
                );
            }
        }
        let apiserver_port = match opts.apiserver_port {
            _ if opts.inside.is_some() => INSIDE_APISERVER_PORT,
            Some(p) => {
                TcpListener::bind(("127.0.0.1", p)).map_err(|e| {
                    anyhow!("kube-apiserver: port 127.0.0.1:{p} is not available ({e}); choose another or stop what holds it")
                })?;
                p
            }
            None => free_port()?,
        };
        // The directory after the checks that refuse to start, so a refused start leaves none.
        let work_dir = match &opts.work_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                dir.clone()
            }
            None => tempfile::Builder::new()
                .prefix("palisade-cp-")
                .tempdir()?
                .keep(),
        };
        let pki = Pki::write(&work_dir.join("pki"))?;
        let mut relays = Vec::new();
        let server = match &opts.inside {
            Some(holder) => {
                let relay =
                    holder.forward(SocketAddr::from(([127, 0, 0, 1], INSIDE_APISERVER_PORT)))?;
                let server = format!("https://127.0.0.1:{}", relay.port());
                relays.push(relay);
                // Components inside use the API server directly.
                std::fs::write(
                    work_dir.join("kubeconfig-inside"),
                    kubeconfig_yaml(&format!("https://127.0.0.1:{INSIDE_APISERVER_PORT}"), &pki),
                )?;
                server
            }
            None => format!("https://127.0.0.1:{apiserver_port}"),
        };
        let kubeconfig = work_dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &pki))?;

        let mut cp = ControlPlane {
            components: std::sync::Mutex::new(Vec::new()),
            args: Vec::new(),
            kubeconfig,
            server,
            pki,
            work_dir,
            bin_dir: opts.bin_dir.clone(),
            keep_dir: opts.keep_dir,
            ready_after: Duration::ZERO,
            inside: opts.inside.clone(),
            _relays: relays,
        };
        let deadline = started + opts.timeout;

        cp.start_etcd_and_apiserver(apiserver_port, deadline)?;
        cp.ready_after = started.elapsed();
        if opts.controller_manager {
            cp.start_controller_manager(deadline)?;
        }
        Ok(cp)
    }

    /// The API server's audit log (JSON lines): requests of ServiceAccounts in
    /// `palisade-system`, at Metadata level.
    pub fn audit_log(&self) -> PathBuf {
        self.work_dir.join("audit.log")
    }

    /// A kubeconfig for components inside the node's namespaces (`None` on the host).
    pub fn kubeconfig_inside(&self) -> Option<PathBuf> {
        self.inside
            .as_ref()
            .map(|_| self.work_dir.join("kubeconfig-inside"))
    }

    fn start_etcd_and_apiserver(&mut self, apiserver_port: u16, deadline: Instant) -> Result<()> {
        let (etcd_client, etcd_peer) = if self.inside.is_some() {
            (2379, 2380)
        } else {
            (free_port()?, free_port()?)
        };
        // Inside a node: every address of the node (its namespace is private), advertised as the
        // node's, with the `kubernetes` Service's endpoints kept by the API server.
        let (bind, advertise, reconciler) = if self.inside.is_some() {
            ("0.0.0.0".to_owned(), NODE_IP.to_string(), "lease")
        } else {
            ("127.0.0.1".to_owned(), "127.0.0.1".to_owned(), "none")
        };
        let data = self.work_dir.join("etcd");
        self.spawn(
            "etcd",
            &[
                &format!("--data-dir={}", data.display()),
                "--name=default",
                &format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                &format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                &format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                &format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                &format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )?;
        self.wait_port("etcd", etcd_client, deadline)?;

        let p = self.pki.clone();
        // Requests of ServiceAccounts in palisade-system (a Helm install of Palisade) are
        // audited, so tests can compare what Palisade calls with what its RBAC grants.
        let audit_policy = self.work_dir.join("audit-policy.yaml");
        std::fs::write(
            &audit_policy,
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  \
             - level: Metadata\n    userGroups: [\"system:serviceaccounts:palisade-system\"]\n  \
             - level: None\n",
        )?;
        self.spawn(
            "kube-apiserver",
            &[
                &format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                &format!("--bind-address={bind}"),
                &format!("--advertise-address={advertise}"),
                &format!("--secure-port={apiserver_port}"),
                &format!("--endpoint-reconciler-type={reconciler}"),
                // The kubelet by its address (there is no DNS for node names): logs and exec.
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                &format!(
                    "--cert-dir={}",
                    self.work_dir.join("apiserver-certs").display()
                ),
                &format!("--tls-cert-file={}", p.server_cert.display()),
                &format!("--tls-private-key-file={}", p.server_key.display()),
                &format!("--client-ca-file={}", p.ca_cert.display()),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                &format!("--service-account-key-file={}", p.sa_pub.display()),
                &format!("--service-account-signing-key-file={}", p.sa_key.display()),
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                &format!("--audit-policy-file={}", audit_policy.display()),
                &format!("--audit-log-path={}", self.audit_log().display()),
                "--audit-log-format=json",
                "--v=1",
            ],
        )?;
        self.wait_for("kube-apiserver", deadline, "waiting for /readyz", |cp| {
            cp.kubectl_ok(&["get", "--raw", "/readyz"])
        })
    }

    fn start_controller_manager(&mut self, deadline: Instant) -> Result<()> {
        let kcfg = self
            .kubeconfig_inside()
            .unwrap_or_else(|| self.kubeconfig.clone())
            .display()
            .to_string();
        let kcm_port = free_port()?;
        let p = self.pki.clone();
        self.spawn(
            "kube-controller-manager",
            &[
                &format!("--kubeconfig={kcfg}"),
                &format!("--authentication-kubeconfig={kcfg}"),
                &format!("--authorization-kubeconfig={kcfg}"),
                "--bind-address=127.0.0.1",
                &format!("--secure-port={kcm_port}"),
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                &format!("--service-account-private-key-file={}", p.sa_key.display()),
                &format!("--root-ca-file={}", p.ca_cert.display()),
                &format!("--cert-dir={}", self.work_dir.join("kcm-certs").display()),
                "--controllers=*",
                "--v=1",
            ],
        )?;
        self.wait_for(
            "kube-controller-manager",
            deadline,
            "creating the default ServiceAccount",
            |cp| cp.kubectl_ok(&["get", "serviceaccount", "default", "-n", "default"]),
        )
    }

    fn spawn(&mut self, name: &'static str, args: &[&str]) -> Result<()> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let component = self.start_component(name, &args)?;
        self.components_mut().push(component);
        self.args.push((name, args));
        Ok(())
    }

    fn start_component(&self, name: &'static str, args: &[String]) -> Result<Component> {
        let log = self.work_dir.join(format!("{name}.log"));
        let out = File::options().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let program = self.bin_dir.join(name);
        let mut cmd = match &self.inside {
            Some(holder) => holder.command(&program),
            None => Command::new(&program),
        };
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| {
                format!("{name}: cannot start {}", self.bin_dir.join(name).display())
            })?;
        Ok(Component { name, child, log })
    }

    fn components_mut(&self) -> std::sync::MutexGuard<'_, Vec<Component>> {
        self.components
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops `name` (SIGKILL, as a crash or a node reboot would) and starts it again with the
    /// same arguments; for the API server, waits until it answers `/readyz` again. How long it
    /// was away.
    pub fn restart(&self, name: &str) -> Result<Duration> {
        let (name, args) = self
            .args
            .iter()
            .find(|(n, _)| *n == name)
            .cloned()
            .ok_or_else(|| anyhow!("no component {name}"))?;
        let t = Instant::now();
        self.stop(name)?;
        let started = self.start_component(name, &args)?;
        if let Some(c) = self.components_mut().iter_mut().find(|c| c.name == name) {
            *c = started;
        }
        if name == "kube-apiserver" {
            let deadline = Instant::now() + Duration::from_mins(1);
            while !self.kubectl_ok(&["get", "--raw", "/readyz"]) {
                check_exited(&mut self.components_mut())?;
                if Instant::now() > deadline {
                    bail!("kube-apiserver did not answer /readyz within a minute of its restart");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(t.elapsed())
    }

    /// Fails with the component's name and log tail if any component has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        check_exited(&mut self.components_mut())
    }

    fn wait_for(
        &mut self,
        who: &str,
        deadline: Instant,
        what: &str,
        mut ok: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        loop {
            self.check_alive()?;
            if ok(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self
                    .components_mut()
                    .iter()
                    .find(|c| c.name == who)
                    .map(|c| tail(&c.log, 15))
                    .unwrap_or_default();
                bail!("{who}: timed out {what}; last log lines:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_port(&mut self, who: &str, port: u16, deadline: Instant) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.wait_for(who, deadline, &format!("waiting for port {port}"), |cp| {
            let timeout = Duration::from_millis(200);
            match &cp.inside {
                Some(holder) => holder.connect(addr, timeout).is_ok(),
                None => std::net::TcpStream::connect_timeout(&addr, timeout).is_ok(),
            }
        })
    }

    fn kubectl_ok(&self, args: &[&str]) -> bool {
        self.kubectl()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A `kubectl` command bound to this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// `helm` from the tools' directory, with this control plane's kubeconfig and its cache,
    /// configuration and data under the work directory.
    pub fn helm(&self) -> Command {
        let mut c = Command::new(self.bin_dir.join("helm"));
        c.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.work_dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.work_dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.work_dir.join("helm/data"));
        c
    }

    /// Kills `name` (for fault tests).
    pub fn kill(&mut self, name: &str) -> Result<()> {
        self.stop(name)
    }

    /// Kills component `name` and reaps it.
    fn stop(&self, name: &str) -> Result<()> {
        let mut all = self.components_mut();
        let c = all
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| anyhow!("no component {name}"))?;
        c.child.kill()?;
        c.child.wait()?;
        Ok(())
    }

    /// Process ids of the running components, for leak checks.
    pub fn pids(&self) -> Vec<u32> {
        self.components_mut().iter().map(|c| c.child.id()).collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in self.components_mut().iter_mut().rev() {
            // Each component runs in its own process group; kill the child, then reap it.
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &all[all.len().saturating_sub(lines)..] {
        let _ = writeln!(out, "  {l}");
    }
    out
}

fn kubeconfig_yaml(server: &str, pki: &Pki) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: palisade-local
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: palisade-admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: palisade-local
  context:
    cluster: palisade-local
    user: palisade-admin
current-context: palisade-local
",
        ca = pki.ca_cert.display(),
        cert = pki.admin_cert.display(),
        key = pki.admin_key.display(),
    )
}
