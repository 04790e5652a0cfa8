//! Webhook decision benchmark: AdmissionReviews for a 3-container pod posted over TLS with
//! keep-alive to the release `palisade-webhook`, from a load generator on the same machine.
//! Prints decisions/s, p50/p99/max latency and the webhook's peak RSS: without an ImagePolicy,
//! then with three signed images under one (verdicts cached), then the cold verification of one
//! image against `cosign verify` of the same image.
//!
//! Run: `cargo build --release -p palisade-webhook && cargo bench -p palisade-e2e --bench webhook`
//! (`PALISADE_BENCH_SECONDS`, default 10; `PALISADE_BENCH_CONNECTIONS`, default 4).

#![allow(clippy::expect_used, missing_docs)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    bench::{exchange, post, tls_connector},
    registry::{Layout, OciRegistry},
    run_ok,
    webhook::WebhookProcess,
};
use rustls::pki_types::ServerName;
use serde_json::json;

fn review_body(images: &[String]) -> String {
    let containers: Vec<_> = ["app", "proxy", "metrics"]
        .iter()
        .zip(images)
        .map(|(n, image)| {
            json!({"name": n, "image": image,
                   "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}]})
        })
        .collect();
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "bench", "name": "web", "namespace": "shop", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "bench"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
                       "spec": {"serviceAccountName": "web", "containers": containers}},
        }
    })
    .to_string()
}

/// One keep-alive connection posting reviews until `until`; returns per-request latencies.
async fn worker(
    connector: tokio_rustls::TlsConnector,
    port: u16,
    request: Arc<Vec<u8>>,
    until: Instant,
) -> Result<Vec<Duration>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
        .await?;
    let mut latencies = Vec::new();
    let mut buf = Vec::new();
    while Instant::now() < until {
        let start = Instant::now();
        let body = exchange(&mut tls, &request, &mut buf).await?;
        if !body.windows(14).any(|w| w == b"\"allowed\":true") {
            bail!("the benchmark pod was not allowed");
        }
        latencies.push(start.elapsed());
    }
    Ok(latencies)
}

/// Decisions/s and latency percentiles of `connections` keep-alive connections posting
/// `body` for `seconds`, after a 1 s warm-up.
struct Measured {
    count: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn measure(
    rt: &tokio::runtime::Runtime,
    connector: &tokio_rustls::TlsConnector,
    port: u16,
    body: &str,
    seconds: u64,
    connections: usize,
) -> Result<Measured> {
    let request = Arc::new(post("/validate?timeout=10s", body));
    rt.block_on(worker(
        connector.clone(),
        port,
        Arc::clone(&request),
        Instant::now() + Duration::from_secs(1),
    ))?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut all: Vec<Duration> = rt.block_on(async {
        let tasks: Vec<_> = (0..connections)
            .map(|_| tokio::spawn(worker(connector.clone(), port, Arc::clone(&request), until)))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let elapsed = started.elapsed();
    all.sort_unstable();
    let pct = |p: f64| {
        let last = all.len().saturating_sub(1);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((last as f64) * p).round() as usize;
        all.get(i).copied().unwrap_or_default()
    };
    #[allow(clippy::cast_precision_loss)]
    let rate = all.len() as f64 / elapsed.as_secs_f64();
    Ok(Measured {
        count: all.len(),
        rate,
        p50: pct(0.50),
        p99: pct(0.99),
        max: pct(1.0),
    })
}

fn report(m: &Measured) {
    println!("  decisions: {} ({:.0}/s)", m.count, m.rate);
    println!(
        "  latency: p50 {:.3} ms, p99 {:.3} ms (goal < 2 ms), max {:.3} ms",
        m.p50.as_secs_f64() * 1e3,
        m.p99.as_secs_f64() * 1e3,
        m.max.as_secs_f64() * 1e3
    );
}

fn main() -> Result<()> {
    let seconds: u64 = std::env::var("PALISADE_BENCH_SECONDS").map_or(Ok(10), |s| s.parse())?;
    let connections: usize =
        std::env::var("PALISADE_BENCH_CONNECTIONS").map_or(Ok(4), |s| s.parse())?;
    // The webhook is ready once its ImagePolicy cache is synced, which needs the CRD.
    let (opts, cp) = palisade_e2e::bench::control_plane()?;
    run_ok(cp.kubectl().args(["create", "namespace", "shop"]))?;
    run_ok(cp.kubectl().args([
        "label",
        "namespace",
        "shop",
        "istio.io/dataplane-mode=ambient",
    ]))?;
    let reg = OciRegistry::start(&opts.bin_dir, &cp.work_dir.join("registry"))?;
    let webhook = WebhookProcess::start(&cp, "bench", &reg.webhook_config())?;

    let connector = tls_connector(&std::fs::read(&cp.pki.ca_cert)?)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;

    // 1. No ImagePolicy covers the images.
    let plain: Vec<String> = ["app", "proxy", "metrics"]
        .iter()
        .map(|n| format!("registry.example.com/shop/{n}:1"))
        .collect();
    let base = measure(
        &rt,
        &connector,
        webhook.port,
        &review_body(&plain),
        seconds,
        connections,
    )?;
    println!(
        "webhook decisions, 3-container pod, TLS keep-alive, {connections} connections, {seconds} s"
    );
    println!("no ImagePolicy (goal >= 10000/s):");
    report(&base);

    // 2. Three signed images by digest under an ImagePolicy, verdicts cached after the first.
    let public = std::fs::read_to_string(reg.key_pair("ci")?)?;
    let mut images = Vec::new();
    for n in ["app", "proxy", "metrics"] {
        let digest = reg.push_signed("ci", &format!("shop/{n}"), n, None, Layout::Tags)?;
        images.push(format!("{}/shop/{n}@{digest}", reg.host));
    }
    let key = public
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect::<Vec<_>>()
        .concat();
    let policy = format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: ImagePolicy\nmetadata:\n  name: bench\nspec:\n  images: [{{glob: \"{}/shop/**\"}}]\n  authorities:\n    - name: ci\n      transparencyLog: Ignore\n      key:\n        publicKey: |\n{key}",
        reg.host
    );
    let file = cp.work_dir.join("bench-policy.yaml");
    std::fs::write(&file, policy)?;
    run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
    let requests = || -> Result<u64> {
        let (_, m) = webhook.curl(&["/metrics"])?;
        m.lines()
            .find_map(|l| l.strip_prefix("palisade_webhook_registry_requests_total "))
            .and_then(|v| v.trim().parse().ok())
            .context("registry request counter")
    };
    let body = review_body(&images);
    let start = Instant::now();
    while requests()? == 0 {
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "the webhook never consulted the registry: {}",
                webhook.log_tail()
            );
        }
        let _ = measure(&rt, &connector, webhook.port, &body, 0, 1);
    }
    let before = requests()?;
    let warm = measure(&rt, &connector, webhook.port, &body, seconds, connections)?;
    let during = requests()? - before;
    println!("3 signed images by digest under an ImagePolicy, verdicts cached:");
    report(&warm);
    println!(
        "  {:.1}% of the no-policy rate (goal within 10%); registry requests while measuring: {during}",
        warm.rate / base.rate * 100.0
    );

    // 3. Cold verification of one image by tag, against `cosign verify` of the same image.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry =
        palisade_webhook::images::registry::Registry::new(std::slice::from_ref(&reg.host))?;
    let signer = palisade_webhook::images::verify::Signer::Key(public.clone().into_bytes());
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    let verify_one = |registry: &palisade_webhook::images::registry::Registry,
                      image: &str|
     -> Result<Duration> {
        let t = Instant::now();
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            let (r, digest) = registry.resolve(image, &auth, deadline).await?;
            let layers = registry
                .cosign_layers(&r, &digest, "sig", &auth, deadline)
                .await?;
            palisade_webhook::images::verify::verify_signatures(&layers, &digest, &signer)?;
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(t.elapsed())
    };
    let image = format!("{}/shop/app:v1", reg.host);
    let first = verify_one(&registry, &image)?;
    let per_image = registry.requests();
    // A second image through the same client: what every later cache miss costs.
    let second = verify_one(&registry, &format!("{}/shop/proxy:v1", reg.host))?;
    // A second client's first image: the first figure is a one-time cost of the process (a
    // long-running webhook pays it once), not of each client or registry.
    let registry2 =
        palisade_webhook::images::registry::Registry::new(std::slice::from_ref(&reg.host))?;
    let other_client = verify_one(&registry2, &format!("{}/shop/metrics:v1", reg.host))?;
    let key_file = reg.dir_key("ci");
    let t = Instant::now();
    run_ok(
        std::process::Command::new(opts.bin_dir.join("cosign"))
            .args(["verify", "--key"])
            .arg(&key_file)
            .args([
                "--insecure-ignore-tlog=true",
                "--allow-http-registry",
                &image,
            ]),
    )?;
    let cosign = t.elapsed();
    println!(
        "cold verification of one signed image by tag (loopback registry, {per_image} registry requests):"
    );
    println!(
        "  palisade: first image of the process {:.1} ms, next image {:.1} ms, first image of a second client {:.1} ms; cosign verify {:.1} ms; ratio cosign/palisade {:.1}x (process's first), {:.1}x (next)",
        first.as_secs_f64() * 1e3,
        second.as_secs_f64() * 1e3,
        other_client.as_secs_f64() * 1e3,
        cosign.as_secs_f64() * 1e3,
        cosign.as_secs_f64() / first.as_secs_f64(),
        cosign.as_secs_f64() / second.as_secs_f64()
    );

    let rss = std::fs::read_to_string(format!("/proc/{}/status", webhook.pid()))?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    println!("webhook peak RSS: {rss} (goal < 64 MiB)");
    Ok(())
}
