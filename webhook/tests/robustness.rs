//! Hostile input against the webhook's HTTP surface: arbitrary bodies never panic and never
//! allow a pod; a refused review stays refused however its object is mangled; a client that
//! opens a connection and says nothing does not keep a connection slot.
//!
//! The property tests run a bounded number of cases (`PROPTEST_CASES` raises it, e.g.
//! `PROPTEST_CASES=20000 cargo test -p palisade-webhook --test robustness`).

#![allow(clippy::expect_used, missing_docs)]

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use palisade_webhook::{
    config::{Config, TlsFiles},
    secrets::SecretsPolicy,
    server::{AppState, Counters, FactSource, ServeLimits, router, serve_tls_with},
    tls::ReloadingCert,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Facts;

impl FactSource for Facts {
    fn namespace_labels(&self, _: &str) -> Option<BTreeMap<String, String>> {
        Some(BTreeMap::from([(
            "istio.io/dataplane-mode".to_owned(),
            "ambient".to_owned(),
        )]))
    }
    fn ready(&self) -> bool {
        true
    }
}

fn app() -> axum::Router {
    let config =
        Config::parse("listen: 127.0.0.1:0\ntls: {certFile: c, keyFile: k}\n").expect("config");
    router(Arc::new(AppState {
        config,
        secrets: SecretsPolicy::new().expect("policy"),
        facts: Arc::new(Facts),
        permits: tokio::sync::Semaphore::new(4),
        counters: Counters::default(),
        images: None,
    }))
}

/// A review of a pod refused twice over: the default ServiceAccount and a Secret in env.
fn refused_review() -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u", "name": "p", "namespace": "shop", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "mallory"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                       "spec": {"serviceAccountName": "default", "containers": [
                           {"name": "app", "image": "r.example/a:1",
                            "env": [{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]}]}},
        }
    })
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[a-zA-Z0-9:/@._-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("kind".to_owned()),
                    Just("request".to_owned()),
                    Just("object".to_owned()),
                    Just("spec".to_owned()),
                    Just("containers".to_owned()),
                    Just("image".to_owned()),
                    "[a-z]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

async fn post(body: String) -> (StatusCode, Value) {
    let resp = app()
        .oneshot(
            Request::post("/validate")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("request"),
        )
        .await
        .expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Every JSON pointer inside `v` below `prefix`.
fn pointers(v: &Value, prefix: &str, out: &mut Vec<String>) {
    out.push(prefix.to_owned());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                pointers(child, &format!("{prefix}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                pointers(child, &format!("{prefix}/{i}"), out);
            }
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]

    /// Arbitrary JSON, or arbitrary bytes: a 400 or a review, never a panic, never an allowed
    /// pod.
    #[test]
    fn arbitrary_bodies_never_panic_or_allow(body in arbitrary_json(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        for raw in [body.to_string(), String::from_utf8_lossy(&bytes).into_owned()] {
            let (status, out) = block_on(post(raw));
            prop_assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::OK, "{}", status);
            if status == StatusCode::OK {
                // Only a well-formed review gets an answer; arbitrary JSON is not one of a pod.
                prop_assert_ne!(out["response"]["allowed"].as_bool(), Some(true), "{}", out);
            }
        }
    }

    /// A refused pod stays refused when any one part of its object is replaced by arbitrary
    /// JSON: malformed input refuses, it never admits.
    #[test]
    fn mangled_objects_stay_refused(pick in any::<prop::sample::Index>(), replacement in arbitrary_json()) {
        let mut review = refused_review();
        let mut all = Vec::new();
        pointers(&review["request"]["object"], "/request/object", &mut all);
        let target = pick.get(&all).clone();
        if let Some(slot) = review.pointer_mut(&target) {
            *slot = replacement;
        }
        let (status, out) = block_on(post(review.to_string()));
        prop_assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::OK, "{}", status);
        if status == StatusCode::OK {
            prop_assert_eq!(out["response"]["allowed"].as_bool(), Some(false), "{} -> {}", target, out);
        }
    }
}

fn serving_cert(dir: &std::path::Path) -> Arc<ReloadingCert> {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write key");
    ReloadingCert::new(TlsFiles {
        cert_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
    })
    .expect("cert")
}

/// With one connection slot, a client that connects and never starts TLS holds it only for the
/// handshake timeout: the next connection is served after that, not never.
#[tokio::test]
async fn silent_clients_do_not_keep_the_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = serving_cert(dir.path());
    let limits = ServeLimits {
        client_roots: None,
        max_connections: 1,
        handshake_timeout: Duration::from_millis(300),
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(2),
        max_age: Duration::from_mins(1),
        max_handshakes: 1,
        ..ServeLimits::default()
    };
    let (addr, stop, server) = serve(&cert, limits, never_draining()).await;
    // The silent client takes the only slot; the server closes it after the timeout.
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the server closes a silent connection");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    // A second silent client, then a real one: served once the silent one is cut off.
    let _second = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    // A client that completes TLS and then says nothing (over HTTP/2 or HTTP/1) is cut off too.
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut quiet = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), quiet.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "a connection silent after TLS was kept open"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let _ = stop.send(());
    server.await.expect("join").expect("served");
}

/// A drain signal that never turns on (its sender is gone).
fn never_draining() -> tokio::sync::watch::Receiver<bool> {
    tokio::sync::watch::channel(false).1
}

/// GET /healthz over TLS from `client` (its own client certificate, or none); the status
/// line, or why the connection failed.
async fn healthz(addr: std::net::SocketAddr, client: rustls::ClientConfig) -> String {
    send(
        addr,
        client,
        "GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await
}

/// POST of an empty AdmissionReview body to /validate, as [`healthz`].
async fn validate(addr: std::net::SocketAddr, client: rustls::ClientConfig) -> String {
    send(
        addr,
        client,
        "POST /validate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
    )
    .await
}

/// `request` over TLS from `client`; the status line, or why the connection failed.
async fn send(addr: std::net::SocketAddr, client: rustls::ClientConfig, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = match connector.connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return format!("handshake failed: {e}"),
    };
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return format!("write failed: {e}");
    }
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await {
        Ok(Ok(_)) => String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        Ok(Err(e)) => format!("read failed: {e}"),
        Err(_) => "no answer".to_owned(),
    }
}

fn client_config() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
}

/// With `tls.clientCAFile`, a client without a certificate from that CA — anyone on the
/// network but the API server — gets no decision (the kubelet's probes are still answered);
/// one with another CA's certificate gets no connection; the API server's certificate is served.
#[tokio::test]
async fn only_clients_with_a_certificate_from_the_client_ca_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = serving_cert(dir.path());
    // The CA the API server's client certificate comes from, and that certificate.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let client_key = rcgen::KeyPair::generate().expect("key");
    let client_cert = rcgen::CertificateParams::new(vec!["kube-apiserver".to_owned()])
        .expect("params")
        .signed_by(&client_key, &issuer)
        .expect("client cert");
    // Another CA's certificate: refused too.
    let other_key = rcgen::KeyPair::generate().expect("key");
    let other = rcgen::CertificateParams::new(vec!["mallory".to_owned()])
        .expect("params")
        .self_signed(&other_key)
        .expect("other");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    let (addr, stop, server) = serve_with_client_ca(
        &cert,
        Arc::new(palisade_webhook::tls::ClientCa::from_roots(roots).expect("verifier")),
    )
    .await;
    let with = with_client_cert;
    // Without a certificate: the probes (the kubelet's) are answered, reviews are not.
    let anonymous = validate(addr, client_config().with_no_client_auth()).await;
    assert!(anonymous.starts_with("HTTP/1.1 403"), "{anonymous}");
    let probe = healthz(addr, client_config().with_no_client_auth()).await;
    assert!(probe.starts_with("HTTP/1.1 200"), "{probe}");
    // Another CA's certificate: no connection at all.
    let foreign = validate(addr, with(&other, &other_key)).await;
    assert!(!foreign.starts_with("HTTP/1.1"), "{foreign}");
    let foreign = healthz(addr, with(&other, &other_key)).await;
    assert!(!foreign.starts_with("HTTP/1.1"), "{foreign}");
    // The API server's certificate: the review is read (and refused as malformed).
    let api_server = validate(addr, with(&client_cert, &client_key)).await;
    assert!(api_server.starts_with("HTTP/1.1 400"), "{api_server}");
    let _ = stop.send(());
    server.await.expect("join").expect("served");
}

#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A CA and a client certificate it issued (with its key).
fn ca_with_client(name: &str) -> (rcgen::Certificate, rcgen::Certificate, rcgen::KeyPair) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("client cert");
    (ca, cert, key)
}

/// The API server's client CA rotates: once `tls.clientCAFile` holds the new CA, certificates
/// from it are served and those of the old one get no connection, with no restart.
#[tokio::test]
async fn a_rotated_client_ca_is_used_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = serving_cert(dir.path());
    let (old_ca, old_cert, old_key) = ca_with_client("kube-apiserver");
    let (new_ca, new_cert, new_key) = ca_with_client("kube-apiserver");
    let ca_file = dir.path().join("client-ca.crt");
    std::fs::write(&ca_file, old_ca.pem()).expect("write");
    let ca = Arc::new(palisade_webhook::tls::ClientCa::load(ca_file.clone()).expect("load"));
    let (addr, stop, server) = serve_with_client_ca(&cert, Arc::clone(&ca)).await;
    let with = with_client_cert;
    assert!(
        validate(addr, with(&old_cert, &old_key))
            .await
            .starts_with("HTTP/1.1 400")
    );
    assert!(
        !validate(addr, with(&new_cert, &new_key))
            .await
            .starts_with("HTTP/1.1")
    );
    assert!(!ca.reload().expect("unchanged"), "nothing to reload yet");
    std::fs::write(&ca_file, new_ca.pem()).expect("rotate");
    assert!(ca.reload().expect("reloaded"), "the new CA is read");
    let new = validate(addr, with(&new_cert, &new_key)).await;
    assert!(new.starts_with("HTTP/1.1 400"), "{new}");
    let old = validate(addr, with(&old_cert, &old_key)).await;
    assert!(!old.starts_with("HTTP/1.1"), "{old}");
    // A broken file keeps the CA in use.
    std::fs::write(&ca_file, "not a certificate").expect("break");
    assert!(ca.reload().is_err());
    assert!(
        validate(addr, with(&new_cert, &new_key))
            .await
            .starts_with("HTTP/1.1 400")
    );
    let _ = stop.send(());
    server.await.expect("join").expect("served");
}

/// A client presenting certificate `c` (key `k`).
fn with_client_cert(c: &rcgen::Certificate, k: &rcgen::KeyPair) -> rustls::ClientConfig {
    client_config()
        .with_client_auth_cert(
            vec![c.der().clone()],
            rustls_pki_types::PrivateKeyDer::try_from(k.serialize_der()).expect("key"),
        )
        .expect("client auth")
}

/// The test app served over TLS with client certificates checked by `ca`: its address, the
/// sender that stops it, and its task.
async fn serve_with_client_ca(
    cert: &palisade_webhook::tls::ReloadingCert,
    ca: Arc<palisade_webhook::tls::ClientCa>,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    serve(
        cert,
        ServeLimits {
            client_roots: Some(ca),
            ..ServeLimits::default()
        },
        never_draining(),
    )
    .await
}

/// The test app served over TLS with `limits`, draining when `draining` turns true: its
/// address, the sender that stops it, and its task.
async fn serve(
    cert: &palisade_webhook::tls::ReloadingCert,
    limits: ServeLimits,
    draining: tokio::sync::watch::Receiver<bool>,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_tls_with(
        listener,
        cert.serving(),
        app(),
        draining,
        async {
            let _ = stopped.await;
        },
        limits,
    ));
    (addr, stop, server)
}

/// Shutdown with a keep-alive connection open (as the API server keeps them): the connection
/// gets its answer, is then closed by the server (not reset mid-request), and the server ends at
/// once rather than waiting for the request timeout.
#[tokio::test]
async fn shutdown_closes_keep_alive_connections_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = serving_cert(dir.path());
    let (addr, stop, server) = serve(&cert, ServeLimits::default(), never_draining()).await;
    let mut tls = client_config().with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = connector.connect(name, tcp).await.expect("handshake");
    // One request on a connection that stays open.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut first))
        .await
        .expect("an answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&first[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let started = Instant::now();
    let _ = stop.send(());
    // The idle keep-alive connection is closed by the server: end of stream, no reset.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the server closes its idle connection on shutdown");
    assert!(closed.is_ok(), "the connection was reset: {closed:?}");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server ends once its connections are closed")
        .expect("join")
        .expect("served");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Draining (the pod is leaving): requests are still answered, but an HTTP/1.1 client is told
/// with its answer that the connection closes (`Connection: close`), and the server closes it
/// only after that answer, so a keep-alive client never sends into a connection closed under
/// it; an HTTP/2 connection is served until the server stops, then ends cleanly.
#[tokio::test]
async fn a_draining_server_tells_keep_alive_clients_to_leave_after_their_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = serving_cert(dir.path());
    let (drain, draining) = tokio::sync::watch::channel(false);
    let (addr, stop, server) = serve(&cert, ServeLimits::default(), draining).await;
    let connect = |alpn: &'static [u8]| async move {
        let mut tls = client_config().with_no_client_auth();
        tls.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        connector.connect(name, tcp).await.expect("handshake")
    };
    let ask = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n";
    // Before: a keep-alive answer without `Connection: close`.
    let mut http1 = connect(b"http/1.1").await;
    http1.write_all(ask).await.expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), http1.read(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    let before = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(before.starts_with("http/1.1 200"), "{before}");
    assert!(!before.contains("connection: close"), "{before}");
    // An HTTP/2 connection, open before the drain.
    let h2 = connect(b"h2").await;
    let (mut sender, h2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(h2),
    )
    .await
    .expect("h2 handshake");
    let h2_conn = tokio::spawn(h2_conn);
    let first = sender
        .send_request(
            Request::get("https://localhost/healthz")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("h2 answer");
    assert_eq!(first.status(), StatusCode::OK);

    drain.send(true).expect("drain");
    // The idle HTTP/1.1 connection is not closed under its client: it stays open, and its next
    // request is answered, with `Connection: close`, and then the server closes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    last_answer(&mut http1, ask).await;
    // The HTTP/2 connection is still served while the server drains.
    let during = sender
        .send_request(
            Request::get("https://localhost/healthz")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("an HTTP/2 answer while draining");
    assert_eq!(during.status(), StatusCode::OK);
    // A new HTTP/1.1 connection during the drain is served once.
    last_answer(&mut connect(b"http/1.1").await, ask).await;
    assert!(!server.is_finished(), "the server stopped while draining");
    let _ = stop.send(());
    // Stopping ends the HTTP/2 connection cleanly (GOAWAY).
    tokio::time::timeout(Duration::from_secs(5), h2_conn)
        .await
        .expect("the HTTP/2 connection ends when the server stops")
        .expect("join")
        .expect("a clean end");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server ends")
        .expect("join")
        .expect("served");
}

/// Sends `ask` on a draining server's HTTP/1.1 connection: the answer is a 200 that says
/// `Connection: close`, and the server then closes the connection cleanly (no reset).
async fn last_answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    ask: &[u8],
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(ask).await.expect("write while draining");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection after its answer")
        .expect("closed cleanly, not reset");
    let answer = String::from_utf8_lossy(&rest).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

/// The plain-HTTP metrics port, which any pod may reach: a request head that never ends is cut
/// at the header timeout or at the buffer cap (never held for good), connections beyond the cap
/// wait in the backlog, and a scraper is still served once the others are gone.
#[tokio::test]
async fn the_metrics_port_bounds_what_a_client_can_hold() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route("/metrics", axum::routing::get(|| async { "m 1\n" }));
    let limits = palisade_webhook::server::ServeLimits {
        header_timeout: Duration::from_millis(500),
        ..palisade_webhook::server::metrics_limits()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(palisade_webhook::server::serve_plain(
        listener,
        app,
        async move {
            let _ = stop_rx.await;
        },
        limits,
    ));
    // A head far over the buffer cap: the connection is closed, not kept growing.
    let mut big = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = big.write_all(b"GET /metrics HTTP/1.1\r\nX-A: ").await;
    let _ = big.write_all(&vec![b'a'; 64 * 1024]).await;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), big.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(_) | Err(_))),
        "a 64 KiB request head was still held after 5 s"
    );
    // Heads that never end, on every slot: each is cut at the header timeout.
    let mut slow = Vec::new();
    for _ in 0..16 {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET /metrics HTTP/1.1\r\nX-A: a")
            .await
            .expect("write");
        slow.push(c);
    }
    let started = Instant::now();
    for c in &mut slow {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(_) | Err(_))),
            "an unfinished head held for 5 s"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // A scraper after them is served.
    let mut scraper = tokio::net::TcpStream::connect(addr).await.expect("connect");
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), scraper.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("m 1\n"),
        "{answer}"
    );
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .expect("joined");
}
