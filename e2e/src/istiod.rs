//! The real istiod (`pilot-discovery`, built by `e2e/toolchain/build.sh istio`) against the local
//! control plane: its validating webhook is registered for every Istio API group, so each Istio
//! object written while it runs passes Istio's own validation, and simulated sidecars
//! (`xdsdump`) receive the Envoy configuration istiod generates for a workload.
//!
//! istiod runs out of cluster as its developers run it: a kubeconfig, a mesh configuration file,
//! and a serving certificate from the control plane's CA (the API server calls its webhook at
//! `https://127.0.0.1:<port>/validate`). Go's TLS trusts that CA through `SSL_CERT_FILE`, so
//! istiod can fetch a JWKS from a test server on loopback.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    ControlPlane, controlplane::free_port, envoy::Push, pki::issue_serving_cert, run, run_ok,
    spawn_logged, tail_lines,
};

/// The trust domain of the test mesh.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The mesh root namespace.
pub const ROOT_NAMESPACE: &str = "istio-system";
const WEBHOOK: &str = "palisade-e2e-istiod-validation";

/// A running istiod. Unregisters its webhook and stops on drop.
pub struct Istiod {
    child: Child,
    kubectl: Command,
    bin_dir: PathBuf,
    log: PathBuf,
    /// Plain-text xDS address (`127.0.0.1:<port>`).
    pub xds: String,
    /// The HTTP debug and readiness address.
    pub http: String,
}

impl Istiod {
    /// Starts istiod against `cp`, waits until it is ready, and registers its validating webhook.
    pub fn start(cp: &ControlPlane, bin_dir: &Path) -> Result<Self> {
        for b in ["pilot-discovery", "xdsdump"] {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{b} not found in {}: build it with e2e/toolchain/build.sh istio",
                    bin_dir.display()
                );
            }
        }
        let dir = cp.work_dir.join(format!("istiod-{}", free_port()?));
        std::fs::create_dir_all(&dir)?;
        let _ = run(cp.kubectl().args(["create", "namespace", ROOT_NAMESPACE]));
        let (cert, key) = issue_serving_cert(&cp.pki.ca_key, &["istiod.istio-system.svc"])?;
        std::fs::write(dir.join("tls.crt"), cert)?;
        std::fs::write(dir.join("tls.key"), key)?;
        std::fs::write(
            dir.join("mesh.yaml"),
            format!("rootNamespace: {ROOT_NAMESPACE}\ntrustDomain: {TRUST_DOMAIN}\n"),
        )?;
        std::fs::write(dir.join("networks.yaml"), "networks: {}\n")?;
        let [http, https, grpc, secure, monitoring] = [
            free_port()?,
            free_port()?,
            free_port()?,
            free_port()?,
            free_port()?,
        ];
        let addr = |p: u16| format!("127.0.0.1:{p}");
        let log = dir.join("istiod.log");
        let d = |f: &str| dir.join(f).display().to_string();
        let child = spawn_logged(
            Command::new(bin_dir.join("pilot-discovery"))
                .args(["discovery", "--kubeconfig"])
                .arg(&cp.kubeconfig)
                .args(["--meshConfig", &d("mesh.yaml")])
                .args(["--networksConfig", &d("networks.yaml")])
                .args(["--httpAddr", &addr(http), "--httpsAddr", &addr(https)])
                .args(["--grpcAddr", &addr(grpc), "--secureGRPCAddr", &addr(secure)])
                .args(["--monitoringAddr", &addr(monitoring)])
                .args([
                    "--tlsCertFile",
                    &d("tls.crt"),
                    "--tlsKeyFile",
                    &d("tls.key"),
                ])
                .arg("--caCertFile")
                .arg(&cp.pki.ca_cert)
                .args(["--domain", "cluster.local", "--clusterID", "Kubernetes"])
                .env("POD_NAMESPACE", ROOT_NAMESPACE)
                .env("POD_NAME", "istiod-e2e")
                .env("REVISION", "default")
                .env("SSL_CERT_FILE", &cp.pki.ca_cert)
                // Palisade's webhook registration is the test's; istiod patches none.
                .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
                .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
                .env("PILOT_ENABLE_GATEWAY_API_DEPLOYMENT_CONTROLLER", "false")
                .env("PILOT_DEBOUNCE_AFTER", "10ms")
                .env("PILOT_DEBOUNCE_MAX", "500ms")
                .env("ENABLE_CA_SERVER", "false"),
            &log,
        )?;
        let mut istiod = Istiod {
            child,
            kubectl: cp.kubectl(),
            bin_dir: bin_dir.to_path_buf(),
            log,
            xds: addr(grpc),
            http: addr(http),
        };
        istiod.wait_ready(Duration::from_mins(2))?;
        Self::register(cp, https)?;
        Ok(istiod)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = run(Command::new("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}/ready", self.http),
            ]))?;
            if String::from_utf8_lossy(&out.stdout) == "200" {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("istiod exited ({status}): {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("istiod not ready after {timeout:?}: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Registers istiod's `/validate` for every Istio API group, failurePolicy Fail.
    fn register(cp: &ControlPlane, port: u16) -> Result<()> {
        let ca = run_ok(Command::new("base64").args(["-w0"]).arg(&cp.pki.ca_cert))?;
        let yaml = format!(
            "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: {WEBHOOK}
webhooks:
  - name: rev.validation.istio.io
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Fail
    timeoutSeconds: 10
    clientConfig:
      url: https://127.0.0.1:{port}/validate
      caBundle: {ca}
    rules:
      - apiGroups: [security.istio.io, networking.istio.io, telemetry.istio.io, extensions.istio.io]
        apiVersions: ['*']
        operations: [CREATE, UPDATE]
        resources: ['*']
",
            ca = ca.trim()
        );
        let file = cp.work_dir.join(format!("{WEBHOOK}.yaml"));
        std::fs::write(&file, yaml)?;
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        Ok(())
    }

    /// Connects a simulated sidecar of a pod `pod` in `namespace` running as `service_account`
    /// with `labels` (`k=v,...`) and pod IP `ip`.
    pub fn sidecar(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
        labels: &str,
        ip: &str,
    ) -> Result<Sidecar> {
        let mut child = Command::new(self.bin_dir.join("xdsdump"))
            .args(["-addr", &self.xds, "-namespace", namespace])
            .args(["-service-account", service_account, "-pod", pod])
            .args(["-labels", labels, "-ip", ip])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting xdsdump")?;
        let stdout = child.stdout.take().context("xdsdump stdout")?;
        let stderr = child.stderr.take().context("xdsdump stderr")?;
        let (tx, rx) = mpsc::channel();
        let errors = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let push = serde_json::from_str::<Push>(&line)
                    .with_context(|| format!("xdsdump printed {line}"))
                    .map_err(|e| format!("{e:#}"));
                if tx.send(push).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            let text = std::io::read_to_string(stderr).unwrap_or_default();
            if !text.trim().is_empty() {
                let _ = errors.send(Err(text));
            }
        });
        Ok(Sidecar {
            child,
            rx,
            latest: None,
        })
    }

    /// The last lines of istiod's log.
    pub fn log_tail(&self) -> String {
        tail_lines(&self.log, 30)
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = run(self.kubectl.args([
            "delete",
            "validatingwebhookconfiguration",
            WEBHOOK,
            "--ignore-not-found",
        ]));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulated sidecar: the listener pushes istiod sends it.
pub struct Sidecar {
    child: Child,
    rx: mpsc::Receiver<std::result::Result<Push, String>>,
    latest: Option<Push>,
}

impl Sidecar {
    /// Waits until a push satisfies `done` (the latest push is tried first) and returns it.
    pub fn wait_for(&mut self, timeout: Duration, done: impl Fn(&Push) -> bool) -> Result<&Push> {
        let deadline = Instant::now() + timeout;
        if !self.latest.as_ref().is_some_and(&done) {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(Ok(push)) => {
                        let ok = done(&push);
                        self.latest = Some(push);
                        if ok {
                            break;
                        }
                    }
                    Ok(Err(e)) => bail!("xdsdump: {e}"),
                    Err(_) => bail!(
                        "no listener push satisfied the condition within {timeout:?} (last: {})",
                        self.latest.as_ref().map_or_else(
                            || "none".to_owned(),
                            |p| serde_json::to_string(&p.chains.len()).unwrap_or_default()
                        )
                    ),
                }
            }
        }
        self.latest.as_ref().context("a push")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
