//! Webhook decision benchmark: AdmissionReviews for a 3-container pod posted over TLS with
//! keep-alive to the release `palisade-webhook`, from a load generator on the same machine.
//! Prints decisions/s, p50/p99/max latency and the webhook's peak RSS.
//!
//! Run: `cargo build --release -p palisade-webhook && cargo bench -p palisade-e2e --bench webhook`
//! (`PALISADE_BENCH_SECONDS`, default 10; `PALISADE_BENCH_CONNECTIONS`, default 4).

#![allow(clippy::expect_used, missing_docs)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use palisade_e2e::{ControlPlane, Options, run_ok, webhook::WebhookProcess};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn review_body() -> String {
    let containers: Vec<_> = ["app", "proxy", "metrics"]
        .iter()
        .map(|n| {
            json!({"name": n, "image": format!("registry.example.com/shop/{n}:1"),
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
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < until {
        let start = Instant::now();
        tls.write_all(&request).await?;
        // Read one response: headers, then Content-Length bytes of body.
        let mut have = 0;
        let (header_end, length) = loop {
            let n = tls.read(&mut buf[have..]).await?;
            if n == 0 {
                bail!("connection closed");
            }
            have += n;
            if let Some(pos) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") {
                    bail!(
                        "unexpected response: {}",
                        head.lines().next().unwrap_or_default()
                    );
                }
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .context("no content-length")?;
                break (pos + 4, len);
            }
        };
        while have < header_end + length {
            let n = tls.read(&mut buf[have..]).await?;
            if n == 0 {
                bail!("connection closed mid-body");
            }
            have += n;
        }
        if !buf[header_end..header_end + length]
            .windows(14)
            .any(|w| w == b"\"allowed\":true")
        {
            bail!("the benchmark pod was not allowed");
        }
        latencies.push(start.elapsed());
    }
    Ok(latencies)
}

fn main() -> Result<()> {
    let seconds: u64 = std::env::var("PALISADE_BENCH_SECONDS").map_or(Ok(10), |s| s.parse())?;
    let connections: usize =
        std::env::var("PALISADE_BENCH_CONNECTIONS").map_or(Ok(4), |s| s.parse())?;
    let mut opts = Options::new()?;
    opts.controller_manager = false;
    let cp = ControlPlane::start(&opts)?;
    // The webhook is ready once its ImagePolicy cache is synced, which needs the CRD.
    cp.install_crds(&opts.bin_dir)?;
    run_ok(cp.kubectl().args(["create", "namespace", "shop"]))?;
    run_ok(
        cp.kubectl()
            .args(["label", "namespace", "shop", "istio-injection=enabled"]),
    )?;
    let webhook = WebhookProcess::start(&cp, "bench", "")?;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&cp.pki.ca_cert)? {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let body = review_body();
    let request = Arc::new(
        format!(
            "POST /validate?timeout=10s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // Warm up, then measure.
    rt.block_on(worker(
        connector.clone(),
        webhook.port,
        Arc::clone(&request),
        Instant::now() + Duration::from_secs(1),
    ))?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut all: Vec<Duration> = rt.block_on(async {
        let tasks: Vec<_> = (0..connections)
            .map(|_| {
                tokio::spawn(worker(
                    connector.clone(),
                    webhook.port,
                    Arc::clone(&request),
                    until,
                ))
            })
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
    let rss = std::fs::read_to_string(format!("/proc/{}/status", webhook.pid()))?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    #[allow(clippy::cast_precision_loss)]
    let rate = all.len() as f64 / elapsed.as_secs_f64();
    println!(
        "webhook decisions, 3-container pod, TLS keep-alive, {connections} connections, {seconds} s"
    );
    println!("  decisions: {} ({rate:.0}/s; goal >= 10000/s)", all.len());
    println!(
        "  latency: p50 {:.3} ms, p99 {:.3} ms (goal < 2 ms), max {:.3} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
    println!("  webhook peak RSS: {rss} (goal < 64 MiB)");
    Ok(())
}
