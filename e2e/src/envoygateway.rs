//! Envoy Gateway's controller (`envoy-gateway-e2e`, built by `e2e/toolchain/build.sh
//! envoygateway` from the `github.com/envoyproxy/gateway` module, the version of its CRDs) against
//! the local control plane: its Kubernetes provider watches Gateway API objects and Envoy
//! Gateway's policies, its translator writes their status (`Accepted`, `Overridden`, ...) as it
//! would in a cluster, and its xDS server holds the configuration it would send each gateway's
//! Envoy. No Envoy proxy is deployed.
//!
//! It runs out of cluster, as its developers run it: a kubeconfig, an `EnvoyGateway`
//! configuration file, and an xDS serving certificate from the control plane's CA; every listener
//! is on loopback.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{ControlPlane, controlplane::free_port, pki::issue_serving_cert, spawn_logged};

/// The GatewayClass the controller accepts (the examples' `gatewayClassName`).
pub const GATEWAY_CLASS: &str = "envoy-gateway";
/// Envoy Gateway's controller name.
pub const CONTROLLER_NAME: &str = "gateway.envoyproxy.io/gatewayclass-controller";
/// The namespace the controller runs in (where it would deploy Envoy).
pub const NAMESPACE: &str = "envoy-gateway-system";

/// How Envoy Gateway is configured for rate limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimits {
    /// The global rate-limit service is configured (a Redis backend), so `Global` limits are
    /// accepted.
    Global,
    /// No rate-limit service: Envoy Gateway refuses `Global` limits, as in an install that
    /// never enabled them.
    LocalOnly,
}

/// A running Envoy Gateway controller. Stops on drop.
pub struct EnvoyGateway {
    child: Child,
    /// The controller's log.
    pub log: PathBuf,
    /// The xDS server's address (`127.0.0.1:<port>`, mutual TLS with the control plane's CA).
    pub xds: String,
}

impl EnvoyGateway {
    /// Starts the controller against `cp`, creates the GatewayClass it controls, and waits until
    /// the controller has accepted that class (so it is watching and writing status).
    pub fn start(cp: &ControlPlane, bin_dir: &Path, rate_limits: RateLimits) -> Result<Self> {
        let bin = bin_dir.join("envoy-gateway-e2e");
        if !bin.exists() {
            bail!(
                "envoy-gateway-e2e not found in {}: build it with e2e/toolchain/build.sh envoygateway",
                bin_dir.display()
            );
        }
        let port = free_port()?;
        let dir = cp.work_dir.join(format!("envoy-gateway-{port}"));
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = issue_serving_cert(
            &cp.pki.ca_key,
            &["envoy-gateway", "envoy-gateway.envoy-gateway-system.svc"],
        )?;
        std::fs::write(dir.join("tls.crt"), cert)?;
        std::fs::write(dir.join("tls.key"), key)?;
        std::fs::copy(&cp.pki.ca_cert, dir.join("ca.crt"))?;
        let rate_limit = match rate_limits {
            RateLimits::Global => {
                "rateLimit:\n  backend:\n    type: Redis\n    redis:\n      url: redis.redis-system.svc.cluster.local:6379\n"
            }
            RateLimits::LocalOnly => "",
        };
        std::fs::write(
            dir.join("envoy-gateway.yaml"),
            format!(
                "apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyGateway
gateway:
  controllerName: {CONTROLLER_NAME}
provider:
  type: Kubernetes
  kubernetes:
    leaderElection:
      disable: true
    proxyTopologyInjector:
      disabled: true
logging:
  level:
    default: info
{rate_limit}"
            ),
        )?;
        let _ = crate::run(cp.kubectl().args(["create", "namespace", NAMESPACE]));
        let log = dir.join("envoy-gateway.log");
        let child = spawn_logged(
            Command::new(&bin)
                .arg("--config")
                .arg(dir.join("envoy-gateway.yaml"))
                .arg("--tls-dir")
                .arg(&dir)
                .args(["--xds-port", &port.to_string()])
                .env("KUBECONFIG", &cp.kubeconfig)
                .env("ENVOY_GATEWAY_NAMESPACE", NAMESPACE),
            &log,
        )?;
        let mut eg = EnvoyGateway {
            child,
            log,
            xds: format!("127.0.0.1:{port}"),
        };
        let class = format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: {GATEWAY_CLASS}
spec:
  controllerName: {CONTROLLER_NAME}
"
        );
        let file = dir.join("gatewayclass.yaml");
        std::fs::write(&file, class)?;
        crate::run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        eg.wait_class_accepted(cp, Duration::from_mins(2))?;
        Ok(eg)
    }

    fn wait_class_accepted(&mut self, cp: &ControlPlane, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = crate::run(cp.kubectl().args([
                "get",
                "gatewayclass",
                GATEWAY_CLASS,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status}",
            ]))?;
            if String::from_utf8_lossy(&out.stdout).trim() == "True" {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("Envoy Gateway exited ({status}): {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy Gateway did not accept GatewayClass {GATEWAY_CLASS} within {timeout:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The controller's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The controller's resident set size (KiB), from `/proc`.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The last lines of the controller's log.
    pub fn log_tail(&self) -> String {
        crate::tail_lines(&self.log, 40)
    }
}

impl Drop for EnvoyGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
