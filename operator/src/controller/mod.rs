//! Controllers: AuthPolicy and RateLimitPolicy.
//!
//! In: watch events of the Palisade objects and of every object Palisade generated (filtered by
//! the `app.kubernetes.io/managed-by=palisade` label; each generated kind is cached in a store).
//! Out: server-side applies of what the translators return — only when the cached live object
//! does not already hold it — deletes of what is no longer wanted, status, and Events.

pub mod apply;
pub mod auth;
pub mod gateway;
pub mod generated;
pub mod ratelimit;
pub mod secrets;
pub mod status;
pub mod topology;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{Stream, StreamExt, TryStreamExt};
use kube::{
    Api, Client,
    api::{ApiResource, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        events::{Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};

use self::generated::GeneratedObject;
use crate::{
    metrics::Metrics,
    translate::{Context, MANAGED_BY, MANAGED_BY_LABEL},
};

/// Field manager of every write Palisade makes.
pub const FIELD_MANAGER: &str = "palisade-operator";

/// How often a reconciled object is looked at again without any event (a no-op resync).
pub const RESYNC: Duration = Duration::from_mins(10);

/// A generated kind the cluster serves, with its cache.
#[derive(Clone)]
pub struct GeneratedKind {
    /// How to reach it.
    pub resource: ApiResource,
    /// Whether it is namespaced.
    pub namespaced: bool,
    /// Cached live objects carrying Palisade's label.
    pub store: Store<GeneratedObject>,
}

/// Everything a reconcile needs.
pub struct State {
    /// API client.
    pub client: Client,
    /// Translation settings.
    pub ctx: Context,
    /// Generated kinds by `(apiVersion, kind)`; a missing entry means the cluster lacks the CRD.
    pub kinds: BTreeMap<(String, String), GeneratedKind>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The last desired object applied per object, to tell "not yet in the cache" from "gone".
    pub applied: apply::AppliedCache,
    /// The resource versions our own writes produced: their watch events trigger nothing.
    pub echoes: Arc<apply::Echoes>,
}

/// `(apiVersion, kind)` of every object the AuthPolicy controller generates.
pub const AUTH_KINDS: &[(&str, &str)] = &[
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("security.istio.io/v1", "RequestAuthentication"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("v1", "ConfigMap"),
    ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID"),
];

/// `(apiVersion, kind)` of every object the RateLimitPolicy controller generates.
pub const RATE_LIMIT_KINDS: &[(&str, &str)] = &[
    ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"),
];

fn gvk(api_version: &str, kind: &str) -> GroupVersionKind {
    match api_version.split_once('/') {
        Some((g, v)) => GroupVersionKind::gvk(g, v, kind),
        None => GroupVersionKind::gvk("", api_version, kind),
    }
}

/// Looks up which generated kinds the cluster serves. Kinds whose CRDs are missing are left out
/// (policies needing them report it in status).
pub async fn discover(client: &Client) -> BTreeMap<(String, String), (ApiResource, bool)> {
    let mut found = BTreeMap::new();
    for (api_version, kind) in AUTH_KINDS.iter().chain(RATE_LIMIT_KINDS) {
        match kube::discovery::pinned_kind(client, &gvk(api_version, kind)).await {
            Ok((ar, caps)) => {
                let namespaced = caps.scope == kube::discovery::Scope::Namespaced;
                found.insert(
                    ((*api_version).to_owned(), (*kind).to_owned()),
                    (ar, namespaced),
                );
            }
            Err(e) => {
                tracing::warn!(%api_version, %kind, error = %e, "generated kind not served; policies needing it will report BackendMissing");
            }
        }
    }
    found
}

/// A watch of one generated kind, restricted to Palisade's objects, feeding `writer`'s store.
pub fn generated_stream(
    client: &Client,
    resource: &ApiResource,
    writer: reflector::store::Writer<GeneratedObject>,
    echoes: Arc<apply::Echoes>,
) -> impl Stream<Item = Result<GeneratedObject, watcher::Error>> + Send + 'static {
    let api = Api::<GeneratedObject>::all_with(client.clone(), resource);
    let config = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    watcher(api, config)
        .default_backoff()
        .modify(|o| {
            // Managed fields are never compared; dropping them keeps the cache small.
            o.metadata.managed_fields = None;
        })
        .reflect(writer)
        .applied_objects()
        // The cache holds our own writes; only their echoes do not wake the owner.
        .try_filter(move |o| std::future::ready(!echoes.is_echo(&o.metadata)))
}

/// The recorder Palisade publishes Events with.
pub fn recorder(client: Client) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    )
}

/// A generated kind's `(apiVersion, kind)`, resource and watch stream.
pub type KindStream = (
    (String, String),
    ApiResource,
    futures::stream::BoxStream<'static, Result<GeneratedObject, watcher::Error>>,
);

/// Builds the stores for the discovered kinds and returns them with their watch streams.
pub fn stores(
    client: &Client,
    discovered: &BTreeMap<(String, String), (ApiResource, bool)>,
    echoes: &Arc<apply::Echoes>,
) -> (BTreeMap<(String, String), GeneratedKind>, Vec<KindStream>) {
    let mut kinds = BTreeMap::new();
    let mut streams = Vec::new();
    for (key, (ar, namespaced)) in discovered {
        let writer = reflector::store::Writer::new(ar.clone());
        let store = writer.as_reader();
        let stream = generated_stream(client, ar, writer, Arc::clone(echoes)).boxed();
        kinds.insert(
            key.clone(),
            GeneratedKind {
                resource: ar.clone(),
                namespaced: *namespaced,
                store,
            },
        );
        streams.push((key.clone(), ar.clone(), stream));
    }
    (kinds, streams)
}

/// Errors of one reconcile; each has a short reason for metrics, Events and conditions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// A generated object could not be serialized.
    #[error("serialization failed: {0}")]
    Serde(#[from] serde_json::Error),
    /// A call to Vault failed.
    #[error("{0}")]
    Vault(#[from] crate::vault::VaultError),
    /// A step of a reconcile failed on one object.
    #[error("{step} {object}: {source}")]
    Step {
        /// What was being done.
        step: Step,
        /// The object, as `Kind/name` or `Kind namespace/name`.
        object: String,
        /// Why it failed.
        source: Box<Error>,
    },
}

/// The steps of a reconcile that write to the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Step {
    /// Server-side apply of a generated object (or removal of fields someone added).
    #[error("applying")]
    Apply,
    /// Deletion of a generated object the policy no longer produces.
    #[error("pruning")]
    Prune,
    /// The policy's status.
    #[error("writing the status of")]
    WriteStatus,
    /// The policy's finalizers.
    #[error("setting the finalizers of")]
    SetFinalizers,
}

impl Error {
    /// Short reason, e.g. for the `reason` label of the error metric (the failed step's own
    /// reason: the label stays bounded).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "ApiError",
            Error::Serde(_) => "SerializationError",
            Error::Vault(e) => e.reason(),
            Error::Step { source, .. } => source.reason(),
        }
    }

    /// This error as the failure of `step` on `object`.
    #[must_use]
    pub fn at(self, step: Step, object: impl Into<String>) -> Self {
        Error::Step {
            step,
            object: object.into(),
            source: Box::new(self),
        }
    }
}

/// Runs one reconcile of the `kind` object `namespace/name` inside a tracing span and records
/// its result and duration (a failed reconcile counts under its error's reason).
pub async fn measured(
    metrics: &Metrics,
    kind: &'static str,
    namespace: &str,
    name: &str,
    work: impl std::future::Future<Output = Result<kube::runtime::controller::Action, Error>>,
) -> Result<kube::runtime::controller::Action, Error> {
    use tracing::Instrument as _;
    let started = std::time::Instant::now();
    let span = tracing::info_span!("reconcile", kind, namespace, name);
    let result = work.instrument(span).await;
    metrics.reconciled(
        kind,
        result.as_ref().err().map(Error::reason),
        started.elapsed(),
    );
    result
}

/// What applying one policy's desired objects did.
#[derive(Debug, Default)]
pub struct Enforced {
    /// Objects created or changed, as `Kind/name`.
    pub changed: Vec<String>,
    /// Objects whose hand edits were reverted, as `Kind/name at path`.
    pub drift: Vec<String>,
    /// Objects removed because the policy no longer produces them.
    pub deleted: Vec<String>,
    /// Kinds the cluster does not serve, as `apiVersion Kind`.
    pub missing: Vec<String>,
    /// The generation each write returned, by `Kind/name` (what the object's controller must
    /// report on before its verdict counts).
    pub generations: std::collections::BTreeMap<String, i64>,
}

/// Applies `desired` and prunes what `owner_kind` `namespace/name` no longer produces.
pub async fn enforce(
    state: &State,
    candidates: &[(&str, &str, String)],
    owner_kind: &str,
    namespace: &str,
    name: &str,
    desired: &[serde_json::Value],
) -> Result<Enforced, Error> {
    use apply::Outcome;
    let mut result = Enforced::default();
    let mut keep = std::collections::BTreeSet::new();
    // Objects that restrict first, then those that could widen what a workload accepts
    // (RequestAuthentication, then PeerAuthentication and SPIRE registrations), each tier
    // concurrently; a failure stops before the next tier, so a refused ALLOW policy never
    // leaves a new PeerAuthentication in force over a workload with no ALLOW policy.
    let mut outcomes = Vec::with_capacity(desired.len());
    for tier in 0..3 {
        let objects: Vec<&serde_json::Value> =
            desired.iter().filter(|o| apply_tier(o) == tier).collect();
        let applied =
            futures::future::join_all(objects.iter().map(|obj| apply::apply(state, obj))).await;
        let failed = applied.iter().any(Result::is_err);
        outcomes.extend(objects.into_iter().zip(applied));
        if failed {
            break;
        }
    }
    for (obj, outcome) in outcomes {
        let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
        let obj_name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let label = format!("{kind}/{obj_name}");
        keep.insert((kind, obj_name));
        let outcome = outcome?;
        if let Outcome::Created {
            generation: Some(g),
        }
        | Outcome::Updated {
            generation: Some(g),
            ..
        } = outcome
        {
            result.generations.insert(label.clone(), g);
        }
        match outcome {
            Outcome::Unchanged => {}
            Outcome::Created { .. } | Outcome::Updated { drift: None, .. } => {
                result.changed.push(label);
            }
            Outcome::Updated {
                drift: Some(path), ..
            } => {
                result.drift.push(format!("{label} at {path}"));
                result.changed.push(label);
            }
            Outcome::KindMissing => result.missing.push(format!(
                "{} {}",
                obj["apiVersion"].as_str().unwrap_or_default(),
                obj["kind"].as_str().unwrap_or_default()
            )),
        }
    }
    result.deleted = apply::prune(state, candidates, owner_kind, namespace, name, &keep).await?;
    Ok(result)
}

/// The order in which a generated object is applied: restricting kinds first.
fn apply_tier(obj: &serde_json::Value) -> u8 {
    match obj["kind"].as_str() {
        Some("RequestAuthentication") => 1,
        Some("PeerAuthentication" | "ClusterSPIFFEID") => 2,
        _ => 0,
    }
}

/// The `Ready`/`Stalled` conditions for an enforcement result and the translation notes.
pub fn readiness(
    result: &Enforced,
    notes: &[crate::translate::Note],
    total: usize,
) -> Vec<status::Cond> {
    use status::Cond;
    let unsupported = notes
        .iter()
        .any(|n| n.severity == crate::translate::Severity::Unsupported);
    let mut conds = Vec::new();
    if result.missing.is_empty() {
        conds.push(if unsupported {
            Cond::new(
                "Ready",
                false,
                "PartiallyEnforced",
                format!("{total} generated objects applied, but part of the spec cannot be expressed (see Unsupported)"),
            )
        } else {
            Cond::new("Ready", true, "Enforced", format!("{total} generated objects applied"))
        });
    } else {
        let msg = format!(
            "the cluster does not serve {}: install the CRDs of the mesh or gateway that enforces this policy",
            result.missing.join(", ")
        );
        conds.push(Cond::new("Ready", false, "BackendMissing", msg.clone()));
        conds.push(Cond::new("Stalled", true, "BackendMissing", msg));
    }
    conds.extend(status::note_conditions(notes));
    conds
}

/// Writes `new` as the status of `policy` (server-side apply of the status subresource) unless
/// the cache already shows it, or we already wrote the same content (timestamps aside) on top
/// of exactly this state of the object (its resource version) and the cache has not caught up.
/// Once the cache holds another state, a status that differs from ours was written by someone
/// else, and is put right.
pub async fn write_status<K, S>(
    state: &State,
    policy: &K,
    new: &S,
    previous: &S,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    use kube::api::{Patch, PatchParams};
    if new == previous {
        return Ok(());
    }
    let meta = policy.meta();
    let key = format!("status/{}", meta.uid.as_deref().unwrap_or_default());
    let value = serde_json::to_value(new)?;
    let content = status::without_times(&value);
    let written_on = serde_json::json!({
        "status": content,
        "on": meta.resource_version.as_deref().unwrap_or_default(),
    });
    if state.applied.wrote(&key, &written_on) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(
        state.client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
    );
    let written = api
        .patch_status(
            meta.name.as_deref().unwrap_or_default(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": K::api_version(&()),
                "kind": K::kind(&()),
                "status": value,
            })),
        )
        .await
        .map_err(|e| {
            Error::from(e).at(
                Step::WriteStatus,
                format!(
                    "{} {}",
                    K::kind(&()),
                    meta.name.as_deref().unwrap_or_default()
                ),
            )
        })?;
    state.metrics.write("status");
    tracing::debug!(
        name = meta.name.as_deref().unwrap_or_default(),
        on = meta.resource_version.as_deref().unwrap_or_default(),
        now = written
            .meta()
            .resource_version
            .as_deref()
            .unwrap_or_default(),
        "status written"
    );
    state.applied.record_as(key, &written_on);
    // Its watch event wakes nothing only when the object is what this reconcile wrote: the spec
    // it judged, and exactly our status (a write that changed nothing returns someone else's
    // state, whose event must not be taken for ours).
    let same_spec = written.meta().generation == meta.generation;
    let ours = serde_json::to_value(&written)
        .is_ok_and(|w| status::without_times(&w["status"]) == content);
    if same_spec && ours {
        state.echoes.wrote(written.meta());
    }
    Ok(())
}

/// Replaces the finalizer list of a namespaced object.
pub async fn set_finalizers<K>(
    state: &State,
    api: &kube::Api<K>,
    name: &str,
    finalizers: &[String],
) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    // Not recorded as an echo: a merge that changes nothing returns the object as someone else
    // last left it (a new spec, say), and that event must still wake the policy.
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"metadata": {"finalizers": finalizers}})),
    )
    .await
    .map_err(|e| Error::from(e).at(Step::SetFinalizers, name))?;
    state.metrics.write("finalizer");
    Ok(())
}

/// Publishes the Events for an enforcement result (nothing when nothing changed).
pub async fn publish_events(
    state: &State,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    result: Result<&Enforced, &Error>,
) {
    use kube::runtime::events::{Event, EventType};
    let mut events = Vec::new();
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            events.push(Event {
                type_: EventType::Warning,
                reason: e.reason().into(),
                note: Some(truncate(
                    format!("applying generated objects failed: {e}"),
                    1000,
                )),
                action: "Apply".into(),
                secondary: None,
            });
            &Enforced::default()
        }
    };
    if !result.drift.is_empty() {
        events.push(Event {
            type_: EventType::Warning,
            reason: "DriftReverted".into(),
            note: Some(format!(
                "reverted hand edits of {}",
                result.drift.join(", ")
            )),
            action: "Apply".into(),
            secondary: None,
        });
    }
    if !result.changed.is_empty() || !result.deleted.is_empty() {
        let mut parts = Vec::new();
        if !result.changed.is_empty() {
            parts.push(format!("applied {}", result.changed.join(", ")));
        }
        if !result.deleted.is_empty() {
            parts.push(format!("deleted {}", result.deleted.join(", ")));
        }
        let note = parts.join("; ");
        events.push(Event {
            type_: EventType::Normal,
            reason: "Applied".into(),
            note: Some(truncate(note, 1000)),
            action: "Apply".into(),
            secondary: None,
        });
    }
    for ev in events {
        if let Err(e) = state.recorder.publish(&ev, reference).await {
            tracing::warn!(error = %e, "cannot publish event");
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{AUTH_KINDS, RATE_LIMIT_KINDS};
    use crate::translate;

    fn kinds_of(
        candidates: &[(&'static str, &'static str, String)],
    ) -> BTreeSet<(&'static str, &'static str)> {
        candidates.iter().map(|(v, k, _)| (*v, *k)).collect()
    }

    /// The kinds each controller watches (and discovers) are exactly the kinds its translation
    /// can produce: a kind added to one list but not the other would go unwatched or unpruned.
    #[test]
    fn watched_kinds_are_the_generated_kinds() {
        let watched: BTreeSet<(&'static str, &'static str)> = AUTH_KINDS.iter().copied().collect();
        assert_eq!(watched, kinds_of(&translate::auth::candidates("ns", "p")));
        let watched: BTreeSet<(&'static str, &'static str)> =
            RATE_LIMIT_KINDS.iter().copied().collect();
        assert_eq!(watched, kinds_of(&translate::ratelimit::candidates("p")));
    }
}
