//! What the benchmarks share: the sizes they run at, the control plane they start, the watch
//! they read convergence from, and the HTTP/1.1-over-TLS exchange their load generators make with
//! a webhook.

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
/// deletion to compete with what is measured), every CRD installed; its directory is kept when
/// `PALISADE_BENCH_KEEP` is set.
pub fn control_plane() -> Result<(Options, ControlPlane)> {
    let mut opts = Options::new();
    opts.controller_manager = false;
    // Kept (logs, audit log) for a look after the run when asked for.
    opts.keep_dir = std::env::var_os("PALISADE_BENCH_KEEP").is_some();
    let cp = ControlPlane::start(&opts)?;
    if opts.keep_dir {
        eprintln!("control plane directory (kept): {}", cp.work_dir.display());
    }
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

/// CPU seconds (user + system) of process `pid` so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// The machine's CPU time so far, in ticks: (all, idle), idle counting I/O wait too
/// (`/proc/stat`'s first line).
pub fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok((fields.iter().sum(), idle))
}

/// The share of the machine's CPU left idle between two [`machine_ticks`] readings.
#[allow(clippy::cast_precision_loss)]
pub fn idle_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    let all = after.0.saturating_sub(before.0);
    let idle = after.1.saturating_sub(before.1);
    if all == 0 {
        0.0
    } else {
        idle as f64 / all as f64
    }
}

/// The requests the API server has served so far, by verb and resource
/// (`apiserver_request_total`, summed over response codes): `APPLY palisade.dev/authpolicies/status`.
pub fn api_requests(cp: &ControlPlane) -> Result<std::collections::BTreeMap<String, f64>> {
    let metrics = crate::run_ok(cp.kubectl().args(["get", "--raw", "/metrics"]))?;
    let mut counts = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map_or("", |v| v.trim_end_matches('"'))
        };
        let mut key = format!("{} {}/{}", label("verb"), label("group"), label("resource"));
        if !label("subresource").is_empty() {
            key = format!("{key}/{}", label("subresource"));
        }
        *counts.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(counts)
}

/// The requests of `after` not yet in `before` (see [`api_requests`]), largest first, as
/// `count verb resource` lines; counts below `min` are left out.
pub fn requests_between(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
    min: f64,
) -> Vec<String> {
    let mut diff: Vec<(f64, &String)> = after
        .iter()
        .map(|(k, v)| (v - before.get(k).copied().unwrap_or(0.0), k))
        .filter(|(d, _)| *d >= min)
        .collect();
    diff.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    diff.into_iter()
        .map(|(d, k)| format!("{d:.0} {k}"))
        .collect()
}

/// The objects of one kind in one namespace, kept current by one watch. A bench waiting for N
/// objects to converge reads them here: listing all N again every few hundred milliseconds
/// would load the API server whose throughput it measures (at N = 5,000 about ten thousand
/// objects a second to serialize), and load it only while the operator runs.
pub struct Watched<K: kube::Resource<DynamicType = ()> + 'static> {
    store: kube::runtime::reflector::Store<K>,
    namespace: String,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Watched<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Starts the watch and returns once its first list is in.
    pub async fn start(client: &kube::Client, ns: &str) -> Result<Self> {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, reflector, watcher};
        let (store, writer) = reflector::store();
        let api = kube::Api::<K>::namespaced(client.clone(), ns);
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        let task = tokio::spawn(stream.for_each(|_| std::future::ready(())));
        tokio::time::timeout(std::time::Duration::from_mins(2), store.wait_until_ready())
            .await
            .context("the watch's first list took over 2 minutes")??;
        Ok(Self {
            store,
            namespace: ns.to_owned(),
            task,
        })
    }

    /// The object named `name`, as the watch last saw it.
    pub fn get(&self, name: &str) -> Option<Arc<K>> {
        self.store
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(&self.namespace))
    }

    /// How many of the objects `pred` holds for.
    pub fn count(&self, pred: impl Fn(&K) -> bool) -> usize {
        self.store.state().iter().filter(|o| pred(o)).count()
    }
}

impl<K: kube::Resource<DynamicType = ()> + 'static> Drop for Watched<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
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
