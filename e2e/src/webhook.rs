//! The real `palisade-webhook` binary, run as a child process with a serving certificate from
//! the control plane's CA, and registered with the API server as a validating webhook.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    ControlPlane, controlplane::free_port, operator::workspace_bin, pki, run, run_ok, spawn_logged,
};

/// A running webhook.
pub struct WebhookProcess {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its log file.
    pub log: PathBuf,
    ca: PathBuf,
    /// Host name the certificate is valid for (and the API server calls).
    host: String,
}

/// The chart's match condition for pod status updates (`palisade.statusRelabels`): only those
/// that change labels or Istio's injection annotations are sent.
pub const STATUS_RELABELS: &str = "!has(request.subResource) || request.subResource != 'status' || has(object.metadata.labels) != has(oldObject.metadata.labels) || (has(object.metadata.labels) && object.metadata.labels != oldObject.metadata.labels) || ['sidecar.istio.io/inject', 'sidecar.istio.io/status'].exists(k, (has(object.metadata.annotations) && k in object.metadata.annotations) != (has(oldObject.metadata.annotations) && k in oldObject.metadata.annotations) || (has(object.metadata.annotations) && k in object.metadata.annotations && object.metadata.annotations[k] != oldObject.metadata.annotations[k]))";

/// Label a namespace needs for the e2e webhook registration to apply to it.
pub const SCOPE_LABEL: &str = "palisade.dev/e2e-webhook";

impl WebhookProcess {
    /// Starts the webhook with `extra_config` lines added, and waits until `/readyz` answers.
    pub fn start(cp: &ControlPlane, tag: &str, extra_config: &str) -> Result<Self> {
        Self::start_on(cp, tag, extra_config, free_port()?)
    }

    /// Like [`WebhookProcess::start`], on a given port (to restart a registered webhook).
    pub fn start_on(cp: &ControlPlane, tag: &str, extra_config: &str, port: u16) -> Result<Self> {
        let dir = cp.work_dir.join(format!("webhook-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = pki::issue_serving_cert(&cp.pki.ca_key, &["localhost"])?;
        std::fs::write(dir.join("tls.crt"), cert)?;
        std::fs::write(dir.join("tls.key"), key)?;
        let tls = format!(
            "tls: {{certFile: {d}/tls.crt, keyFile: {d}/tls.key}}",
            d = dir.display()
        );
        Self::launch(
            cp,
            &dir,
            &tls,
            extra_config,
            (&cp.pki.ca_cert, "127.0.0.1"),
            port,
        )
    }

    /// Starts the webhook serving the X.509-SVID the SPIFFE Workload API at `workload_api`
    /// hands it (valid for `localhost`, signed by the trust bundle in `bundle`).
    pub fn start_svid(
        cp: &ControlPlane,
        tag: &str,
        extra_config: &str,
        workload_api: &str,
        bundle: &std::path::Path,
    ) -> Result<Self> {
        let dir = cp.work_dir.join(format!("webhook-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let tls = format!("tls: {{workloadApiSocket: \"{workload_api}\"}}");
        Self::launch(
            cp,
            &dir,
            &tls,
            extra_config,
            (bundle, "localhost"),
            free_port()?,
        )
    }

    /// Starts the webhook with `config` (everything but `listen`) and credentials from
    /// `kubeconfig`; its certificate is valid for `host` and chains to `ca`.
    pub fn start_as(
        cp: &ControlPlane,
        tag: &str,
        config: &str,
        kubeconfig: &std::path::Path,
        (ca, host): (&std::path::Path, &str),
    ) -> Result<Self> {
        let dir = cp.work_dir.join(format!("webhook-{tag}"));
        std::fs::create_dir_all(&dir)?;
        Self::launch_as(&dir, config, kubeconfig, (ca, host), free_port()?)
    }

    fn launch(
        cp: &ControlPlane,
        dir: &std::path::Path,
        tls: &str,
        extra_config: &str,
        (ca, host): (&std::path::Path, &str),
        port: u16,
    ) -> Result<Self> {
        let config = format!("{tls}\n{extra_config}\n");
        Self::launch_as(dir, &config, &cp.kubeconfig, (ca, host), port)
    }

    fn launch_as(
        dir: &std::path::Path,
        config: &str,
        kubeconfig: &std::path::Path,
        (ca, host): (&std::path::Path, &str),
        port: u16,
    ) -> Result<Self> {
        let mut config = format!("listen: 127.0.0.1:{port}\n{config}\n");
        // One process writes ImagePolicy status unless the test sets up an election.
        if !config.contains("leaderElection") {
            config.push_str(
                "leaderElection: {enabled: false, leaseName: palisade-webhook, leaseNamespace: default, leaseSeconds: 15}\n",
            );
        }
        let config_path = dir.join("config.yaml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("webhook.log");
        let child = spawn_logged(
            Command::new(workspace_bin("palisade-webhook")?)
                .arg("--config")
                .arg(&config_path)
                .env("KUBECONFIG", kubeconfig),
            &log,
        )?;
        let mut wh = WebhookProcess {
            child,
            port,
            log,
            ca: ca.to_path_buf(),
            host: host.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Some(status) = wh.child.try_wait()? {
                bail!("palisade-webhook exited ({status}): {}", wh.log_tail());
            }
            if wh.curl(&["/readyz"]).is_ok_and(|(code, _)| code == 200) {
                return Ok(wh);
            }
            if Instant::now() > deadline {
                bail!("palisade-webhook not ready: {}", wh.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `curl` against the webhook over TLS, verified with the control plane's CA:
    /// (HTTP status, body). Extra arguments follow the path (e.g. `-d @file`).
    pub fn curl(&self, args: &[&str]) -> Result<(u16, String)> {
        let (path, rest) = args.split_first().context("a path")?;
        let out = run(Command::new("curl")
            .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
            .arg(&self.ca)
            // The certificate's name (a Service name, say) always reaches the loopback port.
            .arg("--resolve")
            .arg(format!("{}:{}:127.0.0.1", self.host, self.port))
            .arg(format!("https://{}:{}{path}", self.host, self.port))
            .args(rest))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
    }

    /// Registers this webhook for Pods (and `pods/ephemeralcontainers`) and every workload kind,
    /// in namespaces labelled [`SCOPE_LABEL`]`=on`, with failurePolicy Fail.
    pub fn register(&self, cp: &ControlPlane, name: &str) -> Result<()> {
        let selector = format!("matchLabels: {{{SCOPE_LABEL}: \"on\"}}");
        self.register_for(cp, name, &selector, false)
    }

    /// Like [`WebhookProcess::register`], and also as a mutating webhook (on `/mutate`).
    pub fn register_mutating(&self, cp: &ControlPlane, name: &str) -> Result<()> {
        let selector = format!("matchLabels: {{{SCOPE_LABEL}: \"on\"}}");
        self.register_for(cp, name, &selector, true)
    }

    /// Registers this webhook as a cluster would: every namespace except kube-system and
    /// palisade-system, validating and (on `/mutate`) mutating.
    pub fn register_cluster_wide(&self, cp: &ControlPlane, name: &str) -> Result<()> {
        let selector = "matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [kube-system, palisade-system]}]";
        self.register_for(cp, name, selector, true)
    }

    /// Registers the webhook configurations the chart rendered (`rendered`: `helm template`
    /// output; every document of another kind is skipped) as they are — rules, namespace
    /// selectors, match conditions — with each webhook's `clientConfig` pointed at this process
    /// (same path) and the configurations renamed `name`.
    pub fn register_rendered(&self, cp: &ControlPlane, name: &str, rendered: &str) -> Result<()> {
        use serde::Deserialize as _;
        let ca = run_ok(Command::new("base64").args(["-w0"]).arg(&self.ca))?;
        let mut out = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(rendered) {
            let mut v = serde_json::Value::deserialize(doc)?;
            let kind = v["kind"].as_str().unwrap_or_default();
            if !kind.ends_with("WebhookConfiguration") {
                continue;
            }
            v["metadata"] = serde_json::json!({"name": name});
            for hook in v["webhooks"].as_array_mut().into_iter().flatten() {
                let path = hook["clientConfig"]["service"]["path"]
                    .as_str()
                    .context("a rendered webhook without a service path")?
                    .to_owned();
                hook["clientConfig"] = serde_json::json!({
                    "url": format!("https://{}:{}{path}", self.host, self.port),
                    "caBundle": ca.trim(),
                });
            }
            out.push(v);
        }
        if out.is_empty() {
            bail!("the rendered chart has no webhook configuration");
        }
        let file = cp.work_dir.join(format!("{name}.json"));
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": out});
        std::fs::write(&file, serde_json::to_string(&list)?)?;
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        Ok(())
    }

    fn register_for(
        &self,
        cp: &ControlPlane,
        name: &str,
        selector: &str,
        mutating: bool,
    ) -> Result<()> {
        let ca = run_ok(Command::new("base64").args(["-w0"]).arg(&self.ca))?;
        let rules = "    rules:
      - apiGroups: [\"\"]
        apiVersions: [v1]
        operations: [CREATE, UPDATE]
        resources: [pods, pods/ephemeralcontainers]
      - apiGroups: [apps]
        apiVersions: [v1]
        operations: [CREATE, UPDATE]
        resources: [deployments, replicasets, statefulsets, daemonsets]
      - apiGroups: [batch]
        apiVersions: [v1]
        operations: [CREATE, UPDATE]
        resources: [jobs, cronjobs]
      - apiGroups: [\"\"]
        apiVersions: [v1]
        operations: [CREATE, UPDATE]
        resources: [replicationcontrollers]
";
        // As the chart: pod status updates that relabel go to the validating hook.
        let status = format!(
            "    matchConditions:
      - name: status-relabels
        expression: \"{STATUS_RELABELS}\"
{rules}      - apiGroups: [\"\"]
        apiVersions: [v1]
        operations: [UPDATE]
        resources: [pods/status]
"
        );
        let webhook = |kind: &str, hook: &str| {
            let rules = if hook == "validate" {
                status.as_str()
            } else {
                rules
            };
            format!(
                "apiVersion: admissionregistration.k8s.io/v1
kind: {kind}
metadata:
  name: {name}
webhooks:
  - name: {hook}.palisade.dev
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Fail
    timeoutSeconds: 5
    clientConfig:
      url: https://{host}:{port}/{hook}
      caBundle: {ca}
    namespaceSelector:
      {selector}
{rules}",
                port = self.port,
                host = self.host,
                ca = ca.trim()
            )
        };
        let mut yaml = webhook("ValidatingWebhookConfiguration", "validate");
        if mutating {
            yaml.push_str("---\n");
            yaml.push_str(&webhook("MutatingWebhookConfiguration", "mutate"));
        }
        let file = cp.work_dir.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml)?;
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        Ok(())
    }

    /// Removes the webhook configurations named `name` (either kind) that a `register*` call
    /// made, then returns `result`, an error with the last lines of this webhook's log added.
    pub fn unregister_after<T>(
        &self,
        cp: &ControlPlane,
        name: &str,
        result: Result<T>,
    ) -> Result<T> {
        let _ = run(cp.kubectl().args([
            "delete",
            "validatingwebhookconfiguration,mutatingwebhookconfiguration",
            name,
            "--ignore-not-found",
        ]));
        result.map_err(|e| anyhow::anyhow!("{e:#}\nwebhook log:\n{}", self.log_tail()))
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        crate::tail_lines(&self.log, 20)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (as the kubelet does when the pod is deleted) and returns at once.
    pub fn sigterm(&self) -> Result<()> {
        crate::run_ok(Command::new("kill").args(["-TERM", &self.child.id().to_string()]))?;
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "palisade-webhook still running after {timeout:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The whole log (security events).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WebhookProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
