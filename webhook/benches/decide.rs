//! In-process decision cost, without TLS or HTTP: parse an AdmissionReview for a 3-container pod
//! and decide it, on one thread. Prints microseconds per step and decisions/s per core, the
//! ceiling the served benchmark (`cargo bench -p palisade-e2e --bench webhook`) works against.
//!
//! Run: `cargo bench -p palisade-webhook --bench decide` (`PALISADE_BENCH_ITERATIONS`, default
//! 20000).

#![allow(clippy::expect_used, missing_docs)]

use std::{collections::BTreeMap, hint::black_box, time::Instant};

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionReview},
};
use palisade_webhook::{
    config::Config,
    decide::{Facts, decide},
    secrets::SecretsPolicy,
    workload::{pod_of, pod_of_object},
};
use serde_json::json;

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
    per_op("parse AdmissionReview", n, |i| {
        black_box(parse(i));
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
    let start = Instant::now();
    for i in 0..n {
        let req = parse(i);
        let (resp, _) = decide(&req, &facts, &config, &secrets);
        black_box(serde_json::to_vec(&resp.into_review()).expect("response"));
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!("  parse + decide + respond: {rate:.0} decisions/s on one core");
}
