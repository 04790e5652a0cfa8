//! Operator convergence benchmark against a real control plane.
//!
//! For each N (default 1000 and 5000; `PALISADE_BENCH_N=200,1000` to choose):
//! 1. N AuthPolicies are created, then the release operator is started and timed until every
//!    policy reports `Ready=True` (from empty: no generated object exists yet);
//! 2. in the first round, the operator is restarted and, after it has reconciled every policy
//!    once, its API write counter is read (a no-op resync; goal 0);
//! 3. the operator's peak RSS (VmHWM) during convergence is reported (goal < 150 MiB at 5000);
//! 4. with the operator stopped and its objects removed, a minimal client makes exactly the
//!    requests the operator must make for N existing AuthPolicies — a server-side apply of each
//!    generated object, a status write per policy, one Event per policy as Kubernetes' event
//!    recorder sends it — one policy after another in as many lanes as the operator reconciles
//!    policies at once (32), and the ratio of the two times is printed (goal 1.15×);
//! 5. steps 1 and 4 alternate for `PALISADE_BENCH_ROUNDS` rounds (default 3), each in fresh
//!    namespaces, and the medians are printed.
//!
//! Readiness is read from one watch: listing every policy every few hundred milliseconds would
//! load the API server while the operator runs and not while the minimal client does.
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
use palisade_e2e::{
    ControlPlane,
    bench::{Watched, api_requests, requests_between},
    operator::OperatorProcess,
    run_ok,
};
use palisade_operator::translate::{self, Context as TranslateContext};

/// Requests in flight while creating the policies.
const IN_FLIGHT: usize = 16;

/// The minimal client's lanes: as many as the operator reconciles at once by default.
fn lanes() -> usize {
    usize::from(palisade_operator::config::Config::default().concurrency)
}

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
/// one policy after another in each of [`lanes`] lanes, as the operator reconciles that many
/// policies at once. Returns the time,
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
        .buffer_unordered(lanes())
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

/// Policies `Ready=True`, read from the bench's watch.
fn ready_count(policies: &Watched<AuthPolicy>) -> usize {
    policies.count(|p| {
        p.status.as_ref().is_some_and(|s| {
            s.common
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
}

/// What one run of the operator measured.
struct OperatorRun {
    converged: Duration,
    writes: f64,
    breakdown: Vec<String>,
    peak_kib: u64,
}

/// Starts the release operator on `n` existing AuthPolicies in `ns` and times it until every
/// one is `Ready`, read from one watch started before the operator.
async fn operator_run(
    cp: &ControlPlane,
    client: &Client,
    ns: &str,
    n: usize,
) -> Result<OperatorRun> {
    let policies = Watched::<AuthPolicy>::start(client, ns).await?;
    let started = Instant::now();
    let op = OperatorProcess::start(cp, &format!("bench-{ns}"), "")?;
    let mut peak_kib = 0;
    while ready_count(&policies) < n {
        peak_kib = peak_kib.max(op.peak_rss_kib().unwrap_or(0));
        if started.elapsed() > Duration::from_mins(15) {
            bail!("not converged after 15 minutes: {}", op.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let converged = started.elapsed();
    peak_kib = peak_kib.max(op.peak_rss_kib().unwrap_or(0));
    let writes = op.counter("palisade_operator_api_writes_total")?;
    let (_, metrics) = op.get("/metrics")?;
    let breakdown = metrics
        .lines()
        .filter(|l| {
            l.starts_with("palisade_operator_api_writes_total")
                || l.starts_with("palisade_operator_reconciles_total")
        })
        .map(str::to_owned)
        .collect();
    Ok(OperatorRun {
        converged,
        writes,
        breakdown,
        peak_kib,
    })
}

/// Restarts the operator on what it converged and returns the time until it has reconciled
/// every policy once, the API writes it made (goal 0) and its peak RSS.
async fn resync(cp: &ControlPlane, ns: &str, n: usize) -> Result<(Duration, f64, u64)> {
    let op = OperatorProcess::start(cp, &format!("bench-{ns}-resync"), "")?;
    let started = Instant::now();
    loop {
        let reconciled = op.counter("palisade_operator_reconciles_total")?;
        if reconciled >= f64::from(u32::try_from(n)?) {
            break;
        }
        if started.elapsed() > Duration::from_mins(10) {
            bail!("resync did not finish: {}", op.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = op.counter("palisade_operator_api_writes_total")? + 0.0;
    Ok((took, writes, op.peak_rss_kib().unwrap_or(0)))
}

/// Removes the policies, generated objects and Events of namespace `ns`, one collection
/// deletion per kind (there is no garbage collector on the bench's control plane).
async fn remove_all(client: &Client, ns: &str) -> Result<()> {
    for (api_version, kind) in [
        ("palisade.dev/v1alpha1", "AuthPolicy"),
        ("security.istio.io/v1", "AuthorizationPolicy"),
        ("security.istio.io/v1", "PeerAuthentication"),
        ("events.k8s.io/v1", "Event"),
    ] {
        let ar = resource(api_version, kind, &plural_of(kind));
        Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar)
            .delete_collection(
                &kube::api::DeleteParams::default(),
                &kube::api::ListParams::default(),
            )
            .await?;
    }
    Ok(())
}

/// The rounds in `PALISADE_BENCH_ROUNDS` (default 3): the operator and the minimal client run
/// alternately, each round in fresh namespaces, so a slow phase of the machine weighs on both.
fn rounds() -> Result<usize> {
    std::env::var("PALISADE_BENCH_ROUNDS").map_or(Ok(3), |r| {
        r.parse()
            .map_err(|_| anyhow::anyhow!("PALISADE_BENCH_ROUNDS is a number"))
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn bench(cp: &ControlPlane, n: usize) -> Result<()> {
    let client = client(cp).await?;
    let mib = |kib: u64| f64::from(u32::try_from(kib).unwrap_or(u32::MAX)) / 1024.0;
    println!(
        "operator convergence, N = {n} AuthPolicies ({} generated objects)",
        3 * n
    );
    let (mut ratios, mut ops, mut bases) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds()? {
        let (op_ns, base_ns) = (format!("op-{n}-{round}"), format!("base-{n}-{round}"));
        for ns in [&op_ns, &base_ns] {
            run_ok(cp.kubectl().args(["create", "namespace", ns]))?;
        }
        create_policies(&client, &op_ns, n).await?;
        let before = api_requests(cp)?;
        let run = operator_run(cp, &client, &op_ns, n).await?;
        let op_requests = requests_between(&before, &api_requests(cp)?, 10.0);
        if round == 0 {
            let (took, writes, peak) = resync(cp, &op_ns, n).await?;
            println!(
                "  no-op resync after restart: {:.2} s, {writes} API writes (goal 0); peak RSS {:.1} MiB",
                took.as_secs_f64(),
                mib(peak)
            );
        }
        // The minimal client, on an API server holding what it held when the operator started:
        // the operator's policies and generated objects removed (no operator runs now).
        remove_all(&client, &op_ns).await?;
        let before = api_requests(cp)?;
        let (base, objects, requests) = baseline(&client, &base_ns, n).await?;
        let base_requests = requests_between(&before, &api_requests(cp)?, 10.0);
        // And the next round's operator finds none of the minimal client's policies to take
        // over (which it would reconcile and write the status of, unasked).
        remove_all(&client, &base_ns).await?;
        let ratio = run.converged.as_secs_f64() / base.as_secs_f64();
        println!(
            "  round {round}: minimal client (SSA of {objects} objects, {n} status writes, {n} Events: {requests} requests, {} lanes) {:.2} s; operator, start to all {n} Ready {:.2} s ({} API writes: applies + status), peak RSS {:.1} MiB; ratio {ratio:.2}x",
            lanes(),
            base.as_secs_f64(),
            run.converged.as_secs_f64(),
            run.writes,
            mib(run.peak_kib)
        );
        println!("    {}", run.breakdown.join("\n    "));
        println!(
            "    API server requests while the operator converged (10 or more): {}",
            op_requests.join(", ")
        );
        println!(
            "    API server requests while the minimal client ran (10 or more): {}",
            base_requests.join(", ")
        );
        ratios.push(ratio);
        ops.push(run.converged.as_secs_f64());
        bases.push(base.as_secs_f64());
    }
    println!(
        "  median of {} rounds: minimal client {:.2} s, operator {:.2} s, ratio operator / minimal client {:.2}x (goal <= 1.15x)",
        ratios.len(),
        median(bases),
        median(ops),
        median(ratios)
    );
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    palisade_e2e::bench::each_size("1000,5000", &bench)
}
