//! Applying desired objects: server-side apply only when the live object lacks something
//! Palisade wants (so a resync writes nothing), and deleting what a policy no longer produces.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
};

use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
    runtime::reflector::ObjectRef,
};
use serde_json::Value;

use super::{Error, FIELD_MANAGER, State, Step, generated::GeneratedObject};
use crate::{
    diff,
    translate::{OWNER_KIND_LABEL, OWNER_NAME_LABEL, OWNER_NAMESPACE_LABEL},
};

/// What happened to one desired object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The live object already held everything.
    Unchanged,
    /// The object was created (`generation`: the one the write returned).
    Created {
        /// `metadata.generation` of the object the write returned.
        generation: Option<i64>,
    },
    /// The object was changed (the spec changed, or someone edited it: `drift` names where).
    Updated {
        /// First path where the live object differed, when it existed.
        drift: Option<String>,
        /// `metadata.generation` of the object the write returned (none when only a patch
        /// removing someone else's fields was needed).
        generation: Option<i64>,
    },
    /// The cluster does not serve this kind.
    KindMissing,
}

/// The resource version each of Palisade's own last writes produced, by object uid, recorded
/// when the write's result is exactly what Palisade wanted. A watch event carrying exactly that
/// version is the echo of the write (nothing changed since), so it triggers no reconcile: that
/// reconcile would find nothing to do. Any other change to the object (a spec edit, a forged
/// status, a deletion) has another resource version and triggers as usual.
#[derive(Default)]
pub struct Echoes(Mutex<HashMap<String, String>>);

/// At most this many writes wait for their echo; beyond, the record starts afresh (an echo
/// then reconciles once more, which costs time, never correctness). Echoes of deleted objects
/// never come, so the record cannot grow with churn.
const MAX_PENDING_ECHOES: usize = 65_536;

impl Echoes {
    /// Records the object as a write of ours returned it.
    pub fn wrote(&self, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
        if let (Some(uid), Some(rv), Ok(mut m)) = (&meta.uid, &meta.resource_version, self.0.lock())
        {
            if m.len() >= MAX_PENDING_ECHOES {
                m.clear();
            }
            m.insert(uid.clone(), rv.clone());
        }
    }

    /// Whether `meta` is the object exactly as our last write to it left it (the record is then
    /// dropped: each write echoes once).
    pub fn is_echo(
        &self,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> bool {
        let (Some(uid), Some(rv)) = (&meta.uid, &meta.resource_version) else {
            return false;
        };
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        if m.get(uid) == Some(rv) {
            m.remove(uid);
            true
        } else {
            false
        }
    }

    /// How many writes wait for their echo.
    pub fn pending(&self) -> usize {
        self.0.lock().map_or(0, |m| m.len())
    }
}

/// The last desired value applied, per object, to tell an object that the cache has not seen yet
/// from one that was deleted.
#[derive(Default)]
pub struct AppliedCache(Mutex<HashMap<String, u64>>);

impl AppliedCache {
    fn key(v: &Value) -> String {
        format!(
            "{}/{}/{}/{}",
            v["apiVersion"].as_str().unwrap_or_default(),
            v["kind"].as_str().unwrap_or_default(),
            v["metadata"]["namespace"].as_str().unwrap_or_default(),
            v["metadata"]["name"].as_str().unwrap_or_default()
        )
    }

    fn hash(v: &Value) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        v.to_string().hash(&mut h);
        h.finish()
    }

    fn was_applied(&self, v: &Value) -> bool {
        self.wrote(&Self::key(v), v)
    }

    fn record(&self, v: &Value) {
        self.record_as(Self::key(v), v);
    }

    /// Whether `value` is what was last written under `key` (e.g. a policy's status, keyed by
    /// its uid): the cache of the policy may not show our own write yet.
    pub fn wrote(&self, key: &str, value: &Value) -> bool {
        self.0
            .lock()
            .is_ok_and(|m| m.get(key) == Some(&Self::hash(value)))
    }

    /// Records that `value` was written under `key`.
    pub fn record_as(&self, key: String, value: &Value) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, Self::hash(value));
        }
    }

    fn forget(&self, key: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(key);
        }
    }
}

/// Applies `desired` unless the live object already holds it; an error names the object.
pub async fn apply(state: &State, desired: &Value) -> Result<Outcome, Error> {
    apply_one(state, desired).await.map_err(|e| {
        e.at(
            Step::Apply,
            format!(
                "{}/{}",
                desired["kind"].as_str().unwrap_or_default(),
                desired["metadata"]["name"].as_str().unwrap_or_default()
            ),
        )
    })
}

async fn apply_one(state: &State, desired: &Value) -> Result<Outcome, Error> {
    let api_version = desired["apiVersion"].as_str().unwrap_or_default();
    let kind = desired["kind"].as_str().unwrap_or_default();
    let name = desired["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = desired["metadata"]["namespace"].as_str();
    let Some(gk) = state.kinds.get(&(api_version.to_owned(), kind.to_owned())) else {
        return Ok(Outcome::KindMissing);
    };
    let api: Api<GeneratedObject> = match namespace {
        Some(ns) if gk.namespaced => Api::namespaced_with(state.client.clone(), ns, &gk.resource),
        _ => Api::all_with(state.client.clone(), &gk.resource),
    };
    let mut oref = ObjectRef::new_with(name, gk.resource.clone());
    if let (Some(ns), true) = (namespace, gk.namespaced) {
        oref = oref.within(ns);
    }
    let cached = gk.store.get(&oref);
    let live = match &cached {
        Some(obj) => Some(obj.to_value(&gk.resource)?),
        // Not in the cache. While the cache is still filling (right after start), or when we
        // applied this object before (the watch may not have delivered it yet), look it up: a
        // read now saves a needless write. A never-applied object in a synced cache is new.
        None if !store_ready(&gk.store) || state.applied.was_applied(desired) => api
            .get_opt(name)
            .await?
            .map(|o| o.to_value(&gk.resource))
            .transpose()?,
        None => None,
    };
    // Fields someone else added that change what the object enforces: removed with a JSON
    // Patch that first tests they still hold what was read.
    let foreign = live
        .as_ref()
        .map(|l| diff::foreign_fields(desired, l))
        .unwrap_or_default();
    if !foreign.is_empty() {
        let ops: Vec<Value> = foreign
            .iter()
            .flat_map(|(path, value, with)| {
                let change = match with {
                    Some(v) => serde_json::json!({"op": "replace", "path": path, "value": v}),
                    None => serde_json::json!({"op": "remove", "path": path}),
                };
                [
                    serde_json::json!({"op": "test", "path": path, "value": value}),
                    change,
                ]
            })
            .collect();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))?;
        match api
            .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => state.metrics.write("revert"),
            // The object changed since it was read (the test failed): its watch event brings
            // another reconcile; the apply below still restores Palisade's own fields.
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let reverted = foreign.first().map(|(path, _, _)| path.clone());
    let outcome = match &live {
        Some(l) if diff::is_subset(desired, l) => {
            state.applied.record(desired);
            return Ok(match reverted {
                None => Outcome::Unchanged,
                drift => Outcome::Updated {
                    drift,
                    generation: None,
                },
            });
        }
        Some(l) => Outcome::Updated {
            drift: reverted.or_else(|| diff::first_difference(desired, l)),
            generation: None,
        },
        None => Outcome::Created { generation: None },
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = api.patch(name, &params, &Patch::Apply(desired)).await?;
    // The write's event wakes nothing only when the object it returned is exactly what is
    // desired, with nothing foreign: an apply that changed nothing returns the object as someone
    // else left it, and that event must still reach the owner (to remove what they added).
    // Nor when its status is not the one the cache holds: someone else (the gateway's controller
    // reporting on the object) wrote it meanwhile, and the owner must see that write.
    let result = applied.to_value(&gk.resource)?;
    let same_status = cached
        .as_ref()
        .and_then(|c| c.status.as_ref())
        .map(|r| r.get())
        == applied.status.as_ref().map(|r| r.get());
    if same_status
        && diff::is_subset(desired, &result)
        && diff::foreign_fields(desired, &result).is_empty()
    {
        state.echoes.wrote(&applied.metadata);
    }
    state.metrics.write("apply");
    state.applied.record(desired);
    let generation = applied.metadata.generation;
    Ok(match outcome {
        Outcome::Created { .. } => Outcome::Created { generation },
        Outcome::Updated { drift, .. } => Outcome::Updated { drift, generation },
        other => other,
    })
}

/// Whether the store has completed its first full list.
fn store_ready(store: &kube::runtime::reflector::Store<GeneratedObject>) -> bool {
    use futures::FutureExt;
    store
        .wait_until_ready()
        .now_or_never()
        .is_some_and(|r| r.is_ok())
}

/// Deletes the `candidates` (every object `owner_kind` `namespace/name` can produce, by
/// `(apiVersion, kind, name)`) that exist, carry Palisade's owner labels for this policy, and are
/// not in `keep`. Looking up the few possible names keeps this O(1) in the number of policies.
pub async fn prune(
    state: &State,
    candidates: &[(&str, &str, String)],
    owner_kind: &str,
    namespace: &str,
    name: &str,
    keep: &BTreeSet<(String, String)>,
) -> Result<Vec<String>, Error> {
    let mut deleted = Vec::new();
    for (api_version, kind, obj_name) in candidates {
        if keep.contains(&((*kind).to_owned(), obj_name.clone())) {
            continue;
        }
        let Some(gk) = state
            .kinds
            .get(&((*api_version).to_owned(), (*kind).to_owned()))
        else {
            continue;
        };
        let mut oref = ObjectRef::new_with(obj_name, gk.resource.clone());
        if gk.namespaced {
            oref = oref.within(namespace);
        }
        let Some(obj) = gk.store.get(&oref) else {
            continue;
        };
        let labels = obj.metadata.labels.clone().unwrap_or_default();
        let owned = labels.get(OWNER_KIND_LABEL).map(String::as_str) == Some(owner_kind)
            && labels.get(OWNER_NAME_LABEL).map(String::as_str) == Some(name)
            && (gk.namespaced
                || labels.get(OWNER_NAMESPACE_LABEL).map(String::as_str) == Some(namespace));
        if !owned {
            continue;
        }
        let api: Api<GeneratedObject> = if gk.namespaced {
            Api::namespaced_with(state.client.clone(), namespace, &gk.resource)
        } else {
            Api::all_with(state.client.clone(), &gk.resource)
        };
        match api.delete(obj_name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(Error::from(e).at(Step::Prune, format!("{kind}/{obj_name}"))),
        }
        state.metrics.write("delete");
        state.applied.forget(&format!(
            "{api_version}/{kind}/{}/{obj_name}",
            if gk.namespaced { namespace } else { "" }
        ));
        deleted.push(format!("{kind}/{obj_name}"));
    }
    Ok(deleted)
}
