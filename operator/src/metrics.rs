//! Prometheus metrics: reconciles (by kind and result), reconcile durations, API writes (by what
//! was written) and whether this replica leads, served on `/metrics` with `/healthz` and `/readyz`.
//!
//! Readiness does not depend on leadership: a standby that reached the API server is ready, so a
//! Deployment of several replicas becomes fully available and a rolling upgrade can proceed while
//! the old leader still holds the Lease. `palisade_operator_leading` says which replica leads.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use palisade_api::common::HasCommonStatus;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// What the operator writes: generated objects, deletions, status, finalizers.
pub const WRITE_KINDS: &[&str] = &["apply", "delete", "status", "finalizer"];

fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
    writes: Family<Labels, Counter>,
    vault_requests: Counter,
    vault_writes: Counter,
    vault_swept: Counter,
    leading: Gauge,
    policies: Family<Labels, Gauge>,
    vault_errors: Counter,
    /// Set once the API server answered this replica: it can lead (a standby is ready).
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("palisade_operator");
        let reconciles = Family::<Labels, Counter>::default();
        let durations = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            reconcile_histogram,
        );
        let writes = Family::<Labels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by kind and result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile durations by kind",
            durations.clone(),
        );
        registry.register(
            "api_writes",
            "Writes to the API server by what was written (apply, delete, status, finalizer)",
            writes.clone(),
        );
        let vault_requests = Counter::default();
        let vault_writes = Counter::default();
        registry.register(
            "vault_requests",
            "HTTP requests to Vault, logins included",
            vault_requests.clone(),
        );
        registry.register(
            "vault_writes",
            "Writes to Vault (creates, updates, deletes, lease revocations)",
            vault_writes.clone(),
        );
        let vault_swept = Counter::default();
        registry.register(
            "vault_swept",
            "SecretBindings whose Vault objects the sweep removed because the binding was gone",
            vault_swept.clone(),
        );
        let build = Family::<Labels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1, labelled with the running build's version and source commit",
            build.clone(),
        );
        let (version, commit) = crate::VERSION;
        build
            .get_or_create(&vec![
                ("version", version.to_owned()),
                ("commit", commit.to_owned()),
            ])
            .set(1);
        let policies = Family::<Labels, Gauge>::default();
        registry.register(
            "policies",
            "AuthPolicies, RateLimitPolicies and SecretBindings by kind and by whether they are Ready for their current generation",
            policies.clone(),
        );
        let vault_errors = Counter::default();
        registry.register(
            "vault_errors",
            "Vault requests that failed: no answer, or a status other than 2xx and 404",
            vault_errors.clone(),
        );
        let leading = Gauge::default();
        registry.register(
            "leading",
            "1 while this replica holds the leader Lease (or runs without leader election) and its controllers run",
            leading.clone(),
        );
        // Every write series exists from the start, so "0 writes" is a reading, not an absence.
        for what in WRITE_KINDS {
            let _ = writes.get_or_create(&vec![("what", (*what).to_owned())]);
        }
        Metrics {
            registry,
            reconciles,
            durations,
            writes,
            vault_requests,
            vault_writes,
            vault_swept,
            leading,
            policies,
            vault_errors,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Records one reconcile; `error` is the error reason, if it failed.
    pub fn reconciled(&self, kind: &'static str, error: Option<&'static str>, took: Duration) {
        let result = error.unwrap_or("ok").to_owned();
        self.reconciles
            .get_or_create(&vec![("kind", kind.to_owned()), ("result", result)])
            .inc();
        self.durations
            .get_or_create(&vec![("kind", kind.to_owned())])
            .observe(took.as_secs_f64());
    }

    /// Records one write to the API server.
    pub fn write(&self, what: &'static str) {
        self.writes
            .get_or_create(&vec![("what", what.to_owned())])
            .inc();
    }

    /// Records one request to Vault, and whether it writes.
    pub fn vault_request(&self, write: bool) {
        self.vault_requests.inc();
        if write {
            self.vault_writes.inc();
        }
    }

    /// Records one failed request to Vault.
    pub fn vault_error(&self) {
        self.vault_errors.inc();
    }

    /// Sets how many `kind` objects are Ready for their current generation, and how many not.
    pub fn count_ready<K: HasCommonStatus + kube::Resource>(
        &self,
        kind: &'static str,
        objects: &[Arc<K>],
    ) {
        let ready = objects
            .iter()
            .filter(|o| o.is_ready(o.meta().generation))
            .count();
        let set = |state: &str, n: usize| {
            self.policies
                .get_or_create(&vec![
                    ("kind", kind.to_owned()),
                    ("ready", state.to_owned()),
                ])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        set("true", ready);
        set("false", objects.len() - ready);
    }

    /// Counts `kind` in `store` every 10 seconds (for the life of the process).
    pub async fn count_ready_every<K>(
        metrics: Arc<Metrics>,
        kind: &'static str,
        store: kube::runtime::reflector::Store<K>,
    ) where
        K: HasCommonStatus + kube::Resource + Clone + 'static,
        K::DynamicType: std::hash::Hash + Eq + Clone,
    {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            metrics.count_ready(kind, &store.state());
        }
    }

    /// Records whether this replica leads (its controllers run).
    pub fn set_leading(&self, leading: bool) {
        self.leading.set(i64::from(leading));
    }

    /// Whether this replica leads.
    pub fn is_leading(&self) -> bool {
        self.leading.get() == 1
    }

    /// Records one binding whose Vault objects the sweep removed.
    pub fn vault_swept(&self) {
        self.vault_swept.inc();
    }

    /// Requests and writes sent to Vault so far.
    pub fn vault_totals(&self) -> (u64, u64) {
        (self.vault_requests.get(), self.vault_writes.get())
    }

    /// Total writes so far.
    pub fn total_writes(&self) -> u64 {
        WRITE_KINDS
            .iter()
            .map(|w| {
                self.writes
                    .get_or_create(&vec![("what", (*w).to_owned())])
                    .get()
            })
            .sum()
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready").into_response()
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the API server has not answered yet",
                    )
                        .into_response()
                }
            }),
        )
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
