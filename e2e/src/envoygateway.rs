//! Envoy Gateway's controller (`envoy-gateway-e2e`, built by `e2e/toolchain/build.sh
//! envoygateway` from the `github.com/envoyproxy/gateway` module, the version of its CRDs) against
//! the local control plane: its Kubernetes provider watches Gateway API objects and Envoy
//! Gateway's policies, its translator writes their status (`Accepted`, `Overridden`, ...) as it
//! would in a cluster, and its xDS server holds the configuration it would send each gateway's
//! Envoy. No Envoy proxy is deployed.
//!
//! It runs out of cluster, as its developers run it: a kubeconfig, an `EnvoyGateway`
//! configuration file, and an xDS serving certificate from the control plane's CA; every listener
//! is on loopback.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{ControlPlane, controlplane::free_port, pki::issue_serving_cert, spawn_logged};

/// The GatewayClass the controller accepts (the examples' `gatewayClassName`).
pub const GATEWAY_CLASS: &str = "envoy-gateway";
/// Envoy Gateway's controller name.
pub const CONTROLLER_NAME: &str = "gateway.envoyproxy.io/gatewayclass-controller";
/// The namespace the controller runs in (where it would deploy Envoy).
pub const NAMESPACE: &str = "envoy-gateway-system";

/// How Envoy Gateway is configured for rate limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimits {
    /// The global rate-limit service is configured (a Redis backend), so `Global` limits are
    /// accepted.
    Global,
    /// No rate-limit service: Envoy Gateway refuses `Global` limits, as in an install that
    /// never enabled them.
    LocalOnly,
}

/// A running Envoy Gateway controller. Stops on drop.
pub struct EnvoyGateway {
    child: Child,
    bin: PathBuf,
    /// The controller's log.
    pub log: PathBuf,
    /// The xDS server's address (`127.0.0.1:<port>`, mutual TLS with the control plane's CA).
    pub xds: String,
}

impl EnvoyGateway {
    /// Starts the controller against `cp`, creates the GatewayClass it controls, and waits until
    /// the controller has accepted that class (so it is watching and writing status).
    pub fn start(cp: &ControlPlane, bin_dir: &Path, rate_limits: RateLimits) -> Result<Self> {
        Self::start_with_qps(cp, bin_dir, rate_limits, None)
    }

    /// [`Self::start`], with the controller's Kubernetes client allowed `qps` requests a second
    /// (burst twice that) instead of Envoy Gateway's default of 50 (burst 100), which paces its
    /// status writes.
    pub fn start_with_qps(
        cp: &ControlPlane,
        bin_dir: &Path,
        rate_limits: RateLimits,
        qps: Option<u32>,
    ) -> Result<Self> {
        let bin = bin_dir.join("envoy-gateway-e2e");
        if !bin.exists() {
            bail!(
                "envoy-gateway-e2e not found in {}: build it with e2e/toolchain/build.sh envoygateway",
                bin_dir.display()
            );
        }
        let port = free_port()?;
        let dir = cp.work_dir.join(format!("envoy-gateway-{port}"));
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = issue_serving_cert(
            &cp.pki.ca_key,
            &["envoy-gateway", "envoy-gateway.envoy-gateway-system.svc"],
        )?;
        std::fs::write(dir.join("tls.crt"), cert)?;
        std::fs::write(dir.join("tls.key"), key)?;
        std::fs::copy(&cp.pki.ca_cert, dir.join("ca.crt"))?;
        let rate_limit = match rate_limits {
            RateLimits::Global => {
                "rateLimit:\n  backend:\n    type: Redis\n    redis:\n      url: redis.redis-system.svc.cluster.local:6379\n"
            }
            RateLimits::LocalOnly => "",
        };
        std::fs::write(
            dir.join("envoy-gateway.yaml"),
            format!(
                "apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyGateway
gateway:
  controllerName: {CONTROLLER_NAME}
provider:
  type: Kubernetes
  kubernetes:
    leaderElection:
      disable: true
{client}    proxyTopologyInjector:
      disabled: true
logging:
  level:
    default: info
{rate_limit}",
                client = qps.map_or_else(String::new, |q| format!(
                    "    client:\n      rateLimit:\n        qps: {q}\n        burst: {}\n",
                    2 * q
                )),
            ),
        )?;
        let _ = crate::run(cp.kubectl().args(["create", "namespace", NAMESPACE]));
        let log = dir.join("envoy-gateway.log");
        let child = spawn_logged(
            Command::new(&bin)
                .arg("--config")
                .arg(dir.join("envoy-gateway.yaml"))
                .arg("--tls-dir")
                .arg(&dir)
                .args(["--xds-port", &port.to_string()])
                .env("KUBECONFIG", &cp.kubeconfig)
                .env("ENVOY_GATEWAY_NAMESPACE", NAMESPACE),
            &log,
        )?;
        let mut eg = EnvoyGateway {
            child,
            bin: bin.clone(),
            log,
            xds: format!("127.0.0.1:{port}"),
        };
        let class = format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: {GATEWAY_CLASS}
spec:
  controllerName: {CONTROLLER_NAME}
"
        );
        let file = dir.join("gatewayclass.yaml");
        std::fs::write(&file, class)?;
        crate::run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        eg.wait_class_accepted(cp, Duration::from_mins(2))?;
        Ok(eg)
    }

    fn wait_class_accepted(&mut self, cp: &ControlPlane, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = crate::run(cp.kubectl().args([
                "get",
                "gatewayclass",
                GATEWAY_CLASS,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status}",
            ]))?;
            if String::from_utf8_lossy(&out.stdout).trim() == "True" {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("Envoy Gateway exited ({status}): {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy Gateway did not accept GatewayClass {GATEWAY_CLASS} within {timeout:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The listeners and routes Envoy Gateway's xDS server holds for the Gateway
    /// `namespace/name`, as its Envoy would receive them (`{"listeners": [...], "routes": [...]}`,
    /// Envoy's messages in protobuf JSON). The client authenticates with the control plane's
    /// admin certificate, issued by the CA the server trusts.
    pub fn xds_dump(&self, cp: &ControlPlane, namespace: &str, name: &str) -> Result<Value> {
        let out = crate::run(
            Command::new(&self.bin)
                .args([
                    "dump",
                    "--xds",
                    &self.xds,
                    "--cluster",
                    &format!("{namespace}/{name}"),
                ])
                .arg("--cert")
                .arg(&cp.pki.admin_cert)
                .arg("--key")
                .arg(&cp.pki.admin_key)
                .arg("--ca")
                .arg(&cp.pki.ca_cert),
        )?;
        if !out.status.success() {
            bail!(
                "xDS dump for {namespace}/{name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The controller's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The controller's resident set size (KiB), from `/proc`.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The last lines of the controller's log.
    pub fn log_tail(&self) -> String {
        crate::tail_lines(&self.log, 40)
    }
}

impl Drop for EnvoyGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token bucket of Envoy's local rate limit filter: `max_tokens` requests, refilled every
/// `fill_interval` (`"60s"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// `max_tokens`.
    pub max_tokens: u64,
    /// `tokens_per_fill`.
    pub tokens_per_fill: u64,
    /// `fill_interval`, as protobuf JSON writes a duration.
    pub fill_interval: String,
}

impl Bucket {
    fn from(v: &Value) -> Option<Bucket> {
        let num = |x: &Value| x.as_u64().or_else(|| x.as_str()?.parse().ok());
        Some(Bucket {
            max_tokens: num(&v["maxTokens"])?,
            tokens_per_fill: v.get("tokensPerFill").map_or(Some(1), num)?,
            fill_interval: v["fillInterval"].as_str()?.to_owned(),
        })
    }
}

/// The local rate limit of one route, as Envoy's `envoy.filters.http.local_ratelimit` per-route
/// configuration says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalLimit {
    /// The route's name (Envoy Gateway's `httproute/<ns>/<name>/rule/<i>/match/<j>/...`).
    pub route: String,
    /// The default bucket (requests no descriptor matches).
    pub default: Option<Bucket>,
    /// Each descriptor: its entries (`key=value`) and its bucket.
    pub descriptors: Vec<(Vec<String>, Bucket)>,
}

impl LocalLimit {
    /// What Envoy refuses in this configuration, as its local rate limiter does when it loads it
    /// (`duplicate descriptor in the local rate descriptor`): the route's whole configuration
    /// is then rejected.
    pub fn envoy_refuses(&self) -> Option<String> {
        let mut seen = std::collections::BTreeSet::new();
        for (entries, _) in &self.descriptors {
            if !seen.insert(entries) {
                return Some(format!(
                    "duplicate descriptor in the local rate descriptor: {}",
                    entries.join(", ")
                ));
            }
        }
        None
    }
}

/// Every route of every virtual host in an xDS dump's route configurations.
fn all_routes(dump: &Value) -> impl Iterator<Item = &Value> {
    dump["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["virtualHosts"].as_array())
        .flatten()
        .filter_map(|vh| vh["routes"].as_array())
        .flatten()
}

/// A configured descriptor's entries, `(key, value)` (an empty value takes every value).
fn descriptor_entries(d: &Value) -> Option<Vec<(&str, &str)>> {
    Some(
        d["entries"]
            .as_array()?
            .iter()
            .map(|e| {
                (
                    e["key"].as_str().unwrap_or_default(),
                    e["value"].as_str().unwrap_or_default(),
                )
            })
            .collect(),
    )
}

/// Every route's local rate limit in an xDS dump ([`EnvoyGateway::xds_dump`]).
pub fn local_rate_limits(dump: &Value) -> Vec<LocalLimit> {
    let mut out = Vec::new();
    for route in all_routes(dump) {
        let cfg = &route["typedPerFilterConfig"]["envoy.filters.http.local_ratelimit"];
        if cfg.is_null() {
            continue;
        }
        let descriptors = cfg["descriptors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| {
                let entries = descriptor_entries(d)?
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                Some((entries, Bucket::from(&d["tokenBucket"])?))
            })
            .collect();
        out.push(LocalLimit {
            route: route["name"].as_str().unwrap_or_default().to_owned(),
            default: Bucket::from(&cfg["tokenBucket"]),
            descriptors,
        });
    }
    out
}

/// A request as Envoy's local rate limit filter on a Gateway's listener sees it.
#[derive(Clone, Debug)]
pub struct RateRequest {
    /// `:method`.
    pub method: String,
    /// `:path`, with its query string.
    pub path: String,
    /// Other headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The client's address.
    pub client: std::net::IpAddr,
}

impl RateRequest {
    /// A header's value (`:method` and `:path` included).
    pub fn header(&self, name: &str) -> Option<&str> {
        match name {
            ":method" => Some(&self.method),
            ":path" => Some(&self.path),
            _ => self
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str()),
        }
    }
}

/// The route of the Gateway's configuration that takes `req`, as Envoy picks it: the first whose
/// path match holds for the path without its query string (`prefix`, `pathSeparatedPrefix`,
/// `path`, `safeRegex`; any other match is an error, never a guess).
fn route_for<'a>(dump: &'a Value, req: &RateRequest) -> Result<Option<&'a Value>> {
    let path = req.path.split('?').next().unwrap_or_default();
    for route in all_routes(dump) {
        let m = &route["match"];
        for key in m.as_object().into_iter().flatten().map(|(k, _)| k.as_str()) {
            if !matches!(key, "prefix" | "pathSeparatedPrefix" | "path" | "safeRegex") {
                bail!("route match {key} is not modelled");
            }
        }
        let hit = if let Some(p) = m["prefix"].as_str() {
            path.starts_with(p)
        } else if let Some(p) = m["pathSeparatedPrefix"].as_str() {
            path == p || path.starts_with(&format!("{p}/"))
        } else if let Some(p) = m["path"].as_str() {
            path == p
        } else if !m["safeRegex"].is_null() {
            crate::envoy::string_match(&serde_json::json!({"safeRegex": m["safeRegex"]}), path)?
        } else {
            false
        };
        if hit {
            return Ok(Some(route));
        }
    }
    Ok(None)
}

/// The descriptor one `rate_limits` entry produces for `req`: `None` when an action produces no
/// entry (Envoy then sends no descriptor for that entry).
fn descriptor(limit: &Value, req: &RateRequest) -> Result<Option<Vec<(String, String)>>> {
    let mut entries = Vec::new();
    for action in limit["actions"].as_array().into_iter().flatten() {
        let (kind, a) = action
            .as_object()
            .and_then(|o| o.iter().next())
            .context("an empty rate limit action")?;
        let entry = match kind.as_str() {
            "genericKey" => Some((
                a["descriptorKey"]
                    .as_str()
                    .unwrap_or("generic_key")
                    .to_owned(),
                a["descriptorValue"].as_str().unwrap_or_default().to_owned(),
            )),
            "headerValueMatch" => {
                let mut all = true;
                for h in a["headers"].as_array().into_iter().flatten() {
                    let name = h["name"].as_str().context("header matcher name")?;
                    let value = req.header(name);
                    let mut hit = match (&h["stringMatch"], &h["presentMatch"]) {
                        (m, _) if !m.is_null() => value
                            .map(|v| crate::envoy::string_match(m, v))
                            .transpose()?
                            .unwrap_or(false),
                        (_, p) if !p.is_null() => value.is_some() == (p.as_bool() == Some(true)),
                        _ => bail!("header matcher {h} is not modelled"),
                    };
                    if h["invertMatch"].as_bool() == Some(true) {
                        hit = !hit;
                    }
                    all &= hit;
                }
                let expect = a["expectMatch"].as_bool().unwrap_or(true);
                (all == expect).then(|| {
                    (
                        a["descriptorKey"]
                            .as_str()
                            .unwrap_or("header_match")
                            .to_owned(),
                        a["descriptorValue"].as_str().unwrap_or_default().to_owned(),
                    )
                })
            }
            "requestHeaders" => {
                let name = a["headerName"].as_str().context("headerName")?;
                match req.header(name) {
                    Some(v) => Some((
                        a["descriptorKey"].as_str().unwrap_or(name).to_owned(),
                        v.to_owned(),
                    )),
                    None if a["skipIfAbsent"].as_bool() == Some(true) => continue,
                    None => None,
                }
            }
            "remoteAddress" => Some(("remote_address".to_owned(), req.client.to_string())),
            "maskedRemoteAddress" => {
                let (net, len) = match req.client {
                    std::net::IpAddr::V4(ip) => {
                        let len = a["v4PrefixMaskLen"].as_u64().unwrap_or(32).min(32) as u32;
                        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                        (
                            std::net::Ipv4Addr::from(u32::from(ip) & mask).to_string(),
                            len,
                        )
                    }
                    std::net::IpAddr::V6(ip) => {
                        let len = a["v6PrefixMaskLen"].as_u64().unwrap_or(128).min(128) as u32;
                        let mask = if len == 0 {
                            0
                        } else {
                            u128::MAX << (128 - len)
                        };
                        (
                            std::net::Ipv6Addr::from(u128::from(ip) & mask).to_string(),
                            len,
                        )
                    }
                };
                Some((
                    a["descriptorKey"]
                        .as_str()
                        .unwrap_or("masked_remote_address")
                        .to_owned(),
                    format!("{net}/{len}"),
                ))
            }
            other => bail!("rate limit action {other} is not modelled"),
        };
        match entry {
            Some(e) => entries.push(e),
            None => return Ok(None),
        }
    }
    Ok(Some(entries))
}

/// The token buckets `req` takes a token from, as Envoy's local rate limit filter decides with
/// the configuration Envoy Gateway sent (`dump`, [`EnvoyGateway::xds_dump`]): on the route that
/// takes the request, the descriptors its `rate_limits` produce that equal a configured
/// descriptor (an entry configured without a value takes every value, each value its own bucket);
/// the default bucket when none does (Envoy Gateway sets `alwaysConsumeDefaultTokenBucket: false`,
/// so a matched request takes nothing from it). Each bucket is named by its descriptor with the
/// request's values: two requests share a bucket exactly when the names are equal. `None` when no
/// route takes the request or its route has no local rate limit.
pub fn local_buckets(dump: &Value, req: &RateRequest) -> Result<Option<Vec<(String, Bucket)>>> {
    let Some(route) = route_for(dump, req)? else {
        return Ok(None);
    };
    let cfg = &route["typedPerFilterConfig"]["envoy.filters.http.local_ratelimit"];
    if cfg.is_null() {
        return Ok(None);
    }
    if cfg["alwaysConsumeDefaultTokenBucket"].as_bool() == Some(true) {
        bail!("alwaysConsumeDefaultTokenBucket: true is not modelled");
    }
    let route_name = route["name"].as_str().unwrap_or_default();
    let mut taken = Vec::new();
    let produced: Vec<Vec<(String, String)>> = cfg["rateLimits"]
        .as_array()
        .or_else(|| route["route"]["rateLimits"].as_array())
        .into_iter()
        .flatten()
        .map(|l| descriptor(l, req))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    for d in cfg["descriptors"].as_array().into_iter().flatten() {
        let entries = descriptor_entries(d).unwrap_or_default();
        for p in &produced {
            let equal = p.len() == entries.len()
                && p.iter()
                    .zip(&entries)
                    .all(|((pk, pv), (k, v))| pk == k && (v.is_empty() || pv == v));
            if equal {
                let name = p
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let bucket = Bucket::from(&d["tokenBucket"]).context("descriptor token bucket")?;
                taken.push((format!("{route_name}[{name}]"), bucket));
            }
        }
    }
    if taken.is_empty() {
        let bucket = Bucket::from(&cfg["tokenBucket"]).context("default token bucket")?;
        taken.push((format!("{route_name}[default]"), bucket));
    }
    taken.sort_by(|a, b| a.0.cmp(&b.0));
    taken.dedup();
    Ok(Some(taken))
}
