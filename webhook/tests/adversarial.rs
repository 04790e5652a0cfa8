//! The adversarial suite: every file in `tests/adversarial/` is one attack on the webhook — an
//! AdmissionReview the API server could send, the cluster facts around it, and the verdict it
//! must get — run through the real router (`Router::oneshot`), the real decision, the real
//! ImagePolicy compilation and the real verifier (whose registries here refuse every
//! connection, so a covered image is refused and an uncovered one makes no registry call).
//!
//! To add a case, drop a YAML file beside the others (see `README.md` there); it runs with the
//! rest, and a failure names the file.

#![allow(clippy::expect_used, missing_docs)]

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use palisade_api::ImagePolicy;
use palisade_webhook::{
    config::Config,
    identity::SpireRegistration,
    images::{check::ImageVerifier, policy::CompiledImagePolicy, registry::Registry},
    secrets::SecretsPolicy,
    server::{AppState, Counters, FactSource, router},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A key the suite's policies require (nothing is ever signed with it).
const KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEBQW6/eeRFL8B5FuFXYZU8ZDw9SSL
BNiuXO8dnyJ0mCZGp3h7zvJ00Yk0L60m7+4FTONy5ueB9Ske4sx5851LKA==
-----END PUBLIC KEY-----
";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Case {
    /// The issue class it attacks (for the summary).
    class: String,
    /// What the attacker tries.
    what: String,
    /// Namespaces the webhook's cache knows, with their labels (default: `shop`, ambient).
    #[serde(default)]
    namespaces: Option<BTreeMap<String, BTreeMap<String, String>>>,
    /// ImagePolicies in force: name → spec (a key authority is added when none is given).
    #[serde(default)]
    policies: BTreeMap<String, Value>,
    /// ClusterSPIFFEIDs (name → object), for `identitySource: Spire`.
    #[serde(default)]
    spire: BTreeMap<String, Value>,
    /// Extra webhook configuration (YAML keys of the config file).
    #[serde(default)]
    config: Option<Value>,
    /// The request: `kind` (default Pod), `namespace` (default shop), `operation` (default
    /// CREATE), `subResource`, `object`, `oldObject`, `dryRun`, `username`.
    request: Value,
    /// `/validate` (default) or `/mutate`.
    #[serde(default)]
    path: Option<String>,
    /// Raw query string (default `timeout=2s`).
    #[serde(default)]
    query: Option<String>,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Expect {
    /// HTTP status (default 200).
    #[serde(default)]
    status: Option<u16>,
    /// Whether the review is allowed (when the status is 200).
    #[serde(default)]
    allowed: Option<bool>,
    /// Text the message must contain.
    #[serde(default)]
    contains: Vec<String>,
    /// Text the message must not contain.
    #[serde(default)]
    excludes: Vec<String>,
    /// Text the JSON Patch of a mutation must contain.
    #[serde(default)]
    patch_contains: Vec<String>,
}

struct CaseFacts {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    policies: Vec<Arc<CompiledImagePolicy>>,
    spire: Vec<SpireRegistration>,
}

impl FactSource for CaseFacts {
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces.get(namespace).cloned()
    }
    fn spire_registrations(&self) -> Vec<SpireRegistration> {
        self.spire.clone()
    }
    fn image_policies(&self) -> Vec<Arc<CompiledImagePolicy>> {
        self.policies.clone()
    }
    fn ready(&self) -> bool {
        true
    }
}

fn policy(name: &str, spec: &Value) -> Result<Arc<CompiledImagePolicy>, String> {
    let mut spec = spec.clone();
    if spec.get("authorities").is_none() {
        spec["authorities"] = json!([{"name": "ci", "transparencyLog": "Ignore",
                                       "key": {"publicKey": KEY}}]);
    }
    let p: ImagePolicy = serde_json::from_value(json!({
        "apiVersion": "palisade.dev/v1alpha1", "kind": "ImagePolicy",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1},
        "spec": spec,
    }))
    .map_err(|e| format!("policy {name}: {e}"))?;
    Ok(Arc::new(CompiledImagePolicy::compile(&p, &|_| None)))
}

fn review(r: &Value) -> Value {
    let kind = r["kind"].as_str().unwrap_or("Pod");
    let (group, resource) = match kind {
        "Pod" => ("", "pods"),
        "Job" | "CronJob" => ("batch", "jobs"),
        _ => ("apps", "deployments"),
    };
    let mut req = json!({
        "uid": "adversarial",
        "kind": {"group": group, "version": "v1", "kind": kind},
        "resource": {"group": group, "version": "v1", "resource": resource},
        "name": r["object"]["metadata"]["name"].as_str().unwrap_or("x"),
        "namespace": r["namespace"].as_str().unwrap_or("shop"),
        "operation": r["operation"].as_str().unwrap_or("CREATE"),
        "userInfo": {"username": r["username"].as_str().unwrap_or("mallory")},
        "dryRun": r["dryRun"].as_bool().unwrap_or(false),
        "object": r["object"],
    });
    for key in ["oldObject", "subResource"] {
        if let Some(v) = r.get(key) {
            req[key] = v.clone();
        }
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req})
}

async fn run(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let case: Case = serde_yaml::from_str(&text).map_err(|e| format!("does not parse: {e}"))?;
    let mut config_yaml = "listen: 127.0.0.1:0\ntls: {certFile: c, keyFile: k}\n".to_owned();
    if let Some(extra) = &case.config {
        config_yaml.push_str(&serde_yaml::to_string(extra).map_err(|e| e.to_string())?);
    }
    let config = Config::parse(&config_yaml).map_err(|e| e.to_string())?;
    let namespaces = case.namespaces.clone().unwrap_or_else(|| {
        BTreeMap::from([(
            "shop".to_owned(),
            BTreeMap::from([("istio.io/dataplane-mode".to_owned(), "ambient".to_owned())]),
        )])
    });
    let facts = CaseFacts {
        namespaces,
        policies: case
            .policies
            .iter()
            .map(|(n, s)| policy(n, s))
            .collect::<Result<_, _>>()?,
        spire: case
            .spire
            .iter()
            .map(|(n, o)| SpireRegistration::from_object(n, o))
            .collect(),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let verifier = ImageVerifier::new(
        Registry::new(&[]).map_err(|e| e.to_string())?,
        Duration::from_mins(1),
        Duration::from_secs(5),
    );
    let app = router(Arc::new(AppState {
        config,
        secrets: SecretsPolicy::new().map_err(|e| e.to_string())?,
        facts: Arc::new(facts),
        permits: tokio::sync::Semaphore::new(4),
        counters: Counters::default(),
        images: Some(Arc::new(verifier)),
    }));
    let uri = format!(
        "{}?{}",
        case.path.as_deref().unwrap_or("/validate"),
        case.query.as_deref().unwrap_or("timeout=2s")
    );
    let body = if case.request.get("raw").is_some() {
        case.request["raw"].as_str().unwrap_or_default().to_owned()
    } else {
        review(&case.request).to_string()
    };
    let resp = app
        .oneshot(
            Request::post(uri)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .map_err(|e| e.to_string())?;
    let out: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    check(&case.expect, status, &out)?;
    Ok(format!("class {:>2}: {}", case.class, case.what))
}

/// Whether the answer (`status`, JSON `out`) is what `expect` says.
fn check(expect: &Expect, status: StatusCode, out: &Value) -> Result<(), String> {
    let want_status = expect.status.unwrap_or(200);
    if status != StatusCode::from_u16(want_status).map_err(|e| e.to_string())? {
        return Err(format!("status {status}, want {want_status}: {out}"));
    }
    let response = &out["response"];
    let message = response["status"]["message"].as_str().unwrap_or_default();
    if let Some(allowed) = expect.allowed
        && response["allowed"].as_bool() != Some(allowed)
    {
        return Err(format!(
            "allowed={}, want {allowed}: {message}",
            response["allowed"]
        ));
    }
    for text in &expect.contains {
        if !message.contains(text.as_str()) {
            return Err(format!("message lacks {text:?}: {message}"));
        }
    }
    for text in &expect.excludes {
        if message.contains(text.as_str()) {
            return Err(format!("message has {text:?}: {message}"));
        }
    }
    if !expect.patch_contains.is_empty() {
        use base64::Engine as _;
        let patch = response["patch"]
            .as_str()
            .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .unwrap_or_default();
        for text in &expect.patch_contains {
            if !patch.contains(text.as_str()) {
                return Err(format!("patch lacks {text:?}: {patch}"));
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_gets_its_verdict() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/adversarial");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/adversarial")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "only {} cases", files.len());
    let mut failures = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        match run(f).await {
            Ok(summary) => println!("ok   {name:<48} {summary}"),
            Err(why) => {
                println!("FAIL {name}: {why}");
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    println!(
        "{} adversarial cases, {} failed",
        files.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
