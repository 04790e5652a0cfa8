//! The webhook's HTTP surface through `Router::oneshot`: admission reviews in and out, the body
//! limit, malformed input, readiness, and certificate hot reload.

#![allow(clippy::expect_used, missing_docs)]

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use palisade_webhook::{
    config::{Config, TlsFiles},
    secrets::SecretsPolicy,
    server::{AppState, Counters, FactSource, metrics_router, router},
    tls::ReloadingCert,
};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Namespace labels from a fixed map: the cluster cache's stand-in at this level.
struct StaticFacts(BTreeMap<String, BTreeMap<String, String>>, bool);

impl FactSource for StaticFacts {
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.0.get(namespace).cloned()
    }
    fn ready(&self) -> bool {
        self.1
    }
}

fn app(max_body: usize, ready: bool) -> axum::Router {
    router(state(max_body, ready, ""))
}

fn state(max_body: usize, ready: bool, extra: &str) -> Arc<AppState> {
    let mut config = Config::parse(&format!(
        "listen: 127.0.0.1:0\ntls: {{certFile: c, keyFile: k}}\n{extra}"
    ))
    .expect("config");
    config.max_body_bytes = max_body;
    let mut ns = BTreeMap::new();
    ns.insert(
        "shop".to_owned(),
        BTreeMap::from([("istio.io/dataplane-mode".to_owned(), "ambient".to_owned())]),
    );
    Arc::new(AppState {
        config,
        secrets: SecretsPolicy::new().expect("policy"),
        facts: Arc::new(StaticFacts(ns, ready)),
        permits: tokio::sync::Semaphore::new(4),
        counters: Counters::default(),
        images: None,
    })
}

/// `request` through `app`: the status and the body.
async fn send(app: axum::Router, request: Request<Body>) -> (StatusCode, axum::body::Bytes) {
    let resp = app.oneshot(request).await.expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, bytes)
}

async fn get(app: axum::Router, path: &str) -> (StatusCode, String) {
    let (status, bytes) = send(
        app,
        Request::get(path).body(Body::empty()).expect("request"),
    )
    .await;
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// With `metricsListen`, the metrics move to their own port: the HTTPS router no longer serves
/// them, and the metrics router serves nothing that decides.
#[tokio::test]
async fn metrics_on_their_own_port_leave_the_admission_port() {
    let state = state(1 << 20, true, "metricsListen: 127.0.0.1:0\n");
    let admission = router(Arc::clone(&state));
    let metrics = metrics_router(Arc::clone(&state));
    let (status, _) = post(admission.clone(), "/validate", review("orders").to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        get(admission.clone(), "/metrics").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(admission, "/healthz").await.0, StatusCode::OK);
    let (status, text) = get(metrics.clone(), "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains("palisade_webhook_decisions_total{verdict=\"allow\"} 1"),
        "the decision made on the admission port is counted: {text}"
    );
    for path in ["/validate", "/mutate"] {
        let (status, _) = post(metrics.clone(), path, review("orders").to_string()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path} on the metrics port");
    }
    assert_eq!(get(metrics, "/readyz").await.0, StatusCode::NOT_FOUND);
    // Without it, the HTTPS port serves them as before.
    assert_eq!(get(app(1 << 20, true), "/metrics").await.0, StatusCode::OK);
}

fn review(sa: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "abc", "name": "p", "namespace": "shop", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "alice"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                       "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "r/a:1"}]}},
        }
    })
}

async fn post(app: axum::Router, path: &str, body: String) -> (StatusCode, Value) {
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    let (status, bytes) = send(app, request).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn reviews_come_back_with_the_same_uid_and_a_verdict() {
    let (status, body) = post(
        app(1 << 20, true),
        "/validate",
        review("orders").to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["uid"], "abc");
    assert_eq!(body["response"]["allowed"], true);
    let (_, body) = post(
        app(1 << 20, true),
        "/validate",
        review("default").to_string(),
    )
    .await;
    assert_eq!(body["response"]["allowed"], false);
    let msg = body["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        msg.contains("spiffe://cluster.local/ns/shop/sa/default"),
        "{msg}"
    );
    let (_, body) = post(app(1 << 20, true), "/mutate", review("orders").to_string()).await;
    assert_eq!(body["response"]["allowed"], true);
}

#[tokio::test]
async fn malformed_reviews_are_400_with_a_reason() {
    for bad in [
        "not json",
        "{\"kind\": 7}",
        "{\"apiVersion\": \"admission.k8s.io/v1\", \"kind\": \"AdmissionReview\"}",
        // serde_json would read this map as the JSON text in its value, not as written.
        &review("orders").to_string().replacen(
            '{',
            "{\"$serde_json::private::RawValue\":\"{}\",",
            1,
        ),
    ] {
        let (status, body) = post(app(1 << 20, true), "/validate", bad.to_owned()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}: {body}"
        );
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let big = review("orders").to_string();
    let (status, _) = post(app(big.len() - 1, true), "/validate", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn readiness_follows_the_caches() {
    for (ready, want) in [
        (true, StatusCode::OK),
        (false, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let resp = app(1024, ready)
            .oneshot(
                Request::get("/readyz")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(resp.status(), want);
    }
}

fn write_pair(dir: &std::path::Path, name: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write key");
    cert.der().to_vec()
}

#[test]
fn certificates_reload_only_when_both_files_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = write_pair(dir.path(), "one.example");
    let files = TlsFiles {
        cert_file: dir.path().join("tls.crt"),
        key_file: dir.path().join("tls.key"),
    };
    let cert = ReloadingCert::new(files).expect("loads");
    assert!(!cert.reload_if_changed(), "nothing changed");
    std::thread::sleep(std::time::Duration::from_millis(20));
    // A half-written pair (only the key replaced) is not picked up.
    let key = rcgen::KeyPair::generate().expect("key");
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("write");
    assert!(!cert.reload_if_changed(), "only one file changed");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = write_pair(dir.path(), "two.example");
    assert!(cert.reload_if_changed(), "both changed");
    assert_ne!(first, second);
    // Garbage in both files: the current certificate stays in service.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(dir.path().join("tls.crt"), "garbage").expect("write");
    std::fs::write(dir.path().join("tls.key"), "garbage").expect("write");
    assert!(!cert.reload_if_changed(), "invalid pair refused");
}

#[tokio::test]
async fn metrics_count_verdicts_and_bucket_latency() {
    let app = app(1 << 20, true);
    for sa in ["orders", "default", "default"] {
        let (status, _) = post(app.clone(), "/validate", review(sa).to_string()).await;
        assert_eq!(status, StatusCode::OK);
    }
    let resp = app
        .oneshot(
            Request::get("/metrics")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    let text = String::from_utf8(
        axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body")
            .to_vec(),
    )
    .expect("utf-8");
    assert!(
        text.contains("palisade_webhook_decisions_total{verdict=\"allow\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("palisade_webhook_decisions_total{verdict=\"deny\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("palisade_webhook_decision_duration_seconds_bucket{le=\"+Inf\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("palisade_webhook_decision_duration_seconds_count 3"),
        "{text}"
    );
    // Buckets are cumulative: never decreasing towards +Inf.
    let counts: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("palisade_webhook_decision_duration_seconds_bucket"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 12, "{text}");
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
}

/// A small review is decided on the worker that read it, a large one on the blocking pool: both
/// give the same verdict and reason (here: a Secret in the environment).
#[tokio::test]
async fn small_and_large_reviews_get_the_same_verdict() {
    let leaky = |padding: usize| {
        let mut r = review("orders");
        r["request"]["object"]["spec"]["containers"][0]["env"] = json!([
            {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
        ]);
        r["request"]["object"]["metadata"]["annotations"] = json!({"note": "x".repeat(padding)});
        r.to_string()
    };
    let small = leaky(0);
    let large = leaky(palisade_webhook::server::INLINE_DECISION_BYTES);
    assert!(small.len() <= palisade_webhook::server::INLINE_DECISION_BYTES);
    assert!(large.len() > palisade_webhook::server::INLINE_DECISION_BYTES);
    let mut messages = Vec::new();
    for body in [small, large] {
        let (status, out) = post(app(1 << 20, true), "/validate", body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(out["response"]["allowed"], false, "{out}");
        messages.push(out["response"]["status"]["message"].clone());
    }
    assert!(
        messages[0]
            .as_str()
            .is_some_and(|m| m.contains("Secret \"db\"")),
        "{}",
        messages[0]
    );
    assert_eq!(messages[0], messages[1]);
}

/// Inline only what is cheap to decide: a small review with few environment entries, counted in
/// every container list and at any depth (a Deployment's template too). A pod of many secret-
/// shaped values (each matched against every pattern) goes to the blocking pool.
#[test]
fn only_small_reviews_with_few_env_entries_are_decided_inline() {
    use palisade_webhook::server::{INLINE_DECISION_BYTES, INLINE_ENV_ENTRIES, decided_inline};
    let env = |n: usize| -> Value {
        (0..n)
            .map(|i| json!({"name": format!("K{i}"), "value": "plain"}))
            .collect()
    };
    let pod = |a: usize, b: usize| -> kube::core::DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {
                "initContainers": [{"name": "init", "image": "r/a:1", "env": env(a)}],
                "containers": [{"name": "app", "image": "r/a:1", "envFrom": env(b)}],
            },
        }))
        .expect("object")
    };
    let half = INLINE_ENV_ENTRIES / 2;
    assert!(decided_inline(
        1000,
        Some(&pod(half, INLINE_ENV_ENTRIES - half))
    ));
    assert!(!decided_inline(
        1000,
        Some(&pod(half, INLINE_ENV_ENTRIES - half + 1))
    ));
    assert!(!decided_inline(INLINE_DECISION_BYTES + 1, Some(&pod(0, 0))));
    assert!(decided_inline(1000, None));
    let deployment: kube::core::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "r/a:1", "env": env(INLINE_ENV_ENTRIES + 1)}
        ]}}},
    }))
    .expect("object");
    assert!(!decided_inline(1000, Some(&deployment)));
}
