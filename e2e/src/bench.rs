//! What the benchmarks share: the sizes they run at, the control plane they start, and the
//! HTTP/1.1-over-TLS exchange their load generators make with a webhook.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{ControlPlane, Options};

/// The sizes in `PALISADE_BENCH_N` (a comma-separated list), or `default`.
pub fn sizes(default: &str) -> Result<Vec<usize>> {
    std::env::var("PALISADE_BENCH_N")
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .context("PALISADE_BENCH_N is a list of numbers")
        })
        .collect()
}

/// A control plane without the controller manager (no garbage collection or namespace
/// deletion to compete with what is measured), every CRD installed.
pub fn control_plane() -> Result<(Options, ControlPlane)> {
    let mut opts = Options::new();
    opts.controller_manager = false;
    let cp = ControlPlane::start(&opts)?;
    cp.install_crds(&opts.bin_dir)?;
    Ok((opts, cp))
}

/// Runs `bench` for each size in `PALISADE_BENCH_N` (or `default`) on one [`control_plane`].
pub fn each_size(
    default: &str,
    bench: &impl AsyncFn(&ControlPlane, usize) -> Result<()>,
) -> Result<()> {
    let sizes = sizes(default)?;
    let (_, cp) = control_plane()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    for n in sizes {
        rt.block_on(bench(&cp, n))?;
    }
    Ok(())
}

/// A TLS client trusting the CA certificates in `ca_pem`.
pub fn tls_connector(ca_pem: &[u8]) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `POST path` with a JSON `body`, as bytes to write on a keep-alive connection.
pub fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Writes `request` on `stream` and reads one response: its body, when the status is 200.
/// `buf` is reused between calls (and grows to the largest response).
pub async fn exchange<S>(stream: &mut S, request: &[u8], buf: &mut Vec<u8>) -> Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request).await?;
    if buf.len() < 4096 {
        buf.resize(64 * 1024, 0);
    }
    let mut have = 0;
    let (header_end, length) = loop {
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[have..]).await?;
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
    if buf.len() < header_end + length {
        buf.resize(header_end + length, 0);
    }
    while have < header_end + length {
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            bail!("connection closed mid-body");
        }
        have += n;
    }
    Ok(buf[header_end..header_end + length].to_vec())
}
