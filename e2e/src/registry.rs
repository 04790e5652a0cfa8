//! A real OCI registry on loopback — `crane registry serve` (in memory, anonymous) or the CNCF
//! Distribution `registry` with htpasswd authentication — and the real `cosign` to sign and
//! attest what is pushed to it, all built by `e2e/toolchain/build.sh`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};

use crate::{controlplane::free_port, run_ok, spawn_logged};

/// Where cosign puts what it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `sha256-<hex>.sig` and `.att` tags next to the image (cosign before v3).
    Tags,
    /// Sigstore bundles attached as OCI referrers (cosign v3's default).
    Bundles,
}

/// What cosign signs with: a key pair made with [`OciRegistry::key_pair`] (by name), or a key
/// held in a KMS, named by cosign's `--key` reference (`hashivault://<key>`), with the
/// environment its provider reads (address, token, CA).
#[derive(Clone, Debug)]
pub enum Signer {
    /// A key pair in the registry's directory.
    Pair(String),
    /// A KMS key: the private key never leaves the KMS.
    Kms {
        /// cosign's `--key` reference.
        reference: String,
        /// `VAULT_ADDR`, `VAULT_TOKEN`, `VAULT_CACERT`, ... for the provider.
        env: Vec<(String, String)>,
    },
}

impl Signer {
    /// A `cosign` command with this signer's environment and `--key` after `subcommand`.
    fn command(&self, reg: &OciRegistry, subcommand: &str) -> Command {
        let mut cmd = reg.cosign_command();
        cmd.arg(subcommand).arg("--key");
        match self {
            Signer::Pair(name) => {
                cmd.arg(reg.dir.join(format!("key-{name}")).join("cosign.key"));
            }
            Signer::Kms { reference, env } => {
                cmd.arg(reference).envs(env.iter().map(|(k, v)| (k, v)));
            }
        }
        cmd
    }

    /// The public key (PEM), as cosign reads it from the signer.
    pub fn public_key(&self, reg: &OciRegistry) -> Result<String> {
        match self {
            Signer::Pair(name) => Ok(std::fs::read_to_string(reg.dir_key(name))?),
            Signer::Kms { .. } => run_ok(&mut self.command(reg, "public-key")),
        }
    }
}

/// A running registry. Stops it on drop.
pub struct OciRegistry {
    child: Child,
    bin_dir: PathBuf,
    dir: PathBuf,
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// User and password, for a registry that asks for them.
    pub credentials: Option<(String, String)>,
    /// The CA its HTTPS certificate chains to, for a registry served over TLS.
    pub ca: Option<PathBuf>,
}

impl OciRegistry {
    /// Starts an empty registry; `dir` holds keys and scratch files.
    pub fn start(bin_dir: &Path, dir: &Path) -> Result<Self> {
        let host = prepare(bin_dir, dir, &["crane", "cosign"])?;
        let child = spawn_logged(
            Command::new(bin_dir.join("crane")).args(["registry", "serve", "--address", &host]),
            &dir.join("registry.log"),
        )?;
        let reg = OciRegistry {
            child,
            bin_dir: bin_dir.to_path_buf(),
            dir: dir.to_path_buf(),
            host,
            credentials: None,
            ca: None,
        };
        reg.wait_listening()?;
        Ok(reg)
    }

    /// Starts an empty Distribution registry (in memory) that reads and writes only with HTTP
    /// basic credentials, which it provisions itself; crane and cosign here log in with them.
    pub fn start_with_auth(bin_dir: &Path, dir: &Path) -> Result<Self> {
        let host = prepare(bin_dir, dir, &["registry", "crane", "cosign"])?;
        let htpasswd = dir.join("htpasswd");
        let _ = std::fs::remove_file(&htpasswd);
        let config = dir.join("registry.yaml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info, formatter: text}}\nstorage: {{inmemory: {{}}}}\n\
                 http: {{addr: \"{host}\"}}\n\
                 auth: {{htpasswd: {{realm: palisade-e2e, path: \"{}\"}}}}\n",
                htpasswd.display()
            ),
        )?;
        let log = dir.join("registry.log");
        let child = spawn_logged(
            Command::new(bin_dir.join("registry"))
                .arg("serve")
                .arg(&config),
            &log,
        )?;
        let mut reg = OciRegistry {
            child,
            bin_dir: bin_dir.to_path_buf(),
            dir: dir.to_path_buf(),
            host,
            credentials: None,
            ca: None,
        };
        reg.wait_listening()?;
        // With no htpasswd file the registry makes one for user `docker` and logs the password.
        let text = std::fs::read_to_string(&log)?;
        let password = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("password="))
            .map(|p| p.trim_matches('"').to_owned());
        let Some(password) = password else {
            bail!("the registry logged no provisioned password: {text}");
        };
        let auth = B64.encode(format!("docker:{password}"));
        let docker = reg.docker_config_dir();
        std::fs::create_dir_all(&docker)?;
        std::fs::write(
            docker.join("config.json"),
            serde_json::json!({"auths": {reg.host.clone(): {"auth": auth}}}).to_string(),
        )?;
        reg.credentials = Some(("docker".into(), password));
        Ok(reg)
    }

    /// Starts an empty Distribution registry (in memory) served over HTTPS with a certificate
    /// for 127.0.0.1 from a CA of its own (`ca.pem` in `dir`, [`OciRegistry::ca`]); crane and
    /// cosign here trust that CA.
    pub fn start_with_tls(bin_dir: &Path, dir: &Path) -> Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let host = prepare(bin_dir, dir, &["registry", "crane", "cosign"])?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "e2e private registry CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        let cert = leaf.signed_by(&key, &issuer)?.pem();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_pem)?;
        std::fs::write(dir.join("tls.crt"), cert)?;
        std::fs::write(dir.join("tls.key"), key.serialize_pem())?;
        let config = dir.join("registry.yaml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info, formatter: text}}\nstorage: {{inmemory: {{}}}}\n\
                 http: {{addr: \"{host}\", tls: {{certificate: \"{}\", key: \"{}\"}}}}\n",
                dir.join("tls.crt").display(),
                dir.join("tls.key").display()
            ),
        )?;
        let child = spawn_logged(
            Command::new(bin_dir.join("registry"))
                .arg("serve")
                .arg(&config),
            &dir.join("registry.log"),
        )?;
        let reg = OciRegistry {
            child,
            bin_dir: bin_dir.to_path_buf(),
            dir: dir.to_path_buf(),
            host,
            credentials: None,
            ca: Some(ca_file),
        };
        reg.wait_listening()?;
        Ok(reg)
    }

    /// Where crane's and cosign's registry credentials are kept (`DOCKER_CONFIG`).
    /// A `cosign` command for this registry: its Docker configuration, no key password, run in
    /// its directory.
    fn cosign_command(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("cosign"));
        cmd.env("COSIGN_PASSWORD", "")
            .env("DOCKER_CONFIG", self.docker_config_dir())
            .current_dir(&self.dir);
        if let Some(ca) = &self.ca {
            cmd.env("SSL_CERT_FILE", ca);
        }
        cmd
    }

    fn docker_config_dir(&self) -> PathBuf {
        self.dir.join("docker")
    }

    /// A `.dockerconfigjson` with this registry's credentials (an imagePullSecret's content).
    pub fn docker_config_json(&self) -> Result<String> {
        Ok(std::fs::read_to_string(
            self.docker_config_dir().join("config.json"),
        )?)
    }

    fn wait_listening(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.host).is_err() {
            if Instant::now() > deadline {
                bail!("registry not listening on {}", self.host);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn crane(&self, args: &[&str]) -> Result<String> {
        Ok(run_ok(
            Command::new(self.bin_dir.join("crane"))
                .args(args)
                .arg("--insecure")
                .env("DOCKER_CONFIG", self.docker_config_dir())
                .envs(self.ca.iter().map(|ca| ("SSL_CERT_FILE", ca))),
        )?
        .trim()
        .to_owned())
    }

    /// Pushes a one-layer image whose content is `content` as `<repo>:<tag>`; its digest.
    pub fn push(&self, repo: &str, tag: &str, content: &str) -> Result<String> {
        let work = self.dir.join(format!("img-{repo}-{tag}"));
        std::fs::create_dir_all(&work)?;
        std::fs::write(work.join("content.txt"), content)?;
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&work)
                .args(["-cf", "layer.tar", "content.txt"])
                .current_dir(&work),
        )?;
        let reference = format!("{}/{repo}:{tag}", self.host);
        self.crane(&[
            "append",
            "-f",
            &work.join("layer.tar").display().to_string(),
            "-t",
            &reference,
        ])?;
        self.crane(&["digest", &reference])
    }

    /// Pushes an image made of the layer tarballs `layers` (on an empty OCI base) as
    /// `<repo>:<tag>`, then sets its config with crane `mutate` arguments `config`
    /// (`--entrypoint=…`, `--user=…`, …); its digest.
    pub fn push_layers(
        &self,
        repo: &str,
        tag: &str,
        layers: &[&Path],
        config: &[&str],
    ) -> Result<String> {
        let reference = format!("{}/{repo}:{tag}", self.host);
        let mut args = vec!["append".to_owned(), "--oci-empty-base".to_owned()];
        for l in layers {
            args.push("-f".into());
            args.push(l.display().to_string());
        }
        args.extend(["-t".to_owned(), reference.clone()]);
        self.crane(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let mut args = vec!["mutate", &reference];
        args.extend_from_slice(config);
        args.extend(["-t", &reference]);
        self.crane(&args)?;
        self.crane(&["digest", &reference])
    }

    /// Copies an image or tag within the registry.
    pub fn copy(&self, from: &str, to: &str) -> Result<()> {
        self.crane(&[
            "copy",
            &format!("{}/{from}", self.host),
            &format!("{}/{to}", self.host),
        ])
        .map(|_| ())
    }

    /// A key pair named `name` of another type, made by OpenSSL (`genpkey` with `args`, e.g.
    /// `["-algorithm", "ED25519"]`) and imported with `cosign import-key-pair`, as a team brings a
    /// key cosign does not generate; the public key's path.
    pub fn imported_key_pair(&self, name: &str, args: &[&str]) -> Result<PathBuf> {
        let dir = self.dir.join(format!("key-{name}"));
        std::fs::create_dir_all(&dir)?;
        run_ok(
            Command::new("openssl")
                .arg("genpkey")
                .args(args)
                .args(["-out", "private.pem"])
                .current_dir(&dir),
        )?;
        run_ok(
            Command::new(self.bin_dir.join("cosign"))
                .args([
                    "import-key-pair",
                    "--key",
                    "private.pem",
                    "--output-key-prefix",
                    "cosign",
                ])
                .env("COSIGN_PASSWORD", "")
                .current_dir(&dir),
        )?;
        std::fs::remove_file(dir.join("private.pem"))?;
        Ok(dir.join("cosign.pub"))
    }

    /// Generates a cosign key pair named `name`; the public key's path.
    pub fn key_pair(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.join(format!("key-{name}"));
        std::fs::create_dir_all(&dir)?;
        run_ok(
            Command::new(self.bin_dir.join("cosign"))
                .args(["generate-key-pair"])
                .env("COSIGN_PASSWORD", "")
                .current_dir(&dir),
        )?;
        Ok(dir.join("cosign.pub"))
    }

    /// A keyless signer `name` in Fulcio's shape for an air-gapped cluster: a CA, and a
    /// code-signing certificate from it for `subject` (email) with the OIDC `issuer` extension,
    /// whose key is imported into cosign. Returns the CA's PEM file.
    pub fn keyless_signer(&self, name: &str, subject: &str, issuer: &str) -> Result<PathBuf> {
        use rcgen::{
            BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose,
            IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
        };
        let dir = self.dir.join(format!("key-{name}"));
        std::fs::create_dir_all(&dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "e2e fulcio");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let issuer_ca = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(Vec::<String>::new())?;
        leaf.subject_alt_names = vec![SanType::Rfc822Name(subject.try_into()?)];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 57264, 1, 1],
            issuer.as_bytes().to_vec(),
        )];
        let leaf_pem = leaf.signed_by(&leaf_key, &issuer_ca)?.pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem)?;
        std::fs::write(dir.join("leaf.crt"), leaf_pem)?;
        std::fs::write(dir.join("leaf.key.pem"), leaf_key.serialize_pem())?;
        run_ok(
            Command::new(self.bin_dir.join("cosign"))
                .args([
                    "import-key-pair",
                    "--key",
                    "leaf.key.pem",
                    "--output-key-prefix",
                    "cosign",
                    "--yes",
                ])
                .env("COSIGN_PASSWORD", "")
                .current_dir(&dir),
        )?;
        Ok(dir.join("ca.pem"))
    }

    /// Signs `<repo>@<digest>` with keyless signer `name`, attaching its certificate.
    pub fn sign_keyless(&self, name: &str, repo: &str, digest: &str) -> Result<()> {
        let dir = self.dir.join(format!("key-{name}"));
        let cert = format!("--certificate={}", dir.join("leaf.crt").display());
        let chain = format!("--certificate-chain={}", dir.join("ca.pem").display());
        self.cosign(
            name,
            &[
                "sign",
                &cert,
                &chain,
                &format!("{}/{repo}@{digest}", self.host),
            ],
        )
    }

    /// Path of the public key of pair `name`.
    pub fn dir_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("key-{name}")).join("cosign.pub")
    }

    fn cosign(&self, key: &str, args: &[&str]) -> Result<()> {
        self.cosign_as(key, args, Layout::Tags)
    }

    /// Runs cosign `args` with key pair `key`, offline (no transparency log, no signing
    /// config), writing in `layout`.
    fn cosign_as(&self, key: &str, args: &[&str], layout: Layout) -> Result<()> {
        self.cosign_with(&Signer::Pair(key.to_owned()), args, layout)
    }

    /// Runs cosign `args` (the subcommand first) with `signer`, offline, writing in `layout`.
    fn cosign_with(&self, signer: &Signer, args: &[&str], layout: Layout) -> Result<()> {
        let layout = match layout {
            Layout::Tags => "--new-bundle-format=false",
            Layout::Bundles => "--new-bundle-format=true",
        };
        let (subcommand, rest) = args.split_first().context("a cosign subcommand")?;
        run_ok(
            signer
                .command(self, subcommand)
                .args([
                    "--tlog-upload=false",
                    layout,
                    "--use-signing-config=false",
                    "--allow-http-registry",
                    "--yes",
                ])
                .args(rest),
        )?;
        Ok(())
    }

    /// Signs `<repo>@<digest>` with `signer`.
    pub fn sign_with(&self, signer: &Signer, repo: &str, digest: &str) -> Result<()> {
        self.cosign_with(
            signer,
            &["sign", &format!("{}/{repo}@{digest}", self.host)],
            Layout::Tags,
        )
    }

    /// Attests `<repo>@<digest>` with `signer` (see [`OciRegistry::attest`]).
    pub fn attest_with(
        &self,
        signer: &Signer,
        repo: &str,
        digest: &str,
        type_: &str,
        predicate: &str,
    ) -> Result<()> {
        let image = format!("{repo}@{digest}");
        self.attest_signed(signer, &image, type_, predicate, Layout::Tags)
    }

    /// The webhook configuration that lets it read this registry: plain HTTP on loopback, or
    /// HTTPS trusting its CA.
    pub fn webhook_config(&self) -> String {
        match &self.ca {
            None => format!("images: {{insecureRegistries: [\"{}\"]}}", self.host),
            Some(ca) => format!(
                "images: {{registryCAFiles: {{\"{}\": \"{}\"}}}}",
                self.host,
                ca.display()
            ),
        }
    }

    /// Pushes `content` as `<repo>:v1`, signs it with key `key` and, with `provenance`, attests
    /// it as `slsaprovenance` with that predicate, in `layout`; returns its digest.
    pub fn push_signed(
        &self,
        key: &str,
        repo: &str,
        content: &str,
        provenance: Option<&str>,
        layout: Layout,
    ) -> Result<String> {
        let digest = self.push(repo, "v1", content)?;
        let image = format!("{repo}@{digest}");
        self.cosign_as(key, &["sign", &format!("{}/{image}", self.host)], layout)?;
        if let Some(predicate) = provenance {
            self.attest_as(key, &image, "slsaprovenance", predicate, layout)?;
        }
        Ok(digest)
    }

    /// Signs `<repo>@<digest>` with key `key`.
    pub fn sign(&self, key: &str, repo: &str, digest: &str) -> Result<()> {
        self.sign_with(&Signer::Pair(key.to_owned()), repo, digest)
    }

    /// Attests `<repo>@<digest>` with key `key`: an in-toto statement of `type_` (cosign's
    /// `--type`, e.g. `slsaprovenance`) with `predicate` (JSON).
    pub fn attest(
        &self,
        key: &str,
        repo: &str,
        digest: &str,
        type_: &str,
        predicate: &str,
    ) -> Result<()> {
        self.attest_as(
            key,
            &format!("{repo}@{digest}"),
            type_,
            predicate,
            Layout::Tags,
        )
    }

    fn attest_as(
        &self,
        key: &str,
        image: &str,
        type_: &str,
        predicate: &str,
        layout: Layout,
    ) -> Result<()> {
        self.attest_signed(
            &Signer::Pair(key.to_owned()),
            image,
            type_,
            predicate,
            layout,
        )
    }

    /// Attests `image` (`<repo>@<digest>`) with `signer`: an in-toto statement of `type_` with
    /// `predicate`, in `layout`.
    fn attest_signed(
        &self,
        signer: &Signer,
        image: &str,
        type_: &str,
        predicate: &str,
        layout: Layout,
    ) -> Result<()> {
        let file = self.dir.join(format!("predicate-{}.json", predicate.len()));
        std::fs::write(&file, predicate)?;
        let file = file.display().to_string();
        let image = format!("{}/{image}", self.host);
        self.cosign_with(
            signer,
            &["attest", "--type", type_, "--predicate", &file, &image],
            layout,
        )
    }

    /// Attaches to `<repo>@<attach_to>` a signature made with key `key` over cosign's payload
    /// for `<repo>@<signed_for>`; with `tamper`, the payload is altered after signing. Both make
    /// signatures that must not verify: one for another image, one whose payload was changed.
    pub fn attach_signature(
        &self,
        key: &str,
        repo: &str,
        signed_for: &str,
        attach_to: &str,
        tamper: bool,
    ) -> Result<()> {
        let name = format!("{}-{}", &attach_to[7..19], u8::from(tamper));
        let payload = self.dir.join(format!("payload-{name}.json"));
        let signature = self.dir.join(format!("payload-{name}.sig"));
        let reference = format!("{}/{repo}", self.host);
        let mut text = serde_json::json!({"critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": signed_for},
            "type": "cosign container image signature"}, "optional": null})
        .to_string();
        std::fs::write(&payload, &text)?;
        run_ok(
            Signer::Pair(key.to_owned())
                .command(self, "sign-blob")
                .args([
                    "--tlog-upload=false",
                    "--new-bundle-format=false",
                    "--use-signing-config=false",
                    "--yes",
                    "--output-signature",
                ])
                .arg(&signature)
                .arg(&payload),
        )?;
        if tamper {
            text = text.replace("\"optional\":null", "\"optional\":{\"by\":\"mallory\"}");
            std::fs::write(&payload, &text)?;
        }
        run_ok(
            self.cosign_command()
                .args(["attach", "signature", "--allow-http-registry", "--payload"])
                .arg(&payload)
                .arg("--signature")
                .arg(&signature)
                .arg(format!("{reference}@{attach_to}")),
        )?;
        Ok(())
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Checks that `tools` were built, creates `dir`, and picks the registry's `127.0.0.1:<port>`.
fn prepare(bin_dir: &Path, dir: &Path, tools: &[&str]) -> Result<String> {
    for b in tools {
        if !bin_dir.join(b).exists() {
            bail!(
                "{b} not found in {}: build it with e2e/toolchain/build.sh {b}",
                bin_dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir)?;
    Ok(format!("127.0.0.1:{}", free_port()?))
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
