//! The HTTPS server: rustls with a certificate from [`crate::tls`], axum routes `/validate`, `/mutate`, `/healthz`, `/readyz`, `/metrics`.
//!
//! A malformed AdmissionReview gets a 400 with a JSON reason; bodies over the configured limit
//! a 413. Decisions (Rego evaluation) run on the blocking pool behind a semaphore, off the async
//! runtime.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse},
};
use rustls::server::ResolvesServerCert;
use serde_json::{Value, json};

use crate::{
    config::Config,
    decide::{Facts, decide},
    images::{check::ImageVerifier, policy::CompiledImagePolicy},
    secrets::SecretsPolicy,
};

/// Looks up facts about a namespace (labels) for a decision.
pub trait FactSource: Send + Sync + 'static {
    /// Labels of `namespace`, or `None` when it is unknown.
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>>;
    /// The SPIRE registrations (`ClusterSPIFFEID`s), when SPIRE is the identity source.
    fn spire_registrations(&self) -> Vec<crate::identity::SpireRegistration> {
        Vec::new()
    }
    /// The ImagePolicies in force, compiled.
    fn image_policies(&self) -> Vec<Arc<CompiledImagePolicy>> {
        Vec::new()
    }
    /// Labels of `namespace` read from the API server, for a namespace the cache does not know
    /// (yet): `Ok(None)` when it does not exist. Without a live source, unknown namespaces are
    /// refused.
    fn namespace_labels_live<'a>(
        &'a self,
        namespace: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<BTreeMap<String, String>>, crate::FactError>>
    {
        Box::pin(async move { Err(crate::FactError::NotCached(namespace.to_owned())) })
    }
    /// How many namespaces carry each value of the enforcement label (values that name no mode
    /// counted as `Enforce`).
    fn lowered_namespaces(&self) -> BTreeMap<crate::config::Mode, usize> {
        BTreeMap::new()
    }
    /// Whether `namespace` is being deleted: the API server refuses every new object in it
    /// (403), and the background scan leaves it to its deletion.
    fn namespace_terminating(&self, _namespace: &str) -> bool {
        false
    }
    /// Whether the caches are synced.
    fn ready(&self) -> bool;
    /// Whether this replica holds the Lease that lets it write ImagePolicy status (`None`
    /// where there is no election).
    fn leading(&self) -> Option<bool> {
        None
    }
}

/// The labels of the request's namespace: from the cache, else read live; a namespace that
/// cannot be found refuses the request (its labels decide coverage: empty ones would fail open).
/// A request for a Namespace itself needs none (its own labels are in the request, and a new
/// one is not found yet).
async fn namespace_labels(
    state: &AppState,
    req: &AdmissionRequest<DynamicObject>,
) -> Result<BTreeMap<String, String>, crate::FactError> {
    let namespace = req.namespace.as_deref().unwrap_or_default();
    if namespace.is_empty()
        || (req.kind.group.is_empty() && req.kind.kind == "Namespace")
        || state
            .config
            .exempt_namespaces
            .iter()
            .any(|n| n == namespace)
    {
        return Ok(BTreeMap::new());
    }
    if let Some(labels) = state.facts.namespace_labels(namespace) {
        return Ok(labels);
    }
    match state.facts.namespace_labels_live(namespace).await {
        Ok(Some(labels)) => Ok(labels),
        Ok(None) => Err(crate::FactError::Missing(format!("namespace {namespace}"))),
        Err(e) => Err(e),
    }
}

/// The operation as the API server names it (the metrics' label).
fn operation(op: &kube::core::admission::Operation) -> &'static str {
    use kube::core::admission::Operation;
    match op {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

/// A refusal of `req` that explains itself, with the verdict it is logged as.
fn refused(req: &AdmissionRequest<DynamicObject>, why: &str) -> Response {
    let what = format!(
        "{} {}/{}",
        req.kind.kind,
        req.namespace.as_deref().unwrap_or_default(),
        req.name
    );
    tracing::info!(target: "palisade::security", uid = %req.uid, verdict = "deny", message = %why,
        "admission decision");
    Json(
        AdmissionResponse::from(req)
            .deny(format!("palisade denied {what}: {why}"))
            .into_review(),
    )
    .into_response()
}

/// Everything a request handler needs.
pub struct AppState {
    /// Configuration.
    pub config: Config,
    /// Compiled secrets policy.
    pub secrets: SecretsPolicy,
    /// Cluster facts.
    pub facts: Arc<dyn FactSource>,
    /// Bounds concurrent decisions on the blocking pool.
    pub permits: tokio::sync::Semaphore,
    /// Counters for `/metrics`.
    pub counters: Counters,
    /// Image signature checks; `None` disables them.
    pub images: Option<Arc<ImageVerifier>>,
}

pub use crate::metrics::Counters;

/// The router of the HTTPS port: `/metrics` too unless `metricsListen` serves them.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    let app = Router::new()
        .route("/validate", post(validate))
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    let app = if state.config.metrics_listen.is_none() {
        app.route("/metrics", get(metrics))
    } else {
        app
    };
    app.layer(DefaultBodyLimit::max(limit)).with_state(state)
}

/// The router of the metrics port (`metricsListen`): `/metrics` and `/healthz`, nothing else.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(0))
        .with_state(state)
}

fn bad_request(state: &AppState, why: &str) -> Response {
    state.counters.malformed();
    (StatusCode::BAD_REQUEST, Json(json!({"error": why}))).into_response()
}

/// What `/validate` and `/mutate` start from: the request, when it was parsed, and the
/// deadline for answering it; a 400 (counted) when the body is not a usable review.
fn incoming(
    state: &AppState,
    body: &Bytes,
    query: Option<&str>,
) -> Result<(AdmissionRequest<DynamicObject>, Instant, Instant), Box<Response>> {
    let req = crate::review::parse(body).map_err(|why| Box::new(bad_request(state, &why)))?;
    let started = Instant::now();
    Ok((req, started, deadline(started, query)))
}

/// The longest `timeout` the API server allows a webhook call; a larger one is not believed.
pub const MAX_WEBHOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long the API server waits for this call (its `timeout` query parameter, 10 s when
/// absent, never more than the API server's maximum of 30 s), less a margin for the answer's
/// way back.
pub fn deadline(started: Instant, query: Option<&str>) -> Instant {
    let total = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("timeout="))
        .and_then(|t| t.parse::<palisade_api::Duration>().ok())
        .map_or(std::time::Duration::from_secs(10), |d| {
            std::time::Duration::from_millis(d.as_millis())
        })
        .min(MAX_WEBHOOK_TIMEOUT);
    let margin = std::time::Duration::from_millis(750);
    started
        + total
            .saturating_sub(margin)
            .max(std::time::Duration::from_millis(250))
}

/// Reviews of at most this many bytes, with at most [`INLINE_ENV_ENTRIES`] environment entries,
/// are decided on the async worker that read them; others on the blocking pool.
pub const INLINE_DECISION_BYTES: usize = 8 * 1024;
/// Environment entries (`env` and `envFrom` items, in every container list) a review decided
/// inline may carry: each value is matched against the secret patterns, the decision's one cost
/// that grows with the pod (about 0.1 ms per value at worst), and an inline decision holds one of
/// the runtime's workers (health probes and every other request wait for it).
pub const INLINE_ENV_ENTRIES: usize = 8;

/// Whether a review of `len` bytes for `object` is decided inline: small, and with few
/// environment entries.
pub fn decided_inline(len: usize, object: Option<&DynamicObject>) -> bool {
    fn entries(v: &Value, budget: &mut usize) -> bool {
        match v {
            Value::Object(m) => m.iter().all(|(k, v)| {
                if let ("env" | "envFrom", Value::Array(items)) = (k.as_str(), v) {
                    let Some(left) = budget.checked_sub(items.len()) else {
                        return false;
                    };
                    *budget = left;
                }
                entries(v, budget)
            }),
            Value::Array(items) => items.iter().all(|v| entries(v, budget)),
            _ => true,
        }
    }
    len <= INLINE_DECISION_BYTES
        && object.is_none_or(|o| entries(&o.data, &mut { INLINE_ENV_ENTRIES }))
}

/// Decides `req` on the blocking pool, holding one of the decision permits (which bound the
/// pool's work; the wait for one ends with the request's deadline).
async fn decide_on_the_pool(
    state: &Arc<AppState>,
    req: AdmissionRequest<DynamicObject>,
    facts: Facts,
    deadline: Instant,
) -> Result<
    (
        AdmissionRequest<DynamicObject>,
        Facts,
        AdmissionResponse,
        crate::decide::Verdict,
    ),
    Box<Response>,
> {
    let permit = tokio::time::timeout_at(deadline.into(), state.permits.acquire()).await;
    let permit = match permit {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => {
            return Err(Box::new(
                (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response(),
            ));
        }
        Err(_) => {
            return Err(Box::new(refused(
                &req,
                "the webhook is overloaded: no decision slot freed up before the request's deadline",
            )));
        }
    };
    let st = Arc::clone(state);
    let decided = tokio::task::spawn_blocking(move || {
        let (resp, verdict) = decide(&req, &facts, &st.config, &st.secrets);
        (req, facts, resp, verdict)
    })
    .await;
    drop(permit);
    decided.map_err(|e| {
        Box::new(
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": e.to_string()})),
            )
                .into_response(),
        )
    })
}

async fn validate(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let (req, started, deadline) = match incoming(&state, &body, query.as_deref()) {
        Ok(r) => r,
        Err(bad) => return *bad,
    };
    let namespace = req.namespace.clone().unwrap_or_default();
    let labels = match namespace_labels(&state, &req).await {
        Ok(l) => l,
        Err(why) => return refused(&req, &why.to_string()),
    };
    let spire = if state.config.identity_source == crate::identity::IdentitySource::Spire {
        state.facts.spire_registrations()
    } else {
        Vec::new()
    };
    let facts = Facts {
        namespace_labels: labels,
        spire,
    };
    let (req, facts, resp, verdict) = if decided_inline(body.len(), req.object.as_ref()) {
        // Cheap to decide: here, on the worker that read it, rather than paying two thread
        // hand-offs to the blocking pool and back.
        let (resp, verdict) = decide(&req, &facts, &state.config, &state.secrets);
        (req, facts, resp, verdict)
    } else {
        match decide_on_the_pool(&state, req, facts, deadline).await {
            Ok(d) => d,
            Err(response) => return *response,
        }
    };
    let (resp, verdict) = match &state.images {
        Some(images) => {
            crate::images::admit::check_pod(
                images,
                &state.facts.image_policies(),
                &req,
                &facts.namespace_labels,
                deadline,
                resp,
                verdict,
            )
            .await
        }
        None => (resp, verdict),
    };
    state.counters.decided(
        operation(&req.operation),
        &req.kind.kind,
        verdict.verdict,
        &verdict.modes,
        started.elapsed(),
    );
    tracing::info!(
        target: "palisade::security",
        uid = %req.uid,
        user = %req.user_info.username.as_deref().unwrap_or_default(),
        operation = ?req.operation,
        kind = %req.kind.kind,
        namespace = %namespace,
        name = %req.name,
        dry_run = req.dry_run,
        verdict = verdict.verdict,
        rules = %verdict.rules.join(","),
        message = %resp.result.message,
        audited = %verdict.audited.join(" | "),
        "admission decision"
    );
    Json(resp.into_review()).into_response()
}

async fn mutate(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let (req, _, deadline) = match incoming(&state, &body, query.as_deref()) {
        Ok(r) => r,
        Err(bad) => return *bad,
    };
    let (response, verdict) = pin(&state, &req, deadline).await;
    state
        .counters
        .admitted("mutate", operation(&req.operation), &req.kind.kind, verdict);
    response
}

/// The mutating hook's answer for `req` (the digest pins) and its verdict, `allow` or `deny`.
async fn pin(
    state: &AppState,
    req: &AdmissionRequest<DynamicObject>,
    deadline: std::time::Instant,
) -> (Response, &'static str) {
    let resp = AdmissionResponse::from(req);
    let Some(images) = &state.images else {
        return (Json(resp.into_review()).into_response(), "allow");
    };
    let namespace = req.namespace.clone().unwrap_or_default();
    let labels = match namespace_labels(state, req).await {
        Ok(l) => l,
        Err(why) => return (refused(req, &why.to_string()), "deny"),
    };
    let ops = crate::images::pin::pin_ops(
        images,
        &state.facts.image_policies(),
        &state.config,
        req,
        &labels,
        deadline,
    )
    .await;
    if ops.is_empty() {
        return (Json(resp.into_review()).into_response(), "allow");
    }
    let patched = serde_json::from_value::<json_patch::Patch>(serde_json::Value::Array(ops))
        .map_err(|e| e.to_string())
        .and_then(|p| resp.with_patch(p).map_err(|e| e.to_string()));
    match patched {
        Ok(r) => (Json(r.into_review()).into_response(), "allow"),
        // A pin that cannot be expressed refuses: the image would run by its moving tag.
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the digest-pinning patch");
            (
                Json(
                    AdmissionResponse::from(req)
                        .deny(format!(
                            "palisade cannot pin the verified image digests of Pod {}/{}: {e}",
                            namespace, req.name
                        ))
                        .into_review(),
                )
                .into_response(),
                "deny",
            )
        }
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.facts.ready() && !state.counters.draining.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let scrape = crate::metrics::Scrape {
        namespaces: state.facts.lowered_namespaces(),
        leading: state.facts.leading(),
        images: state.images.as_ref().map(|i| i.stats()),
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.counters.render(&scrape),
    )
        .into_response()
}

/// Who may connect, and limits that keep one client (or many) from exhausting the server.
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// When set, only clients presenting a certificate these CAs signed get decisions.
    pub client_roots: Option<Arc<crate::tls::ClientCa>>,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: std::time::Duration,
    /// Time allowed for a request's headers to arrive, and for a new connection's first
    /// request to start.
    pub header_timeout: std::time::Duration,
    /// Time a connection may sit with no request in flight before it is closed (gracefully).
    pub idle_timeout: std::time::Duration,
    /// Time one request may take, body included.
    pub request_timeout: std::time::Duration,
    /// Age at which a connection is closed (gracefully) whatever it does.
    pub max_age: std::time::Duration,
    /// TLS handshakes in progress at once; a connection slot is taken only after one succeeds,
    /// so clients that cannot complete one (no client certificate) never hold a slot.
    pub max_handshakes: usize,
    /// Bytes an HTTP/1.1 connection may buffer while it reads a request head (at least 8192).
    pub max_buffer_bytes: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            client_roots: None,
            max_connections: 1024,
            handshake_timeout: std::time::Duration::from_secs(10),
            header_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(30),
            // The API server's longest wait, and a little more.
            request_timeout: MAX_WEBHOOK_TIMEOUT + std::time::Duration::from_secs(5),
            max_age: std::time::Duration::from_mins(10),
            max_handshakes: 256,
            // hyper's own default.
            max_buffer_bytes: 8192 + 4096 * 100,
        }
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, with the default limits;
/// with `client_roots`, decisions only to clients presenting a certificate they signed. Once
/// `draining` turns true, HTTP/1.1 clients are told to move on while still being served (see
/// [`serve_tls_with`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    cert: Arc<dyn ResolvesServerCert>,
    app: Router,
    draining: tokio::sync::watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    client_roots: Option<Arc<crate::tls::ClientCa>>,
) -> std::io::Result<()> {
    serve_tls_with(
        listener,
        cert,
        app,
        draining,
        shutdown,
        ServeLimits {
            client_roots,
            ..ServeLimits::default()
        },
    )
    .await
}

/// What a connection is doing: requests in flight, requests served, and when it last did
/// anything.
struct Activity {
    started: Instant,
    in_flight: AtomicU64,
    served: AtomicU64,
    last_millis: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(now, Ordering::Relaxed);
    }

    /// Whether the connection has had nothing in flight for longer than its limit (the header
    /// timeout before its first request, the idle timeout after).
    fn idle_too_long(&self, limits: &ServeLimits) -> bool {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let limit = if self.served.load(Ordering::Relaxed) == 0 {
            limits.header_timeout
        } else {
            limits.idle_timeout
        };
        let last = std::time::Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) > limit
    }
}

/// One request in flight on a connection, counted out when dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.served.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves. An `accept` error (file
/// descriptors exhausted, a connection reset before it was taken) is logged and serving goes
/// on; handshakes, request headers, whole requests and idle connections are bounded in time,
/// connections in number.
///
/// From the moment `draining` turns true (a dropped sender means never), every request is still
/// answered, and HTTP/1.1 clients are told to leave: each answer carries `Connection: close` and
/// its connection closes once it is written, so the client opens its next one elsewhere rather
/// than sending into a keep-alive connection closed under it. HTTP/2 connections are served
/// until `shutdown` (then GOAWAY).
pub async fn serve_tls_with(
    listener: tokio::net::TcpListener,
    cert: Arc<dyn ResolvesServerCert>,
    app: Router,
    draining: tokio::sync::watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ServeLimits,
) -> std::io::Result<()> {
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?;
    let mut tls = match &limits.client_roots {
        None => tls.with_no_client_auth(),
        // A certificate, when one is presented, must chain to the roots; a client without one
        // (the kubelet's probes) reaches the probe paths only (see `serve_connection`).
        Some(ca) => tls.with_client_cert_verifier(Arc::clone(ca) as _),
    }
    .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes));
    tokio::pin!(shutdown);
    // Told to every connection when the listener closes, so each finishes what it serves and
    // closes cleanly (HTTP/2 GOAWAY, or `Connection: close` on HTTP/1.1) rather than being cut.
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // A free handshake slot first: at the cap, new connections wait in the backlog.
        let handshake = tokio::select! {
            h = Arc::clone(&handshakes).acquire_owned() => h.map_err(std::io::Error::other)?,
            () = &mut shutdown => break,
        };
        let Some(tcp) = next_connection(&listener, &mut shutdown).await else {
            break;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let limits = limits.clone();
        let slots = Arc::clone(&slots);
        let closed = closed.clone();
        let draining = draining.clone();
        connections.spawn(async move {
            let accepted =
                tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
            drop(handshake);
            let Ok(Ok(stream)) = accepted else {
                return;
            };
            // A connection slot once the client has proven itself; waiting for one is bounded
            // by the header timeout, as a new connection's first request is.
            let Ok(Ok(_slot)) =
                tokio::time::timeout(limits.header_timeout, slots.acquire_owned()).await
            else {
                return;
            };
            let anonymous = limits.client_roots.is_some()
                && stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .is_none_or(<[_]>::is_empty);
            let signals = Signals { draining, closed };
            serve_connection(stream, app, limits, anonymous, signals).await;
        });
    }
    // Requests in flight finish (each is bounded by the request timeout); then the server ends.
    let _ = closing.send(true);
    let wait_for = limits.request_timeout + std::time::Duration::from_secs(5);
    let finished = tokio::time::timeout(wait_for, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            left = connections.len(),
            "connections still open after the request timeout; closing them"
        );
    }
    Ok(())
}

/// The limits of the plain-HTTP metrics port: few connections, small request heads, short
/// timeouts (a scraper sends one small GET at a time).
pub fn metrics_limits() -> ServeLimits {
    ServeLimits {
        max_connections: 16,
        header_timeout: std::time::Duration::from_secs(5),
        idle_timeout: std::time::Duration::from_secs(30),
        request_timeout: std::time::Duration::from_secs(10),
        max_buffer_bytes: 8192,
        ..ServeLimits::default()
    }
}

/// Serves `app` over plain HTTP on `listener` until `shutdown` resolves, bounded like the
/// HTTPS port (connections in number; request heads, requests and idle connections in time;
/// and here request heads in size): the metrics port, which any pod may reach.
pub async fn serve_plain(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ServeLimits,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (_never_draining, draining) = tokio::sync::watch::channel(false);
    let (closing, closed) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // A free slot first: at the cap, new connections wait in the backlog.
        let slot = tokio::select! {
            s = Arc::clone(&slots).acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            () = &mut shutdown => break,
        };
        let Some(tcp) = next_connection(&listener, &mut shutdown).await else {
            break;
        };
        let (app, limits) = (app.clone(), limits.clone());
        let signals = Signals {
            draining: draining.clone(),
            closed: closed.clone(),
        };
        connections.spawn(async move {
            let _slot = slot;
            serve_connection(tcp, app, limits, false, signals).await;
        });
    }
    let _ = closing.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// The next connection of `listener`, or `None` once `shutdown` resolves. An `accept` error
/// (file descriptors exhausted, a connection reset before it was taken) is logged and
/// accepting goes on; such errors clear when connections close, so it waits 50 ms rather than
/// spin. Responses are small and latency-bound: no Nagle delay.
async fn next_connection<F: Future<Output = ()>>(
    listener: &tokio::net::TcpListener,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Option<tokio::net::TcpStream> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some(tcp);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection; serving on");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            () = shutdown.as_mut() => return None,
        }
    }
}

/// What a connection is told by its server: that it drains, then that it closes.
struct Signals {
    draining: tokio::sync::watch::Receiver<bool>,
    closed: tokio::sync::watch::Receiver<bool>,
}

/// Serves one TLS connection until the client closes it, or it idles too long (then it is
/// shut down gracefully, and dropped if the client does not follow within 5 s).
/// An `anonymous` client (no certificate where `tls.clientCAFile` asks for one) is answered on
/// the probe paths and `/metrics` (read-only counters, for Prometheus) only.
async fn serve_connection<S>(
    stream: S,
    app: Router,
    limits: ServeLimits,
    anonymous: bool,
    signals: Signals,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    let Signals {
        draining,
        mut closed,
    } = signals;
    let activity = Arc::new(Activity {
        started: Instant::now(),
        in_flight: AtomicU64::new(0),
        served: AtomicU64::new(0),
        last_millis: AtomicU64::new(0),
    });
    let service = tower::service_fn({
        let activity = Arc::clone(&activity);
        let request_timeout = limits.request_timeout;
        let draining = draining.clone();
        move |req: axum::http::Request<hyper::body::Incoming>| {
            let (app, activity) = (app.clone(), Arc::clone(&activity));
            let draining = draining.clone();
            async move {
                // Counted out when the handler ends or is dropped (an HTTP/2 stream reset
                // drops it), so an abandoned request never keeps the connection busy.
                let _in_flight = InFlight::start(&activity);
                if anonymous && !matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics") {
                    return Ok((
                        StatusCode::FORBIDDEN,
                        "a client certificate from tls.clientCAFile is required",
                    )
                        .into_response());
                }
                let http1 = req.version() <= axum::http::Version::HTTP_11;
                let out = tokio::time::timeout(request_timeout, app.oneshot(req)).await;
                let mut resp = match out {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(never)) => match never {},
                    Err(_) => {
                        (StatusCode::REQUEST_TIMEOUT, "request took too long").into_response()
                    }
                };
                // Draining: this answer is the connection's last, and the client knows it.
                if http1 && *draining.borrow() {
                    resp.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_buffer_bytes);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(std::time::Duration::from_secs(20)))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .max_concurrent_streams(256);
    let conn = builder.serve_connection(io, hyper_util::service::TowerToHyperService::new(service));
    tokio::pin!(conn);
    let check = (limits.header_timeout.min(limits.idle_timeout) / 4)
        .max(std::time::Duration::from_millis(20));
    let mut tick = tokio::time::interval(check);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            // HTTP/1.1 connections are told with their next answer while the server drains
            // (above); HTTP/2 ones keep being served until the server stops (GOAWAY then: an
            // early GOAWAY closed idle connections under requests already on their way).
            _ = closed.wait_for(|c| *c) => break,
            _ = tick.tick() => {
                // Idle too long, or simply old: every connection is renewed now and then.
                if activity.idle_too_long(&limits) || activity.started.elapsed() > limits.max_age {
                    break;
                }
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    // In-flight requests finish (each is bounded by the request timeout); an idle one closes now.
    let _ = tokio::time::timeout(limits.request_timeout, conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_request_does_not_keep_its_connection_busy() {
        let activity = Arc::new(Activity {
            started: Instant::now(),
            in_flight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            last_millis: AtomicU64::new(0),
        });
        let limits = ServeLimits {
            header_timeout: std::time::Duration::ZERO,
            idle_timeout: std::time::Duration::ZERO,
            ..ServeLimits::default()
        };
        // A handler future dropped mid-request (an HTTP/2 stream reset does that) still
        // counts itself out.
        let handler = async {
            let _in_flight = InFlight::start(&activity);
            std::future::pending::<()>().await;
        };
        let mut handler = Box::pin(handler);
        let waker = futures::task::noop_waker();
        let _ = handler
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker));
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 1);
        assert!(!activity.idle_too_long(&limits));
        drop(handler);
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(activity.idle_too_long(&limits));
    }

    #[test]
    fn the_deadline_believes_the_api_server_only_up_to_its_maximum() {
        let now = Instant::now();
        let left = |q: &str| deadline(now, Some(q)).duration_since(now);
        assert_eq!(left("timeout=5s"), std::time::Duration::from_millis(4250));
        assert_eq!(
            left("timeout=86400s"),
            std::time::Duration::from_millis(29_250)
        );
        assert_eq!(left("x=1"), std::time::Duration::from_millis(9250));
        assert_eq!(left("timeout=1ms"), std::time::Duration::from_millis(250));
    }
}
