//! The real `palisade-operator` binary, run as a child process against a [`ControlPlane`].
//! Dropping an [`OperatorProcess`] kills it.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{ControlPlane, controlplane::free_port, spawn_logged};

/// Where cargo put the workspace's binaries (next to the running test or tool).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("no parent of the current executable")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("no parent of deps/")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build -p {name}; ./e2e/test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A running operator.
pub struct OperatorProcess {
    child: Child,
    /// `127.0.0.1:<port>` of its metrics server.
    pub metrics_addr: String,
    /// Its log file.
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts the operator with `extra_config` (YAML lines) added to a configuration that
    /// disables leader election unless `extra_config` sets it, and waits for `/readyz`.
    pub fn start(cp: &ControlPlane, tag: &str, extra_config: &str) -> Result<Self> {
        let port = free_port()?;
        let metrics_addr = format!("127.0.0.1:{port}");
        let mut config = format!("metricsAddress: {metrics_addr}\n{extra_config}\n");
        if !extra_config.contains("leaderElection") {
            config.push_str(
                "leaderElection: {enabled: false, leaseName: palisade-operator, leaseNamespace: default, leaseSeconds: 15}\n",
            );
        }
        Self::start_as(cp, tag, &config, &cp.kubeconfig, metrics_addr)
    }

    /// Starts the operator with the whole configuration `config` (serving metrics on
    /// `metrics_addr`, as it must say) and credentials from `kubeconfig`, and waits until it
    /// leads.
    pub fn start_as(
        cp: &ControlPlane,
        tag: &str,
        config: &str,
        kubeconfig: &std::path::Path,
        metrics_addr: String,
    ) -> Result<Self> {
        let mut op = Self::spawn(cp, tag, config, kubeconfig, metrics_addr)?;
        op.wait_leading(Duration::from_secs(30))?;
        Ok(op)
    }

    /// Starts a replica with `extra_config` as [`Self::start`] does, but returns once it is
    /// ready, leading or not (a standby is ready).
    pub fn start_standby(cp: &ControlPlane, tag: &str, extra_config: &str) -> Result<Self> {
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let config = format!("metricsAddress: {metrics_addr}\n{extra_config}\n");
        let mut op = Self::spawn(cp, tag, &config, &cp.kubeconfig, metrics_addr)?;
        op.wait_for("ready", Duration::from_secs(30), OperatorProcess::is_ready)?;
        Ok(op)
    }

    fn spawn(
        cp: &ControlPlane,
        tag: &str,
        config: &str,
        kubeconfig: &std::path::Path,
        metrics_addr: String,
    ) -> Result<Self> {
        let config_path = cp.work_dir.join(format!("operator-{tag}.yaml"));
        std::fs::write(&config_path, config)?;
        let log = cp.work_dir.join(format!("operator-{tag}.log"));
        let child = spawn_logged(
            Command::new(workspace_bin("palisade-operator")?)
                .arg("--config")
                .arg(&config_path)
                .env("KUBECONFIG", kubeconfig)
                .env(
                    "RUST_LOG",
                    std::env::var("PALISADE_OPERATOR_LOG")
                        .unwrap_or_else(|_| "info,kube=warn,vaultrs=off,rustify=off".into()),
                )
                .env("POD_NAME", format!("operator-{tag}")),
            &log,
        )?;
        Ok(OperatorProcess {
            child,
            metrics_addr,
            log,
        })
    }

    /// Waits until this replica leads and its controllers run (`palisade_operator_leading 1`).
    pub fn wait_leading(&mut self, timeout: Duration) -> Result<()> {
        self.wait_for("leading", timeout, OperatorProcess::is_leading)
    }

    fn wait_for(&mut self, what: &str, timeout: Duration, pred: fn(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("palisade-operator exited ({status}): {}", self.log_tail());
            }
            if pred(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "palisade-operator not {what} after {timeout:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `/readyz` says 200 now (the API server answered it; leading or standby).
    pub fn is_ready(&self) -> bool {
        self.get("/readyz").is_ok_and(|(code, _)| code == 200)
    }

    /// Whether it leads now (`palisade_operator_leading` is 1).
    pub fn is_leading(&self) -> bool {
        self.counter("palisade_operator_leading")
            .is_ok_and(|v| (v - 1.0).abs() < f64::EPSILON)
    }

    /// A plain HTTP/1.0 GET against the metrics server: (status code, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = TcpStream::connect(&self.metrics_addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    }

    /// The sum of a counter over all its label sets, from `/metrics`.
    pub fn counter(&self, name: &str) -> Result<f64> {
        let (_, body) = self.get("/metrics")?;
        Ok(body
            .lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        crate::tail_lines(&self.log, 20)
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Stops it with SIGTERM and waits for a graceful exit; returns its exit status.
    pub fn terminate(mut self) -> Result<std::process::ExitStatus> {
        crate::run_ok(Command::new("kill").args(["-TERM", &self.child.id().to_string()]))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "palisade-operator did not stop within 20 s of SIGTERM: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
