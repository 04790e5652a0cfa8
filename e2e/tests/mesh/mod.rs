//! Proof with the real istiod: every Istio object the operator writes passes Istio's own
//! validating webhook, and the Envoy configuration istiod generates for a workload decides each
//! request exactly as the AuthPolicy says ([`model::meaning`]). The decision is taken by the
//! reference evaluator in `palisade_e2e::envoy` over what a simulated sidecar receives; policies
//! and requests come from the same strategies as the operator's own property test.
//!
//! The mesh validates tokens of two issuers (a RequestAuthentication the test writes for the
//! whole namespace), and the policy's issuer publishes its keys at an https JWKS that istiod
//! fetches, as in a cluster.

use std::{
    io::{Read, Write},
    net::TcpListener,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use palisade_api::AuthPolicy;
use palisade_e2e::{
    ControlPlane,
    envoy::{self, Decision, Push},
    istiod::{Istiod, TRUST_DOMAIN},
    operator::OperatorProcess,
    pki::issue_serving_cert,
    rejects, run,
};
use palisade_operator::{
    model::{self, Request},
    strategies::{self, ISSUER, OTHER_ISSUER, compared},
    translate::{self, Context as TranslateContext},
};
use proptest::{
    strategy::{BoxedStrategy, Strategy, ValueTree},
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};
use serde_json::json;

use crate::{
    Env, TestFn,
    e2e_operator::{apply_yaml, condition, get},
};

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "mesh::istiod_validates_what_palisade_writes",
        istiod_validates_what_palisade_writes,
    ),
    (
        "mesh::real_istio_config_means_what_the_auth_policy_says",
        real_istio_config_means_what_the_auth_policy_says,
    ),
    (
        "mesh::several_auth_policies_on_one_workload",
        several_auth_policies_on_one_workload,
    ),
];

const WAIT: Duration = Duration::from_secs(30);
/// The `kid` of the key every test token is signed with.
const KEY_ID: &str = "palisade-e2e";

fn istiod_validates_what_palisade_writes(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let istiod = Istiod::start(cp, &env.opts.bin_dir)?;
    let _op = OperatorProcess::start(cp, "mesh-validate", "")?;
    cp.with_temp_ns("mesh-v", |ns| {
        // What the CRD schema lets through, istiod's own validation refuses.
        for (what, rule) in [
            ("a path with braces", json!({"to": [{"operation": {"paths": ["/api/{id}"]}}]})),
            (
                "an empty claim value",
                json!({"when": [{"key": "request.auth.claims[groups]", "values": [""]}]}),
            ),
        ] {
            let yaml = serde_json::to_string(&json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "hand-made", "namespace": ns},
                "spec": {"rules": [rule]},
            }))?;
            let out = apply_doc(cp, &yaml)?;
            rejects(&out, what, &["rev.validation.istio.io"])?;
        }
        // Every example AuthPolicy's objects pass it.
        for example in ["20-authpolicy-orders.yaml", "21-authpolicy-payments.yaml"] {
            let text = std::fs::read_to_string(palisade_e2e::repo_root().join("examples").join(example))?;
            apply_yaml(cp, ns, &text.replace("namespace: shop", &format!("namespace: {ns}")))?;
        }
        for name in ["orders", "payments"] {
            let p = cp.eventually(&format!("AuthPolicy {name} Ready"), WAIT, || {
                let p = get(cp, ns, "authpolicy", name)?;
                (condition(&p, "Ready")?["status"] == "True").then_some(p)
            });
            let p = p.with_context(|| {
                format!(
                    "{:?}\nistiod: {}",
                    get(cp, ns, "authpolicy", name).map(|p| p["status"].clone()),
                    istiod.log_tail()
                )
            })?;
            let generated = p["status"]["generated"].as_array().map_or(0, Vec::len);
            if generated == 0 {
                bail!("AuthPolicy {name} generated nothing: {}", p["status"]);
            }
        }
        let n = run(cp.kubectl().args(["get", "authorizationpolicies", "-n", ns, "-o", "name"]))?;
        let n = String::from_utf8_lossy(&n.stdout).lines().count();
        eprintln!("  istiod refused 2 hand-made objects and admitted {n} AuthorizationPolicies Palisade wrote");
        Ok(())
    })
}

fn apply_doc(cp: &ControlPlane, doc: &str) -> Result<std::process::Output> {
    let file = cp.work_dir.join(format!("mesh-{}.json", doc.len()));
    std::fs::write(&file, doc)?;
    run(cp.kubectl().arg("apply").arg("-f").arg(&file))
}

/// How many generated policies the end-to-end property test runs (`MESH_CASES`).
fn cases() -> u32 {
    std::env::var("MESH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

fn real_istio_config_means_what_the_auth_policy_says(env: &Env) -> Result<()> {
    run_cases(env, "one AuthPolicy per workload", |ns, jwks| {
        strategies::policy(ns, "p0", Some(APP), Some(jwks))
            .prop_map(|p| vec![p])
            .boxed()
    })
}

/// Two or three AuthPolicies on one workload, namespace-wide ones included: istiod's
/// configuration decides what they promise together ([`model::combined`]).
fn several_auth_policies_on_one_workload(env: &Env) -> Result<()> {
    run_cases(env, "several AuthPolicies per workload", |ns, jwks| {
        strategies::several(ns, APP, Some(jwks)).boxed()
    })
}

/// The workload every case's policies protect.
const APP: &str = "orders";

fn run_cases(
    env: &Env,
    what: &str,
    policies: impl Fn(&str, &str) -> BoxedStrategy<Vec<AuthPolicy>>,
) -> Result<()> {
    let cp = &env.cp;
    let istiod = Istiod::start(cp, &env.opts.bin_dir)?;
    let jwks = JwksServer::start(cp)?;
    let _op = OperatorProcess::start(cp, "mesh-meaning", "")?;
    let mut stats = Stats::default();
    // A new seed each run, printed so a failure can be replayed (`MESH_SEED`).
    let seed: u64 = std::env::var("MESH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    eprintln!("  seed {seed} (MESH_SEED={seed} replays this run)");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    for case in 0..cases() {
        cp.with_temp_ns("mesh", |ns| {
            // The mesh also validates tokens of the policy's issuer and of another one.
            let ra = json!({
                "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                "metadata": {"name": "mesh-issuers", "namespace": ns},
                "spec": {"jwtRules": [
                    {"issuer": ISSUER, "jwks": jwks.jwks, "forwardOriginalToken": true},
                    {"issuer": OTHER_ISSUER, "jwks": jwks.jwks, "forwardOriginalToken": true},
                ]},
            });
            let out = apply_doc(cp, &serde_json::to_string(&ra)?)?;
            palisade_e2e::accepts(&out, "the mesh's RequestAuthentication")?;
            let strategy = (
                policies(ns, &jwks.uri),
                proptest::collection::vec(strategies::request(ns), 64),
            );
            let tree = strategy
                .new_tree(&mut runner)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (policies, requests) = tree.current();
            let specs: Vec<_> = policies.iter().map(|p| &p.spec).collect();
            check_case(cp, &istiod, case, &policies, &requests, &mut stats).with_context(|| {
                format!(
                    "case {case}: policies {}",
                    serde_json::to_string(&specs).unwrap_or_default()
                )
            })
        })?;
    }
    eprintln!(
        "  {} cases of {what} through the operator and the real istiod: {} requests compared \
         ({} allowed, {} refused), decisions by kind {:?}; {} left to an external authorizer; {} \
         cases refused by the API server",
        cases(),
        stats.compared,
        stats.allowed,
        stats.compared - stats.allowed,
        stats.decisions,
        stats.external,
        stats.refused
    );
    Ok(())
}

#[derive(Default)]
struct Stats {
    compared: u64,
    allowed: u64,
    external: u64,
    refused: u64,
    decisions: std::collections::BTreeMap<&'static str, u64>,
}

fn check_case(
    cp: &ControlPlane,
    istiod: &Istiod,
    case: u32,
    policies: &[AuthPolicy],
    requests: &[Request],
    stats: &mut Stats,
) -> Result<()> {
    let Some(ns) = policies
        .first()
        .and_then(|p| p.metadata.namespace.as_deref())
    else {
        bail!("no policy");
    };
    let ctx = TranslateContext::default();
    let mut notes = Vec::new();
    let mut objects = Vec::new();
    for policy in policies {
        let out = translate::auth::translate(policy, &ctx);
        notes.push(out.notes);
        objects.extend(out.objects);
        let mut doc = serde_json::to_value(policy)?;
        doc["metadata"].as_object_mut().map(|m| m.remove("uid"));
        if !apply_doc(cp, &serde_json::to_string(&doc)?)?
            .status
            .success()
        {
            // The API server refuses it (CEL): nothing is written, nothing to compare.
            stats.refused += 1;
            return Ok(());
        }
    }
    for policy in policies {
        let name = policy.metadata.name.as_deref().unwrap_or_default();
        let ready = cp.eventually("the AuthPolicy reconciled", WAIT, || {
            let p = get(cp, ns, "authpolicy", name)?;
            (p["status"]["observedGeneration"] == 1)
                .then(|| condition(&p, "Ready").cloned())
                .flatten()
        })?;
        if ready["status"] != "True" {
            bail!("the operator did not apply {name}: {ready}");
        }
    }
    // A marker policy written after the operator's objects: once a push carries it, istiod has
    // seen everything before it. It denies only port 1, which no request uses.
    let yaml = serde_json::to_string(&json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "marker", "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": APP}}, "action": "DENY",
                 "rules": [{"to": [{"operation": {"ports": ["1"]}}]}]},
    }))?;
    palisade_e2e::accepts(&apply_doc(cp, &yaml)?, "the marker policy")?;
    let ip = format!("10.20.{}.{}", case / 200, case % 200 + 2);
    let mut sidecar = istiod.sidecar(ns, "orders", "orders-0", &format!("app={APP}"), &ip)?;
    let needle = format!("ns[{ns}]-policy[marker]");
    let push = sidecar
        .wait_for(WAIT, |p| {
            p.rbac_policies().iter().any(|n| n.contains(&needle))
        })
        .with_context(|| istiod.log_tail())?
        .clone();
    // A token whose signature no published key verifies is refused, whatever the rules say.
    for req in requests.iter().filter(|r| r.token.is_some()).take(4) {
        let mut forged = envoy_request(req, &ip)?;
        if let Some(t) = forged.token.as_mut() {
            t.key_id = "forged".into();
        }
        let decided = envoy::decide(&push, &forged)?;
        if decided.allowed() {
            bail!("a forged token in {req:?} is allowed");
        }
        *stats.decisions.entry(kind(&decided)).or_default() += 1;
    }
    let compared_by_all =
        |r: &&Request| policies.iter().zip(&notes).all(|(p, n)| compared(p, n, r));
    for req in requests.iter().filter(compared_by_all) {
        let said = model::combined(policies, TRUST_DOMAIN, req);
        let decided = envoy::decide(&push, &envoy_request(req, &ip)?)?;
        if decided == Decision::External {
            stats.external += 1;
            continue;
        }
        stats.compared += 1;
        stats.allowed += u64::from(said);
        *stats.decisions.entry(kind(&decided)).or_default() += 1;
        if said != decided.allowed() {
            bail!(
                "request {req:?}: the AuthPolicies say {}, the Envoy configuration istiod \
                 generated decides {decided:?}\ngenerated objects: {}\npush: {}",
                if said { "allow" } else { "refuse" },
                serde_json::to_string(&objects).unwrap_or_default(),
                dump(&push)
            );
        }
    }
    Ok(())
}

/// The kind of a decision: which filter took it.
fn kind(d: &Decision) -> &'static str {
    let Decision::Refused(why) = d else {
        return "allowed";
    };
    let net = why.starts_with("network");
    match (net, why.contains("DENY"), why.contains("no ALLOW")) {
        _ if why.starts_with("jwt_authn") => "jwt 401",
        _ if why.starts_with("no filter chain") => "no filter chain",
        (true, true, _) => "network DENY",
        (true, _, true) => "network no ALLOW",
        (false, true, _) => "http DENY",
        (false, _, true) => "http no ALLOW",
        _ => "other",
    }
}

fn dump(push: &Push) -> String {
    use std::fmt::Write as _;
    let json = |v: &[serde_json::Value]| serde_json::to_string(v).unwrap_or_default();
    let mut out = String::new();
    for c in &push.chains {
        let _ = write!(
            out,
            "\n  {} {} http={} net={} jwt={} rbac={}",
            c.name,
            c.r#match,
            c.http,
            json(&c.network_rbac),
            json(&c.jwt_authn),
            json(&c.http_rbac)
        );
    }
    out
}

fn envoy_request(req: &Request, ip: &str) -> Result<envoy::Request> {
    Ok(envoy::Request {
        dest: (ip.parse()?, req.port),
        peer: req
            .peer
            .as_ref()
            .map(|(ns, sa)| format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")),
        http: req.http.clone(),
        token: req.token.as_ref().map(|t| envoy::Jwt {
            key_id: KEY_ID.into(),
            payload: payload(t),
        }),
    })
}

/// The JWT payload of a model token: `iss` and `sub` are strings, `scope` the space-delimited
/// string OAuth 2 defines, `aud` a string or a list, other claims lists.
fn payload(t: &model::Token) -> serde_json::Value {
    let mut p = serde_json::Map::new();
    for (name, values) in &t.claims {
        let v = match name.as_str() {
            "scope" => json!(values.join(" ")),
            "iss" | "sub" => json!(values.first()),
            _ => json!(values),
        };
        p.insert(name.clone(), v);
    }
    p.insert("iss".into(), json!(t.issuer));
    p.insert("sub".into(), json!(t.subject));
    // `aud` is a string or a list (RFC 7519): both forms are generated.
    match t.audiences.as_slice() {
        [] => {}
        [one] => {
            p.insert("aud".into(), json!(one));
        }
        many => {
            p.insert("aud".into(), json!(many));
        }
    }
    serde_json::Value::Object(p)
}

/// An https server on loopback that answers every request with one JWKS (a P-256 key with
/// `kid` [`KEY_ID`]), its certificate from the control plane's CA.
struct JwksServer {
    uri: String,
    jwks: String,
    stop: Arc<AtomicBool>,
}

impl JwksServer {
    fn start(cp: &ControlPlane) -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let point = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::to_string(&json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": KEY_ID,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]}))?;
        let (cert, key) = issue_serving_cert(&cp.pki.ca_key, &["localhost"])?;
        let config = server_config(&cert, &key)?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let uri = format!(
            "https://127.0.0.1:{}/jwks.json",
            listener.local_addr()?.port()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, body) = (stop.clone(), jwks.clone());
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = answer(&config, stream, &body);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(JwksServer { uri, jwks, stop })
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn server_config(cert: &str, key: &str) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?,
    ))
}

/// Answers one request on `stream` with `body` (blocking, bounded by a 5 s timeout).
fn answer(
    config: &Arc<rustls::ServerConfig>,
    stream: std::net::TcpStream,
    body: &str,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let conn = rustls::ServerConnection::new(config.clone())?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut buf = [0u8; 4096];
    let mut request = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && Instant::now() < deadline {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    write!(
        tls,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}
