//! A real SPIRE server and agent (built by `e2e/toolchain/build.sh spire`) on loopback, so the
//! webhook can take its serving certificate from the SPIFFE Workload API as it would in a
//! cluster. The server attests the agent with a join token; the agent attests workloads with
//! the `unix` attestor, so every process of this user receives the registered SVID.
//!
//! [`OnNode`] is SPIRE as a cluster runs it, for the real node: the server on the host, an agent
//! inside the node's namespaces with the Kubernetes workload attestor (it asks this node's
//! kubelet which pod is calling), and the SPIRE controller manager, which turns the
//! ClusterSPIFFEIDs Palisade writes into registration entries.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{controlplane::free_port, netns::Relay, node::Node, run_ok, spawn_logged};

/// Trust domain of the test SPIRE deployment.
pub const TRUST_DOMAIN: &str = "palisade.test";

/// A running SPIRE server and agent. Stops both and removes its directory on drop.
pub struct Spire {
    server: Child,
    agent: Option<Child>,
    bin_dir: PathBuf,
    /// Working directory (short, so socket paths stay under the 108-byte limit).
    pub dir: PathBuf,
    /// The Workload API endpoint (`unix://...`).
    pub workload_api: String,
    /// PEM file of the trust bundle (the CA that signs every SVID).
    pub bundle: PathBuf,
    node_id: String,
    /// The server's port on 127.0.0.1.
    port: u16,
}

/// Waits (up to a minute) for an agent's Workload API socket at `socket`.
fn wait_for_socket(socket: &Path, log: impl Fn() -> String) -> Result<()> {
    let deadline = Instant::now() + Duration::from_mins(1);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("spire-agent socket {} missing: {}", socket.display(), log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

impl Spire {
    /// Starts a server and an attested agent and waits for the Workload API socket.
    pub fn start(bin_dir: &Path) -> Result<Self> {
        let mut spire = Spire::start_server(bin_dir, TRUST_DOMAIN)?;
        let token = spire.join_token()?;
        let d = spire.dir.display().to_string();
        std::fs::write(spire.dir.join("agent.conf"), agent_conf(&d, spire.port))?;
        spire.agent = Some(spawn_logged(
            Command::new(bin_dir.join("spire-agent")).args([
                "run",
                "-config",
                &format!("{d}/agent.conf"),
                "-joinToken",
                &token,
            ]),
            &spire.dir.join("agent.log"),
        )?);
        wait_for_socket(&spire.dir.join("agent.sock"), || spire.log_tail("agent"))?;
        Ok(spire)
    }

    /// A join token for one agent, which attests it as [`Spire::node_id`] (an alias every
    /// registration entry names as its parent).
    fn join_token(&self) -> Result<String> {
        let out = self.server_cmd(&["token", "generate", "-spiffeID", &self.node_id])?;
        Ok(out
            .split_whitespace()
            .last()
            .context("a join token")?
            .to_owned())
    }

    /// Starts the server alone (on 127.0.0.1) for `trust_domain` and writes its trust bundle.
    fn start_server(bin_dir: &Path, trust_domain: &str) -> Result<Self> {
        for b in ["spire-server", "spire-agent"] {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{b} not found in {}: build it with e2e/toolchain/build.sh spire",
                    bin_dir.display()
                );
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("spire-")
            .tempdir_in("/tmp")?
            .keep();
        let port = free_port()?;
        let d = dir.display();
        let server_conf = server_conf(&d.to_string(), port, trust_domain);
        std::fs::write(dir.join("server.conf"), server_conf)?;
        let server = spawn_logged(
            Command::new(bin_dir.join("spire-server")).args([
                "run",
                "-config",
                &format!("{d}/server.conf"),
            ]),
            &dir.join("server.log"),
        )?;
        let node_id = format!("spiffe://{trust_domain}/e2e-node");
        let mut spire = Spire {
            server,
            agent: None,
            bin_dir: bin_dir.to_path_buf(),
            workload_api: format!("unix://{d}/agent.sock"),
            bundle: dir.join("bundle.pem"),
            dir: dir.clone(),
            node_id,
            port,
        };
        // The server answers its API once its CA is prepared.
        let deadline = Instant::now() + Duration::from_mins(1);
        let bundle = loop {
            if let Ok(b) = spire.server_cmd(&["bundle", "show"]) {
                break b;
            }
            if let Some(status) = spire.server.try_wait()? {
                bail!(
                    "spire-server exited ({status}): {}",
                    spire.log_tail("server")
                );
            }
            if Instant::now() > deadline {
                bail!("spire-server not ready: {}", spire.log_tail("server"));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        std::fs::write(&spire.bundle, &bundle)?;
        Ok(spire)
    }

    fn server_cmd(&self, args: &[&str]) -> Result<String> {
        let socket = self.dir.join("server.sock");
        let (first, rest) = args.split_first().context("a subcommand")?;
        let mut cmd = Command::new(self.bin_dir.join("spire-server"));
        cmd.arg(first);
        if let Some((second, rest)) = rest.split_first() {
            cmd.arg(second).arg("-socketPath").arg(&socket).args(rest);
        }
        run_ok(&mut cmd)
    }

    /// Registers `spiffe_id` for every process of this user (`unix:uid`), with `dns` names and
    /// an SVID lifetime of `ttl_secs`.
    pub fn register_this_user(&self, spiffe_id: &str, dns: &[&str], ttl_secs: u32) -> Result<()> {
        let uid = run_ok(Command::new("id").arg("-u"))?;
        let selector = format!("unix:uid:{}", uid.trim());
        let ttl = ttl_secs.to_string();
        let mut args = vec![
            "entry",
            "create",
            "-parentID",
            &self.node_id,
            "-spiffeID",
            spiffe_id,
            "-selector",
            &selector,
            "-x509SVIDTTL",
            &ttl,
        ];
        for name in dns {
            args.extend(["-dns", name]);
        }
        self.server_cmd(&args)?;
        Ok(())
    }

    /// The last lines of `server` or `agent` log.
    pub fn log_tail(&self, which: &str) -> String {
        crate::tail_lines(&self.dir.join(format!("{which}.log")), 20)
    }
}

/// spire-server configuration: loopback, SQLite datastore, join-token node attestation.
fn server_conf(d: &str, port: u16, trust_domain: &str) -> String {
    format!(
        r#"server {{
      bind_address = "127.0.0.1"
      bind_port = "{port}"
      socket_path = "{d}/server.sock"
      trust_domain = "{trust_domain}"
      data_dir = "{d}/server"
      log_level = "INFO"
      ca_ttl = "24h"
      default_x509_svid_ttl = "1h"
    }}
    plugins {{
      DataStore "sql" {{
        plugin_data {{
          database_type = "sqlite3"
          connection_string = "{d}/datastore.sqlite3"
        }}
      }}
      KeyManager "memory" {{
        plugin_data {{}}
      }}
      NodeAttestor "join_token" {{
        plugin_data {{}}
      }}
    }}
    "#
    )
}

/// spire-agent configuration: join-token attestation, `unix` workload attestation.
fn agent_conf(d: &str, port: u16) -> String {
    format!(
        r#"agent {{
      data_dir = "{d}/agent"
      log_level = "INFO"
      server_address = "127.0.0.1"
      server_port = "{port}"
      socket_path = "{d}/agent.sock"
      trust_bundle_path = "{d}/bundle.pem"
      trust_domain = "{TRUST_DOMAIN}"
    }}
    plugins {{
      NodeAttestor "join_token" {{
        plugin_data {{}}
      }}
      KeyManager "memory" {{
        plugin_data {{}}
      }}
      WorkloadAttestor "unix" {{
        plugin_data {{}}
      }}
    }}
    "#
    )
}

/// Where the node's agent reaches the server (relayed to the host's loopback).
pub const SERVER_ON_NODE: &str = "10.200.0.1:8081";

/// Where a pod mounts the node agent's socket directory, and the endpoint it is told.
pub const POD_SOCKET_DIR: &str = "/run/spire/sockets";

/// SPIRE for the real node (see the module documentation). Stops the agent and the controller
/// manager, then the server, on drop.
pub struct OnNode {
    agent: Child,
    manager: Option<Child>,
    spire: Spire,
    _relay: Relay,
    /// The directory, on the node, that holds the agent's Workload API socket (`agent.sock`):
    /// pods mount it as [`POD_SOCKET_DIR`].
    pub sockets: PathBuf,
}

impl OnNode {
    /// Starts the server, the node's agent (attested with a join token as [`Spire::node_id`],
    /// which the controller manager names as every entry's parent) and the controller manager
    /// (cluster `palisade-node`, its validating webhook off), all for `trust_domain`.
    pub fn start(bin_dir: &Path, node: &Node, trust_domain: &str) -> Result<Self> {
        // `start_server` checks for the server and the agent.
        if !bin_dir.join("spire-controller-manager").exists() {
            bail!(
                "spire-controller-manager not found in {}: build it with e2e/toolchain/build.sh spirecm",
                bin_dir.display()
            );
        }
        let spire = Spire::start_server(bin_dir, trust_domain)?;
        let relay = node.holder().expose(
            SERVER_ON_NODE.parse()?,
            std::net::SocketAddr::from(([127, 0, 0, 1], spire.port)),
        )?;
        let token = spire.join_token()?;
        let sockets = node.work_dir.join("spire-sockets");
        std::fs::create_dir_all(&sockets)?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o755))?;
        }
        let d = spire.dir.display().to_string();
        let pki = &node.cp().pki;
        std::fs::write(
            spire.dir.join("node-agent.conf"),
            node_agent_conf(
                &d,
                trust_domain,
                &sockets,
                (&pki.admin_cert, &pki.admin_key),
            ),
        )?;
        let agent = spawn_logged(
            node.holder()
                .command(bin_dir.join("spire-agent"))
                .args(["run", "-config", &format!("{d}/node-agent.conf")])
                .args(["-joinToken", &token]),
            &spire.dir.join("node-agent.log"),
        )?;
        let mut on_node = OnNode {
            agent,
            manager: None,
            spire,
            _relay: relay,
            sockets,
        };
        wait_for_socket(&on_node.sockets.join("agent.sock"), || {
            on_node.spire.log_tail("node-agent")
        })?;
        std::fs::write(
            on_node.spire.dir.join("manager.yaml"),
            manager_conf(&d, trust_domain),
        )?;
        on_node.manager = Some(spawn_logged(
            Command::new(bin_dir.join("spire-controller-manager"))
                .args(["-config", &format!("{d}/manager.yaml")])
                .env("KUBECONFIG", &node.cp().kubeconfig)
                .env("ENABLE_WEBHOOKS", "false"),
            &on_node.spire.dir.join("manager.log"),
        )?);
        Ok(on_node)
    }

    /// `spire-server entry show`: every registration entry.
    pub fn entries(&self) -> Result<String> {
        self.spire.server_cmd(&["entry", "show"])
    }

    /// The last lines of `server`, `node-agent` or `manager` log.
    pub fn log_tail(&self, which: &str) -> String {
        self.spire.log_tail(which)
    }
}

impl Drop for OnNode {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.agent).chain(self.manager.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The node agent's configuration: the server through the node's relay, join-token
/// attestation, and the Kubernetes workload attestor, which asks the kubelet on the node's
/// address (its secure port, with a client certificate the kubelet's client CA signed) for the
/// pod of a calling process.
fn node_agent_conf(d: &str, trust_domain: &str, sockets: &Path, client: (&Path, &Path)) -> String {
    let (host, port) = SERVER_ON_NODE
        .split_once(':')
        .unwrap_or((SERVER_ON_NODE, ""));
    let (sockets, cert, key) = (sockets.display(), client.0.display(), client.1.display());
    format!(
        r#"agent {{
      data_dir = "{d}/node-agent"
      log_level = "INFO"
      server_address = "{host}"
      server_port = "{port}"
      socket_path = "{sockets}/agent.sock"
      trust_bundle_path = "{d}/bundle.pem"
      trust_domain = "{trust_domain}"
    }}
    plugins {{
      NodeAttestor "join_token" {{
        plugin_data {{}}
      }}
      KeyManager "memory" {{
        plugin_data {{}}
      }}
      WorkloadAttestor "k8s" {{
        plugin_data {{
          node_name = "{host}"
          kubelet_secure_port = 10250
          skip_kubelet_verification = true
          certificate_path = "{cert}"
          private_key_path = "{key}"
        }}
      }}
    }}
    "#
    )
}

/// The controller manager's configuration: entries for this cluster's pods, parented to the
/// node agent's alias, written through the server's admin socket.
fn manager_conf(d: &str, trust_domain: &str) -> String {
    format!(
        r#"apiVersion: spire.spiffe.io/v1alpha1
kind: ControllerManagerConfig
metrics:
  bindAddress: "0"
health:
  healthProbeBindAddress: "0"
leaderElection:
  leaderElect: false
clusterName: palisade-node
trustDomain: {trust_domain}
spireServerSocketPath: {d}/server.sock
validatingWebhookConfigurationName: spire-controller-manager-webhook
parentIDTemplate: "spiffe://{{{{ .TrustDomain }}}}/e2e-node"
ignoreNamespaces: [kube-system, kube-public]
"#
    )
}

impl Drop for Spire {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.as_mut() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
