//! Admission-time image checks: for each container image the ImagePolicies covering it, the
//! digest, the signature and attestation layers (fetched once per digest, shared by concurrent
//! requests), and a verdict per policy, cached by (digest, policy, generation): verified results
//! for `ttl`, failed ones for `negative_ttl`; registry errors are never cached.
//!
//! Registries are read with the credentials of the pod's `imagePullSecrets` (read only when a
//! registry call is needed). A workload whose template verified records the digests its tags
//! resolved to, by its uid; a pod that workload owns and that runs the same images uses those
//! digests instead of resolving the tags again, so a ReplicaSet's pods cost no registry call.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use oci_client::{Reference, secrets::RegistryAuth};
use palisade_api::image_policy::EnforcementMode;

use super::{
    policy::{CompiledImagePolicy, predicate_allowed},
    registry::{Registry, RegistryError, registry_auth},
    verify::{Layer, verify_attestations, verify_signatures},
};

/// Signature and attestation layers of one digest.
#[derive(Debug)]
struct Fetched {
    sigs: Vec<Layer>,
    atts: Vec<Layer>,
}

type FetchResult = Arc<Result<Fetched, RegistryError>>;

/// (digest, policy name, policy generation).
type CacheKey = (String, String, i64);

/// A cached verdict and when it expires.
type Cached = (Instant, Result<(), String>);

/// What one policy says about one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVerdict {
    /// Policy name.
    pub policy: String,
    /// Its mode.
    pub mode: EnforcementMode,
    /// `Ok` when the image satisfies it, otherwise why not (per authority and attestation).
    pub outcome: Result<(), String>,
    /// The digest that was verified, when known.
    pub digest: Option<String>,
    /// Whether the policy asks for the digest to be pinned in pods.
    pub pin_digest: bool,
}

impl PolicyVerdict {
    /// What policy `p` says: `outcome`, for `digest` when known.
    fn of(p: &CompiledImagePolicy, outcome: Result<(), String>, digest: Option<&str>) -> Self {
        PolicyVerdict {
            policy: p.name.clone(),
            mode: p.mode(),
            outcome,
            digest: digest.map(str::to_owned),
            pin_digest: p.policy.spec.pin_digest,
        }
    }
}

/// A Secret's data: key → decoded bytes.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// Pull secrets' docker configs, by secret name.
type DockerConfigs = Vec<(String, Vec<u8>)>;

/// Reads a pull secret: `Ok(None)` when it does not exist.
pub trait PullSecretSource: Send + Sync {
    /// The Secret `name` in `namespace`, as its data map (key → decoded bytes).
    fn read<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<SecretData>, String>>;
}

/// What a check knows about the object beyond its images.
#[derive(Debug, Default)]
pub struct Scope {
    /// Namespace of the object.
    pub namespace: String,
    /// Names of its `imagePullSecrets`.
    pub pull_secrets: Vec<String>,
    /// Uid of the workload that owns it (its controller), for template-verified digests.
    pub owner_uid: Option<String>,
    /// The pull secrets' docker configs, read at the first registry call.
    configs: tokio::sync::OnceCell<Result<DockerConfigs, String>>,
}

impl Scope {
    /// A scope for an object in `namespace`.
    pub fn new(namespace: &str, pull_secrets: Vec<String>, owner_uid: Option<String>) -> Self {
        Scope {
            namespace: namespace.to_owned(),
            pull_secrets,
            owner_uid,
            configs: tokio::sync::OnceCell::new(),
        }
    }

    /// The credentials for `registry`: those of the first pull secret that has any, else
    /// anonymous. A missing secret is skipped (as the kubelet does); one that cannot be read
    /// is an error, so the image is refused rather than judged without its credentials.
    async fn auth(
        &self,
        source: Option<&dyn PullSecretSource>,
        registry: &str,
    ) -> Result<RegistryAuth, String> {
        let (Some(source), false) = (source, self.pull_secrets.is_empty()) else {
            return Ok(RegistryAuth::Anonymous);
        };
        let configs = self
            .configs
            .get_or_init(|| async {
                let mut out = Vec::new();
                for name in &self.pull_secrets {
                    let data = source
                        .read(&self.namespace, name)
                        .await
                        .map_err(|e| format!("cannot read imagePullSecret {name}: {e}"))?;
                    let Some(mut data) = data else { continue };
                    if let Some(config) = data.remove(".dockerconfigjson") {
                        out.push((name.clone(), config));
                    } else if let Some(legacy) = data.remove(".dockercfg") {
                        // The legacy format is the `auths` map alone.
                        let mut config = b"{\"auths\":".to_vec();
                        config.extend_from_slice(&legacy);
                        config.push(b'}');
                        out.push((name.clone(), config));
                    }
                }
                Ok(out)
            })
            .await
            .as_ref()
            .map_err(Clone::clone)?;
        for (name, config) in configs {
            match registry_auth(config, registry) {
                Ok(RegistryAuth::Anonymous) => {}
                Ok(auth) => return Ok(auth),
                Err(e) => return Err(format!("imagePullSecret {name}: {e}")),
            }
        }
        Ok(RegistryAuth::Anonymous)
    }
}

/// Digests a workload's template verified at: owner uid → (until, image → digest).
type TemplateDigests = HashMap<String, (Instant, BTreeMap<String, String>)>;

/// The verifier shared by all requests.
pub struct ImageVerifier {
    registry: Arc<Registry>,
    ttl: Duration,
    negative_ttl: Duration,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    inflight: Mutex<HashMap<String, Shared<BoxFuture<'static, FetchResult>>>>,
    templates: Mutex<TemplateDigests>,
    pull_secrets: Option<Arc<dyn PullSecretSource>>,
}

impl ImageVerifier {
    /// A verifier over `registry`.
    pub fn new(registry: Registry, ttl: Duration, negative_ttl: Duration) -> Self {
        ImageVerifier {
            registry: Arc::new(registry),
            ttl,
            negative_ttl,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
            pull_secrets: None,
        }
    }

    /// Reads pull secrets through `source`; without one, registries are read anonymously.
    #[must_use]
    pub fn with_pull_secrets(mut self, source: Arc<dyn PullSecretSource>) -> Self {
        self.pull_secrets = Some(source);
        self
    }

    /// Records that the template of the workload `uid` verified with `digests`
    /// (image as written → digest), for the pods it will own.
    pub fn remember_template(&self, uid: &str, digests: BTreeMap<String, String>) {
        if digests.is_empty() {
            return;
        }
        if let Ok(mut templates) = self.templates.lock() {
            let now = Instant::now();
            if templates.len() > 10_000 {
                templates.retain(|_, (until, _)| *until > now);
            }
            templates.insert(uid.to_owned(), (now + self.ttl, digests));
        }
    }

    /// The digest the owner's template verified `image` at, while remembered.
    fn template_digest(&self, owner: Option<&str>, image: &str) -> Option<String> {
        let templates = self.templates.lock().ok()?;
        let (until, digests) = templates.get(owner?)?;
        (*until > Instant::now())
            .then(|| digests.get(image).cloned())
            .flatten()
    }

    /// Registry requests made so far.
    pub fn registry_requests(&self) -> u64 {
        self.registry.requests()
    }

    fn cached(&self, key: &CacheKey) -> Option<Result<(), String>> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(key)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, r)| r.clone())
    }

    fn remember(&self, key: CacheKey, outcome: &Result<(), String>) {
        let ttl = if outcome.is_ok() {
            self.ttl
        } else {
            self.negative_ttl
        };
        if let Ok(mut cache) = self.cache.lock() {
            let now = Instant::now();
            if cache.len() > 10_000 {
                cache.retain(|_, (until, _)| *until > now);
            }
            cache.insert(key, (now + ttl, outcome.clone()));
        }
    }

    /// The layers of `digest` (attestations only `with_atts`), fetched once however many
    /// requests ask at the same time.
    async fn fetch(
        &self,
        reference: &Reference,
        digest: &str,
        auth: &RegistryAuth,
        deadline: Instant,
        with_atts: bool,
    ) -> FetchResult {
        let key = format!("{digest} {with_atts}");
        let shared = {
            let Ok(mut inflight) = self.inflight.lock() else {
                return Arc::new(Err(RegistryError::Failed {
                    registry: String::new(),
                    why: "internal lock poisoned".into(),
                }));
            };
            inflight
                .entry(key.clone())
                .or_insert_with(|| {
                    let registry = Arc::clone(&self.registry);
                    let (reference, digest, auth) =
                        (reference.clone(), digest.to_owned(), auth.clone());
                    async move {
                        let fetched = async {
                            let mut sigs = registry
                                .cosign_layers(&reference, &digest, "sig", &auth, deadline)
                                .await?;
                            let mut atts = if with_atts {
                                registry
                                    .cosign_layers(&reference, &digest, "att", &auth, deadline)
                                    .await?
                            } else {
                                Vec::new()
                            };
                            // No tag-layout signatures (or attestations): look for Sigstore
                            // bundles among the image's referrers (cosign v3's default).
                            if sigs.is_empty() || (with_atts && atts.is_empty()) {
                                let bundles = registry
                                    .bundle_layers(&reference, &digest, &auth, deadline)
                                    .await?;
                                sigs.extend(bundles.iter().cloned());
                                atts.extend(bundles);
                            }
                            Ok(Fetched { sigs, atts })
                        };
                        Arc::new(fetched.await)
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        let out = shared.await;
        if let Ok(mut inflight) = self.inflight.lock() {
            inflight.remove(&key);
        }
        out
    }

    /// Verdicts of every policy in `policies` that covers `image` in a namespace with `labels`;
    /// empty (and no registry call) when none does.
    pub async fn check(
        &self,
        image: &str,
        labels: &BTreeMap<String, String>,
        policies: &[Arc<CompiledImagePolicy>],
        scope: &Scope,
        deadline: Instant,
    ) -> Vec<PolicyVerdict> {
        let covering: Vec<&Arc<CompiledImagePolicy>> = policies
            .iter()
            .filter(|p| p.covers(image, labels))
            .collect();
        if covering.is_empty() {
            return Vec::new();
        }
        let fail_all = |why: String| {
            covering
                .iter()
                .map(|p| PolicyVerdict::of(p, Err(why.clone()), None))
                .collect()
        };
        // A digest reference is checked against the cache before anything is parsed or
        // fetched; a tag is resolved at the registry every time (tags move), unless the pod's
        // owner verified its template at a digest for it.
        let pinned = image
            .split_once('@')
            .map(|(_, d)| d.to_owned())
            .filter(|d| d.starts_with("sha256:"))
            .or_else(|| self.template_digest(scope.owner_uid.as_deref(), image));
        if let Some(digest) = &pinned {
            let hits: Option<Vec<PolicyVerdict>> = covering
                .iter()
                .map(|p| {
                    self.cached(&(digest.clone(), p.name.clone(), p.generation))
                        .map(|outcome| {
                            let outcome = outcome.map_err(|why| format!("{image}: {why}"));
                            PolicyVerdict::of(p, outcome, Some(digest))
                        })
                })
                .collect();
            if let Some(hits) = hits {
                return hits;
            }
        }
        let reference: Reference = match image.parse() {
            Ok(r) => r,
            Err(_) => return fail_all(format!("image reference {image:?} does not parse")),
        };
        let auth = match scope
            .auth(self.pull_secrets.as_deref(), reference.resolve_registry())
            .await
        {
            Ok(a) => a,
            Err(e) => return fail_all(e),
        };
        let (reference, digest) = match &pinned {
            Some(d) => (reference.clone_with_digest(d.clone()), d.clone()),
            None => match self.registry.digest_of(&reference, &auth, deadline).await {
                Ok(d) => (reference, d),
                Err(e) => return fail_all(format!("cannot resolve the image digest: {e}")),
            },
        };
        let with_atts = covering.iter().any(|p| !p.attestations.is_empty());
        let mut out = Vec::new();
        let mut fetched: Option<FetchResult> = None;
        for p in covering {
            let key = (digest.clone(), p.name.clone(), p.generation);
            let outcome = if let Some(hit) = self.cached(&key) {
                hit
            } else {
                // Fetched at the first cache miss, then shared by the other policies.
                let layers = if let Some(f) = &fetched {
                    Arc::clone(f)
                } else {
                    let f = self
                        .fetch(&reference, &digest, &auth, deadline, with_atts)
                        .await;
                    fetched = Some(Arc::clone(&f));
                    f
                };
                match &*layers {
                    Ok(layers) => {
                        let outcome = evaluate(p, &digest, layers);
                        self.remember(key, &outcome);
                        outcome
                    }
                    Err(e) => Err(format!("cannot fetch signatures: {e}")),
                }
            };
            let outcome = outcome.map_err(|why| format!("{image} ({digest}): {why}"));
            out.push(PolicyVerdict::of(p, outcome, Some(&digest)));
        }
        out
    }
}

/// Whether `layers` satisfy policy `p` for `digest`: enough authorities verify the signature,
/// and every attestation requirement is met by an attestation one of them signed.
fn evaluate(p: &CompiledImagePolicy, digest: &str, layers: &Fetched) -> Result<(), String> {
    let mut why = Vec::new();
    let mut verified = Vec::new();
    for a in &p.authorities {
        match &a.signer {
            Err(e) => why.push(format!("authority {}: not loaded: {e}", a.name)),
            Ok(signer) => match verify_signatures(&layers.sigs, digest, signer) {
                Ok(()) => verified.push(signer),
                Err(e) => why.push(format!("authority {}: {e}", a.name)),
            },
        }
    }
    let needed = p.needed();
    if verified.len() < needed {
        return Err(format!(
            "{} of {} required authorities verified: {}",
            verified.len(),
            needed,
            why.join("; ")
        ));
    }
    for att in &p.attestations {
        let policy = match &att.policy {
            Ok(p) => p,
            Err(e) => return Err(format!("attestation {}: not loaded: {e}", att.name)),
        };
        let mut reasons = Vec::new();
        let mut ok = false;
        for signer in &verified {
            match verify_attestations(&layers.atts, digest, &att.predicate_type, signer) {
                Ok(predicates) => {
                    for predicate in predicates {
                        match policy.as_ref().map_or(Ok(true), |rp| {
                            predicate_allowed(rp, &att.predicate_type, &predicate)
                        }) {
                            Ok(true) => ok = true,
                            Ok(false) => {
                                reasons.push("its predicate is refused by the policy".to_owned());
                            }
                            Err(e) => reasons.push(format!("policy error: {e}")),
                        }
                    }
                }
                Err(e) => reasons.push(e.to_string()),
            }
        }
        if !ok {
            return Err(format!(
                "attestation {} ({}): {}",
                att.name,
                att.predicate_type,
                reasons.join("; ")
            ));
        }
    }
    Ok(())
}
