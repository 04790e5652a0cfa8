//! The cluster as the webhook sees it: namespaces, ClusterSPIFFEIDs and ImagePolicies from
//! watches, the key material ImagePolicies reference (Secrets and ConfigMaps, re-read every
//! `material_refresh`, so a rotated or revoked key stops verifying within that time), and the
//! ImagePolicy status writer (active on the replica holding the webhook's Lease only).
//! [`ClusterFacts::start`] wires it to a client; the rest of the
//! webhook reads it through [`FactSource`].

use crate::{FactError, lock};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use palisade_api::ImagePolicy;

use crate::{
    identity::SpireRegistration,
    images::{
        check::{PullSecretSource, SecretData},
        policy::{CompiledImagePolicy, material_refs},
    },
    server::FactSource,
};

/// Why the cluster facts could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The ClusterSPIFFEID kind is not served by the API server.
    #[error(
        "cannot find the ClusterSPIFFEID kind (is the SPIRE controller manager's CRD installed?): {0}"
    )]
    SpireKind(#[source] kube::Error),
}

/// Compiled policies by (uid, generation, version of the key material).
type Compiled = HashMap<(String, i64, u64), Arc<CompiledImagePolicy>>;

/// Cluster facts kept from watches.
pub struct ClusterFacts {
    client: Client,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    /// ClusterSPIFFEIDs, watched only when SPIRE is the identity source.
    spire: Option<Store<DynamicObject>>,
    /// ImagePolicies as written.
    image_policies: Store<ImagePolicy>,
    /// Compiled ImagePolicies: each is compiled once, for admission and status alike.
    compiled: Mutex<Compiled>,
    /// Referenced Secrets' and ConfigMaps' keys.
    material: Material,
    /// Whether this replica writes ImagePolicy status (it holds the webhook's Lease).
    leading: Arc<AtomicBool>,
}

/// Key material read from Secrets and ConfigMaps, by `secret|configmap/<ns>/<name>/<key>`,
/// with a version that changes whenever any of it does (so compiled policies are redone and
/// what the old material verified is no longer found in the verdict cache).
#[derive(Default)]
struct Material {
    entries: Mutex<HashMap<String, Result<Vec<u8>, FactError>>>,
    version: AtomicU64,
}

impl Material {
    fn get(&self, key: &str) -> Option<Result<Vec<u8>, FactError>> {
        lock(&self.entries).get(key).cloned()
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Reads every reference in `refs` from the API server; `true` when any changed.
    async fn refresh(&self, client: &Client, refs: &BTreeSet<String>) -> bool {
        let mut changed = false;
        for r in refs {
            let parts: Vec<&str> = r.splitn(4, '/').collect();
            let [kind, ns, name, key] = parts.as_slice() else {
                continue;
            };
            let what = if *kind == "secret" {
                "Secret"
            } else {
                "ConfigMap"
            };
            let object = format!("{what} {ns}/{name}");
            let value = object_data(client, what, ns, name)
                .await
                .and_then(|d| d.ok_or_else(|| FactError::Missing(object.clone())))
                .and_then(|mut d| {
                    d.remove(*key).ok_or_else(|| FactError::NoKey {
                        object: object.clone(),
                        key: (*key).to_owned(),
                    })
                });
            let mut m = lock(&self.entries);
            if m.get(r) != Some(&value) {
                m.insert(r.clone(), value);
                self.version.fetch_add(1, Ordering::AcqRel);
                changed = true;
            }
        }
        changed
    }
}

/// The data of Secret or ConfigMap (`kind`) `namespace/name`, by key (Secret values decoded);
/// `None` when it does not exist.
async fn object_data(
    client: &Client,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<SecretData>, FactError> {
    let failed = |e: kube::Error| FactError::Api {
        object: format!("{kind} {namespace}/{name}"),
        why: e.to_string(),
    };
    if kind == "Secret" {
        let secret = Api::<Secret>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(failed)?;
        Ok(secret.map(|s| {
            let data = s.data.unwrap_or_default();
            data.into_iter().map(|(k, v)| (k, v.0)).collect()
        }))
    } else {
        let map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(failed)?;
        Ok(map.map(|c| {
            let data = c.data.unwrap_or_default();
            data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect()
        }))
    }
}

/// Pull secrets read from the API server when a registry call needs them.
pub struct ApiPullSecrets(pub Client);

impl PullSecretSource for ApiPullSecrets {
    fn read<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<SecretData>, FactError>> {
        Box::pin(object_data(&self.0, "Secret", namespace, name))
    }

    fn service_account_pull_secrets<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, FactError>> {
        Box::pin(async move {
            let sa = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
                self.0.clone(),
                namespace,
            )
            .get_opt(name)
            .await
            .map_err(|e| FactError::Api {
                object: format!("ServiceAccount {namespace}/{name}"),
                why: e.to_string(),
            })?;
            Ok(sa
                .and_then(|sa| sa.image_pull_secrets)
                .into_iter()
                .flatten()
                .map(|r| r.name)
                .filter(|n| !n.is_empty())
                .collect())
        })
    }
}

impl ClusterFacts {
    /// Starts the watches (ClusterSPIFFEIDs only `with_spire`) and the key-material refresher
    /// (every `material_refresh`), and returns the facts they fill.
    pub async fn start(
        client: Client,
        with_spire: bool,
        material_refresh: Duration,
    ) -> Result<Arc<Self>, ClusterError> {
        let (namespaces, ns_writer) = reflector::store();
        let spire = if with_spire {
            let gvk = GroupVersionKind::gvk("spire.spiffe.io", "v1alpha1", "ClusterSPIFFEID");
            let (ar, _) = kube::discovery::pinned_kind(&client, &gvk)
                .await
                .map_err(ClusterError::SpireKind)?;
            let writer = reflector::store::Writer::new(ar.clone());
            let store = writer.as_reader();
            let stream = watcher(
                Api::<DynamicObject>::all_with(client.clone(), &ar),
                watcher::Config::default(),
            )
            .default_backoff()
            .reflect(writer)
            .for_each(|_| std::future::ready(()));
            tokio::spawn(stream);
            Some(store)
        } else {
            None
        };
        let (image_policies, policy_writer) = reflector::store();
        let facts = Arc::new(ClusterFacts {
            client: client.clone(),
            namespaces,
            spire,
            image_policies,
            compiled: Mutex::new(HashMap::new()),
            material: Material::default(),
            leading: Arc::new(AtomicBool::new(false)),
        });
        let policy_stream = watcher(
            Api::<ImagePolicy>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(policy_writer)
        .applied_objects()
        .for_each({
            let facts = Arc::clone(&facts);
            move |p| {
                let facts = Arc::clone(&facts);
                async move {
                    if let Ok(p) = p {
                        let refs = material_refs(&p).into_iter().collect();
                        facts.material.refresh(&facts.client, &refs).await;
                        facts.write_status(&p).await;
                    }
                }
            }
        });
        tokio::spawn(policy_stream);
        tokio::spawn({
            let facts = Arc::clone(&facts);
            async move {
                let mut tick = tokio::time::interval(material_refresh);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    facts.refresh_material().await;
                }
            }
        });
        let stream = watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(ns_writer)
        .for_each(|event| {
            // Each namespace whose label turns its checks down is a security event when it is
            // seen (at start, on every relist, on each change), whoever labelled it and when.
            if let Ok(watcher::Event::Apply(ns) | watcher::Event::InitApply(ns)) = &event
                && let Some(mode) = ns
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(crate::config::Mode::of_namespace)
                    .filter(|m| *m != crate::config::Mode::Enforce)
            {
                tracing::warn!(target: "palisade::security",
                    namespace = %ns.metadata.name.as_deref().unwrap_or_default(),
                    mode = ?mode, "namespace enforcement lowered by its label");
            }
            std::future::ready(())
        });
        tokio::spawn(stream);
        Ok(facts)
    }

    /// Re-reads the key material of every ImagePolicy; when any changed, the policies are
    /// recompiled (new fingerprints: nothing the old material verified is reused) and their
    /// status rewritten.
    async fn refresh_material(&self) {
        let policies = self.image_policies.state();
        let refs: BTreeSet<String> = policies.iter().flat_map(|p| material_refs(p)).collect();
        if refs.is_empty() || !self.material.refresh(&self.client, &refs).await {
            return;
        }
        tracing::info!(
            version = self.material.version(),
            "ImagePolicy key material changed: verdicts it gave are no longer used"
        );
        self.write_all_status().await;
    }

    /// The compiled form of `p` from `cache`, compiling it on first use.
    fn compiled_in(&self, cache: &mut Compiled, p: &ImagePolicy) -> Arc<CompiledImagePolicy> {
        let key = (
            p.metadata.uid.clone().unwrap_or_default(),
            p.metadata.generation.unwrap_or_default(),
            self.material.version(),
        );
        Arc::clone(cache.entry(key).or_insert_with(|| {
            Arc::new(CompiledImagePolicy::compile(p, &|r| self.material.get(r)))
        }))
    }

    /// The flag that lets this replica write ImagePolicy status: set it while this replica
    /// holds the Lease (`palisade_lease::follow`), so replicas never race on status.
    pub fn leading_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.leading)
    }

    /// Rewrites every ImagePolicy's status that is out of date (when leadership starts: the
    /// previous leader may have stopped before writing what changed).
    pub async fn write_all_status(&self) {
        for p in &self.image_policies.state() {
            self.write_status(p).await;
        }
    }

    /// Reports in an ImagePolicy's status whether its keys and predicate policies are loaded;
    /// written only when it changes, and only by the leading replica.
    async fn write_status(&self, policy: &ImagePolicy) {
        if !self.leading.load(Ordering::SeqCst) {
            return;
        }
        let compiled = self.compiled_in(&mut lock(&self.compiled), policy);
        let previous = policy.status.clone().unwrap_or_default();
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let status = compiled.status(&previous, &now);
        if status == previous {
            return;
        }
        let api: Api<ImagePolicy> = Api::all(self.client.clone());
        let patch = serde_json::json!({"status": status});
        if let Err(e) = api
            .patch_status(
                &compiled.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::warn!(policy = %compiled.name, error = %e, "cannot write ImagePolicy status");
        } else {
            tracing::info!(policy = %compiled.name, "ImagePolicy status written");
        }
    }
}

impl FactSource for ClusterFacts {
    fn leading(&self) -> Option<bool> {
        Some(self.leading.load(Ordering::SeqCst))
    }

    fn lowered_namespaces(&self) -> BTreeMap<crate::config::Mode, usize> {
        let mut out = BTreeMap::new();
        for ns in self.namespaces.state() {
            if let Some(mode) = ns
                .metadata
                .labels
                .as_ref()
                .and_then(crate::config::Mode::of_namespace)
            {
                *out.entry(mode).or_default() += 1;
            }
        }
        out
    }

    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&ObjectRef::new(namespace))
            .map(|n| n.metadata.labels.clone().unwrap_or_default())
    }

    fn namespace_terminating(&self, namespace: &str) -> bool {
        self.namespaces
            .get(&ObjectRef::new(namespace))
            .is_some_and(|n| n.metadata.deletion_timestamp.is_some())
    }

    fn namespace_labels_live<'a>(
        &'a self,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, FactError>> {
        Box::pin(async move {
            let api: Api<Namespace> = Api::all(self.client.clone());
            let ns = api
                .get_metadata_opt(namespace)
                .await
                .map_err(|e| FactError::Api {
                    object: format!("namespace {namespace}"),
                    why: e.to_string(),
                })?;
            Ok(ns.map(|n| n.metadata.labels.unwrap_or_default()))
        })
    }

    fn spire_registrations(&self) -> Vec<SpireRegistration> {
        let Some(store) = &self.spire else {
            return Vec::new();
        };
        store
            .state()
            .iter()
            .map(|o| {
                let name = o.metadata.name.clone().unwrap_or_default();
                SpireRegistration::from_object(&name, &o.data)
            })
            .collect()
    }

    fn image_policies(&self) -> Vec<Arc<CompiledImagePolicy>> {
        let mut compiled = lock(&self.compiled);
        let live: Vec<Arc<CompiledImagePolicy>> = self
            .image_policies
            .state()
            .iter()
            .map(|p| self.compiled_in(&mut compiled, p))
            .collect();
        // Forget generations (and material versions) no longer in force.
        compiled.retain(|_, c| live.iter().any(|l| Arc::ptr_eq(l, c)));
        live
    }

    fn ready(&self) -> bool {
        use futures::FutureExt;
        let synced = |ready: Option<Result<(), reflector::store::WriterDropped>>| {
            ready.is_some_and(|r| r.is_ok())
        };
        synced(self.namespaces.wait_until_ready().now_or_never())
            && synced(self.image_policies.wait_until_ready().now_or_never())
            && self
                .spire
                .as_ref()
                .is_none_or(|s| synced(s.wait_until_ready().now_or_never()))
    }
}
