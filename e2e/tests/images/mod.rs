//! Image signatures and attestations made by the real cosign, in a real registry on loopback,
//! fetched and checked by the webhook's verifier: signed images verify with their key only,
//! unsigned images and signatures copied from another image do not, attestations need the right
//! signer, type and subject, and a registry that does not answer fails by the deadline.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use oci_client::secrets::RegistryAuth;
use palisade_e2e::{
    accepts,
    registry::{Layout, OciRegistry},
    rejects, run, run_ok,
    webhook::{SCOPE_LABEL, WebhookProcess},
};
use palisade_webhook::images::{
    registry::{Registry, RegistryError},
    verify::{Signer, verify_attestations, verify_signatures},
};

use crate::{Env, TestFn};

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "images::cosign_signatures_and_attestations_verify",
        cosign_signatures_and_attestations_verify,
    ),
    (
        "images::image_policy_enforced_at_admission",
        image_policy_enforced_at_admission,
    ),
    (
        "images::private_registry_tampering_quorum_audit_and_templates",
        private_registry_tampering_quorum_audit_and_templates,
    ),
    (
        "images::one_replica_writes_policy_status",
        one_replica_writes_policy_status,
    ),
    (
        "images::key_types_cosign_imports_verify",
        key_types_cosign_imports_verify,
    ),
    (
        "images::registry_with_a_private_ca",
        registry_with_a_private_ca,
    ),
];

const SLSA: &str = "https://slsa.dev/provenance/v0.2";

#[allow(clippy::too_many_lines)]
fn cosign_signatures_and_attestations_verify(env: &Env) -> Result<()> {
    let reg = OciRegistry::start(&env.opts.bin_dir, &env.cp.work_dir.join("registry"))?;
    let ours = std::fs::read(reg.key_pair("ours")?)?;
    reg.key_pair("theirs")?;
    let theirs = std::fs::read(reg.dir_key("theirs"))?;

    let provenance = r#"{"builder": {"id": "https://ci.example/builder"}, "invocation": {"configSource": {"uri": "git+https://git.example/shop"}}}"#;
    let signed = reg.push_signed("ours", "shop/app", "app v1", Some(provenance), Layout::Tags)?;
    let unsigned = reg.push("shop/unsigned", "v1", "unsigned")?;
    let foreign = reg.push("shop/foreign", "v1", "foreign")?;
    reg.sign("theirs", "shop/foreign", &foreign)?;
    // A valid signature of one image, copied next to another.
    let replayed = reg.push("shop/replayed", "v1", "replayed")?;
    reg.copy(
        &format!("shop/app:{}.sig", signed.replace(':', "-")),
        &format!("shop/replayed:{}.sig", replayed.replace(':', "-")),
    )?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = Registry::new(std::slice::from_ref(&reg.host))?;
    let auth = RegistryAuth::Anonymous;
    let deadline = || Instant::now() + Duration::from_secs(5);
    let key = Signer::Key(ours.clone());

    rt.block_on(async {
        // Signed: the tag resolves to the pushed digest, the signature verifies with our key
        // only, the attestation with the right type.
        let before = registry.requests();
        let (r, digest) = registry
            .resolve(&format!("{}/shop/app:v1", reg.host), &auth, deadline())
            .await?;
        if digest != signed {
            bail!("resolved {digest}, pushed {signed}");
        }
        let sigs = registry.cosign_layers(&r, &digest, "sig", &auth, deadline()).await?;
        verify_signatures(&sigs, &digest, &key).context("signed image")?;
        let requests = registry.requests() - before;
        eprintln!("  registry requests for one signature verification: {requests} (digest, signature manifest, signature blob)");
        if requests != 3 {
            bail!("{requests} registry requests for one signature verification, want 3");
        }
        let Err(err) = verify_signatures(&sigs, &digest, &Signer::Key(theirs.clone())) else {
            bail!("the signature verified with another key");
        };
        if !err.to_string().contains("does not verify with the key") {
            bail!("wrong-key error: {err}");
        }
        let atts = registry.cosign_layers(&r, &digest, "att", &auth, deadline()).await?;
        let predicates = verify_attestations(&atts, &digest, SLSA, &key).context("attestation")?;
        if predicates[0]["builder"]["id"] != "https://ci.example/builder" {
            bail!("predicate {}", predicates[0]);
        }
        let Err(err) = verify_attestations(&atts, &digest, "https://spdx.dev/Document", &key)
        else {
            bail!("an attestation of the wrong type verified");
        };
        if !err.to_string().contains(SLSA) {
            bail!("wrong-type error: {err}");
        }
        if verify_attestations(&atts, &digest, SLSA, &Signer::Key(theirs.clone())).is_ok() {
            bail!("an attestation verified with another key");
        }

        // Unsigned: no signature manifest at all.
        let (r, digest) = registry
            .resolve(&format!("{}/shop/unsigned:v1", reg.host), &auth, deadline())
            .await?;
        let sigs = registry.cosign_layers(&r, &digest, "sig", &auth, deadline()).await?;
        if digest != unsigned || !sigs.is_empty() {
            bail!("unsigned image has {} signature layers", sigs.len());
        }
        if verify_signatures(&sigs, &digest, &key).is_ok() {
            bail!("an unsigned image verified");
        }

        // Signed by someone else.
        let (r, digest) = registry
            .resolve(&format!("{}/shop/foreign:v1", reg.host), &auth, deadline())
            .await?;
        let sigs = registry.cosign_layers(&r, &digest, "sig", &auth, deadline()).await?;
        if verify_signatures(&sigs, &digest, &key).is_ok() {
            bail!("an image signed with another key verified");
        }

        // A genuine signature of another image, replayed.
        let (r, digest) = registry
            .resolve(&format!("{}/shop/replayed:v1", reg.host), &auth, deadline())
            .await?;
        if digest != replayed {
            bail!("resolved {digest}, pushed {replayed}");
        }
        let sigs = registry.cosign_layers(&r, &digest, "sig", &auth, deadline()).await?;
        let Err(err) = verify_signatures(&sigs, &digest, &key) else {
            bail!("a signature replayed from another image verified");
        };
        if !err.to_string().contains("another image") {
            bail!("replayed-signature error: {err}");
        }
        Ok::<_, anyhow::Error>(())
    })?;

    // A registry that accepts connections and never answers: an error by the deadline.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let host = silent.local_addr()?.to_string();
    let registry = Registry::new(std::slice::from_ref(&host))?;
    let started = Instant::now();
    let out = rt.block_on(registry.resolve(
        &format!("{host}/shop/app:v1"),
        &auth,
        Instant::now() + Duration::from_millis(800),
    ));
    let took = started.elapsed();
    match out {
        Err(RegistryError::Timeout { .. }) if took < Duration::from_millis(1500) => {
            eprintln!(
                "  silent registry: refused after {} ms (deadline 800 ms)",
                took.as_millis()
            );
        }
        other => bail!("silent registry: {other:?} after {took:?}"),
    }
    drop(silent);
    Ok(())
}

/// One test namespace's view: ImagePolicies over `<host>/<dir>/**` in it, and pods in it.
pub struct Scene<'a> {
    pub cp: &'a palisade_e2e::ControlPlane,
    pub ns: &'a str,
    pub host: &'a str,
}

impl Scene<'_> {
    /// Applies ImagePolicy `e2e-<ns><suffix>` covering `<host>/<dir>/**` in this namespace,
    /// with `spec` (YAML lines indented by two) after `images` and `namespaceSelector`.
    fn policy(&self, suffix: &str, dir: &str, spec: &str) -> Result<String> {
        let (cp, ns) = (self.cp, self.ns);
        let name = format!("e2e-{ns}{suffix}");
        let yaml = format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: ImagePolicy\nmetadata:\n  name: {name}\nspec:\n  images: [{{glob: \"{}/{dir}/**\"}}]\n  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}\n{spec}",
            self.host
        );
        let file = cp.work_dir.join(format!("imagepolicy-{name}.yaml"));
        std::fs::write(&file, yaml)?;
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        Ok(name)
    }

    /// `kubectl apply` of pod `name` running `image` as ServiceAccount `orders`, with `extra`
    /// (YAML lines indented by two) in its spec.
    pub fn pod(&self, name: &str, image: &str, extra: &str) -> Result<std::process::Output> {
        let (cp, ns) = (self.cp, self.ns);
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  serviceAccountName: orders\n{extra}  containers:\n    - name: app\n      image: {image}\n"
        );
        let file = cp.work_dir.join(format!("pod-{ns}-{name}.yaml"));
        std::fs::write(&file, yaml)?;
        run(cp.kubectl().args(["apply", "-n", ns, "-f"]).arg(&file))
    }

    /// The reason of ImagePolicy `name`'s Ready condition, once it has one.
    fn ready(&self, name: &str) -> Option<String> {
        policy_ready(self.cp, name)
    }

    /// Labels the namespace for the webhook and the mesh, and creates ServiceAccount `orders`.
    pub fn prepare(&self) -> Result<()> {
        let (cp, ns) = (self.cp, self.ns);
        for label in [
            format!("{SCOPE_LABEL}=on"),
            "istio.io/dataplane-mode=ambient".into(),
        ] {
            run_ok(cp.kubectl().args(["label", "namespace", ns, &label]))?;
        }
        run_ok(
            cp.kubectl()
                .args(["create", "serviceaccount", "orders", "-n", ns]),
        )?;
        Ok(())
    }
}

/// An ImagePolicy's `authorities` (lines indented by two): authority `name` with the PEM key
/// `public`, no transparency log.
pub fn key_authority(name: &str, public: &str) -> String {
    let key = public
        .lines()
        .map(|l| format!("          {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "  authorities:\n    - name: {name}\n      transparencyLog: Ignore\n      key:\n        publicKey: |\n{key}\n"
    )
}

/// An ImagePolicy's `attestations`: SLSA provenance from `https://ci.example/builder`.
const PROVENANCE_REQUIREMENT: &str = "  attestations:
    - name: provenance
      predicateType: https://slsa.dev/provenance/v0.2
      policy:
        rego: |
          package palisade.attestation
          import rego.v1
          default allow := false
          allow if input.predicate.builder.id == \"https://ci.example/builder\"
";

const PROVENANCE_OK: &str = r#"{"builder": {"id": "https://ci.example/builder"}}"#;
const PROVENANCE_EVIL: &str = r#"{"builder": {"id": "https://evil.example/builder"}}"#;

/// Through the real API server: an ImagePolicy requiring our key and provenance from our
/// builder admits a signed, attested image and refuses an unsigned one, one attested by another
/// builder, and, once the registry is gone, an image it can no longer resolve, in time.
#[allow(clippy::too_many_lines)]
fn image_policy_enforced_at_admission(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let reg = OciRegistry::start(&env.opts.bin_dir, &cp.work_dir.join("registry-admission"))?;
    let public = std::fs::read_to_string(reg.key_pair("ci")?)?;
    let ok = Some(PROVENANCE_OK);
    let good = reg.push_signed("ci", "shop/orders", "orders v1", ok, Layout::Tags)?;
    reg.push("shop/unsigned", "v1", "unsigned")?;
    reg.key_pair("other")?;
    reg.push_signed("other", "shop/foreign", "foreign", ok, Layout::Tags)?;
    reg.push_signed(
        "ci",
        "shop/bare",
        "signed, not attested",
        None,
        Layout::Tags,
    )?;
    reg.push_signed(
        "ci",
        "shop/evil",
        "evil",
        Some(PROVENANCE_EVIL),
        Layout::Tags,
    )?;

    let wh = WebhookProcess::start(cp, "images", &reg.webhook_config())?;
    wh.register_mutating(cp, "palisade-e2e-images")?;
    let result = cp.with_temp_ns("img", |ns| {
        let host = reg.host.clone();
        let scene = Scene { cp, ns, host: &host };
        scene.prepare()?;
        let key = public
            .lines()
            .map(|l| format!("          {l}"))
            .collect::<Vec<_>>()
            .join("\n");
        let apply_policy = |suffix: &str, dir: &str, spec: &str| scene.policy(suffix, dir, spec);
        // Authority `ci` with our key; `tlog` is its transparencyLog line (or nothing).
        let ci_key = |tlog: &str| {
            format!("  authorities:\n    - name: ci\n{tlog}      key:\n        publicKey: |\n{key}\n")
        };
        let ignore_tlog = "      transparencyLog: Ignore\n";
        let main_policy = apply_policy(
            "",
            "shop",
            &format!("  pinDigest: true\n{}{PROVENANCE_REQUIREMENT}", ci_key(ignore_tlog)),
        )?;
        let pod = |name: &str, image: &str| scene.pod(name, image, "");
        // The unsigned image is refused once the webhook sees the policy.
        let unsigned = format!("{}/shop/unsigned:v1", reg.host);
        let mut attempt = 0;
        cp.eventually("the ImagePolicy enforced", Duration::from_secs(30), || {
            // A new pod each time: one admitted before the policy was seen stays admitted.
            attempt += 1;
            let out = pod(&format!("unsigned-{attempt}"), &unsigned).ok()?;
            (!out.status.success()).then_some(out)
        })
        .and_then(|out| {
            rejects(&out, "unsigned image", &[
                "containers \"app\"",
                &unsigned,
                &format!("image policy {main_policy}"),
                "authority ci: no signature",
            ])
        })?;
        accepts(&pod("signed", &format!("{}/shop/orders:v1", reg.host))?, "signed and attested image")?;
        // pinDigest: the stored pod runs the verified digest and records it.
        let stored = run_ok(cp.kubectl().args([
            "get", "pod", "signed", "-n", ns, "-o",
            r"jsonpath={.spec.containers[0].image} {.metadata.annotations.palisade\.dev/verified-digests}",
        ]))?;
        if !stored.starts_with(&format!("{}/shop/orders:v1@{good}", reg.host)) || !stored.contains(&good) {
            bail!("the admitted pod was not pinned to {good}: {stored}");
        }
        let ready = |name: &str| scene.ready(name);
        cp.eventually("the ImagePolicy reported Loaded", Duration::from_secs(30), || {
            ready(&main_policy).filter(|r| r == "Loaded")
        })?;

        // A policy whose authority cannot be loaded (it asks for a transparency log this
        // webhook does not query) says so in its status and refuses the images it covers.
        let broken = apply_policy("-broken", "broken", &ci_key(""))?;
        cp.eventually("the broken ImagePolicy reported NotLoaded", Duration::from_secs(30), || {
            ready(&broken).filter(|r| r == "NotLoaded")
        })?;
        reg.push_signed("ci", "broken/app", "broken", None, Layout::Tags)?;
        rejects(&pod("broken", &format!("{}/broken/app:v1", reg.host))?, "image under a policy that cannot be loaded", &[
            "authority ci: not loaded",
            "transparencyLog",
        ])?;
        let _ = run(cp.kubectl().args(["delete", "imagepolicy", &broken]));
        rejects(&pod("evil", &format!("{}/shop/evil:v1", reg.host))?, "image attested by another builder", &[
            "attestation provenance",
            "refused by the policy",
        ])?;
        rejects(&pod("foreign", &format!("{}/shop/foreign:v1", reg.host))?, "image signed with another key", &[
            "authority ci",
            "does not verify with the key",
        ])?;
        rejects(&pod("bare", &format!("{}/shop/bare:v1", reg.host))?, "signed image without an attestation", &[
            "attestation provenance",
            &format!("no {SLSA} attestation"),
        ])?;
        // Keyless: a certificate from the cluster's own CA (read from a ConfigMap) for an
        // accepted identity; a certificate from another CA is refused.
        let ca = reg.keyless_signer("dev", "dev@shop.example", "https://issuer.example")?;
        reg.keyless_signer("eve", "dev@shop.example", "https://issuer.example")?;
        let keyless = reg.push("keyless/app", "v1", "keyless")?;
        reg.sign_keyless("dev", "keyless/app", &keyless)?;
        let other = reg.push("keyless/other", "v1", "other CA")?;
        reg.sign_keyless("eve", "keyless/other", &other)?;
        run_ok(cp.kubectl().args(["create", "configmap", "fulcio-ca", "-n", ns])
            .arg(format!("--from-file=ca.pem={}", ca.display())))?;
        let keyless_policy = apply_policy(
            "-keyless",
            "keyless",
            &format!("  authorities:\n    - name: fulcio\n{ignore_tlog}      keyless:\n        identities: [{{issuer: \"https://issuer.example\", subjectRegExp: \"[a-z]+@shop[.]example\"}}]\n        trustRootRef: {{name: fulcio-ca, namespace: {ns}}}\n"),
        )?;
        cp.eventually("the keyless ImagePolicy reported Loaded", Duration::from_secs(30), || {
            ready(&keyless_policy).filter(|r| r == "Loaded")
        })?;
        accepts(&pod("keyless", &format!("{}/keyless/app:v1", reg.host))?, "keyless-signed image")?;
        rejects(&pod("keyless-other", &format!("{}/keyless/other:v1", reg.host))?, "keyless image from another CA", &[
            "authority fulcio",
            "does not chain to the trusted CA",
        ])?;
        let _ = run(cp.kubectl().args(["delete", "imagepolicy", &keyless_policy]));

        // A Warn policy admits what fails it, with the reason as a warning.
        let warn = apply_policy("-warn", "legacy", &format!("  mode: Warn\n{}", ci_key(ignore_tlog)))?;
        reg.push("legacy/app", "v1", "legacy")?;
        let legacy = format!("{}/legacy/app:v1", reg.host);
        let mut attempt = 0;
        let out = cp.eventually("the Warn policy applied", Duration::from_secs(30), || {
            // A new pod each time: re-applying an unchanged one would not reach the webhook.
            attempt += 1;
            let out = pod(&format!("legacy-{attempt}"), &legacy).ok()?;
            String::from_utf8_lossy(&out.stderr)
                .contains("Warning")
                .then_some(out)
        })?;
        accepts(&out, "image failing a Warn policy")?;
        let warning = String::from_utf8_lossy(&out.stderr).into_owned();
        if !warning.contains(&format!("image policy {warn}")) || !warning.contains("no signature") {
            bail!("the warning does not explain the failure: {warning}");
        }
        let _ = run(cp.kubectl().args(["delete", "imagepolicy", &warn]));
        // Images no policy covers make no registry call.
        let requests = || -> Result<String> {
            let (_, m) = wh.curl(&["/metrics"])?;
            m.lines()
                .find(|l| l.starts_with("palisade_webhook_registry_requests_total "))
                .map(str::to_owned)
                .context("no registry request counter")
        };
        let before = requests()?;
        accepts(&pod("other", "registry.example.com/elsewhere/app:1")?, "image outside the policy")?;
        if requests()? != before {
            bail!("an image no policy covers caused registry requests");
        }

        // The registry goes away: a tag that cannot be resolved is refused within the deadline.
        drop(reg);
        let started = Instant::now();
        let out = pod("gone", &format!("{host}/shop/orders:v2"))?;
        let took = started.elapsed();
        rejects(&out, "image from a registry that is down", &["cannot resolve the image digest"])?;
        if took > Duration::from_secs(10) {
            bail!("the refusal took {took:?}, beyond the API server's deadline");
        }
        eprintln!("  registry down: refused in {} ms", took.as_millis());
        let _ = run(cp.kubectl().args(["delete", "imagepolicy", &main_policy]));
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-images", result)
}

/// Through the real API server, against a registry that needs credentials: images are read with
/// the pod's imagePullSecrets (and refused without them); a tampered signature and a signature
/// made for another digest are refused; `AtLeast` counts authorities; `Audit` admits and logs;
/// and the pods of a verified Deployment cost no registry call and are pinned.
#[allow(clippy::too_many_lines)]
fn private_registry_tampering_quorum_audit_and_templates(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let reg =
        OciRegistry::start_with_auth(&env.opts.bin_dir, &cp.work_dir.join("registry-private"))?;
    let mut keys = String::new();
    for k in ["ci", "qa", "sec"] {
        let public = std::fs::read_to_string(reg.key_pair(k)?)?;
        let _ = writeln!(
            keys,
            "    - name: {k}\n      transparencyLog: Ignore\n      key:\n        publicKey: |"
        );
        for l in public.lines() {
            let _ = writeln!(keys, "          {l}");
        }
    }
    let ci_only = keys[..keys.find("    - name: qa").context("qa key")?].to_owned();
    let app = reg.push_signed("ci", "private/app", "private app", None, Layout::Tags)?;
    let tampered = reg.push("private/tampered", "v1", "tampered")?;
    reg.attach_signature("ci", "private/tampered", &tampered, &tampered, true)?;
    let moved = reg.push("private/moved", "v1", "moved")?;
    reg.attach_signature("ci", "private/moved", &app, &moved, false)?;
    let two = reg.push("quorum/two", "v1", "two signers")?;
    reg.sign("ci", "quorum/two", &two)?;
    reg.sign("qa", "quorum/two", &two)?;
    reg.push_signed("sec", "quorum/one", "one signer", None, Layout::Tags)?;
    reg.push("audit/app", "v1", "unsigned, audited")?;
    // cosign v3's default layout: Sigstore bundles as OCI referrers.
    let ok = Some(PROVENANCE_OK);
    reg.push_signed("ci", "bundle/app", "bundle-signed", ok, Layout::Bundles)?;
    reg.push_signed(
        "ci",
        "bundle/bare",
        "bundle-signed, not attested",
        None,
        Layout::Bundles,
    )?;
    reg.push_signed(
        "qa",
        "bundle/other",
        "bundle-signed by qa",
        ok,
        Layout::Bundles,
    )?;

    let wh = WebhookProcess::start(cp, "images-private", &reg.webhook_config())?;
    wh.register_mutating(cp, "palisade-e2e-images-private")?;
    let result = cp.with_temp_ns("priv", |ns| {
        let scene = Scene { cp, ns, host: &reg.host };
        scene.prepare()?;
        let secret = cp.work_dir.join(format!("dockerconfig-{ns}.json"));
        std::fs::write(&secret, reg.docker_config_json()?)?;
        run_ok(cp.kubectl().args(["create", "secret", "generic", "regcred", "-n", ns,
            "--type=kubernetes.io/dockerconfigjson"])
            .arg(format!("--from-file=.dockerconfigjson={}", secret.display())))?;
        let with_creds = "  imagePullSecrets: [{name: regcred}]\n";
        let main = scene.policy("", "private", &format!("  pinDigest: true\n  authorities:\n{ci_only}"))?;
        let image = format!("{}/private/app:v1", reg.host);
        let mut attempt = 0;
        cp.eventually("the private-registry ImagePolicy enforced", Duration::from_secs(30), || {
            attempt += 1;
            let out = scene.pod(&format!("anonymous-{attempt}"), &image, "").ok()?;
            (!out.status.success()).then_some(out)
        })
        .and_then(|out| rejects(&out, "private image without pull credentials", &[
            &format!("image policy {main}"),
            "cannot resolve the image digest",
        ]))?;
        rejects(&scene.pod("missing-secret", &image, "  imagePullSecrets: [{name: nosuch}]\n")?,
            "private image with a pull secret that does not exist", &["cannot resolve the image digest"])?;
        accepts(&scene.pod("private", &image, with_creds)?, "private image read with the pod's imagePullSecret")?;
        // A workload template names no pull secret: its ServiceAccount's are read, as its pods
        // will get them. Without them on the ServiceAccount, the private image cannot be read.
        let deployment = |name: &str, sa: &str| -> Result<std::process::Output> {
            let file = cp.work_dir.join(format!("deploy-{ns}-{name}.yaml"));
            std::fs::write(&file, format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      serviceAccountName: {sa}\n      containers: [{{name: app, image: \"{image}\"}}]\n"))?;
            run(cp.kubectl().args(["apply", "--dry-run=server", "-n", ns, "-f"]).arg(&file))
        };
        rejects(&deployment("no-sa-secret", "orders")?, "a template whose ServiceAccount has no pull secret",
            &["cannot resolve the image digest"])?;
        run_ok(cp.kubectl().args(["create", "serviceaccount", "puller", "-n", ns]))?;
        run_ok(cp.kubectl().args(["patch", "serviceaccount", "puller", "-n", ns, "-p",
            r#"{"imagePullSecrets": [{"name": "regcred"}]}"#]))?;
        accepts(&deployment("sa-secret", "puller")?, "a template read with its ServiceAccount's imagePullSecret")?;
        let pinned = run_ok(cp.kubectl().args(["get", "pod", "private", "-n", ns, "-o",
            "jsonpath={.spec.containers[0].image}"]))?;
        if pinned != format!("{image}@{app}") {
            bail!("the private image was not pinned to {app}: {pinned}");
        }

        // Signatures that must not verify.
        rejects(&scene.pod("tampered", &format!("{}/private/tampered:v1", reg.host), with_creds)?,
            "image whose signed payload was altered", &["authority ci", "does not verify with the key"])?;
        rejects(&scene.pod("moved", &format!("{}/private/moved:v1", reg.host), with_creds)?,
            "image carrying a signature made for another digest", &["authority ci", "another image"])?;

        // AtLeast 2 of 3: two signers admitted, one refused with the count.
        let quorum = scene.policy("-quorum", "quorum", &format!("  require: AtLeast\n  atLeast: 2\n  authorities:\n{keys}"))?;
        cp.eventually("the quorum ImagePolicy reported Loaded", Duration::from_secs(30), || {
            scene.ready(&quorum).filter(|r| r == "Loaded")
        })?;
        accepts(&scene.pod("two", &format!("{}/quorum/two:v1", reg.host), with_creds)?, "image signed by 2 of 3 authorities")?;
        rejects(&scene.pod("one", &format!("{}/quorum/one:v1", reg.host), with_creds)?,
            "image signed by 1 of 3 authorities", &["1 of 2 required authorities verified", "authority ci: signature does not verify with the key"])?;

        // Bundles as referrers (cosign v3's default): signature and provenance read from them.
        let bundle_policy = scene.policy(
            "-bundle",
            "bundle",
            &format!("  authorities:\n{ci_only}{PROVENANCE_REQUIREMENT}"),
        )?;
        cp.eventually("the bundle ImagePolicy reported Loaded", Duration::from_secs(30), || {
            scene.ready(&bundle_policy).filter(|r| r == "Loaded")
        })?;
        accepts(
            &scene.pod("bundled", &format!("{}/bundle/app:v1", reg.host), with_creds)?,
            "image signed and attested as Sigstore bundles",
        )?;
        rejects(
            &scene.pod("bundled-bare", &format!("{}/bundle/bare:v1", reg.host), with_creds)?,
            "bundle-signed image without a provenance bundle",
            &["attestation provenance", &format!("no {SLSA} attestation")],
        )?;
        rejects(
            &scene.pod("bundled-other", &format!("{}/bundle/other:v1", reg.host), with_creds)?,
            "image whose bundles another key signed",
            &["authority ci", "does not verify with the key"],
        )?;

        // Audit: admitted without a warning, recorded in the webhook's log.
        let audit = scene.policy("-audit", "audit", &format!("  mode: Audit\n  authorities:\n{ci_only}"))?;
        cp.eventually("the audit ImagePolicy reported Loaded", Duration::from_secs(30), || {
            scene.ready(&audit).filter(|r| r == "Loaded")
        })?;
        let out = scene.pod("audited", &format!("{}/audit/app:v1", reg.host), with_creds)?;
        accepts(&out, "unsigned image under an Audit policy")?;
        if String::from_utf8_lossy(&out.stderr).contains("Warning") {
            bail!("an Audit policy warned: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Recorded in the decision's security event: verdict audit, the failure in `audited`.
        cp.eventually("the audit failure logged", Duration::from_secs(10), || {
            wh.log_tail()
                .lines()
                .any(|l| {
                    l.contains("\"verdict\":\"audit\"")
                        && l.contains("\"audited\":\"")
                        && l.contains(&format!("image policy {audit} not satisfied"))
                })
                .then_some(())
        })?;

        // A Deployment verified at admission: its ReplicaSet resolves its tag once more, its
        // pods reuse the template's digests (pinned, no registry call).
        let requests = || -> Result<u64> {
            let (_, m) = wh.curl(&["/metrics"])?;
            m.lines()
                .find_map(|l| l.strip_prefix("palisade_webhook_registry_requests_total "))
                .context("no registry request counter")?
                .trim()
                .parse()
                .context("registry request counter")
        };
        let before = requests()?;
        let deployment = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\nspec:\n  replicas: 3\n  selector: {{matchLabels: {{app: shop}}}}\n  template:\n    metadata: {{labels: {{app: shop}}}}\n    spec:\n      serviceAccountName: orders\n      imagePullSecrets: [{{name: regcred}}]\n      containers: [{{name: app, image: \"{image}\"}}]\n"
        );
        let file = cp.work_dir.join(format!("deployment-{ns}.yaml"));
        std::fs::write(&file, deployment)?;
        accepts(&run(cp.kubectl().args(["apply", "-n", ns, "-f"]).arg(&file))?, "Deployment of a verified image")?;
        let images = cp.eventually("the Deployment's three pods", Duration::from_mins(1), || {
            let out = run_ok(cp.kubectl().args(["get", "pods", "-n", ns, "-l", "app=shop", "-o",
                "jsonpath={range .items[*]}{.spec.containers[0].image}{\"\\n\"}{end}"])).ok()?;
            (out.lines().count() == 3).then_some(out)
        })?;
        if !images.lines().all(|l| l == format!("{image}@{app}")) {
            bail!("the Deployment's pods are not pinned to {app}: {images}");
        }
        let spent = requests()? - before;
        eprintln!("  Deployment with 3 pods: {spent} registry requests (tag resolutions; the ReplicaSet and pods reuse the template's digests)");
        if spent > 2 {
            bail!("{spent} registry requests for a Deployment and its 3 pods; the pods should reuse the template's digests");
        }
        for p in [main, quorum, audit, bundle_policy] {
            let _ = run(cp.kubectl().args(["delete", "imagepolicy", &p]));
        }
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-images-private", result)
}

/// Two webhook replicas share a Lease: only its holder writes ImagePolicy status (the other
/// serves admission only), and when the holder stops, the other takes the Lease and writes what
/// changed meanwhile.
fn one_replica_writes_policy_status(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let election = "leaderElection: {enabled: true, leaseName: palisade-webhook-e2e, leaseNamespace: default, leaseSeconds: 3}";
    let holder = || {
        run_ok(cp.kubectl().args([
            "get",
            "lease",
            "palisade-webhook-e2e",
            "-n",
            "default",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]))
        .ok()
        .filter(|h| !h.is_empty())
    };
    let first = WebhookProcess::start(cp, "lease-a", election)?;
    let first_id = format!("-{}", first.pid());
    cp.eventually(
        "the first replica holds the Lease",
        Duration::from_secs(30),
        || holder().filter(|h| h.ends_with(&first_id)),
    )?;
    let second = WebhookProcess::start(cp, "lease-b", election)?;
    let second_id = format!("-{}", second.pid());
    let leading = |wh: &WebhookProcess| -> Result<String> {
        let (_, m) = wh.curl(&["/metrics"])?;
        Ok(m.lines()
            .find_map(|l| l.strip_prefix("palisade_webhook_leading "))
            .unwrap_or("absent")
            .to_owned())
    };
    // A policy whose authority cannot load, so its status has something to say.
    let policy = |name: &str| {
        let file = cp.work_dir.join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: palisade.dev/v1alpha1\nkind: ImagePolicy\nmetadata:\n  name: {name}\nspec:\n  images: [{{glob: \"lease.example/{name}/**\"}}]\n  authorities:\n    - name: ci\n      keyless: {{identities: [{{issuer: https://issuer.example, subject: dev@shop.example}}]}}\n"
            ),
        )?;
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        Ok::<_, anyhow::Error>(())
    };
    let ready = |name: &str| policy_ready(cp, name);
    let wrote = |wh: &WebhookProcess, name: &str| {
        wh.log_text()
            .lines()
            .any(|l| l.contains("ImagePolicy status written") && l.contains(&format!("\"{name}\"")))
    };
    let result = (|| {
        policy("lease-one")?;
        cp.eventually(
            "the leader wrote the status",
            Duration::from_secs(30),
            || ready("lease-one"),
        )?;
        std::thread::sleep(Duration::from_secs(2));
        if (leading(&first)?, leading(&second)?) != ("1".into(), "0".into()) {
            bail!(
                "palisade_webhook_leading: {} on the leader, {} on the standby",
                leading(&first)?,
                leading(&second)?
            );
        }
        if !wrote(&first, "lease-one") || wrote(&second, "lease-one") {
            bail!(
                "status of lease-one: leader wrote it {}, standby wrote it {}",
                wrote(&first, "lease-one"),
                wrote(&second, "lease-one")
            );
        }
        // The leader stops gracefully and gives the Lease up; the standby takes it.
        run_ok(std::process::Command::new("kill").arg(first.pid().to_string()))?;
        cp.eventually(
            "the standby holds the Lease",
            Duration::from_secs(20),
            || holder().filter(|h| h.ends_with(&second_id)),
        )?;
        policy("lease-two")?;
        cp.eventually(
            "the new leader wrote the status",
            Duration::from_secs(30),
            || ready("lease-two"),
        )?;
        if !wrote(&second, "lease-two") {
            bail!(
                "the new leader did not write lease-two's status:\n{}",
                second.log_tail()
            );
        }
        Ok(())
    })();
    for name in ["lease-one", "lease-two"] {
        let _ = run(cp
            .kubectl()
            .args(["delete", "imagepolicy", name, "--ignore-not-found"]));
    }
    let _ = run(cp
        .kubectl()
        .args(["delete", "lease", "palisade-webhook-e2e", "-n", "default"]));
    result
}

/// The reason of ImagePolicy `name`'s Ready condition, once it has one.
fn policy_ready(cp: &palisade_e2e::controlplane::ControlPlane, name: &str) -> Option<String> {
    run_ok(cp.kubectl().args([
        "get",
        "imagepolicy",
        name,
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Ready")].reason}"#,
    ]))
    .ok()
    .filter(|r| !r.is_empty())
}

/// Keys of the types cosign imports and KMS keys commonly are — ECDSA P-384 and RSA 3072 — made
/// by OpenSSL, imported and used by the real cosign: an ImagePolicy naming the key admits the
/// image it signed, and refuses the images signed by a key of another type (and the P-256 key
/// cosign generates) when only that key is named. An Ed25519 key signs with Ed25519ph under
/// cosign, which Palisade does not verify: refused, saying why.
fn key_types_cosign_imports_verify(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let reg = OciRegistry::start(&env.opts.bin_dir, &cp.work_dir.join("registry-key-types"))?;
    let kinds: [(&str, &[&str]); 2] = [
        (
            "p384",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
        ),
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
        ),
    ];
    let ed25519 =
        std::fs::read_to_string(reg.imported_key_pair("ed25519", &["-algorithm", "ED25519"])?)?;
    reg.push_signed("ed25519", "ed25519/app", "ed25519", None, Layout::Tags)?;
    let mut keys = Vec::new();
    for (name, args) in kinds {
        keys.push((
            name,
            std::fs::read_to_string(reg.imported_key_pair(name, args)?)?,
        ));
        reg.push_signed(name, &format!("{name}/app"), name, None, Layout::Tags)?;
    }
    reg.key_pair("p256")?;
    reg.push_signed("p256", "p256/app", "p256", None, Layout::Tags)?;
    let wh = WebhookProcess::start(cp, "key-types", &reg.webhook_config())?;
    wh.register(cp, "palisade-e2e-key-types")?;
    let result = cp.with_temp_ns("keys", |ns| {
        let host = reg.host.clone();
        let scene = Scene { cp, ns, host: &host };
        scene.prepare()?;
        for (name, public) in &keys {
            // The policy covers every repository of this registry, with only this key.
            let policy = scene.policy(&format!("-{name}"), "*", &key_authority(name, public))?;
            cp.eventually(&format!("ImagePolicy {policy} Loaded"), Duration::from_secs(30), || {
                scene.ready(&policy).filter(|r| r == "Loaded")
            })?;
            let mut attempt = 0;
            cp.eventually(&format!("{name}: its image admitted"), Duration::from_secs(30), || {
                attempt += 1;
                let out = scene.pod(&format!("{name}-{attempt}"), &format!("{host}/{name}/app:v1"), "").ok()?;
                out.status.success().then_some(())
            })?;
            for (other, _) in keys.iter().filter(|(o, _)| o != name).chain([&("p256", String::new())]) {
                rejects(
                    &scene.pod(&format!("{name}-by-{other}"), &format!("{host}/{other}/app:v1"), "")?,
                    &format!("an image signed with the {other} key under a policy naming the {name} key"),
                    &[&format!("authority {name}")],
                )?;
            }
            run_ok(cp.kubectl().args(["delete", "imagepolicy", &policy]))?;
            eprintln!("  {name}: signed by cosign with the imported key, admitted; the other key types refused");
        }
        let policy = scene.policy("-ed25519", "*", &key_authority("ed25519", &ed25519))?;
        cp.eventually("ImagePolicy ed25519 Loaded", Duration::from_secs(30), || {
            scene.ready(&policy).filter(|r| r == "Loaded")
        })?;
        let mut attempt = 0;
        let out = cp.eventually("the Ed25519 policy applied", Duration::from_secs(30), || {
            attempt += 1;
            let out = scene.pod(&format!("ed25519-{attempt}"), &format!("{host}/ed25519/app:v1"), "").ok()?;
            String::from_utf8_lossy(&out.stderr).contains("authority ed25519").then_some(out)
        })?;
        rejects(&out, "an image cosign signed with an Ed25519 key", &["cosign signs images with Ed25519ph"])?;
        run_ok(cp.kubectl().args(["delete", "imagepolicy", &policy]))?;
        Ok(())
    });
    wh.unregister_after(cp, "palisade-e2e-key-types", result)
}

/// A registry serving HTTPS with a certificate from a private CA: with that CA in
/// `images.registryCAFiles` for it, its signed image is admitted; without it, or with the CA
/// given for another registry only, the pod is refused and the denial says why.
fn registry_with_a_private_ca(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let reg =
        OciRegistry::start_with_tls(&env.opts.bin_dir, &cp.work_dir.join("registry-private-ca"))?;
    let public = std::fs::read_to_string(reg.key_pair("ci")?)?;
    reg.push_signed("ci", "corp/app", "behind a private CA", None, Layout::Tags)?;
    let ca = reg.ca.clone().context("the registry's CA")?;
    let elsewhere = format!(
        "images: {{registryCAFiles: {{\"127.0.0.1:1\": \"{}\"}}}}",
        ca.display()
    );
    for (case, config, admitted) in [
        ("its CA configured", reg.webhook_config(), true),
        ("no CA configured", String::new(), false),
        ("the CA configured for another registry", elsewhere, false),
    ] {
        let wh = WebhookProcess::start(cp, "private-ca", &config)?;
        wh.register(cp, "palisade-e2e-private-ca")?;
        let result = cp.with_temp_ns("pca", |ns| {
            let host = reg.host.clone();
            let scene = Scene {
                cp,
                ns,
                host: &host,
            };
            scene.prepare()?;
            let policy = scene.policy("", "corp", &key_authority("ci", &public))?;
            cp.eventually(
                &format!("ImagePolicy {policy} Loaded"),
                Duration::from_secs(30),
                || scene.ready(&policy).filter(|r| r == "Loaded"),
            )?;
            let image = format!("{host}/corp/app:v1");
            let mut attempt = 0;
            // Until the webhook has the policy, a pod is admitted without a check: wait for a
            // verdict that names the policy (or an admission, when that is the expectation).
            let out = cp.eventually(
                &format!("{case}: a verdict"),
                Duration::from_secs(30),
                || {
                    attempt += 1;
                    let out = scene.pod(&format!("app-{attempt}"), &image, "").ok()?;
                    let named = String::from_utf8_lossy(&out.stderr).contains(&policy);
                    (named || (admitted && out.status.success())).then_some(out)
                },
            )?;
            if admitted {
                accepts(&out, &format!("{case}: the signed image"))?;
            } else {
                rejects(
                    &out,
                    &format!("{case}: the signed image"),
                    &[
                        &format!("registry {host}"),
                        "its TLS certificate is not trusted",
                        "registryCAFiles",
                    ],
                )?;
            }
            eprintln!(
                "  {case}: {}",
                if admitted {
                    "admitted"
                } else {
                    "refused, the certificate named"
                }
            );
            run_ok(cp.kubectl().args(["delete", "imagepolicy", &policy]))?;
            Ok(())
        });
        wh.unregister_after(cp, "palisade-e2e-private-ca", result)?;
    }
    Ok(())
}
