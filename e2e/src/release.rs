//! Palisade's own images, built without a container engine: the static release binaries
//! (`cargo build --release --target x86_64-unknown-linux-gnu` with `+crt-static`), each on a
//! minimal base layer built here (a non-root user 65532, CA certificates, `/tmp`), assembled and
//! pushed with crane, signed with cosign and attested with a CycloneDX SBOM and SLSA provenance.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{
    registry::{OciRegistry, Signer},
    run_ok, sbom,
};

/// What the release ships, as images: `(package, binary)`; each image is named after its
/// package and runs its binary. `palisade-cli` carries the `palisade` command line.
pub const BINARIES: &[(&str, &str)] = &[
    ("palisade-operator", "palisade-operator"),
    ("palisade-webhook", "palisade-webhook"),
    ("palisade-cli", "palisade"),
];

/// Builder identity recorded in the provenance (and required by Palisade's own ImagePolicy).
pub const BUILDER_ID: &str = "https://palisade.dev/builders/release@v1";

/// The command that builds the static release binaries.
pub const BUILD_COMMAND: &str = "PALISADE_COMMIT=$(git rev-parse HEAD) CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C target-feature=+crt-static' \
     cargo build --release --locked --target x86_64-unknown-linux-gnu -p palisade-operator -p palisade-webhook -p palisade-cli";

/// One published image.
#[derive(Clone, Debug)]
pub struct Published {
    /// Package name, also the repository name.
    pub name: String,
    /// The binary it runs (`/usr/local/bin/<binary>`).
    pub binary: String,
    /// `<registry>/<name>:<version>`.
    pub reference: String,
    /// Its digest.
    pub digest: String,
}

/// Where the static release binary `name` is.
pub fn binary(root: &Path, name: &str) -> Result<std::path::PathBuf> {
    let path = root
        .join("target")
        .join(sbom::TARGET)
        .join("release")
        .join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it with {BUILD_COMMAND}",
            path.display()
        );
    }
    Ok(path)
}

/// A reproducible tarball of `dir` (sorted names, epoch times, root owner unless set).
fn tarball(dir: &Path, out: &Path) -> Result<()> {
    run_ok(
        Command::new("tar")
            .args([
                "--sort=name",
                "--mtime=@0",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-C",
            ])
            .arg(dir)
            .arg("-cf")
            .arg(out)
            .arg("."),
    )?;
    Ok(())
}

/// The base layer: `/etc/passwd` and `/etc/group` with user `nonroot` (65532), the system's CA
/// bundle (for registries and Vault over TLS), and a world-writable `/tmp`. Returns the tarball
/// and the files in it, for the SBOM.
fn base_layer(work: &Path) -> Result<(std::path::PathBuf, Vec<sbom::ImageFile>)> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = work.join("base");
    std::fs::create_dir_all(dir.join("etc/ssl/certs"))?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    let mut files = Vec::new();
    let mut write = |path: &str, content: &[u8], package: Option<&str>| -> Result<()> {
        std::fs::write(dir.join(path.trim_start_matches('/')), content)?;
        files.push(sbom::ImageFile::new(path, content, package));
        Ok(())
    };
    write(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n",
        None,
    )?;
    write("/etc/group", b"root:x:0:\nnonroot:x:65532:\n", None)?;
    // update-ca-certificates builds the bundle from the ca-certificates package's certificates.
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if bundle.exists() {
        write(
            "/etc/ssl/certs/ca-certificates.crt",
            &std::fs::read(bundle)?,
            Some("ca-certificates"),
        )?;
    }
    let out = work.join("base.tar");
    tarball(&dir, &out)?;
    Ok((out, files))
}

/// Builds, pushes, signs and attests every image of [`BINARIES`] in `reg` with `signer` (a key
/// pair made with [`OciRegistry::key_pair`], or a KMS key); `root` is the workspace, `work`
/// scratch space.
pub fn publish(
    root: &Path,
    reg: &OciRegistry,
    signer: &Signer,
    work: &Path,
) -> Result<Vec<Published>> {
    std::fs::create_dir_all(work)?;
    let version = env!("CARGO_PKG_VERSION");
    let (base, base_files) = base_layer(work)?;
    let commit = run_ok(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(root),
    )
    .unwrap_or_else(|_| "unknown".into());
    let workspace = sbom::Workspace::load(root)?;
    let mut out = Vec::new();
    for (name, program) in BINARIES {
        let bin = binary(root, program)?;
        let dir = work.join(name);
        std::fs::create_dir_all(dir.join("usr/local/bin"))?;
        std::fs::copy(&bin, dir.join("usr/local/bin").join(program))?;
        let layer = work.join(format!("{name}.tar"));
        tarball(&dir, &layer)?;
        let entrypoint = format!("--entrypoint=/usr/local/bin/{program}");
        let digest = reg.push_layers(
            name,
            version,
            &[&base, &layer],
            &[
                &entrypoint,
                "--user=65532:65532",
                "--set-platform=linux/amd64",
                "--label=org.opencontainers.image.title=Palisade",
                &format!("--label=org.opencontainers.image.version={version}"),
                &format!("--label=org.opencontainers.image.revision={commit}"),
            ],
        )?;
        let mut bom = workspace.cyclonedx(name)?;
        sbom::add_files(&mut bom, &base_files);
        reg.sign_with(signer, name, &digest)?;
        reg.attest_with(signer, name, &digest, "cyclonedx", &bom.to_string())?;
        let provenance = serde_json::json!({
            "builder": {"id": BUILDER_ID},
            "buildType": "https://palisade.dev/build/cargo-crane@v1",
            "invocation": {
                "configSource": {
                    "uri": "git+https://github.com/palisade-dev/palisade",
                    "digest": {"sha1": commit},
                    "entryPoint": BUILD_COMMAND,
                },
            },
            "metadata": {"reproducible": false, "completeness": {"parameters": true, "environment": false, "materials": false}},
            "materials": [{"uri": "git+https://github.com/palisade-dev/palisade", "digest": {"sha1": commit}}],
        });
        reg.attest_with(
            signer,
            name,
            &digest,
            "slsaprovenance",
            &provenance.to_string(),
        )
        .context("provenance attestation")?;
        out.push(Published {
            name: (*name).to_owned(),
            binary: (*program).to_owned(),
            reference: format!("{}/{name}:{version}", reg.host),
            digest,
        });
    }
    Ok(out)
}
