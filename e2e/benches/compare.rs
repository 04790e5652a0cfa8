//! Admission, side by side, on one control plane with one load generator: Palisade's webhook,
//! Kyverno's admission controller (built from its Go module, run out of cluster the way its
//! developers run it: a kubeconfig, `--serverIP`, its webhooks registered by URL) and a
//! do-nothing webhook (the same axum + rustls server as Palisade's, answering `allowed: true`
//! without reading the review) as the limit of this machine and this client.
//!
//! 1. Equivalence: both policies (Palisade's checks with an ImagePolicy; one Kyverno
//!    ClusterPolicy: a ServiceAccount of the pod's own, a namespace with a mesh identity, no
//!    Secret in environment variables, `verifyImages` with a cosign key and the transparency log
//!    off) judge the same corpus of pods; every difference is printed.
//! 2. Decisions straight to each webhook over TLS keep-alive, rounds alternating between the
//!    three: decisions/s, p50/p99, CPU seconds per 1,000 decisions, RSS, and the load
//!    generator's CPU and the machine's idle share in the same round. A decision is what the
//!    API server asks of each for a pod: its mutating path, then its validating path with the
//!    mutated pod.
//! 3. Pod creations/s through the API server (`dryRun`), each webhook registered alone.
//! 4. Cold verification: one newly pushed signed image, its first decision.
//!
//! Run: `cargo build --release -p palisade-webhook && e2e/toolchain/build.sh kyverno &&
//! cargo bench -p palisade-e2e --bench compare` (`PALISADE_BENCH_SECONDS`, default 10;
//! `PALISADE_BENCH_ROUNDS`, default 3; `PALISADE_BENCH_CONNECTIONS`, the connection counts of
//! section 2, default `4,16`).

#![allow(clippy::expect_used, missing_docs)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use palisade_e2e::{
    ControlPlane,
    bench::{cpu_seconds, exchange, post, tls_connector},
    registry::{Layout, OciRegistry},
    run, run_ok,
    webhook::{SCOPE_LABEL, WebhookProcess},
};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};

/// The environment variable that makes this binary the do-nothing webhook:
/// `<port> <cert file> <key file>`.
const NULL_WEBHOOK: &str = "PALISADE_BENCH_NULL_WEBHOOK";

/// The do-nothing webhook's one answer: `allowed`, with the request's uid (which the API server
/// checks) found by a byte search, the review not parsed.
async fn allow(body: axum::body::Bytes) -> impl axum::response::IntoResponse {
    const KEY: &[u8] = b"\"uid\":\"";
    let uid = body
        .windows(KEY.len())
        .position(|w| w == KEY)
        .map(|i| &body[i + KEY.len()..])
        .and_then(|rest| rest.iter().position(|&b| b == b'"').map(|end| &rest[..end]))
        .unwrap_or_default();
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":""#,
    );
    out.extend_from_slice(uid);
    out.extend_from_slice(br#"","allowed":true}}"#);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out,
    )
}

/// Serves `allowed: true` on every path, with Palisade's TLS and HTTP server.
fn null_webhook(spec: &str) -> Result<()> {
    use axum::Router;
    let mut parts = spec.split(' ');
    let (Some(port), Some(cert), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("{NULL_WEBHOOK}: <port> <cert> <key>");
    };
    let port: u16 = port.parse()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let files = palisade_webhook::config::TlsFiles {
        cert_file: cert.into(),
        key_file: key.into(),
    };
    let serving = palisade_webhook::tls::ReloadingCert::new(files)?.serving();
    let app = Router::new().fallback(allow);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let (_tx, draining) = tokio::sync::watch::channel(false);
        palisade_webhook::server::serve_tls(
            listener,
            serving,
            app,
            draining,
            std::future::pending(),
            None,
        )
        .await?;
        Ok(())
    })
}

/// A webhook under test: where it listens, the name its certificate carries, its mutating and
/// validating paths, and its process.
struct Target {
    name: &'static str,
    port: u16,
    server_name: ServerName<'static>,
    mutate: &'static str,
    validate: &'static str,
    pid: u32,
    connector: tokio_rustls::TlsConnector,
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(t: &Target) -> Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", t.port)).await?;
    tcp.set_nodelay(true)?;
    Ok(t.connector.connect(t.server_name.clone(), tcp).await?)
}

/// An AdmissionReview of a CREATE of `pod` in `namespace`.
fn review(namespace: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7c3a0a5e-0000-4000-8000-000000000001",
            "name": pod["metadata"]["name"], "namespace": namespace, "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "bench", "groups": ["system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
}

/// What a webhook decides for a pod, as the API server would ask: its mutating path, the
/// patch applied, then its validating path with the mutated pod. `Ok((allowed, message,
/// validate review))`.
async fn decide(t: &Target, namespace: &str, pod: &Value) -> Result<(bool, String, String)> {
    let mut tls = connect(t).await?;
    let mut buf = vec![0; 64 * 1024];
    let body = review(namespace, pod).to_string();
    let out: Value =
        serde_json::from_slice(&exchange(&mut tls, &post(t.mutate, &body), &mut buf).await?)?;
    let response = &out["response"];
    if response["allowed"] != true {
        return Ok((false, message(response), body));
    }
    let mut mutated = pod.clone();
    if let Some(patch) = response["patch"].as_str() {
        let patch: json_patch::Patch =
            serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(patch)?)?;
        json_patch::patch(&mut mutated, &patch)?;
    }
    let body = review(namespace, &mutated).to_string();
    let out: Value =
        serde_json::from_slice(&exchange(&mut tls, &post(t.validate, &body), &mut buf).await?)?;
    let response = &out["response"];
    Ok((response["allowed"] == true, message(response), body))
}

fn message(response: &Value) -> String {
    let m = response["status"]["message"].as_str().unwrap_or_default();
    let m: String = m.chars().take(110).collect();
    m.replace('\n', " ")
}

/// One keep-alive connection making decisions (the two requests) until `until`; returns the
/// latency of each decision.
async fn worker(
    t: Arc<Target>,
    requests: Arc<[Vec<u8>; 2]>,
    until: Instant,
) -> Result<Vec<Duration>> {
    let mut tls = connect(&t).await?;
    let mut buf = vec![0; 64 * 1024];
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let start = Instant::now();
        for r in requests.iter() {
            let body = exchange(&mut tls, r, &mut buf).await?;
            if !body.windows(14).any(|w| w == b"\"allowed\":true") {
                bail!(
                    "{}: the compliant pod was not allowed: {}",
                    t.name,
                    String::from_utf8_lossy(&body)
                );
            }
        }
        latencies.push(start.elapsed());
    }
    Ok(latencies)
}

/// `VmRSS` and `VmHWM` of `pid`, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

#[derive(Clone, Copy, Default)]
struct Load {
    decisions: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_1000: f64,
    /// This process's CPU (the load generator's) per 1,000 decisions.
    client_cpu_per_1000: f64,
    /// The share of the machine's CPU left idle during the round.
    idle: f64,
}

fn load(
    rt: &tokio::runtime::Runtime,
    t: &Arc<Target>,
    requests: &Arc<[Vec<u8>; 2]>,
    seconds: u64,
    connections: usize,
) -> Result<Load> {
    // Warm-up: a second of the same load.
    rt.block_on(worker(
        Arc::clone(t),
        Arc::clone(requests),
        Instant::now() + Duration::from_secs(1),
    ))?;
    let cpu = cpu_seconds(t.pid)?;
    let client_cpu = cpu_seconds(std::process::id())?;
    let machine = palisade_e2e::bench::machine_ticks()?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut all: Vec<Duration> = rt.block_on(async {
        let tasks: Vec<_> = (0..connections)
            .map(|_| tokio::spawn(worker(Arc::clone(t), Arc::clone(requests), until)))
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(t.pid)? - cpu;
    let client_cpu = cpu_seconds(std::process::id())? - client_cpu;
    let idle = palisade_e2e::bench::idle_share(machine, palisade_e2e::bench::machine_ticks()?);
    all.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let pct = |p: f64| {
        all.get(((all.len().saturating_sub(1)) as f64 * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    #[allow(clippy::cast_precision_loss)]
    Ok(Load {
        decisions: all.len(),
        rate: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        cpu_per_1000: cpu / all.len().max(1) as f64 * 1000.0,
        client_cpu_per_1000: client_cpu / all.len().max(1) as f64 * 1000.0,
        idle,
    })
}

/// The median of `runs` by rate (the run reported whole).
fn median(mut runs: Vec<Load>) -> Load {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

/// A child process killed and reaped when dropped: a run that fails part-way leaves none behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kyverno's admission controller, out of cluster (killed and reaped when dropped).
struct Kyverno {
    child: Reaped,
    log: PathBuf,
}

impl Kyverno {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

const KYVERNO_CA_SECRET: &str = "kyverno-svc.kyverno.svc.kyverno-tls-ca";
const KYVERNO_TLS_SECRET: &str = "kyverno-svc.kyverno.svc.kyverno-tls-pair";

/// Installs Kyverno's CRDs from its module and starts its admission controller on `port`.
fn start_kyverno(cp: &ControlPlane, bin_dir: &Path, port: u16) -> Result<Kyverno> {
    let module = Path::new(
        &run_ok(Command::new("go").args(["env", "GOMODCACHE"]))?
            .trim()
            .to_owned(),
    )
    .join("github.com/kyverno/kyverno@v1.19.1/config/crds");
    for dir in ["kyverno", "policies.kyverno.io", "reports"] {
        run_ok(
            cp.kubectl()
                .args(["apply", "--server-side", "-R", "-f"])
                .arg(module.join(dir)),
        )?;
    }
    run_ok(cp.kubectl().args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
        "--all",
    ]))?;
    let _ = run(cp.kubectl().args(["create", "namespace", "kyverno"]));
    let log = cp.work_dir.join("kyverno.log");
    let child = Command::new(bin_dir.join("kyverno"))
        .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
        .arg(format!("--serverIP=127.0.0.1:{port}"))
        .arg(format!("--webhookServerPort={port}"))
        .arg(format!("--caSecretName={KYVERNO_CA_SECRET}"))
        .arg(format!("--tlsSecretName={KYVERNO_TLS_SECRET}"))
        .arg("--backgroundServiceAccountName=system:serviceaccount:kyverno:kyverno-background-controller")
        .arg("--reportsServiceAccountName=system:serviceaccount:kyverno:kyverno-reports-controller")
        .args(["--admissionReports=false", "--controllerRuntimeMetricsAddress=0", "-v=1"])
        .env("KYVERNO_NAMESPACE", "kyverno")
        .env("KYVERNO_SERVICEACCOUNT_NAME", "kyverno-admission-controller")
        .env("KYVERNO_DEPLOYMENT", "kyverno-admission-controller")
        .env("KYVERNO_POD_NAME", "bench")
        .env("INIT_CONFIG", "kyverno")
        .env("METRICS_CONFIG", "kyverno-metrics")
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(cp.work_dir.join("kyverno.err"))?)
        .spawn()
        .context("starting kyverno (e2e/toolchain/build.sh kyverno builds it)")?;
    Ok(Kyverno {
        child: Reaped(child),
        log,
    })
}

/// The Kyverno ClusterPolicy equivalent to Palisade's checks and `ImagePolicy` over
/// `<host>/shop/*` with `public` as the key.
fn kyverno_policy(host: &str, public: &str) -> String {
    let key = indented(public, 14);
    format!(
        r#"apiVersion: kyverno.io/v1
kind: ClusterPolicy
metadata:
  name: bench-pod-guard
  annotations: {{pod-policies.kyverno.io/autogen-controllers: none}}
spec:
  background: false
  webhookConfiguration: {{failurePolicy: Fail, timeoutSeconds: 10}}
  rules:
  - name: own-service-account
    match: &pods {{any: [{{resources: {{kinds: [Pod], operations: [CREATE, UPDATE]}}}}]}}
    validate:
      failureAction: Enforce
      message: "serviceAccountName must be set and not default"
      deny:
        conditions:
          any:
          - key: "{{{{ request.object.spec.serviceAccountName || '' }}}}"
            operator: AnyIn
            value: ["", "default"]
  - name: mesh-namespace
    match: *pods
    exclude:
      any:
      - resources: {{namespaceSelector: {{matchLabels: {{istio.io/dataplane-mode: ambient}}}}}}
      - resources: {{namespaceSelector: {{matchLabels: {{istio-injection: enabled}}}}}}
    validate:
      failureAction: Enforce
      message: "the namespace has no mesh identity"
      deny:
        conditions:
          any:
          - key: "{{{{ request.operation }}}}"
            operator: AnyIn
            value: [CREATE, UPDATE]
  - name: no-secret-env
    match: *pods
    validate:
      failureAction: Enforce
      message: "Secrets must not be in environment variables"
      pattern:
        spec:
          containers: &no-secrets
          - name: "*"
            =(env):
            - =(valueFrom):
                X(secretKeyRef): "null"
            =(envFrom):
            - X(secretRef): "null"
          =(initContainers): *no-secrets
  - name: signed-images
    match: *pods
    verifyImages:
    - type: Cosign
      imageReferences: ["{host}/shop/*"]
      failureAction: Enforce
      mutateDigest: true
      verifyDigest: true
      required: true
      useCache: true
      attestors:
      - count: 1
        entries:
        - keys:
            publicKeys: |-
{key}            rekor: {{url: "https://rekor.sigstore.dev", ignoreTlog: true}}
            ctlog: {{ignoreSCT: true}}
"#
    )
}

/// `text`'s lines, each indented by `by` spaces and ended by a newline.
fn indented(text: &str, by: usize) -> String {
    text.lines().fold(String::new(), |mut out, l| {
        out.push_str(&" ".repeat(by));
        out.push_str(l);
        out.push('\n');
        out
    })
}

/// The ImagePolicy equivalent to the Kyverno rule `signed-images`.
fn palisade_policy(host: &str, public: &str) -> String {
    let key = indented(public, 10);
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: ImagePolicy\nmetadata:\n  name: bench\nspec:\n  images: [{{glob: \"{host}/shop/**\"}}]\n  authorities:\n    - name: ci\n      transparencyLog: Ignore\n      key:\n        publicKey: |\n{key}"
    )
}

fn pod(name: &str, sa: Option<&str>, containers: &Value, init: Option<&Value>) -> Value {
    let mut spec = json!({"containers": containers});
    if let Some(sa) = sa {
        spec["serviceAccountName"] = json!(sa);
    }
    if let Some(init) = init {
        spec["initContainers"] = init.clone();
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": {"app": name}}, "spec": spec})
}

fn container(image: &str, env: &Value) -> Value {
    json!({"name": "app", "image": image, "env": env})
}

/// The corpus: (namespace, pod, what a policy that means the same must say).
fn corpus(images: &Images) -> Vec<(&'static str, Value, bool)> {
    let none = json!([]);
    let c = |image: &str| json!([container(image, &none)]);
    let secret_env = json!([{"name": "DB_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]);
    let envfrom = json!([{"name": "app", "image": images.signed,
        "envFrom": [{"secretRef": {"name": "db"}}]}]);
    let init = json!([{"name": "init", "image": images.signed, "env": secret_env}]);
    // Palisade also looks for secret-shaped literal values: not part of the shared policy.
    let literal = json!([container(
        &images.signed,
        &json!([{"name": "AWS_ACCESS_KEY_ID", "value": "AKIAIOSFODNN7EXAMPLE"}])
    )]);
    let (web, signed) = (Some("web"), c(&images.signed));
    let secret = json!([container(&images.signed, &secret_env)]);
    let outside = c("registry.example.com/other/app:1");
    [
        ("shop", "compliant", web, signed.clone(), None, true),
        (
            "shop",
            "signed-by-tag",
            web,
            c(&images.signed_tag),
            None,
            true,
        ),
        (
            "shop",
            "default-sa",
            Some("default"),
            signed.clone(),
            None,
            false,
        ),
        ("shop", "no-sa", None, signed.clone(), None, false),
        ("plain", "no-mesh", web, signed.clone(), None, false),
        ("shop", "secret-env", web, secret, None, false),
        ("shop", "secret-envfrom", web, envfrom, None, false),
        ("shop", "init-secret-env", web, signed, Some(init), false),
        ("shop", "unsigned", web, c(&images.unsigned), None, false),
        ("shop", "other-key", web, c(&images.foreign), None, false),
        ("shop", "outside-glob", web, outside, None, true),
        ("shop", "literal-aws-key", web, literal, None, false),
    ]
    .into_iter()
    .map(|(ns, name, sa, containers, init, want)| {
        (ns, pod(name, sa, &containers, init.as_ref()), want)
    })
    .collect()
}

struct Images {
    signed: String,
    signed_tag: String,
    unsigned: String,
    foreign: String,
}

/// Registers `t` alone with the API server for pods in namespace `shop` (mutating and
/// validating, by URL), as `name`.
fn register(cp: &ControlPlane, name: &str, t: &Target, ca_pem: &[u8]) -> Result<()> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let host = match &t.server_name {
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => other.to_str().into_owned(),
    };
    let hook = |kind: &str, path: &str| {
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
            "metadata": {"name": name},
            "webhooks": [{
                "name": format!("{}.bench.palisade.dev", kind.to_lowercase()),
                "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail", "timeoutSeconds": 10,
                "clientConfig": {"url": format!("https://{host}:{}{}", t.port, without_query(path)), "caBundle": ca},
                "namespaceSelector": {"matchLabels": {SCOPE_LABEL: "on"}},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
            }],
        })
    };
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        hook("MutatingWebhookConfiguration", t.mutate),
        hook("ValidatingWebhookConfiguration", t.validate),
    ]});
    let file = cp.work_dir.join(format!("{name}.json"));
    std::fs::write(&file, list.to_string())?;
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
    Ok(())
}

/// `path` without its query (the API server sends its own `timeout`).
fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

fn unregister(cp: &ControlPlane, selector: &[&str]) -> Result<()> {
    run_ok(
        cp.kubectl()
            .args([
                "delete",
                "validatingwebhookconfiguration,mutatingwebhookconfiguration",
            ])
            .args(selector)
            .arg("--ignore-not-found"),
    )?;
    Ok(())
}

/// Pod creations/s through the API server (`dryRun: All`), 16 in flight, for `seconds`.
fn through_api_server(
    rt: &tokio::runtime::Runtime,
    cp: &ControlPlane,
    pod: &Value,
    seconds: u64,
) -> Result<(f64, usize)> {
    use futures::{StreamExt, stream};
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};
    let pod: Pod = serde_json::from_value(pod.clone())?;
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&cp.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        let client = kube::Client::try_from(config)?;
        let api: Api<Pod> = Api::namespaced(client, "shop");
        let params = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        // Warm-up, and a check that the pod is admitted.
        api.create(&params, &pod)
            .await
            .context("a dry-run pod creation")?;
        let started = Instant::now();
        let until = started + Duration::from_secs(seconds);
        let done: Vec<Result<usize>> = stream::iter(0..16)
            .map(|_| {
                let (api, params, pod) = (api.clone(), params.clone(), pod.clone());
                async move {
                    let mut n = 0;
                    while Instant::now() < until {
                        api.create(&params, &pod).await?;
                        n += 1;
                    }
                    Ok(n)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let n: usize = done.into_iter().sum::<Result<usize>>()?;
        #[allow(clippy::cast_precision_loss)]
        Ok((n as f64 / started.elapsed().as_secs_f64(), n))
    })
}

fn wait_for(what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while !probe() {
        if t.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[allow(clippy::too_many_lines)]
fn main() -> Result<()> {
    if let Ok(spec) = std::env::var(NULL_WEBHOOK) {
        return null_webhook(&spec);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seconds: u64 = std::env::var("PALISADE_BENCH_SECONDS").map_or(Ok(10), |s| s.parse())?;
    let rounds: usize = std::env::var("PALISADE_BENCH_ROUNDS").map_or(Ok(3), |s| s.parse())?;
    // Each count is a block of section 2: few connections leave the machine waiting on each
    // answer; 16, the concurrency section 3 gives the API server, keep it close to busy.
    let connection_counts: Vec<usize> = std::env::var("PALISADE_BENCH_CONNECTIONS")
        .unwrap_or_else(|_| "4,16".to_owned())
        .split(',')
        .map(|c| c.trim().parse())
        .collect::<Result<_, _>>()?;
    let (opts, cp) = palisade_e2e::bench::control_plane()?;
    let kyverno_bin = opts.bin_dir.join("kyverno");
    if !kyverno_bin.exists() {
        bail!(
            "{} is missing: e2e/toolchain/build.sh kyverno builds it",
            kyverno_bin.display()
        );
    }
    for (ns, labels) in [
        (
            "shop",
            vec![
                "istio.io/dataplane-mode=ambient".to_owned(),
                format!("{SCOPE_LABEL}=on"),
            ],
        ),
        ("plain", vec![]),
    ] {
        run_ok(cp.kubectl().args(["create", "namespace", ns]))?;
        for l in labels {
            run_ok(cp.kubectl().args(["label", "namespace", ns, &l]))?;
        }
        run_ok(
            cp.kubectl()
                .args(["create", "serviceaccount", "web", "-n", ns]),
        )?;
    }

    // The registry: images signed by the policy's key, one unsigned, one signed by another key.
    let reg = OciRegistry::start(&opts.bin_dir, &cp.work_dir.join("registry"))?;
    let public = std::fs::read_to_string(reg.key_pair("ci")?)?;
    reg.key_pair("other")?;
    let host = reg.host.clone();
    let signed = reg.push_signed("ci", "shop/app", "app v1", None, Layout::Tags)?;
    reg.push("shop/unsigned", "v1", "unsigned")?;
    let foreign = reg.push_signed("other", "shop/foreign", "foreign", None, Layout::Tags)?;
    let images = Images {
        signed: format!("{host}/shop/app@{signed}"),
        signed_tag: format!("{host}/shop/app:v1"),
        unsigned: format!("{host}/shop/unsigned:v1"),
        foreign: format!("{host}/shop/foreign@{foreign}"),
    };

    // Palisade.
    let palisade = WebhookProcess::start(&cp, "compare", &reg.webhook_config())?;
    let file = cp.work_dir.join("bench-imagepolicy.yaml");
    std::fs::write(&file, palisade_policy(&host, &public))?;
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
    let cp_ca = std::fs::read(&cp.pki.ca_cert)?;
    let palisade_t = Arc::new(Target {
        name: "palisade",
        port: palisade.port,
        server_name: ServerName::try_from("localhost")?.to_owned(),
        mutate: "/mutate?timeout=10s",
        validate: "/validate?timeout=10s",
        pid: palisade.pid(),
        connector: tls_connector(&cp_ca)?,
    });

    // Kyverno.
    let kyverno_port = palisade_e2e::controlplane::free_port()?;
    let kyverno = start_kyverno(&cp, &opts.bin_dir, kyverno_port)?;
    let secret_ca = || {
        run_ok(cp.kubectl().args([
            "get",
            "secret",
            KYVERNO_CA_SECRET,
            "-n",
            "kyverno",
            "-o",
            "jsonpath={.data.tls\\.crt}",
        ]))
        .ok()
        .filter(|s| !s.trim().is_empty())
    };
    wait_for("Kyverno's CA", Duration::from_mins(2), || {
        secret_ca().is_some()
    })
    .with_context(|| kyverno.log_tail())?;
    let kyverno_ca =
        base64::engine::general_purpose::STANDARD.decode(secret_ca().unwrap_or_default().trim())?;
    let file = cp.work_dir.join("bench-clusterpolicy.yaml");
    std::fs::write(&file, kyverno_policy(&host, &public))?;
    // Kyverno registers its policy webhooks before it serves their certificate: retried.
    wait_for("the ClusterPolicy accepted", Duration::from_mins(2), || {
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file)).is_ok()
    })
    .with_context(|| kyverno.log_tail())?;
    wait_for("the ClusterPolicy Ready", Duration::from_mins(2), || {
        run_ok(cp.kubectl().args([
            "get",
            "clusterpolicy",
            "bench-pod-guard",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        ]))
        .is_ok_and(|s| s.trim() == "True")
    })
    .with_context(|| kyverno.log_tail())?;
    let kyverno_t = Arc::new(Target {
        name: "kyverno",
        port: kyverno_port,
        server_name: ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        mutate: "/mutate/fail",
        validate: "/validate/fail",
        pid: kyverno.child.0.id(),
        connector: tls_connector(&kyverno_ca)?,
    });

    // The do-nothing webhook: this binary, with Palisade's server and a certificate like its.
    let null_dir = cp.work_dir.join("null-webhook");
    std::fs::create_dir_all(&null_dir)?;
    let (cert, key) = palisade_e2e::pki::issue_serving_cert(&cp.pki.ca_key, &["localhost"])?;
    std::fs::write(null_dir.join("tls.crt"), cert)?;
    std::fs::write(null_dir.join("tls.key"), key)?;
    let null_port = palisade_e2e::controlplane::free_port()?;
    let null_child = Reaped(
        Command::new(std::env::current_exe()?)
            .env(
                NULL_WEBHOOK,
                format!(
                    "{null_port} {} {}",
                    null_dir.join("tls.crt").display(),
                    null_dir.join("tls.key").display()
                ),
            )
            .spawn()?,
    );
    let null_t = Arc::new(Target {
        name: "do-nothing",
        port: null_port,
        server_name: ServerName::try_from("localhost")?.to_owned(),
        mutate: "/mutate",
        validate: "/validate",
        pid: null_child.0.id(),
        connector: tls_connector(&cp_ca)?,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    wait_for("the do-nothing webhook", Duration::from_secs(20), || {
        rt.block_on(connect(&null_t)).is_ok()
    })?;

    // 1. The same corpus through both.
    let corpus = corpus(&images);
    println!(
        "admission, side by side: Palisade {} vs Kyverno v1.19.1 vs a do-nothing webhook",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "1. equivalence on {} pods (mutating path, then validating path with the mutated pod):",
        corpus.len()
    );
    let mut differences = 0;
    for (ns, pod, want) in &corpus {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let p = rt.block_on(decide(&palisade_t, ns, pod))?;
        let k = rt.block_on(decide(&kyverno_t, ns, pod))?;
        let word = |a: bool| if a { "admit" } else { "refuse" };
        let same = p.0 == k.0;
        if !same {
            differences += 1;
        }
        println!(
            "  {name:<16} expected {:<6} palisade {:<6} kyverno {:<6}{}",
            word(*want),
            word(p.0),
            word(k.0),
            if same {
                String::new()
            } else {
                format!("   DIFFERENT (palisade: {:?}; kyverno: {:?})", p.1, k.1)
            }
        );
        if p.0 != *want {
            println!("    palisade does not say what the policy means: {}", p.1);
        }
    }
    println!("  {differences} difference(s)");

    // 2. Decisions straight to each webhook.
    let compliant = &corpus[0].1;
    let requests = |t: &Target| -> Result<Arc<[Vec<u8>; 2]>> {
        let (allowed, why, validate_body) = rt.block_on(decide(t, "shop", compliant))?;
        if !allowed {
            bail!("{} refuses the compliant pod: {why}", t.name);
        }
        let mutate_body = review("shop", compliant).to_string();
        Ok(Arc::new([
            post(t.mutate, &mutate_body),
            post(t.validate, &validate_body),
        ]))
    };
    let targets = [&palisade_t, &kyverno_t, &null_t];
    let bodies: Vec<Arc<[Vec<u8>; 2]>> =
        targets.iter().map(|t| requests(t)).collect::<Result<_>>()?;
    println!(
        "2. decisions straight to each webhook (TLS keep-alive, {seconds} s, median of {rounds} alternating rounds; a decision = mutating + validating request):"
    );
    for &connections in &connection_counts {
        let mut runs: Vec<Vec<Load>> = vec![Vec::new(); targets.len()];
        for _ in 0..rounds {
            for (i, t) in targets.iter().enumerate() {
                runs[i].push(load(&rt, t, &bodies[i], seconds, connections)?);
            }
        }
        let results: Vec<Load> = runs.into_iter().map(median).collect();
        println!("  {connections} connections:");
        let mut rss_of = Vec::new();
        for (t, r) in targets.iter().zip(&results) {
            let (rss, hwm) = rss_mib(t.pid);
            rss_of.push(rss);
            println!(
                "    {:<11} {:>8.0} decisions/s  p50 {:>6.2} ms  p99 {:>6.2} ms  {:>6.3} CPU s per 1,000 decisions  RSS {rss:.0} MiB (peak {hwm:.0} MiB)  [{} decisions]  load generator {:.3} CPU s per 1,000, machine {:.0} % idle",
                t.name,
                r.rate,
                ms(r.p50),
                ms(r.p99),
                r.cpu_per_1000,
                r.decisions,
                r.client_cpu_per_1000,
                r.idle * 100.0
            );
        }
        let (p, k, n) = (results[0], results[1], results[2]);
        println!(
            "    palisade / kyverno: {:.1}x the decisions/s, p50 {:.2}x, p99 {:.2}x, CPU per decision {:.2}x, RSS {:.2}x; palisade / do-nothing: {:.2} of the limit (goals: >= 10x kyverno at a lower p99; >= 0.8 of the limit)",
            p.rate / k.rate,
            p.p50.as_secs_f64() / k.p50.as_secs_f64(),
            p.p99.as_secs_f64() / k.p99.as_secs_f64(),
            p.cpu_per_1000 / k.cpu_per_1000,
            rss_of[0] / rss_of[1],
            p.rate / n.rate
        );
    }

    // 3. Through the API server, each registered alone (Kyverno paused, its registrations gone).
    println!(
        "3. pod creations through the API server (dryRun, 16 in flight, {seconds} s), each webhook registered alone:"
    );
    let kyverno_pid = kyverno.child.0.id().to_string();
    let kyverno_hooks = ["-l", "webhook.kyverno.io/managed-by=kyverno"];
    let mut rates = Vec::new();
    for t in targets {
        if t.name == "kyverno" {
            run_ok(Command::new("kill").args(["-CONT", &kyverno_pid]))?;
            wait_for("Kyverno's webhooks back", Duration::from_mins(2), || {
                run_ok(cp.kubectl().args([
                    "get",
                    "mutatingwebhookconfiguration",
                    "-l",
                    "webhook.kyverno.io/managed-by=kyverno",
                    "-o",
                    "name",
                ]))
                .is_ok_and(|s| s.contains("kyverno-resource-mutating"))
                    && run_ok(cp.kubectl().args([
                        "get",
                        "validatingwebhookconfiguration",
                        "-l",
                        "webhook.kyverno.io/managed-by=kyverno",
                        "-o",
                        "name",
                    ]))
                    .is_ok_and(|s| s.contains("kyverno-resource-validating"))
            })?;
        } else {
            run_ok(Command::new("kill").args(["-STOP", &kyverno_pid]))?;
            unregister(&cp, &kyverno_hooks)?;
            register(
                &cp,
                "bench-alone",
                t,
                if t.name == "kyverno" {
                    &kyverno_ca
                } else {
                    &cp_ca
                },
            )?;
        }
        // Registration reaches the API server's webhook cache within a second or so.
        std::thread::sleep(Duration::from_secs(2));
        let (rate, n) = through_api_server(&rt, &cp, compliant, seconds)?;
        println!("  {:<11} {rate:>7.0} pods/s  [{n} creations]", t.name);
        rates.push(rate);
        if t.name != "kyverno" {
            unregister(&cp, &["bench-alone"])?;
        }
    }
    run_ok(Command::new("kill").args(["-STOP", &kyverno_pid]))?;
    unregister(&cp, &kyverno_hooks)?;
    let (apiserver_alone, _) = through_api_server(&rt, &cp, compliant, seconds)?;
    println!("  no webhook  {apiserver_alone:>7.0} pods/s");
    println!(
        "  palisade / kyverno: {:.2}x; palisade / do-nothing: {:.2}",
        rates[0] / rates[1],
        rates[0] / rates[2]
    );
    run_ok(Command::new("kill").args(["-CONT", &kyverno_pid]))?;

    // 4. Cold verification: a newly pushed signed image, its first decision through each.
    println!(
        "4. cold verification of a newly pushed signed image (first decision on it; median of 5):"
    );
    let mut cold = Vec::new();
    for t in [&palisade_t, &kyverno_t] {
        let mut took = Vec::new();
        for i in 0..5 {
            let repo = format!("shop/cold-{}-{i}", t.name);
            let digest =
                reg.push_signed("ci", &repo, &format!("{} {i}", t.name), None, Layout::Tags)?;
            let fresh = pod(
                "cold",
                Some("web"),
                &json!([container(&format!("{host}/{repo}@{digest}"), &json!([]))]),
                None,
            );
            let started = Instant::now();
            let (allowed, why, _) = rt.block_on(decide(t, "shop", &fresh))?;
            took.push(started.elapsed());
            if !allowed {
                bail!("{} refused a newly signed image: {why}", t.name);
            }
        }
        took.sort_unstable();
        println!(
            "  {:<11} {:.1} ms (fastest {:.1} ms, slowest {:.1} ms)",
            t.name,
            ms(took[2]),
            ms(took[0]),
            ms(took[4])
        );
        cold.push(took[2]);
    }
    println!(
        "  palisade / kyverno: {:.2}x the time",
        cold[0].as_secs_f64() / cold[1].as_secs_f64()
    );
    drop(null_child);
    drop(kyverno);
    drop(palisade);
    Ok(())
}
