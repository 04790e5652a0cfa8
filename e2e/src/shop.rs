//! Palisade installed on the node by its chart, from its release images, with OpenBao and
//! PostgreSQL on the host for SecretBindings; and the example shop (`examples/` and
//! `e2e/node/shop.yaml`) as real workloads from images built, signed and attested here. Used by
//! `palisade-e2e up --node` and the node tests.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    controlplane::default_bin_dir,
    netns::{NODE_IP, Relay},
    node::{Node, REGISTRY, push_binary_image},
    openbao::{EXAMPLE_TENANCY, OPERATOR_ROLE, OpenBao},
    pki,
    postgres::Postgres,
    registry::Signer,
    release, repo_root, run, run_ok,
};

/// The release namespace.
pub const NS: &str = "palisade-system";
/// The example shop's namespace (examples/00-shop-namespace.yaml).
pub const SHOP: &str = "shop";
/// OpenBao as pods reach it: a relay on the node's address to the host's server.
pub const VAULT_ON_NODE: &str = "10.200.0.1:8200";
/// PostgreSQL as pods reach it.
pub const POSTGRES_ON_NODE: &str = "10.200.0.1:5432";
/// The shop's services, each an image `shop/<name>:v1` and a Deployment.
pub const SERVICES: [&str; 3] = ["frontend", "orders", "payments"];
/// The repository the example ImagePolicy requires in the images' provenance.
const SHOP_REPOSITORY: &str = "https://git.example.com/shop/orders";

/// Palisade as installed on the node, and the Vault it uses. The relays stop (and OpenBao and
/// PostgreSQL with them) on drop, which must come before the node's.
pub struct Installation {
    /// Digest of the operator's image.
    pub operator: String,
    /// Digest of the webhook's image.
    pub webhook: String,
    /// OpenBao on the host (bootstrapped: Kubernetes auth, the operator's role, tenancy).
    pub bao: OpenBao,
    /// PostgreSQL on the host, behind OpenBao's database engine.
    pub pg: Postgres,
    _relays: Vec<Relay>,
}

/// `helm` with the node's kubeconfig.
pub fn helm(node: &Node) -> Command {
    let mut cmd = Command::new(node.bin("helm"));
    cmd.env("KUBECONFIG", &node.cp().kubeconfig);
    cmd
}

/// Starts OpenBao and PostgreSQL on the host, reachable from pods at [`VAULT_ON_NODE`] and
/// [`POSTGRES_ON_NODE`]; publishes the release images to the node's registry (signed and
/// attested); installs the CRDs and `charts/palisade` with its defaults, its images by digest
/// and the operator's `vault` configuration; then bootstraps OpenBao for it.
pub fn install(node: &Node) -> Result<Installation> {
    let cp = node.cp();
    let root = repo_root();
    let bin = default_bin_dir();
    let pg = Postgres::start()?;
    // The dev server's certificate names only localhost: pods reach it under the node address.
    let (cert, key) = pki::issue_serving_cert(&cp.pki.ca_key, &[&NODE_IP.to_string()])?;
    let bao = OpenBao::start_with_listener(&bin, &node.work_dir.join("openbao"), &cert, &key)?;
    let second = bao.second_listener.context("OpenBao's node listener")?;
    let relays = vec![
        node.holder().expose(VAULT_ON_NODE.parse()?, second)?,
        node.holder().expose(
            POSTGRES_ON_NODE.parse()?,
            SocketAddr::from(([127, 0, 0, 1], pg.port)),
        )?,
    ];
    node.registry.key_pair("release")?;
    let t = Instant::now();
    let images = release::publish(
        &root,
        &node.registry,
        &Signer::Pair("release".to_owned()),
        &node.work_dir.join("release"),
    )?;
    eprintln!(
        "  release images pushed, signed and attested in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    cp.install_crds(&bin)?;
    let digest = |name: &str| {
        images
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.digest.clone())
            .with_context(|| format!("no {name} image"))
    };
    let (operator, webhook) = (digest("palisade-operator")?, digest("palisade-webhook")?);
    // The CA the operator trusts for Vault, before its pods start.
    let _ = run(cp.kubectl().args(["create", "namespace", NS]));
    config_map_ca(node, NS)?;
    let values = node.work_dir.join("palisade-values.yaml");
    std::fs::write(&values, values_yaml())?;
    let t = Instant::now();
    let out = run(helm(node)
        .args(["install", "palisade"])
        .arg(root.join("charts/palisade"))
        .args(["--namespace", NS, "--create-namespace", "-f"])
        .arg(&values)
        .args([
            "--set",
            &format!("image.registry={REGISTRY}"),
            "--set",
            &format!("image.operator.digest={operator}"),
            "--set",
            &format!("image.webhook.digest={webhook}"),
            // The node's registry speaks plain HTTP.
            "--set",
            &format!("webhook.images.insecureRegistries={{{REGISTRY}}}"),
            "--wait",
            "--timeout",
            "4m",
        ]))?;
    helm_succeeded(node, "install", &out)?;
    eprintln!(
        "  helm install --wait done in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    bao.bootstrap(cp, &pg, &[("orders-pg", SHOP)], EXAMPLE_TENANCY)?;
    Ok(Installation {
        operator,
        webhook,
        bao,
        pg,
        _relays: relays,
    })
}

/// The chart values beyond the defaults: the operator's Vault (`EXAMPLE_TENANCY` is indented
/// for a `vault:` key at the top level; here that key is under `operator:`).
fn values_yaml() -> String {
    // A short sweep: what a binding deleted while Vault was down left is removed soon after.
    let vault = format!("{EXAMPLE_TENANCY}  sweepIntervalSeconds: 10\n");
    let tenancy = vault.lines().fold(String::new(), |mut t, l| {
        let _ = writeln!(t, "  {l}");
        t
    });
    // The harness applied every CRD (Palisade's with the third-party ones) before the chart.
    format!(
        "crds:\n  enabled: false\noperator:\n  vaultCAConfigMap: vault-ca\n  vault:\n    address: https://{VAULT_ON_NODE}\n    role: {OPERATOR_ROLE}\n    serviceAccount: {{namespace: {NS}, name: palisade-operator}}\n{tenancy}"
    )
}

/// ConfigMap `vault-ca` (key `ca.crt`): the CA of OpenBao's node listener, which is the
/// cluster's CA.
fn config_map_ca(node: &Node, namespace: &str) -> Result<()> {
    let cp = node.cp();
    let out = run(cp
        .kubectl()
        .args(["create", "configmap", "vault-ca", "-n", namespace])
        .arg(format!("--from-file=ca.crt={}", cp.pki.ca_cert.display())))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !err.contains("AlreadyExists") {
        bail!("configmap vault-ca in {namespace}: {err}");
    }
    Ok(())
}

/// Fails with the pods' description and the kubelet's log when `helm <what>` failed.
pub fn helm_succeeded(node: &Node, what: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let pods = run(node.cp().kubectl().args(["describe", "pods", "-n", NS]))?;
    bail!(
        "helm {what} failed: {}\n{}\nkubelet:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&pods.stdout),
        node.log_tail("kubelet", 30)
    )
}

/// The example shop, running.
pub struct Shop {
    /// `(service, digest)` of each image, as pushed, signed and attested.
    pub images: Vec<(String, String)>,
    /// From the first apply to every Deployment available.
    pub took: Duration,
}

/// Builds the shop's images from `shop-app` (one per service), signs them with a new key pair
/// `shop-ci` and attests their provenance; applies `examples/` with the ImagePolicy's glob and
/// key made local, the secret and table `orders` reads, and `e2e/node/shop.yaml`; waits until
/// every Deployment is available.
pub fn deploy_shop(node: &Node, inst: &Installation) -> Result<Shop> {
    let cp = node.cp();
    let t = Instant::now();
    let public = node.registry.key_pair("shop-ci")?;
    let images = push_shop_images(node)?;
    inst.bao.root(&[
        "kv",
        "put",
        "secret/shop/orders/db",
        "url=postgres://orders",
    ])?;
    let file = node.work_dir.join("shop.yaml");
    std::fs::write(&file, local_examples(&std::fs::read_to_string(&public)?)?)?;
    run_ok(
        cp.kubectl()
            .args([
                "apply",
                "--server-side",
                "--field-manager=palisade-quickstart",
                "-f",
            ])
            .arg(&file),
    )?;
    // No sidecar can run here (no Envoy image), so the namespace joins the mesh in ambient
    // mode, whose identity the webhook accepts from the namespace label (no ztunnel runs
    // either: the node has no mesh data plane).
    run_ok(cp.kubectl().args([
        "label",
        "namespace",
        SHOP,
        "istio-injection-",
        "istio.io/dataplane-mode=ambient",
    ]))?;
    config_map_ca(node, SHOP)?;
    let workloads = std::fs::read_to_string(repo_root().join("e2e/node/shop.yaml"))?
        .replace("@REGISTRY@", REGISTRY)
        .replace("@VAULT@", VAULT_ON_NODE)
        .replace("@POSTGRES@", POSTGRES_ON_NODE);
    let file = node.work_dir.join("shop-workloads.yaml");
    std::fs::write(&file, workloads)?;
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
    cp.eventually(
        "the shop's Deployments available",
        Duration::from_mins(3),
        || {
            let out = run_ok(cp.kubectl().args([
                "get",
                "deployments",
                "-n",
                SHOP,
                "-o",
                "jsonpath={range .items[*]}{.status.availableReplicas}/{.spec.replicas} {end}",
            ]))
            .ok()?;
            let all: Vec<&str> = out.split_whitespace().collect();
            (all.len() == SERVICES.len() && all.iter().all(|c| *c == "1/1")).then_some(())
        },
    )
    .map_err(|e| {
        let events = run(cp.kubectl().args(["get", "events", "-n", SHOP]))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        anyhow::anyhow!("{e:#}\nevents in {SHOP}:\n{events}")
    })?;
    Ok(Shop {
        images,
        took: t.elapsed(),
    })
}

/// One image per service from `shop-app`, signed with key `shop-ci` and attested with the
/// provenance the example ImagePolicy requires; `(service, digest)` of each.
fn push_shop_images(node: &Node) -> Result<Vec<(String, String)>> {
    let predicate = format!(
        r#"{{"buildDefinition":{{"buildType":"https://palisade.dev/e2e/shop@v1","externalParameters":{{"workflow":{{"repository":"{SHOP_REPOSITORY}","ref":"refs/heads/main"}}}}}},"runDetails":{{"builder":{{"id":"https://palisade.dev/e2e/builder"}}}}}}"#
    );
    let mut images = Vec::new();
    for svc in SERVICES {
        let repo = format!("shop/{svc}");
        let digest = push_binary_image(
            &node.registry,
            &node.work_dir,
            &node.bin("shop-app"),
            "bin/shop-app",
            (&repo, "v1"),
            &[
                "--entrypoint=/bin/shop-app",
                "--user=65532",
                &format!("--env=SHOP_SERVICE={svc}"),
            ],
        )?;
        node.registry.sign("shop-ci", &repo, &digest)?;
        node.registry
            .attest("shop-ci", &repo, &digest, "slsaprovenance1", &predicate)?;
        images.push((svc.to_owned(), digest));
    }
    Ok(images)
}

/// `examples/*.yaml` as one multi-document text, the ImagePolicy made local (see
/// [`local_image_policy`]).
fn local_examples(public_key: &str) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("examples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f)?;
        docs.push(if text.contains("kind: ImagePolicy") {
            local_image_policy(&text, public_key)?
        } else {
            text
        });
    }
    Ok(docs.join("\n---\n"))
}

/// The example ImagePolicy with its glob under the node's registry and `public_key` (PEM) in
/// place of its published key; refuses a text whose glob or key it does not find.
fn local_image_policy(text: &str, public_key: &str) -> Result<String> {
    let glob = "registry.example.com/shop/**";
    let begin = text
        .find("-----BEGIN PUBLIC KEY-----")
        .context("no public key in the example ImagePolicy")?;
    let end = text[begin..]
        .find("-----END PUBLIC KEY-----")
        .map(|i| begin + i + "-----END PUBLIC KEY-----".len())
        .context("no end of the public key in the example ImagePolicy")?;
    if !text.contains(glob) {
        bail!("the example ImagePolicy no longer names {glob}");
    }
    let indent = text[..begin]
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .to_owned();
    let key = public_key
        .trim()
        .lines()
        .collect::<Vec<_>>()
        .join(&format!("\n{indent}"));
    Ok(format!("{}{key}{}", &text[..begin], &text[end..])
        .replace(glob, &format!("{REGISTRY}/shop/**")))
}

/// `GET /status` of the first running pod of Deployment `app` in the shop: what the workload
/// reports of its own login, reads and query.
pub fn workload_status(node: &Node, app: &str) -> Result<Value> {
    let body = workload_get(node, app, "/status")?;
    serde_json::from_str(&body).with_context(|| format!("{app} /status: {body}"))
}

/// `GET path` of the first running pod of Deployment `app` in the shop; the body.
pub fn workload_get(node: &Node, app: &str, path: &str) -> Result<String> {
    let ip = run_ok(node.cp().kubectl().args([
        "get",
        "pods",
        "-n",
        SHOP,
        "-l",
        &format!("app={app}"),
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ]))?;
    let addr: SocketAddr = format!("{}:8080", ip.trim())
        .parse()
        .with_context(|| format!("pod IP of {app}: {ip:?}"))?;
    http_get(node, addr, path)
}

/// A plain HTTP/1.0 GET from inside the node's network namespace; the body.
pub fn http_get(node: &Node, addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = node.holder().connect(addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}
