//! Kuadrant's breaking scale (kuadrant-operator#1085: a Gateway with 63 listeners took 30
//! minutes to settle, the whole topology recomputed on every event), against a real control
//! plane with the real Gateway API, Istio and Envoy Gateway CRDs:
//!
//! 1. the release operator runs; a Gateway with 64 listeners, N HTTPRoutes spread over them, a
//!    RateLimitPolicy on each route and one on the Gateway, and N AuthPolicies are applied
//!    (16 requests in flight), and the time from the first apply to every policy `Ready` is
//!    taken;
//! 2. with all of them in place, one RateLimitPolicy and then one AuthPolicy are changed: the
//!    time until the change is reflected (its generated object carries it and its `Ready`
//!    condition names the new generation) and the number of reconciles the operator ran for it
//!    (it must not grow with N);
//! 3. the operator's peak RSS.
//!
//! Envoy Gateway's real controller runs beside it (`e2e/toolchain/build.sh envoygateway`): a
//! RateLimitPolicy is `Ready` only once Envoy Gateway accepted its BackendTrafficPolicy, so the
//! times include Envoy Gateway's own translation and status writes.
//!
//! Run: `cargo build --release -p palisade-operator && cargo bench -p palisade-e2e --bench scale`
//! (`PALISADE_BENCH_N=250,1000` to choose the sizes; default 1000; `PALISADE_BENCH_EG_QPS=500` to
//! let Envoy Gateway's Kubernetes client make more than its default 50 requests a second).

#![allow(clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, stream};
use kube::{
    Api, Client, Config,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use palisade_api::{AuthPolicy, RateLimitPolicy, common::HasCommonStatus};
use palisade_e2e::{
    ControlPlane,
    bench::{Watched, api_requests, cpu_seconds, requests_between},
    controlplane::default_bin_dir,
    envoygateway::{EnvoyGateway, RateLimits},
    operator::OperatorProcess,
    run_ok,
};
use serde_json::{Value, json};

const IN_FLIGHT: usize = 16;
const LISTENERS: usize = 64;

async fn client(cp: &ControlPlane) -> Result<Client> {
    let kc = Kubeconfig::read_from(&cp.kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn gateway(ns: &str) -> Value {
    let listeners: Vec<Value> = (0..LISTENERS)
        .map(|l| {
            json!({"name": format!("l{l}"), "protocol": "HTTP", "port": 80,
                   "hostname": format!("l{l}.shop.example")})
        })
        .collect();
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": ns},
        "spec": {"gatewayClassName": "envoy-gateway", "listeners": listeners},
    })
}

fn route(ns: &str, i: usize) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": format!("r{i}"), "namespace": ns},
        "spec": {
            "parentRefs": [{"name": "edge", "sectionName": format!("l{}", i % LISTENERS)}],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": format!("/api/r{i}")}}],
                "backendRefs": [{"name": format!("svc-{i}"), "port": 8080}],
            }],
        },
    })
}

fn rate_limit(ns: &str, name: &str, kind: &str, target: &str, requests: u32) -> Value {
    json!({
        "apiVersion": "palisade.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "targetRef": {"group": "gateway.networking.k8s.io", "kind": kind, "name": target},
            "backend": "EnvoyGateway",
            "limits": [{"name": "per-client", "requests": requests, "per": "1m",
                        "key": {"clientIP": {}}}],
        },
    })
}

fn auth(ns: &str, i: usize, methods: &[&str]) -> Value {
    json!({
        "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
        "metadata": {"name": format!("svc-{i}"), "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": format!("svc-{i}")}},
            "rules": [{
                "from": [{"serviceAccount": {"name": format!("caller-{i}")}}],
                "to": [{"methods": methods, "paths": [format!("/api/r{i}/*")], "ports": [8080]}],
            }],
        },
    })
}

/// Server-side applies `objects` (16 in flight) as the bench's field manager.
async fn apply_all(client: &Client, ns: &str, objects: Vec<(ApiResource, Value)>) -> Result<()> {
    let results: Vec<Result<()>> = stream::iter(objects)
        .map(|(ar, o)| {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
            async move {
                let name = o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                api.patch(
                    &name,
                    &PatchParams::apply("bench-scale").force(),
                    &Patch::Apply(&o),
                )
                .await
                .with_context(|| format!("applying {name}"))?;
                Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    results.into_iter().collect()
}

/// RateLimitPolicies whose objects the operator has applied for their current generation (`Ready`,
/// or waiting only for Envoy Gateway's verdict).
fn operator_applied(rl: &Watched<RateLimitPolicy>) -> usize {
    rl.count(|p| {
        p.common_status().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == "Ready"
                    && (c.status == "True" || c.reason == "AwaitingGateway")
                    && c.observed_generation == p.metadata.generation
            })
        })
    })
}

/// Policies of each kind `Ready` for their current generation.
fn ready(rl: &Watched<RateLimitPolicy>, ap: &Watched<AuthPolicy>) -> (usize, usize) {
    (
        rl.count(|p| p.is_ready(p.metadata.generation)),
        ap.count(|p| p.is_ready(p.metadata.generation)),
    )
}

/// Applies `object` (a changed policy) and waits until `reflected` sees it in the cluster;
/// returns the time and the reconciles the operator ran meanwhile and in the 2 s after.
async fn one_change<F, Fut>(
    client: &Client,
    ns: &str,
    op: &OperatorProcess,
    object: (ApiResource, Value),
    mut reflected: F,
) -> Result<(Duration, f64)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let before = op.counter("palisade_operator_reconciles_total")?;
    let started = Instant::now();
    apply_all(client, ns, vec![object]).await?;
    loop {
        if reflected().await? {
            break;
        }
        if started.elapsed() > Duration::from_mins(2) {
            bail!(
                "the change was not reflected in 2 minutes: {}",
                op.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((
        took,
        op.counter("palisade_operator_reconciles_total")? - before,
    ))
}

#[allow(clippy::too_many_lines)]
async fn bench(cp: &ControlPlane, n: usize) -> Result<()> {
    let client = client(cp).await?;
    let ns = format!("scale-{n}");
    run_ok(cp.kubectl().args(["create", "namespace", &ns]))?;
    let [gw, hr, rl, ap, btp] = [
        ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
        ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
        (
            "palisade.dev",
            "v1alpha1",
            "RateLimitPolicy",
            "ratelimitpolicies",
        ),
        ("palisade.dev", "v1alpha1", "AuthPolicy", "authpolicies"),
        (
            "gateway.envoyproxy.io",
            "v1alpha1",
            "BackendTrafficPolicy",
            "backendtrafficpolicies",
        ),
    ]
    .map(|(group, version, kind, plural)| resource(group, version, kind, plural));
    let qps = std::env::var("PALISADE_BENCH_EG_QPS")
        .ok()
        .and_then(|q| q.parse().ok());
    let eg = EnvoyGateway::start_with_qps(cp, &default_bin_dir(), RateLimits::Global, qps)?;
    let op = OperatorProcess::start(cp, &format!("scale-{n}"), "")?;
    let rss_idle = op.peak_rss_kib().unwrap_or(0);

    let mut objects = vec![(gw.clone(), gateway(&ns))];
    objects.extend((0..n).map(|i| (hr.clone(), route(&ns, i))));
    objects.push((
        rl.clone(),
        rate_limit(&ns, "edge", "Gateway", "edge", 10_000),
    ));
    objects.extend((0..n).map(|i| {
        (
            rl.clone(),
            rate_limit(&ns, &format!("r{i}"), "HTTPRoute", &format!("r{i}"), 100),
        )
    }));
    objects.extend((0..n).map(|i| (ap.clone(), auth(&ns, i, &["GET"]))));
    let count = objects.len();
    // Readiness is read from two watches, not by listing every policy again and again, which
    // would load the API server the operator and Envoy Gateway share.
    let (rl_watch, ap_watch) = (
        Watched::<RateLimitPolicy>::start(&client, &ns).await?,
        Watched::<AuthPolicy>::start(&client, &ns).await?,
    );
    // CPU seconds of each process from the first apply to all Ready: who the cores worked for.
    let cpu = |cp: &ControlPlane| -> Result<[f64; 3]> {
        let control_plane: f64 = cp
            .pids()
            .into_iter()
            .map(cpu_seconds)
            .sum::<Result<f64>>()?;
        Ok([
            cpu_seconds(op.pid())?,
            cpu_seconds(eg.pid())?,
            control_plane,
        ])
    };
    let (cpu_before, requests_before) = (cpu(cp)?, api_requests(cp)?);
    let started = Instant::now();
    apply_all(&client, &ns, objects).await?;
    let applied = started.elapsed();
    let mut peak = 0;
    let mut operator_done = None;
    loop {
        peak = peak.max(op.peak_rss_kib().unwrap_or(0));
        let (r, a) = ready(&rl_watch, &ap_watch);
        if operator_done.is_none() && a == n && operator_applied(&rl_watch) == n + 1 {
            operator_done = Some(started.elapsed());
        }
        if r == n + 1 && a == n {
            break;
        }
        if started.elapsed() > Duration::from_mins(15) {
            bail!(
                "{r} RateLimitPolicies and {a} AuthPolicies Ready after 15 minutes; Envoy Gateway: {}",
                eg.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_ready = started.elapsed();
    let cpu_after = cpu(cp)?;
    let requests = requests_between(&requests_before, &api_requests(cp)?, 20.0);
    peak = peak.max(op.peak_rss_kib().unwrap_or(0));

    // One RateLimitPolicy changed: its BackendTrafficPolicy carries the new limit.
    let name = format!("r{}", n / 2);
    let generated = palisade_operator::translate::ratelimit::candidates(&name)
        .into_iter()
        .find(|c| c.1 == "BackendTrafficPolicy")
        .map(|c| c.2)
        .context("the BackendTrafficPolicy's name")?;
    let btp_api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &btp);
    let (rl_took, rl_reconciles) = one_change(
        &client,
        &ns,
        &op,
        (rl.clone(), rate_limit(&ns, &name, "HTTPRoute", &name, 42)),
        || {
            let (btp_api, rl_watch, generated, name) = (&btp_api, &rl_watch, &generated, &name);
            async move {
                let object = btp_api.get(generated).await?;
                let carried = serde_json::to_string(&object.data)?.contains("\"requests\":42");
                let policy = rl_watch.get(name).context("the changed policy")?;
                Ok(carried && policy.is_ready(policy.metadata.generation))
            }
        },
    )
    .await?;

    // One AuthPolicy changed: its ALLOW AuthorizationPolicy carries the new method.
    let i = n / 2;
    let (ap_took, ap_reconciles) = one_change(
        &client,
        &ns,
        &op,
        (ap.clone(), auth(&ns, i, &["GET", "POST"])),
        || {
            let (ap_watch, name) = (&ap_watch, format!("svc-{i}"));
            async move {
                let policy = ap_watch.get(&name).context("the changed policy")?;
                Ok(policy.is_ready(policy.metadata.generation)
                    && policy.metadata.generation == Some(2))
            }
        },
    )
    .await?;
    let all_reconciles = op.counter("palisade_operator_reconciles_total")?;
    peak = peak.max(op.peak_rss_kib().unwrap_or(0));
    let mib = |kib: u64| f64::from(u32::try_from(kib).unwrap_or(u32::MAX)) / 1024.0;

    println!(
        "scale, N = {n}: a Gateway with {LISTENERS} listeners, {n} HTTPRoutes, {} RateLimitPolicies ({n} on routes, 1 on the Gateway), {n} AuthPolicies; Envoy Gateway's client at {} requests/s",
        n + 1,
        qps.map_or_else(|| "its default 50".to_owned(), |q: u32| q.to_string())
    );
    println!(
        "  applied {count} objects in {:.2} s; the operator's part done (every generated object applied, every status written) {:.2} s after the first apply; every policy Ready (Envoy Gateway's verdicts included) after {:.2} s (goal < 60 s)",
        applied.as_secs_f64(),
        operator_done.unwrap_or(all_ready).as_secs_f64(),
        all_ready.as_secs_f64()
    );
    println!(
        "  CPU seconds from the first apply to all Ready: operator {:.1}, Envoy Gateway {:.1}, etcd and kube-apiserver {:.1} (2 cores: {:.1} available)",
        cpu_after[0] - cpu_before[0],
        cpu_after[1] - cpu_before[1],
        cpu_after[2] - cpu_before[2],
        2.0 * all_ready.as_secs_f64()
    );
    println!(
        "  API server requests meanwhile (20 or more): {}",
        requests.join(", ")
    );
    println!(
        "  one RateLimitPolicy changed: reflected in its BackendTrafficPolicy and Ready in {:.0} ms, {rl_reconciles} reconciles (goal < 1 s; must not grow with N)",
        rl_took.as_secs_f64() * 1000.0
    );
    println!(
        "  one AuthPolicy changed: Ready for its new generation in {:.0} ms, {ap_reconciles} reconciles",
        ap_took.as_secs_f64() * 1000.0
    );
    println!(
        "  operator: {all_reconciles} reconciles in all; peak RSS {:.1} MiB (idle {:.1} MiB); Envoy Gateway's controller RSS {:.1} MiB",
        mib(peak),
        mib(rss_idle),
        mib(eg.rss_kib().unwrap_or(0))
    );
    drop(op);
    drop(eg);
    run_ok(
        cp.kubectl()
            .args(["delete", "namespace", &ns, "--wait=false"]),
    )?;
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    palisade_e2e::bench::each_size("1000", &bench)
}
