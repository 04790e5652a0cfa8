//! Palisade's own supply chain: the static release binaries become OCI images built with crane
//! on the project's own base layer, pushed to a real registry, signed and attested (CycloneDX
//! SBOM, SLSA provenance) with the real cosign; the chart's ImagePolicy for Palisade's images
//! admits them through the real API server and refuses a tampered image, also one carrying the
//! genuine signature of the original.

use std::{collections::BTreeMap, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    accepts,
    openbao::OpenBao,
    registry::{OciRegistry, Signer},
    rejects,
    release::{self, Published},
    repo_root, run, run_ok,
    webhook::WebhookProcess,
};

use crate::{Env, TestFn};

mod sbom;

pub const TESTS: &[(&str, TestFn)] = &[(
    "release::own_images_signed_attested_and_enforced",
    own_images_signed_attested_and_enforced,
)];

#[allow(clippy::too_many_lines)]
fn own_images_signed_attested_and_enforced(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let root = repo_root();
    let work = cp.work_dir.join("release");
    let reg = OciRegistry::start(&env.opts.bin_dir, &work.join("registry"))?;
    // The release key is an OpenBao transit key: cosign signs through it, the private key stays.
    let bao = OpenBao::start(&env.opts.bin_dir, &work.join("openbao"))?;
    let signer = bao.transit_signer("palisade-release")?;
    let public = work.join("release.pub");
    std::fs::write(&public, kms_key_stays_in_openbao(&bao, &reg, &signer)?)?;
    let images = release::publish(&root, &reg, &signer, &work.join("images"))?;
    let advisories = Advisories::load()?;
    let crane = |args: &[&str]| crane(env, args);
    for Published {
        name,
        binary,
        reference,
        digest,
    } in &images
    {
        // The image: non-root, the binary as entrypoint, two layers (base, binary), linux/amd64.
        let config: serde_json::Value = serde_json::from_str(&crane(&["config", reference])?)?;
        if config["config"]["User"] != "65532:65532"
            || config["config"]["Entrypoint"][0] != format!("/usr/local/bin/{binary}")
            || config["architecture"] != "amd64"
            || config["rootfs"]["diff_ids"].as_array().map(Vec::len) != Some(2)
        {
            bail!("{reference}: unexpected image config {config}");
        }
        // The binary in it is static and runs on its own.
        let out_dir = work.join(format!("{name}-fs"));
        export_filesystem(&crane, reference, &out_dir)?;
        let bin = out_dir.join("usr/local/bin").join(binary);
        let ldd = run(Command::new("ldd").arg(&bin))?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&ldd.stdout),
            String::from_utf8_lossy(&ldd.stderr)
        );
        if !said.contains("statically linked") && !said.contains("not a dynamic executable") {
            bail!("{name} in the image is dynamically linked: {said}");
        }
        // It runs (no loader, no shared libraries), says which build it is, and reads what it
        // is given.
        let commit = run_ok(
            Command::new("git")
                .args(["rev-parse", "HEAD"])
                .current_dir(&root),
        )?;
        let version = run_ok(Command::new(&bin).arg("--version"))?;
        if version.trim()
            != format!(
                "{binary} {} (commit {})",
                env!("CARGO_PKG_VERSION"),
                commit.trim()
            )
        {
            bail!("{name} from the image says it is {version:?}, not this commit's build");
        }
        let ran = if binary == "palisade" {
            run(Command::new(&bin).args(["render", "-f", "/nonexistent-palisade.yaml"]))?
        } else {
            run(Command::new(&bin).args(["--config", "/nonexistent-palisade.yaml"]))?
        };
        if !String::from_utf8_lossy(&ran.stderr).contains("/nonexistent-palisade.yaml") {
            bail!("{name} from the image does not run: {ran:?}");
        }
        for f in ["etc/passwd", "etc/ssl/certs/ca-certificates.crt"] {
            if !out_dir.join(f).exists() {
                bail!("{reference} has no /{f}");
            }
        }
        // No secret in any file of the image (the repository's gitleaks configuration).
        if let Some(found) = secrets_in(env, &out_dir)? {
            bail!("gitleaks found secrets in {reference}:\n{found}");
        }
        // cosign itself verifies the signature and both attestations with the release key.
        let cosign = |args: &[&str]| {
            run_ok(
                Command::new(env.opts.bin_dir.join("cosign"))
                    .args(args)
                    .arg("--key")
                    .arg(&public)
                    .args(["--insecure-ignore-tlog", "--allow-http-registry"])
                    .arg(format!("{reference}@{digest}")),
            )
        };
        cosign(&["verify"])?;
        let sbom = cosign(&["verify-attestation", "--type", "cyclonedx"])?;
        let envelope: serde_json::Value =
            serde_json::from_str(sbom.lines().next().context("no attestation")?)?;
        let statement = base64_decode(envelope["payload"].as_str().unwrap_or_default())?;
        let statement: serde_json::Value = serde_json::from_slice(&statement)?;
        let components = statement["predicate"]["components"]
            .as_array()
            .map(Vec::len)
            .unwrap_or_default();
        let has_ring = statement["predicate"]["components"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == "ring");
        eprintln!("  {reference}@{digest}: {components} components in its SBOM");
        advisories.check(name, &statement["predicate"])?;
        if components < 50 || !has_ring {
            bail!("{name}'s SBOM lists {components} components (ring: {has_ring})");
        }
        // The SBOM's files are the image's files: each listed with the SHA-256 it has in the
        // image, and every base-layer file listed.
        let listed: BTreeMap<String, String> = statement["predicate"]["components"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["type"] == "file")
            .filter_map(|c| {
                Some((
                    c["name"].as_str()?.to_owned(),
                    c["hashes"][0]["content"].as_str()?.to_owned(),
                ))
            })
            .collect();
        for f in [
            "etc/passwd",
            "etc/group",
            "etc/ssl/certs/ca-certificates.crt",
        ] {
            let in_image = palisade_e2e::sbom::sha256_hex(&std::fs::read(out_dir.join(f))?);
            match listed.get(&format!("/{f}")) {
                Some(sum) if *sum == in_image => {}
                Some(sum) => bail!("{name}'s SBOM gives /{f} SHA-256 {sum}, the image {in_image}"),
                None => bail!("{name}'s SBOM does not list /{f}"),
            }
        }
        let bundle_purl = statement["predicate"]["components"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "/etc/ssl/certs/ca-certificates.crt")
            .and_then(|c| c["purl"].as_str())
            .unwrap_or("(no package)");
        eprintln!(
            "  {name}: {} base-layer files in its SBOM, CA bundle from {bundle_purl}",
            listed.len()
        );
        let dpkg = Command::new("dpkg-query").arg("--version").output().is_ok();
        if dpkg && !bundle_purl.starts_with("pkg:deb/") {
            bail!("{name}'s SBOM does not name the package the CA bundle came from");
        }
        cosign(&["verify-attestation", "--type", "slsaprovenance"])?;
    }

    // The chart's ImagePolicy for Palisade's images, enforced by the webhook.
    let policy = run_ok(
        Command::new(env.opts.bin_dir.join("helm"))
            .args(["template", "palisade", "--kube-version", "1.36.3"])
            .arg(root.join("charts/palisade"))
            .args([
                "--show-only",
                "templates/imagepolicy.yaml",
                // The control plane serves the kind (its CRD applied before the chart).
                "--api-versions",
                "palisade.dev/v1alpha1/ImagePolicy",
                "--set",
                "imagePolicy.enabled=true",
                "--set",
                &format!("image.registry={}", reg.host),
            ])
            .arg("--set-file")
            .arg(format!("imagePolicy.publicKey={}", public.display())),
    )?;
    let file = work.join("imagepolicy.yaml");
    std::fs::write(&file, policy)?;
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
    let wh = WebhookProcess::start(cp, "release", &reg.webhook_config())?;
    // Both hooks, as the chart registers them: the policy pins digests (pinDigest), so the
    // mutating hook pins what the validating hook then requires to be pinned.
    wh.register_mutating(cp, "palisade-e2e-release")?;
    let webhook = images
        .iter()
        .find(|p| p.name == "palisade-webhook")
        .context("no webhook image")?;
    // Tampered: the same tag, one more variable in the config (a new digest), once bare and
    // once carrying the original's genuine signature.
    let tampered_ref = format!("{}/palisade-webhook:tampered", reg.host);
    crane(&[
        "mutate",
        &webhook.reference,
        "--env",
        "EVIL=1",
        "-t",
        &tampered_ref,
    ])?;
    let replayed_ref = format!("{}/palisade-webhook:replayed", reg.host);
    crane(&[
        "mutate",
        &webhook.reference,
        "--env",
        "EVIL=2",
        "-t",
        &replayed_ref,
    ])?;
    let replayed = crane(&["digest", &replayed_ref])?.trim().to_owned();
    planted_secret_found(env, &work, &webhook.reference)?;
    // Signed, but with another transit key of the same OpenBao.
    let rogue_ref = format!("{}/palisade-webhook:rogue", reg.host);
    crane(&[
        "mutate",
        &webhook.reference,
        "--env",
        "EVIL=3",
        "-t",
        &rogue_ref,
    ])?;
    let rogue = crane(&["digest", &rogue_ref])?.trim().to_owned();
    reg.sign_with(&bao.transit_signer("rogue")?, "palisade-webhook", &rogue)?;
    reg.copy(
        &format!("palisade-webhook:{}.sig", webhook.digest.replace(':', "-")),
        &format!("palisade-webhook:{}.sig", replayed.replace(':', "-")),
    )?;
    let result = cp.with_temp_ns("release", |ns| {
        let scene = crate::images::Scene {
            cp,
            ns,
            host: &reg.host,
        };
        scene.prepare()?;
        let pod = |name: &str, image: &str| scene.pod(name, image, "");
        let mut attempt = 0;
        cp.eventually(
            "Palisade's ImagePolicy enforced",
            Duration::from_secs(30),
            || {
                attempt += 1;
                let out = pod(&format!("tampered-{attempt}"), &tampered_ref).ok()?;
                (!out.status.success()).then_some(out)
            },
        )
        .and_then(|out| {
            rejects(
                &out,
                "tampered Palisade image",
                &[
                    "image policy palisade-images",
                    "authority palisade-release: no signature",
                ],
            )
        })?;
        rejects(
            &pod("replayed", &replayed_ref)?,
            "tampered image with the original's signature",
            &["authority palisade-release", "another image"],
        )?;
        rejects(
            &pod("rogue", &rogue_ref)?,
            "image signed with another transit key",
            &["image policy palisade-images", "authority palisade-release"],
        )?;
        for p in &images {
            accepts(
                &pod(&p.name, &p.reference)?,
                &format!("Palisade's own image {}", p.reference),
            )?;
        }
        Ok(())
    });
    let _ = run(cp
        .kubectl()
        .args(["delete", "imagepolicy", "palisade-images"]));
    wh.unregister_after(cp, "palisade-e2e-release", result)?;
    sbom::query_finds_affected_workloads(cp, &reg, &signer, &public, &images)
}

fn base64_decode(text: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    Ok(base64::engine::general_purpose::STANDARD.decode(text)?)
}

/// The advisory database snapshot and the project's unexpired exceptions: what an image's
/// verified SBOM is checked against.
struct Advisories {
    db: palisade_e2e::advisories::Database,
    accepted: Vec<palisade_e2e::advisories::Exception>,
}

impl Advisories {
    fn load() -> Result<Self> {
        use palisade_e2e::advisories::{
            Database, EXCEPTIONS, read_exceptions, snapshot_dir, today,
        };
        let db = Database::load(&snapshot_dir())?;
        let today = today();
        let accepted = read_exceptions(&repo_root().join(EXCEPTIONS))?
            .into_iter()
            .filter(|e| e.expires >= today)
            .collect();
        Ok(Advisories { db, accepted })
    }

    /// No library in `bom` has an advisory without an unexpired exception; and the check does
    /// find one: the same SBOM with `smallvec` 1.6.0 added reports RUSTSEC-2021-0003.
    fn check(&self, name: &str, bom: &serde_json::Value) -> Result<()> {
        let findings = palisade_e2e::advisories::sbom_findings(&self.db, bom, &self.accepted);
        if !findings.is_empty() {
            bail!(
                "{name}'s SBOM lists components with advisories:\n{}",
                findings.join("\n")
            );
        }
        let mut planted = bom.clone();
        if let Some(c) = planted["components"].as_array_mut() {
            c.push(serde_json::json!({"type": "library", "name": "smallvec", "version": "1.6.0"}));
        }
        let found = palisade_e2e::advisories::sbom_findings(&self.db, &planted, &self.accepted);
        if !found.iter().any(|f| f.contains("RUSTSEC-2021-0003")) {
            bail!("a vulnerable smallvec planted in {name}'s SBOM was not reported: {found:?}");
        }
        eprintln!(
            "  {name}: no SBOM component has an advisory ({} advisories in the snapshot); a planted smallvec 1.6.0 is reported",
            self.db.len()
        );
        Ok(())
    }
}

/// The release key held in OpenBao's transit engine: the public key cosign reads through
/// `hashivault://` is the one transit holds, and the private key cannot be had: export is
/// refused even to root (the key is not exportable), and the signing token can neither export,
/// back up nor reconfigure it. The public key (PEM).
fn kms_key_stays_in_openbao(bao: &OpenBao, reg: &OciRegistry, signer: &Signer) -> Result<String> {
    let through_cosign = signer.public_key(reg)?;
    let key: serde_json::Value = serde_json::from_str(&bao.root(&[
        "read",
        "-format=json",
        "transit/keys/palisade-release",
    ])?)?;
    let in_transit = key["data"]["keys"]["1"]["public_key"]
        .as_str()
        .context("transit's public key")?;
    if through_cosign.trim() != in_transit.trim() || key["data"]["exportable"] != false {
        bail!("cosign reads {through_cosign}, transit holds {key}");
    }
    let Signer::Kms { env, .. } = signer else {
        bail!("the release signer is not a KMS key");
    };
    let token = env
        .iter()
        .find(|(k, _)| k == "VAULT_TOKEN")
        .map(|(_, v)| v.as_str())
        .context("the signing token")?;
    let refused = |out: std::process::Output, args: &[&str]| -> Result<String> {
        if out.status.success() {
            bail!("bao {args:?} succeeded: the private key could leave OpenBao");
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let export = ["read", "transit/export/signing-key/palisade-release"];
    let root_export = refused(bao.root_output(&export)?, &export)?;
    for args in [
        &["read", "transit/export/signing-key/palisade-release"][..],
        &["read", "transit/backup/palisade-release"],
        &[
            "write",
            "transit/keys/palisade-release/config",
            "exportable=true",
        ],
    ] {
        let why = refused(bao.bao_output(token, args)?, args)?;
        if !why.contains("permission denied") {
            bail!("the signing token was refused {args:?} for another reason: {why}");
        }
    }
    eprintln!(
        "  release key in OpenBao transit (ecdsa-p256, not exportable): export refused to root ({}), export, backup and reconfiguration refused to the signing token",
        root_export.lines().last().unwrap_or_default().trim()
    );
    Ok(through_cosign)
}

/// What gitleaks (with the repository's `.gitleaks.toml`) finds in the files under `dir`:
/// `None` when nothing.
fn secrets_in(env: &Env, dir: &std::path::Path) -> Result<Option<String>> {
    let out = run(Command::new(env.opts.bin_dir.join("gitleaks"))
        .args(["dir", "--no-banner", "--redact", "--verbose", "--config"])
        .arg(repo_root().join(".gitleaks.toml"))
        .arg(dir))
    .context("gitleaks (e2e/toolchain/build.sh gitleaks)")?;
    match out.status.code() {
        Some(0) => Ok(None),
        Some(1) => Ok(Some(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))),
        _ => bail!("gitleaks failed: {out:?}"),
    }
}

/// The image scan finds a secret when there is one: an AWS key planted in a layer added to
/// `base` (an image of the release) is reported in the exported filesystem.
fn planted_secret_found(env: &Env, work: &std::path::Path, base: &str) -> Result<()> {
    let dir = work.join("planted");
    std::fs::create_dir_all(dir.join("layer/etc/app"))?;
    // Built at run time, so this file does not hold a key-shaped string itself.
    std::fs::write(
        dir.join("layer/etc/app/credentials"),
        format!("aws_access_key_id = {}{}\n", "AKIA", "Z7Q3LMN4XP2TRW5Y"),
    )?;
    let layer = dir.join("layer.tar");
    run_ok(
        Command::new("tar")
            .arg("-cf")
            .arg(&layer)
            .arg("-C")
            .arg(dir.join("layer"))
            .arg("."),
    )?;
    let planted = format!(
        "{}:planted",
        base.rsplit_once(':').map_or(base, |(repo, _)| repo)
    );
    let crane = |args: &[&str]| crane(env, args);
    crane(&[
        "append",
        "-b",
        base,
        "-f",
        &layer.display().to_string(),
        "-t",
        &planted,
    ])?;
    let out = dir.join("fs");
    export_filesystem(&crane, &planted, &out)?;
    match secrets_in(env, &out)? {
        Some(found) if found.contains("credentials") || found.contains("aws") => {
            eprintln!(
                "  gitleaks: no secret in either image; a key planted in an added layer is reported"
            );
            Ok(())
        }
        other => bail!("a key planted in {planted} was not reported: {other:?}"),
    }
}

/// `crane args --insecure` (the registry is plain HTTP on loopback); its output.
fn crane(env: &Env, args: &[&str]) -> Result<String> {
    run_ok(
        Command::new(env.opts.bin_dir.join("crane"))
            .args(args)
            .arg("--insecure"),
    )
}

/// The flattened filesystem of `reference` (`crane export`), extracted into `out`.
fn export_filesystem(
    crane: &impl Fn(&[&str]) -> Result<String>,
    reference: &str,
    out: &std::path::Path,
) -> Result<()> {
    let tar = out.with_extension("tar");
    crane(&["export", reference, &tar.display().to_string()])?;
    std::fs::create_dir_all(out)?;
    run_ok(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(out))?;
    Ok(())
}
