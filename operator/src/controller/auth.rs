//! The AuthPolicy controller: translate, apply, prune, status.
//!
//! Only with SPIRE as identity source does an AuthPolicy get a finalizer: its ClusterSPIFFEID is
//! cluster-scoped and cannot be garbage-collected through an owner reference. Everything else is
//! owned by the AuthPolicy and removed by the garbage collector when it goes.

use std::sync::Arc;

use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        controller::Action,
        reflector::{ObjectRef, Store},
    },
};
use palisade_api::{AuthPolicy, AuthPolicyStatus};

use super::{Error, RESYNC, State, enforce, publish_events, readiness};
use crate::{
    controller::status::{self, Cond},
    translate::{self, IdentitySource},
};

/// Finalizer that removes an AuthPolicy's cluster-scoped ClusterSPIFFEID.
pub const FINALIZER: &str = "palisade.dev/cluster-objects";

/// State of the AuthPolicy controller: the shared state plus its cache of AuthPolicies, which
/// decide together what a workload allows (Istio ORs the ALLOW policies on a workload).
pub struct AuthState {
    /// Shared state.
    pub shared: Arc<State>,
    /// Every AuthPolicy.
    pub policies: Store<AuthPolicy>,
    /// Which AuthPolicies may apply to the same workloads, kept by the same watch.
    pub overlaps: Arc<Overlaps>,
    /// Every namespace (metadata only): its labels say whether it is in the ambient mesh.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// The pods labelled `istio.io/dataplane-mode=ambient` (metadata only).
    pub ambient_pods: Store<PartialObjectMeta<Pod>>,
}

/// The [`translate::auth::OverlapIndex`] of every AuthPolicy, kept by the controller's watch
/// before its cache takes each event in: a creation, a deletion or a change of spec (a new
/// generation, a deletion timestamp) updates one entry and a completed (re-)list replaces the
/// whole; status writes, most of the watch's events, leave it as it is. So a reconcile finds
/// the policies that may overlap its own without comparing it with every policy.
#[derive(Default)]
pub struct Overlaps {
    index: std::sync::RwLock<translate::auth::OverlapIndex>,
    /// The policies of a (re-)list in progress.
    listing: std::sync::Mutex<Vec<Arc<AuthPolicy>>>,
}

impl Overlaps {
    /// Takes one event of the AuthPolicy watch in.
    pub fn observe(&self, event: &kube::runtime::watcher::Event<AuthPolicy>) {
        use kube::runtime::watcher::Event;
        use std::sync::PoisonError;
        let key = |p: &AuthPolicy| (p.namespace().unwrap_or_default(), p.name_any());
        match event {
            Event::Apply(p) => {
                let (ns, name) = key(p);
                let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
                let same_spec = index.get(&ns, &name).is_some_and(|old| {
                    old.metadata.generation == p.metadata.generation
                        && old.metadata.deletion_timestamp == p.metadata.deletion_timestamp
                });
                if !same_spec {
                    index.insert(&Arc::new(p.clone()));
                }
            }
            Event::Delete(p) => {
                let (ns, name) = key(p);
                self.index
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&ns, &name);
            }
            Event::Init => self
                .listing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear(),
            Event::InitApply(p) => self
                .listing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Arc::new(p.clone())),
            Event::InitDone => {
                let listed = std::mem::take(
                    &mut *self.listing.lock().unwrap_or_else(PoisonError::into_inner),
                );
                *self.index.write().unwrap_or_else(PoisonError::into_inner) =
                    translate::auth::OverlapIndex::new(listed);
            }
        }
    }

    /// The policies that may apply to the same workloads as `policy` (see
    /// [`translate::auth::OverlapIndex::candidates`]).
    pub fn candidates(&self, policy: &AuthPolicy, root: &str) -> Vec<Arc<AuthPolicy>> {
        self.index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .candidates(policy, root)
    }
}

/// The AuthPolicies a change to namespace `ns`, or to an ambient pod in it, may concern: those
/// of the namespace and of the mesh root namespace.
pub fn in_namespace(
    store: &Store<AuthPolicy>,
    ns: Option<&str>,
    root: &str,
) -> Vec<ObjectRef<AuthPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| {
            let pns = p.metadata.namespace.as_deref();
            pns == ns || pns == Some(root)
        })
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// The AuthPolicies to reconcile for one event of the namespace or ambient-pod watch (`ns_of`
/// gives the namespace an object concerns): those of its namespace for a change or a deletion;
/// every one when a (re-)list completes, the cache being whole only then; none for the objects
/// of a list in progress.
pub fn ambient_triggers<T>(
    store: &Store<AuthPolicy>,
    event: &kube::runtime::watcher::Event<T>,
    ns_of: impl Fn(&T) -> Option<&str>,
    root: &str,
) -> Vec<ObjectRef<AuthPolicy>> {
    use kube::runtime::watcher::Event;
    match event {
        Event::Apply(o) | Event::Delete(o) => in_namespace(store, ns_of(o), root),
        Event::InitDone => store
            .state()
            .iter()
            .map(|p| ObjectRef::from_obj(&**p))
            .collect(),
        Event::Init | Event::InitApply(_) => Vec::new(),
    }
}

/// The value of label `key`, if any.
fn label<'a>(
    labels: Option<&'a std::collections::BTreeMap<String, String>>,
    key: &str,
) -> Option<&'a str> {
    labels?.get(key).map(String::as_str)
}

/// What ztunnel would change of `policy` (see [`translate::auth::ambient_notes`]), from the
/// caches of namespaces and ambient pods; waits up to 10 s for their first list.
async fn ambient_notes(policy: &AuthPolicy, auth: &AuthState) -> Vec<translate::Note> {
    let listed = async {
        auth.namespaces.wait_until_ready().await.is_ok()
            && auth.ambient_pods.wait_until_ready().await.is_ok()
    };
    let known = tokio::time::timeout(std::time::Duration::from_secs(10), listed)
        .await
        .unwrap_or(false);
    let ns = policy.namespace().unwrap_or_default();
    let root = auth.shared.ctx.mesh_root_namespace.as_str();
    let reaches = |n: Option<&str>| ns == root || n == Some(ns.as_str());
    let namespaces = auth.namespaces.state();
    let pods = auth.ambient_pods.state();
    let empty = std::collections::BTreeMap::new();
    let facts = translate::auth::AmbientFacts {
        known,
        ambient_namespaces: namespaces
            .iter()
            .filter(|n| {
                reaches(n.metadata.name.as_deref())
                    && label(n.metadata.labels.as_ref(), translate::auth::DATAPLANE_MODE)
                        == Some("ambient")
            })
            .filter_map(|n| {
                let waypoint = label(n.metadata.labels.as_ref(), translate::auth::USE_WAYPOINT)
                    .filter(|w| *w != "none");
                Some((n.metadata.name.as_deref()?, waypoint))
            })
            .collect(),
        ambient_pods: pods
            .iter()
            .filter(|p| {
                reaches(p.metadata.namespace.as_deref())
                    && label(p.metadata.labels.as_ref(), translate::auth::DATAPLANE_MODE)
                        == Some("ambient")
            })
            .map(|p| translate::auth::AmbientPod {
                namespace: p.metadata.namespace.as_deref().unwrap_or_default(),
                name: p.metadata.name.as_deref().unwrap_or_default(),
                labels: p.metadata.labels.as_ref().unwrap_or(&empty),
                annotations: p.metadata.annotations.as_ref().unwrap_or(&empty),
            })
            .collect(),
    };
    translate::auth::ambient_notes(policy, &facts)
}

/// The other AuthPolicies that may apply to the same workloads as `policy`: a change to one can
/// widen or narrow what the others promise (its own events reconcile it already). Found among
/// the candidates of the overlap index kept by the watch, not by comparing with every policy.
pub fn overlapping(
    overlaps: &Overlaps,
    policy: &AuthPolicy,
    root: &str,
) -> Vec<ObjectRef<AuthPolicy>> {
    let me = ObjectRef::from_obj(policy);
    overlaps
        .candidates(policy, root)
        .iter()
        .filter(|p| translate::auth::overlap(p, policy, root))
        .map(|p| ObjectRef::from_obj(&**p))
        .filter(|r| *r != me)
        .collect()
}

/// [`overlapping`] by comparing `policy` with every policy of the cache: the answer the index's
/// must equal.
#[cfg(test)]
pub fn overlapping_in_cache(
    store: &Store<AuthPolicy>,
    policy: &AuthPolicy,
    root: &str,
) -> Vec<ObjectRef<AuthPolicy>> {
    let me = ObjectRef::from_obj(policy);
    store
        .state()
        .iter()
        .filter(|p| translate::auth::overlap(p, policy, root))
        .map(|p| ObjectRef::from_obj(&**p))
        .filter(|r| *r != me)
        .collect()
}

/// Reconciles one AuthPolicy.
pub async fn reconcile(policy: Arc<AuthPolicy>, auth: Arc<AuthState>) -> Result<Action, Error> {
    let (ns, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
    let work = reconcile_inner(&policy, &auth);
    super::measured(&auth.shared.metrics, "AuthPolicy", &ns, &name, work).await
}

async fn reconcile_inner(policy: &AuthPolicy, auth: &AuthState) -> Result<Action, Error> {
    let state = &*auth.shared;
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let api: Api<AuthPolicy> = Api::namespaced(state.client.clone(), &ns);
    let needs_finalizer = state.ctx.identity_source == IdentitySource::Spire;
    let has_finalizer = policy.finalizers().iter().any(|f| f == FINALIZER);

    if policy.meta().deletion_timestamp.is_some() {
        if has_finalizer {
            // Remove what the garbage collector cannot, then let the object go.
            super::apply::prune(
                state,
                &translate::auth::candidates(&ns, &name),
                "AuthPolicy",
                &ns,
                &name,
                &std::collections::BTreeSet::new(),
            )
            .await?;
            let rest: Vec<String> = policy
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            super::set_finalizers(state, &api, &name, &rest).await?;
        }
        return Ok(Action::await_change());
    }
    if needs_finalizer && !has_finalizer {
        let mut all = policy.finalizers().to_vec();
        all.push(FINALIZER.into());
        super::set_finalizers(state, &api, &name, &all).await?;
    }

    let mut desired = translate::auth::translate(policy, &state.ctx);
    // `widenings` keeps, of the policies the index offers (those of this namespace and of the
    // mesh root namespace that may select the same workloads), the ones that apply to them.
    let root = state.ctx.mesh_root_namespace.as_str();
    let siblings = auth.overlaps.candidates(policy, root);
    desired
        .notes
        .extend(translate::auth::widenings(policy, &siblings, root));
    desired.notes.extend(ambient_notes(policy, auth).await);
    let enforced = enforce(
        state,
        &translate::auth::candidates(&ns, &name),
        "AuthPolicy",
        &ns,
        &name,
        &desired.objects,
    )
    .await;
    let mut conds = vec![Cond::new(
        "Accepted",
        true,
        "Accepted",
        format!("translated into {} Istio objects", desired.objects.len()),
    )];
    let result = match enforced {
        Ok(r) => {
            conds.extend(readiness(&r, &desired.notes, desired.objects.len()));
            Ok(r)
        }
        Err(e) => {
            conds.push(Cond::new("Ready", false, e.reason(), e.to_string()));
            Err(e)
        }
    };
    let previous = policy.status.clone().unwrap_or_default();
    let now = Time(jiff_now());
    let new = AuthPolicyStatus {
        common: status::build(&previous.common, policy.meta().generation, &conds, &now),
        generated: status::generated_refs(&desired.objects),
    };
    super::write_status(state, policy, &new, &previous).await?;
    publish_events(state, &policy.object_ref(&()), result.as_ref()).await;
    // A failed apply is retried with backoff by the error policy, after status says why.
    result.map(|_| Action::requeue(RESYNC))
}

/// The current time (the only clock read in a reconcile, outside the pure translators).
pub(crate) fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;

    use super::*;

    fn policy(name: &str, app: &str, generation: i64) -> AuthPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
            "metadata": {"name": name, "namespace": "shop", "generation": generation},
            "spec": {"selector": {"matchLabels": {"app": app}}, "rules": [{}]},
        }))
        .expect("policy")
    }

    fn names(overlaps: &Overlaps, probe: &AuthPolicy) -> Vec<String> {
        let mut n: Vec<String> = overlaps
            .candidates(probe, "istio-system")
            .iter()
            .map(|p| p.name_any())
            .collect();
        n.sort();
        n
    }

    /// The index follows the watch: a completed list, a new policy, a new selector (a new
    /// generation), a deletion; a re-list replaces it whole.
    #[test]
    fn overlaps_follow_the_watch() {
        let overlaps = Overlaps::default();
        let probe = policy("probe", "orders", 1);
        for e in [
            Event::Init,
            Event::InitApply(policy("a", "orders", 1)),
            Event::InitApply(policy("b", "payments", 1)),
        ] {
            overlaps.observe(&e);
        }
        assert!(
            names(&overlaps, &probe).is_empty(),
            "a list counts once done"
        );
        overlaps.observe(&Event::InitDone);
        assert_eq!(names(&overlaps, &probe), ["a"]);

        overlaps.observe(&Event::Apply(policy("c", "orders", 1)));
        assert_eq!(names(&overlaps, &probe), ["a", "c"]);
        // Same generation (a status write): the indexed spec stays.
        overlaps.observe(&Event::Apply(policy("b", "orders", 1)));
        assert_eq!(names(&overlaps, &probe), ["a", "c"]);
        // A new generation moves it.
        overlaps.observe(&Event::Apply(policy("a", "payments", 2)));
        assert_eq!(names(&overlaps, &probe), ["c"]);
        overlaps.observe(&Event::Delete(policy("c", "orders", 1)));
        assert!(names(&overlaps, &probe).is_empty());

        // A deletion timestamp alone (same generation, as a fake might send it) replaces the
        // indexed copy: a policy being deleted is told apart.
        let mut terminating = policy("d", "orders", 1);
        overlaps.observe(&Event::Apply(terminating.clone()));
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        overlaps.observe(&Event::Apply(terminating));
        let indexed = overlaps.candidates(&probe, "istio-system");
        assert!(
            indexed
                .iter()
                .all(|p| p.metadata.deletion_timestamp.is_some())
        );
        assert_eq!(names(&overlaps, &probe), ["d"]);

        // A re-list replaces the index whole: a policy it no longer holds is gone, though it
        // matched.
        for e in [
            Event::Init,
            Event::InitApply(policy("e", "orders", 1)),
            Event::InitApply(policy("f", "payments", 1)),
        ] {
            overlaps.observe(&e);
        }
        assert_eq!(
            names(&overlaps, &probe),
            ["d"],
            "the old index serves until the list is done"
        );
        overlaps.observe(&Event::InitDone);
        assert_eq!(names(&overlaps, &probe), ["e"]);
    }
}
