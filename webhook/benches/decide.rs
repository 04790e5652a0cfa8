//! In-process decision cost, without TLS or HTTP: parse an AdmissionReview for a 3-container pod
//! and decide it, on one thread. Prints microseconds per step and decisions/s per core, the
//! ceiling the served benchmark (`cargo bench -p palisade-e2e --bench webhook`) works against.
//! Then whole requests for a 1-container pod through the router (body in, response body out;
//! namespace labels from a fixed map, image checks off), without and with the security log line
//! written as JSON.
//!
//! Run: `cargo bench -p palisade-webhook --bench decide` (`PALISADE_BENCH_ITERATIONS`, default
//! 20000).

#![allow(clippy::expect_used, missing_docs)]

use std::{collections::BTreeMap, hint::black_box, sync::Arc, time::Instant};

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionReview},
};
use palisade_webhook::{
    config::Config,
    decide::{Facts, decide},
    secrets::SecretsPolicy,
    server::{AppState, Counters, FactSource, router},
    workload::{pod_of, pod_of_object},
};
use serde_json::json;
use tower::ServiceExt as _;

/// Namespace labels from a fixed map, as the cluster cache would give them.
struct StaticFacts(BTreeMap<String, String>);

impl FactSource for StaticFacts {
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        (namespace == "shop").then(|| self.0.clone())
    }
    fn ready(&self) -> bool {
        true
    }
}

fn review(i: usize) -> String {
    let containers: Vec<_> = ["app", "proxy", "metrics"]
        .iter()
        .map(|n| {
            json!({"name": n, "image": format!("registry.example.com/shop/{n}:{i}"),
                   "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"},
                           {"name": "BUILD", "value": format!("build-{i:020}")}]})
        })
        .collect();
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("bench-{i}"), "name": "web", "namespace": "shop", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "bench"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
                       "spec": {"serviceAccountName": "web", "containers": containers}},
        }
    })
    .to_string()
}

/// A review as the side-by-side benchmark sends: one container, no environment, decided on the
/// worker that read it.
fn small_review(i: usize) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("7c3a0a5e-0000-4000-8000-{i:012}"), "name": "compliant",
            "namespace": "shop", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "bench", "groups": ["system:authenticated"]},
            "object": {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "compliant", "labels": {"app": "compliant"}},
                       "spec": {"serviceAccountName": "web", "containers": [
                           {"name": "app", "image": format!("registry.example.com/shop/app@sha256:{i:064x}"),
                            "env": []}]}},
            "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
    .to_string()
}

fn per_op(label: &str, n: usize, f: impl FnMut(usize)) {
    let mut f = f;
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    #[allow(clippy::cast_precision_loss)]
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("  {label:<34} {us:>8.1} µs");
}

fn main() {
    let n: usize = std::env::var("PALISADE_BENCH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let config =
        Config::parse("listen: 127.0.0.1:0\ntls: {certFile: c, keyFile: k}\n").expect("config");
    let secrets = SecretsPolicy::new().expect("policy");
    let facts = Facts {
        namespace_labels: BTreeMap::from([("istio.io/dataplane-mode".into(), "ambient".into())]),
        spire: Vec::new(),
    };
    // Distinct pods, so no step can profit from seeing the same input twice.
    let bodies: Vec<String> = (0..256).map(review).collect();
    let parse = |i: usize| -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_str(&bodies[i % bodies.len()]).expect("review");
        review.try_into().expect("request")
    };
    let reqs: Vec<_> = (0..bodies.len()).map(parse).collect();
    let pods: Vec<_> = reqs
        .iter()
        .map(|r| {
            let v = serde_json::to_value(r.object.as_ref().expect("object")).expect("value");
            pod_of("Pod", &v).expect("pod").expect("a pod")
        })
        .collect();
    let (resp, verdict) = decide(&reqs[0], &facts, &config, &secrets);
    assert!(resp.allowed, "the benchmark pod is compliant: {verdict:?}");

    println!("webhook decision steps, 3-container pod with 3 env vars each, {n} iterations");
    per_op("parse AdmissionReview (kube)", n, |i| {
        black_box(parse(i));
    });
    per_op("parse it in one pass (the webhook)", n, |i| {
        black_box(
            palisade_webhook::review::parse(bodies[i % bodies.len()].as_bytes()).expect("review"),
        );
    });
    per_op("parse the same as a JSON value", n, |i| {
        black_box(
            serde_json::from_str::<serde_json::Value>(&bodies[i % bodies.len()]).expect("json"),
        );
    });
    per_op("view of the pod, from a copy", n, |i| {
        let object = reqs[i % reqs.len()].object.as_ref().expect("object");
        let v = serde_json::to_value(object).expect("value");
        black_box(pod_of("Pod", &v).expect("pod"));
    });
    per_op("view of the pod, in place", n, |i| {
        let object = reqs[i % reqs.len()].object.as_ref().expect("object");
        black_box(pod_of_object("Pod", object).expect("pod"));
    });
    per_op("secrets: input built, then screened", n, |i| {
        let input = SecretsPolicy::input(&pods[i % pods.len()]);
        black_box(secrets.evaluate(&input).expect("evaluates"));
    });
    per_op("secrets: the pod screened", n, |i| {
        black_box(
            secrets
                .evaluate_pod(&pods[i % pods.len()])
                .expect("evaluates"),
        );
    });
    per_op("secrets: the Rego policy evaluated", n, |i| {
        let input = SecretsPolicy::input(&pods[i % pods.len()]);
        black_box(secrets.eval(&input).expect("evaluates"));
    });
    per_op("decide (identity + secrets)", n, |i| {
        black_box(decide(&reqs[i % reqs.len()], &facts, &config, &secrets));
    });
    let small: Vec<String> = (0..256).map(small_review).collect();
    through_the_router(n, &small, &config);
    let start = Instant::now();
    for i in 0..n {
        let req =
            palisade_webhook::review::parse(bodies[i % bodies.len()].as_bytes()).expect("review");
        let (resp, _) = decide(&req, &facts, &config, &secrets);
        black_box(serde_json::to_vec(&resp.into_review()).expect("response"));
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!("  parse + decide + respond: {rate:.0} decisions/s on one core");
}

/// Whole requests through the router, on a current-thread runtime: `/validate` and `/mutate`,
/// without a log subscriber and with the JSON log the webhook writes (into a sink).
fn through_the_router(n: usize, bodies: &[String], config: &Config) {
    let labels = BTreeMap::from([("istio.io/dataplane-mode".into(), "ambient".into())]);
    let state = Arc::new(AppState {
        config: config.clone(),
        secrets: SecretsPolicy::new().expect("policy"),
        facts: Arc::new(StaticFacts(labels)),
        permits: tokio::sync::Semaphore::new(4),
        counters: Counters::default(),
        images: None,
    });
    let app = router(state);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let send = |path: &str, i: usize| {
        let request = axum::http::Request::post(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(bodies[i % bodies.len()].clone()))
            .expect("request");
        rt.block_on(async {
            let resp = app.clone().oneshot(request).await.expect("response");
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .expect("body")
        })
    };
    let reply = send("/validate?timeout=10s", 0);
    assert!(
        reply.windows(14).any(|w| w == b"\"allowed\":true"),
        "the benchmark pod is admitted: {}",
        String::from_utf8_lossy(&reply)
    );
    per_op("/validate through the router", n, |i| {
        black_box(send("/validate?timeout=10s", i));
    });
    per_op("/mutate through the router", n, |i| {
        black_box(send("/mutate?timeout=10s", i));
    });
    let log = tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(log, || {
        per_op("/validate, with the JSON log line", n, |i| {
            black_box(send("/validate?timeout=10s", i));
        });
    });
}
