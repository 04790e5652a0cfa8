//! Operator convergence benchmark against a real control plane.
//!
//! For each N (default 1000 and 5000; `PALISADE_BENCH_N=200,1000` to choose):
//! 1. N AuthPolicies are created, then the release operator is started and timed until every
//!    policy reports `Ready=True` (from empty: no generated object exists yet);
//! 2. the operator is restarted and, after it has reconciled every policy once, its API write
//!    counter is read (a no-op resync; goal 0);
//! 3. the operator's peak RSS (VmHWM) during convergence is reported (goal < 150 MiB at 5000);
//! 4. with the operator stopped and its objects removed, a minimal client makes exactly the
//!    requests the operator must make for N existing AuthPolicies — a server-side apply of each
//!    generated object, a status write per policy, one Event per policy as Kubernetes' event
//!    recorder sends it — 16 in flight, and the ratio of the two times is printed (goal 1.15×).
//!
//! Run: `cargo build --release -p palisade-operator && cargo bench -p palisade-e2e --bench operator`

#![allow(clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::{StreamExt, stream};
use kube::{
    Api, Client, Config,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use palisade_api::AuthPolicy;
use palisade_e2e::{ControlPlane, operator::OperatorProcess, run_ok};
use palisade_operator::translate::{self, Context as TranslateContext};

const IN_FLIGHT: usize = 16;

fn policy(ns: &str, i: usize) -> AuthPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "palisade.dev/v1alpha1",
        "kind": "AuthPolicy",
        "metadata": {"name": format!("svc-{i}"), "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": format!("svc-{i}")}},
            "rules": [{
                "from": [{"serviceAccount": {"name": format!("caller-{i}")}}],
                "to": [{"methods": ["GET"], "paths": ["/api/*"], "ports": [8080]}],
            }],
        },
    }))
    .expect("valid policy")
}

async fn client(cp: &ControlPlane) -> Result<Client> {
    let kc = Kubeconfig::read_from(&cp.kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The resource name of `kind` (`AuthorizationPolicy` → `authorizationpolicies`).
fn plural_of(kind: &str) -> String {
    let lower = kind.to_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    }
}

/// The minimal client: exactly the requests the operator must make for N AuthPolicies that
/// exist already — a server-side apply of each generated object, one status write per policy
/// (a server-side apply of its status), and one Event per policy, sent as Kubernetes' event
/// recorder sends it (a first Event for an object is created; there is nothing to aggregate) —
/// one policy after another in each of 16 lanes, so 16 requests are in flight. Returns the time,
/// the generated objects and the requests made.
async fn baseline(client: &Client, ns: &str, n: usize) -> Result<(Duration, usize, usize)> {
    use kube::{
        Resource as _,
        runtime::events::{Event, EventType, Recorder, Reporter},
    };
    create_policies(client, ns, n).await?;
    let policies: Api<AuthPolicy> = Api::namespaced(client.clone(), ns);
    let listed = policies
        .list(&kube::api::ListParams::default())
        .await?
        .items;
    let ctx = TranslateContext::default();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "bench-baseline".into(),
            instance: None,
        },
    );
    let mut work = Vec::new();
    let mut count = 0;
    for p in &listed {
        let objects = translate::auth::translate(p, &ctx).objects;
        count += objects.len();
        work.push((p, objects));
    }
    let requests = count + 2 * listed.len();
    let started = Instant::now();
    let results: Vec<Result<()>> = stream::iter(work)
        .map(|(p, objects)| {
            let (client, recorder, policies) = (client.clone(), &recorder, &policies);
            async move {
                let name = p.metadata.name.clone().unwrap_or_default();
                let mut generated = Vec::new();
                for o in &objects {
                    let kind = o["kind"].as_str().unwrap_or_default();
                    let ar = resource(o["apiVersion"].as_str().unwrap_or_default(), kind, &plural_of(kind));
                    let object_name = o["metadata"]["name"].as_str().unwrap_or_default();
                    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
                    api.patch(
                        object_name,
                        &PatchParams::apply("bench-baseline").force(),
                        &Patch::Apply(o),
                    )
                    .await?;
                    generated.push(serde_json::json!({
                        "apiVersion": o["apiVersion"], "kind": kind, "name": object_name,
                    }));
                }
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                let condition = |type_: &str, message: String| {
                    serde_json::json!({
                        "type": type_, "status": "True", "reason": type_,
                        "message": message, "observedGeneration": p.metadata.generation,
                        "lastTransitionTime": now,
                    })
                };
                let status = serde_json::json!({
                    "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
                    "status": {
                        "observedGeneration": p.metadata.generation,
                        "conditions": [
                            condition("Accepted", format!("translated into {} Istio objects", objects.len())),
                            condition("Ready", format!("{} Istio objects applied", objects.len())),
                        ],
                        "generated": generated,
                    },
                });
                policies
                    .patch_status(
                        &name,
                        &PatchParams::apply("bench-baseline").force(),
                        &Patch::Apply(&status),
                    )
                    .await?;
                recorder
                    .publish(
                        &Event {
                            type_: EventType::Normal,
                            reason: "Applied".into(),
                            note: Some(format!("applied {} objects", objects.len())),
                            action: "Apply".into(),
                            secondary: None,
                        },
                        &p.object_ref(&()),
                    )
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let took = started.elapsed();
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok((took, count, requests))
}

async fn create_policies(client: &Client, ns: &str, n: usize) -> Result<()> {
    let api: Api<AuthPolicy> = Api::namespaced(client.clone(), ns);
    let results: Vec<Result<(), kube::Error>> = stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let p = policy(ns, i);
            async move { api.create(&PostParams::default(), &p).await.map(|_| ()) }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(())
}

async fn ready_count(client: &Client, ns: &str) -> Result<usize> {
    let api: Api<AuthPolicy> = Api::namespaced(client.clone(), ns);
    // From the API server's watch cache: the poll itself should cost the server little.
    let list = api
        .list(&kube::api::ListParams::default().match_any())
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.common
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .count())
}

async fn bench(cp: &ControlPlane, n: usize) -> Result<()> {
    let client = client(cp).await?;
    for ns in [format!("base-{n}"), format!("op-{n}")] {
        run_ok(cp.kubectl().args(["create", "namespace", &ns]))?;
    }

    let ns = format!("op-{n}");
    create_policies(&client, &ns, n).await?;
    let started = Instant::now();
    let op = OperatorProcess::start(cp, &format!("bench-{n}"), "")?;
    let mut peak = 0;
    loop {
        peak = peak.max(op.peak_rss_kib().unwrap_or(0));
        if ready_count(&client, &ns).await? == n {
            break;
        }
        if started.elapsed() > Duration::from_mins(15) {
            bail!("not converged after 15 minutes: {}", op.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let converged = started.elapsed();
    peak = peak.max(op.peak_rss_kib().unwrap_or(0));
    let writes_converge = op.counter("palisade_operator_api_writes_total")?;
    let (_, metrics) = op.get("/metrics")?;
    let breakdown: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("palisade_operator_api_writes_total")
                || l.starts_with("palisade_operator_reconciles_total")
        })
        .collect();
    drop(op);

    let op = OperatorProcess::start(cp, &format!("bench-{n}-resync"), "")?;
    let resync_started = Instant::now();
    loop {
        let reconciled = op.counter("palisade_operator_reconciles_total")?;
        if reconciled >= f64::from(u32::try_from(n)?) {
            break;
        }
        if resync_started.elapsed() > Duration::from_mins(10) {
            bail!("resync did not finish: {}", op.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let resync = resync_started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resync_writes = op.counter("palisade_operator_api_writes_total")? + 0.0;
    let resync_peak = op.peak_rss_kib().unwrap_or(0);
    drop(op);

    // The minimal client, on an API server holding what it held when the operator started:
    // the operator's policies and generated objects removed (no operator runs now).
    for kind in [
        "authpolicies.palisade.dev",
        "authorizationpolicies.security.istio.io",
        "peerauthentications.security.istio.io",
        "events.events.k8s.io",
    ] {
        run_ok(
            cp.kubectl()
                .args(["delete", kind, "--all", "-n", &ns, "--wait=false"]),
        )?;
    }
    let (base, objects, requests) = baseline(&client, &format!("base-{n}"), n).await?;

    println!("operator convergence, N = {n} AuthPolicies ({objects} generated objects)");
    println!(
        "  baseline: minimal client, the requests the operator must make: SSA of {objects} objects, {n} status writes, {n} Events ({requests} requests, {IN_FLIGHT} in flight): {:.2} s",
        base.as_secs_f64()
    );
    println!(
        "  operator: start to all {n} Ready: {:.2} s ({writes_converge} API writes: applies + status)",
        converged.as_secs_f64()
    );
    println!("  {}", breakdown.join("\n  "));
    println!(
        "  ratio operator / baseline: {:.2}x (goal <= 1.15x)",
        converged.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "  no-op resync after restart: {:.2} s, {resync_writes} API writes (goal 0)",
        resync.as_secs_f64()
    );
    println!(
        "  operator peak RSS: {:.1} MiB converging, {:.1} MiB resyncing (goal < 150 MiB at 5000)",
        f64::from(u32::try_from(peak).unwrap_or(u32::MAX)) / 1024.0,
        f64::from(u32::try_from(resync_peak).unwrap_or(u32::MAX)) / 1024.0
    );
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    palisade_e2e::bench::each_size("1000,5000", &bench)
}
