//! A real OpenBao server (`bao server -dev`, built by `e2e/toolchain/build.sh openbao`) on
//! loopback with TLS, and the one-time bootstrap a platform team does with the root token:
//! Kubernetes auth against the control plane (TokenReview), the operator's own policy and login
//! role, KV v2 and a PostgreSQL connection. After bootstrap the operator never sees the root
//! token: it logs in with its ServiceAccount.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{ControlPlane, controlplane::free_port, postgres::Postgres, run, run_ok, spawn_logged};

/// Name of the operator's own Vault policy and login role. It does not start with `palisade-`,
/// the prefix of every name the operator may write, so it can never rewrite its own grant.
pub const OPERATOR_ROLE: &str = "palisade_operator";

/// The `vault` settings beyond the connection that the quick start and the tests use: each
/// namespace owns `secret/<namespace>/` and the database connections `<namespace>_*` with the
/// `readonly` profile; namespace `shop` also gets connection `orders-pg` (the example binding's)
/// with `readonly` or `readwrite`. The profiles put credentials in the platform's group roles
/// (see `postgres::Postgres::prepare_for_vault`) and drop them by name: the plugin's default
/// revocation revokes privileges on every table, which a least-privileged account cannot.
pub const EXAMPLE_TENANCY: &str = r#"  cleanupTimeoutSeconds: 20
  tenancy:
    kv: [{mount: secret, version: 2, pathPrefix: "{namespace}/"}]
    database: [{mount: database, connection: "{namespace}_*", profiles: [readonly]}]
    namespaces: {shop: {database: [{mount: database, connection: orders-pg, profiles: [readonly, readwrite]}]}}
    profiles:
      readonly:
        creationStatements:
          - CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE palisade_readonly;
        revocationStatements: ['DROP ROLE IF EXISTS "{{name}}";']
        renewStatements: ['ALTER ROLE "{{name}}" VALID UNTIL ''{{expiration}}'';']
      readwrite:
        creationStatements:
          - CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE palisade_readwrite;
        revocationStatements: ['DROP ROLE IF EXISTS "{{name}}";']
        renewStatements: ['ALTER ROLE "{{name}}" VALID UNTIL ''{{expiration}}'';']
"#;

fn vault_password(pg: &Postgres) -> String {
    format!("vault-{}", pg.port)
}

/// A running dev-mode OpenBao. Stops it on drop.
pub struct OpenBao {
    child: Child,
    bin: PathBuf,
    dir: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub addr: String,
    /// CA of its serving certificate.
    pub ca: PathBuf,
    /// A second listener, with a certificate of the caller's (see [`OpenBao::start_with_listener`]).
    pub second_listener: Option<std::net::SocketAddr>,
    root_token: String,
    unseal_key: String,
}

impl OpenBao {
    /// Starts `bao server -dev -dev-tls` in `dir`.
    pub fn start(bin_dir: &Path, dir: &Path) -> Result<Self> {
        Self::start_inner(bin_dir, dir, None)
    }

    /// Like [`OpenBao::start`], with a second loopback listener serving the certificate
    /// `cert_pem`/`key_pem` (the dev server's own names only `localhost` and 127.0.0.1; clients
    /// that reach it under another address, through a relay, need one naming that address).
    pub fn start_with_listener(
        bin_dir: &Path,
        dir: &Path,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self> {
        Self::start_inner(bin_dir, dir, Some((cert_pem, key_pem)))
    }

    fn start_inner(bin_dir: &Path, dir: &Path, listener: Option<(&str, &str)>) -> Result<Self> {
        let bin = bin_dir.join("bao");
        if !bin.exists() {
            bail!(
                "bao not found in {}: build it with e2e/toolchain/build.sh openbao",
                bin_dir.display()
            );
        }
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let root_token = format!("root-{}", std::process::id());
        let log = dir.join("bao.log");
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "-dev", "-dev-tls", "-dev-no-store-token"])
            .arg(format!("-dev-tls-cert-dir={}", dir.display()))
            .arg(format!("-dev-root-token-id={root_token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env_remove("BAO_TOKEN")
            .env_remove("VAULT_TOKEN");
        let mut second_listener = None;
        if let Some((cert, key)) = listener {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let (cert_file, key_file) =
                (dir.join("listener-cert.pem"), dir.join("listener-key.pem"));
            std::fs::write(&cert_file, cert)?;
            std::fs::write(&key_file, key)?;
            let config = dir.join("listener.hcl");
            std::fs::write(
                &config,
                format!(
                    "listener \"tcp\" {{\n  address = \"{addr}\"\n  cluster_address = \"127.0.0.1:{}\"\n  tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"\n}}\n",
                    free_port()?,
                    cert_file.display(),
                    key_file.display()
                ),
            )?;
            cmd.arg(format!("-config={}", config.display()));
            second_listener = Some(addr);
        }
        let child = spawn_logged(&mut cmd, &log)?;
        let mut bao = OpenBao {
            child,
            bin,
            dir: dir.to_path_buf(),
            addr: format!("https://127.0.0.1:{port}"),
            ca: dir.join("vault-ca.pem"),
            second_listener,
            root_token,
            unseal_key: String::new(),
        };
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Some(status) = bao.child.try_wait()? {
                bail!("bao exited ({status}): {}", bao.log_tail());
            }
            // Ready when it answers and has printed its unseal key (the banner can come after
            // the listener is up).
            let banner = std::fs::read_to_string(&log).unwrap_or_default();
            if bao.ca.exists() && banner.contains("Unseal Key: ") && bao.root(&["status"]).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("bao not ready: {}", bao.log_tail());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let text = std::fs::read_to_string(&log)?;
        text.lines()
            .find_map(|l| l.trim().strip_prefix("Unseal Key: "))
            .context("no unseal key in the dev server's output")?
            .trim()
            .clone_into(&mut bao.unseal_key);
        Ok(bao)
    }

    /// `bao` with `token` (stdout, or an error carrying stderr).
    pub fn bao(&self, token: &str, args: &[&str]) -> Result<String> {
        let out = self.bao_output(token, args)?;
        if !out.status.success() {
            bail!(
                "bao {}: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `bao` with `token`, whatever its outcome.
    pub fn bao_output(&self, token: &str, args: &[&str]) -> Result<std::process::Output> {
        run(Command::new(&self.bin)
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_CACERT", &self.ca)
            .env("BAO_TOKEN", token)
            .env("HOME", &self.dir)
            .env_remove("VAULT_TOKEN"))
    }

    /// `bao` as root (bootstrap and test inspection only).
    pub fn root(&self, args: &[&str]) -> Result<String> {
        self.bao(&self.root_token, args)
    }

    /// `bao` as root, whatever its outcome.
    pub fn root_output(&self, args: &[&str]) -> Result<std::process::Output> {
        self.bao_output(&self.root_token, args)
    }

    /// A signing key `name` in the transit engine (enabled at `transit/` on first use): ECDSA
    /// P-256, not exportable, and a token whose policy may only read its public key and sign
    /// with it. Returned as cosign's `hashivault://` signer with that token: cosign sends a
    /// digest and gets a signature back; the private key never leaves OpenBao.
    pub fn transit_signer(&self, name: &str) -> Result<crate::registry::Signer> {
        if !self.root(&["secrets", "list"])?.contains("transit/") {
            self.root(&["secrets", "enable", "transit"])?;
        }
        self.root(&[
            "write",
            "-f",
            &format!("transit/keys/{name}"),
            "type=ecdsa-p256",
            "exportable=false",
        ])?;
        let policy = format!(
            "path \"transit/keys/{name}\" {{ capabilities = [\"read\"] }}\n\
             path \"transit/sign/{name}/sha2-256\" {{ capabilities = [\"update\"] }}\n"
        );
        let file = self.dir_file(&format!("signer-{name}.hcl"), &policy)?;
        self.root(&["policy", "write", &format!("signer-{name}"), &file])?;
        let token = self.root(&[
            "token",
            "create",
            "-field=token",
            &format!("-policy=signer-{name}"),
            "-ttl=1h",
        ])?;
        Ok(crate::registry::Signer::Kms {
            reference: format!("hashivault://{name}"),
            env: vec![
                ("VAULT_ADDR".to_owned(), self.addr.clone()),
                ("VAULT_CACERT".to_owned(), self.ca.display().to_string()),
                ("VAULT_TOKEN".to_owned(), token),
                (
                    "TRANSIT_SECRET_ENGINE_PATH".to_owned(),
                    "transit".to_owned(),
                ),
            ],
        })
    }

    /// Seals the server: every call answers 503 until [`OpenBao::unseal`].
    pub fn seal(&self) -> Result<()> {
        self.root(&["operator", "seal"]).map(|_| ())
    }

    /// Unseals it with the dev server's key.
    pub fn unseal(&self) -> Result<()> {
        self.bao("", &["operator", "unseal", &self.unseal_key])
            .map(|_| ())
    }

    /// The operator's Vault policy for the operator configuration `vault_extra` (see
    /// [`OpenBao::operator_config`]), as `palisade-operator --config F --vault-policy` renders
    /// it.
    pub fn operator_policy(&self, vault_extra: &str) -> Result<String> {
        let config = self.dir_file("operator-config.yaml", &self.operator_config(vault_extra))?;
        run_ok(
            Command::new(crate::operator::workspace_bin("palisade-operator")?).args([
                "--config",
                &config,
                "--vault-policy",
            ]),
        )
    }

    /// Kubernetes auth against `cp`; the operator's policy (rendered from the operator
    /// configuration `vault_extra`) and login role for ServiceAccount
    /// `palisade-system/palisade-operator`; and, for each `(connection, namespace)`, a database
    /// connection to `pg` as its least-privileged `vault_admin` account whose `allowed_roles`
    /// are only the role names bindings of that namespace produce.
    pub fn bootstrap(
        &self,
        cp: &ControlPlane,
        pg: &Postgres,
        connections: &[(&str, &str)],
        vault_extra: &str,
    ) -> Result<()> {
        let kubectl = |args: &[&str]| run_ok(cp.kubectl().args(args));
        let _ = kubectl(&["create", "namespace", "palisade-system"]);
        for sa in ["palisade-operator", "vault-token-reviewer"] {
            let _ = kubectl(&["create", "serviceaccount", sa, "-n", "palisade-system"]);
        }
        let _ = kubectl(&[
            "create",
            "clusterrolebinding",
            "vault-token-reviewer",
            "--clusterrole=system:auth-delegator",
            "--serviceaccount=palisade-system:vault-token-reviewer",
        ]);
        let reviewer = kubectl(&[
            "create",
            "token",
            "vault-token-reviewer",
            "-n",
            "palisade-system",
            "--duration=24h",
        ])?;
        self.root(&["auth", "enable", "kubernetes"])?;
        self.root(&[
            "write",
            "auth/kubernetes/config",
            &format!("kubernetes_host={}", cp.server),
            &format!("kubernetes_ca_cert=@{}", cp.pki.ca_cert.display()),
            &format!("token_reviewer_jwt={}", reviewer.trim()),
        ])?;
        let policy = self.dir.join("operator-policy.hcl");
        std::fs::write(&policy, self.operator_policy(vault_extra)?)?;
        self.root(&[
            "policy",
            "write",
            OPERATOR_ROLE,
            &policy.display().to_string(),
        ])?;
        self.root(&[
            "write",
            &format!("auth/kubernetes/role/{OPERATOR_ROLE}"),
            "bound_service_account_names=palisade-operator",
            "bound_service_account_namespaces=palisade-system",
            &format!("token_policies={OPERATOR_ROLE}"),
            "audience=vault",
            "token_ttl=10m",
        ])?;
        self.root(&["secrets", "enable", "database"])?;
        pg.prepare_for_vault(&vault_password(pg))?;
        for (c, namespace) in connections {
            self.add_connection(pg, c, namespace)?;
        }
        Ok(())
    }

    /// Database connection `connection` to `pg` as `vault_admin`, usable only by the role
    /// names bindings of `namespace` produce (`palisade-<namespace>.*`).
    pub fn add_connection(&self, pg: &Postgres, connection: &str, namespace: &str) -> Result<()> {
        self.root(&[
            "write",
            &format!("database/config/{connection}"),
            "plugin_name=postgresql-database-plugin",
            &format!("connection_url={}", pg.vault_connection_url()),
            &format!("username={}", crate::postgres::VAULT_ADMIN),
            &format!("password={}", vault_password(pg)),
            &format!("allowed_roles=palisade-{namespace}.*"),
            "verify_connection=true",
        ])
        .map(|_| ())
    }

    /// The operator configuration's `vault` section for this server.
    pub fn operator_config(&self, extra: &str) -> String {
        format!(
            "vault:\n  address: {}\n  caFile: {}\n  role: {OPERATOR_ROLE}\n  serviceAccount: {{namespace: palisade-system, name: palisade-operator}}\n{extra}",
            self.addr,
            self.ca.display()
        )
    }

    /// Logs in as ServiceAccount `namespace/sa` to `role`; the client token.
    pub fn login(
        &self,
        cp: &ControlPlane,
        namespace: &str,
        sa: &str,
        role: &str,
    ) -> Result<String> {
        let jwt = run_ok(cp.kubectl().args([
            "create",
            "token",
            sa,
            "-n",
            namespace,
            "--audience",
            "vault",
        ]))?;
        self.bao(
            "",
            &[
                "write",
                "-field=token",
                "auth/kubernetes/login",
                &format!("role={role}"),
                &format!("jwt={}", jwt.trim()),
            ],
        )
    }

    /// Writes `text` to a file in the server's directory; its path.
    pub fn dir_file(&self, name: &str, text: &str) -> Result<String> {
        let path = self.dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    }

    /// Process id (of the launcher, for PostgreSQL under root).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        crate::tail_lines(&self.dir.join("bao.log"), 20)
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
