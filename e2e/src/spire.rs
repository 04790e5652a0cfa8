//! A real SPIRE server and agent (built by `e2e/toolchain/build.sh spire`) on loopback, so the
//! webhook can take its serving certificate from the SPIFFE Workload API as it would in a
//! cluster. The server attests the agent with a join token; the agent attests workloads with
//! the `unix` attestor, so every process of this user receives the registered SVID.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{controlplane::free_port, run_ok, spawn_logged};

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
}

impl Spire {
    /// Starts a server and an attested agent and waits for the Workload API socket.
    pub fn start(bin_dir: &Path) -> Result<Self> {
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
        let server_conf = server_conf(&d.to_string(), port);
        std::fs::write(dir.join("server.conf"), server_conf)?;
        let server = spawn_logged(
            Command::new(bin_dir.join("spire-server")).args([
                "run",
                "-config",
                &format!("{d}/server.conf"),
            ]),
            &dir.join("server.log"),
        )?;
        let node_id = format!("spiffe://{TRUST_DOMAIN}/e2e-node");
        let mut spire = Spire {
            server,
            agent: None,
            bin_dir: bin_dir.to_path_buf(),
            workload_api: format!("unix://{d}/agent.sock"),
            bundle: dir.join("bundle.pem"),
            dir: dir.clone(),
            node_id,
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
        let token_out = spire.server_cmd(&["token", "generate", "-spiffeID", &spire.node_id])?;
        let token = token_out
            .split_whitespace()
            .last()
            .context("a join token")?
            .to_owned();
        let agent_conf = agent_conf(&d.to_string(), port);
        std::fs::write(dir.join("agent.conf"), agent_conf)?;
        spire.agent = Some(spawn_logged(
            Command::new(bin_dir.join("spire-agent")).args([
                "run",
                "-config",
                &format!("{d}/agent.conf"),
                "-joinToken",
                &token,
            ]),
            &dir.join("agent.log"),
        )?);
        let socket = dir.join("agent.sock");
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("spire-agent socket missing: {}", spire.log_tail("agent"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
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
fn server_conf(d: &str, port: u16) -> String {
    format!(
        r#"server {{
      bind_address = "127.0.0.1"
      bind_port = "{port}"
      socket_path = "{d}/server.sock"
      trust_domain = "{TRUST_DOMAIN}"
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
