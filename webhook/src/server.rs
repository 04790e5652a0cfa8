//! The HTTPS server: rustls with a certificate reloaded when both the certificate and key files
//! change on disk, axum routes `/validate`, `/mutate`, `/healthz`, `/readyz`, `/metrics`.
//!
//! A malformed AdmissionReview gets a 400 with a JSON reason; bodies over the configured limit
//! a 413. Decisions (Rego evaluation) run on the blocking pool behind a semaphore, off the async
//! runtime.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use arc_swap::ArcSwap;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde_json::json;

use crate::{
    config::{Config, TlsFiles},
    decide::{Facts, decide},
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
    /// Whether the caches are synced.
    fn ready(&self) -> bool;
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
}

/// Decision counters.
#[derive(Default)]
pub struct Counters {
    allow: AtomicU64,
    deny: AtomicU64,
    warn: AtomicU64,
    malformed: AtomicU64,
    micros: AtomicU64,
    /// Set when the server is shutting down.
    pub draining: AtomicBool,
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/validate", post(validate))
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn bad_request(state: &AppState, why: &str) -> Response {
    state.counters.malformed.fetch_add(1, Ordering::Relaxed);
    (StatusCode::BAD_REQUEST, Json(json!({"error": why}))).into_response()
}

fn parse(body: &Bytes) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    review
        .try_into()
        .map_err(|e| format!("AdmissionReview without a usable request: {e}"))
}

async fn validate(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(r) => r,
        Err(why) => return bad_request(&state, &why),
    };
    let started = Instant::now();
    let namespace = req.namespace.clone().unwrap_or_default();
    let labels = state.facts.namespace_labels(&namespace);
    let spire = if state.config.identity_source == crate::identity::IdentitySource::Spire {
        state.facts.spire_registrations()
    } else {
        Vec::new()
    };
    let Ok(_permit) = state.permits.acquire().await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    };
    let st = Arc::clone(&state);
    let decided = tokio::task::spawn_blocking(move || {
        let facts = Facts {
            namespace_labels: labels.unwrap_or_default(),
            spire,
        };
        let (resp, verdict) = decide(&req, &facts, &st.config, &st.secrets);
        (req, resp, verdict)
    })
    .await;
    let (req, resp, verdict) = match decided {
        Ok(d) => d,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    let counter = match verdict.verdict {
        "deny" => &state.counters.deny,
        "warn" => &state.counters.warn,
        _ => &state.counters.allow,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    state.counters.micros.fetch_add(micros, Ordering::Relaxed);
    tracing::info!(
        target: "palisade::security",
        uid = %req.uid,
        user = %req.user_info.username.clone().unwrap_or_default(),
        operation = ?req.operation,
        kind = %req.kind.kind,
        namespace = %namespace,
        name = %req.name,
        dry_run = req.dry_run,
        verdict = verdict.verdict,
        rules = %verdict.rules.join(","),
        message = %resp.result.message,
        "admission decision"
    );
    Json(resp.into_review()).into_response()
}

async fn mutate(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    // No mutation is configured yet (digest pinning arrives with image policies): admit as is,
    // so the endpoint can be registered ahead of time.
    match parse(&body) {
        Ok(req) => Json(AdmissionResponse::from(&req).into_review()).into_response(),
        Err(why) => bad_request(&state, &why),
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.facts.ready() && !state.counters.draining.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> String {
    let c = &state.counters;
    format!(
        "# TYPE palisade_webhook_decisions_total counter\n\
         palisade_webhook_decisions_total{{verdict=\"allow\"}} {}\n\
         palisade_webhook_decisions_total{{verdict=\"deny\"}} {}\n\
         palisade_webhook_decisions_total{{verdict=\"warn\"}} {}\n\
         # TYPE palisade_webhook_malformed_requests_total counter\n\
         palisade_webhook_malformed_requests_total {}\n\
         # TYPE palisade_webhook_decision_seconds_total counter\n\
         palisade_webhook_decision_seconds_total {}\n",
        c.allow.load(Ordering::Relaxed),
        c.deny.load(Ordering::Relaxed),
        c.warn.load(Ordering::Relaxed),
        c.malformed.load(Ordering::Relaxed),
        f64::from(u32::try_from(c.micros.load(Ordering::Relaxed)).unwrap_or(u32::MAX)) / 1e6,
    )
}

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("cannot load {path}: {why}")]
    Load {
        /// File.
        path: String,
        /// Cause.
        why: String,
    },
}

fn load_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let err = |path: &PathBuf, why: String| TlsError::Load {
        path: path.display().to_string(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(|e| err(&files.cert_file, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&files.cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(&files.cert_file, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| err(&files.key_file, e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| err(&files.key_file, e.to_string()))?;
    Ok(CertifiedKey::new(certs, signer))
}

/// Serves the certificate in `files`, reloading it when both files have changed.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    stamps: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    /// Loads the certificate now; fails when it cannot.
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let key = load_key(&files)?;
        let stamps = (mtime(&files.cert_file), mtime(&files.key_file));
        Ok(Arc::new(ReloadingCert {
            files,
            current: ArcSwap::from_pointee(key),
            stamps: Mutex::new(stamps),
        }))
    }

    /// Reloads when both files changed since the last load; returns whether it did. A pair that
    /// does not load keeps the current certificate in service.
    pub fn reload_if_changed(&self) -> bool {
        let now = (mtime(&self.files.cert_file), mtime(&self.files.key_file));
        let Ok(mut stamps) = self.stamps.lock() else {
            return false;
        };
        if now.0 == stamps.0 || now.1 == stamps.1 {
            return false;
        }
        match load_key(&self.files) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                *stamps = now;
                tracing::info!("serving certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "new certificate does not load; keeping the current one");
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    cert: Arc<ReloadingCert>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_cert_resolver(cert.clone());
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let reloader = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            cert.reload_if_changed();
        }
    });
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => break,
        };
        // Responses are small and latency-bound: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
        });
    }
    reloader.abort();
    Ok(())
}
