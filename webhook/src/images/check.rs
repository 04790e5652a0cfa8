//! Admission-time image checks: for each container image the ImagePolicies covering it (matched
//! on the canonical reference, see [`super::reference`]), the digest, the signature and
//! attestation layers (fetched once per repository, digest and credential scope, shared by
//! concurrent requests), and a verdict per policy.
//!
//! Verdicts are cached by everything that determined them: the canonical repository, the
//! digest, the credential scope (anonymous, or the namespace and pull secrets the registry was
//! read with), and the policy's fingerprint (uid, generation and the key material it was
//! compiled with). Verified results live for `ttl`, failed ones for `negative_ttl`; registry
//! errors are never cached, nor is "no signature found" for a digest this scope did not resolve
//! itself (a repository that does not exist says nothing about the same digest elsewhere).
//!
//! Registries are read with the credentials of the pod's `imagePullSecrets` (read only when a
//! registry call is needed). A workload whose template verified records the digests its tags
//! resolved to, under its namespace, kind, name and uid; a pod whose controller is that workload
//! and whose images are all among the template's uses those digests instead of resolving the
//! tags again, so a ReplicaSet's pods cost no registry call.

use crate::lock;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
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
    reference::ImageRef,
    registry::{Budget, PullSecretError, Registry, RegistryError, registry_auth},
    verify::{Layer, verify_attestations, verify_signatures},
};

/// Signature and attestation layers of one digest.
#[derive(Debug)]
struct Fetched {
    sigs: Vec<Layer>,
    atts: Vec<Layer>,
}

type FetchResult = Arc<Result<Fetched, RegistryError>>;

/// (canonical repository, digest, credential scope, policy fingerprint).
type CacheKey = (String, String, String, String);

/// The workload that owns a pod: its namespace, kind, name and uid.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OwnerKey {
    /// Namespace (the pod's own: owners are never in another namespace).
    pub namespace: String,
    /// Kind (`ReplicaSet`, `Job`, ...).
    pub kind: String,
    /// Name.
    pub name: String,
    /// Uid.
    pub uid: String,
}

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
    ) -> BoxFuture<'a, Result<Option<SecretData>, crate::FactError>>;

    /// The `imagePullSecrets` of ServiceAccount `name` in `namespace` (none when it does not
    /// exist yet).
    fn service_account_pull_secrets<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, crate::FactError>> {
        let _ = (namespace, name);
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// What a check knows about the object beyond its images.
#[derive(Debug, Default)]
pub struct Scope {
    /// Namespace of the object.
    pub namespace: String,
    /// Names of its `imagePullSecrets`.
    pub pull_secrets: Vec<String>,
    /// The workload that controls it, for template-verified digests.
    pub owner: Option<OwnerKey>,
    /// Its own uid, when it has one (a template never takes digests from itself).
    pub own_uid: Option<String>,
    /// Every image of the object as written: a template's digests are used only when it lists
    /// all of them.
    pub images: std::collections::BTreeSet<String>,
    /// The pull secrets' docker configs, read at the first registry call.
    configs: tokio::sync::OnceCell<Result<DockerConfigs, PullSecretError>>,
}

impl Scope {
    /// A scope for an object in `namespace`.
    pub fn new(namespace: &str, pull_secrets: Vec<String>, owner: Option<OwnerKey>) -> Self {
        Scope {
            namespace: namespace.to_owned(),
            pull_secrets,
            owner,
            own_uid: None,
            images: std::collections::BTreeSet::new(),
            configs: tokio::sync::OnceCell::new(),
        }
    }

    /// Which credentials registry reads are made with, as part of cache keys: anonymous, or
    /// this namespace's pull secrets (so no tenant's answer is reused for another).
    pub fn credential_scope(&self) -> String {
        if self.pull_secrets.is_empty() {
            return "anonymous".to_owned();
        }
        let mut names = self.pull_secrets.clone();
        names.sort();
        names.dedup();
        format!("{}/{}", self.namespace, names.join(","))
    }

    /// The credentials for `registry`: those of the first pull secret that has any, else
    /// anonymous. A missing secret is skipped (as the kubelet does); one that cannot be read
    /// is an error, so the image is refused rather than judged without its credentials.
    async fn auth(
        &self,
        source: Option<&dyn PullSecretSource>,
        registry: &str,
    ) -> Result<RegistryAuth, PullSecretError> {
        let (Some(source), false) = (source, self.pull_secrets.is_empty()) else {
            return Ok(RegistryAuth::Anonymous);
        };
        let configs = self
            .configs
            .get_or_init(|| async {
                let mut out = Vec::new();
                for name in &self.pull_secrets {
                    let data = source.read(&self.namespace, name).await.map_err(|source| {
                        PullSecretError::Unreadable {
                            name: name.clone(),
                            source,
                        }
                    })?;
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
                Err(e) => {
                    return Err(PullSecretError::In {
                        name: name.clone(),
                        source: Box::new(e),
                    });
                }
            }
        }
        Ok(RegistryAuth::Anonymous)
    }
}

/// Digests a workload's template verified at: owner → (until, image → digest).
type TemplateDigests = HashMap<OwnerKey, (Instant, BTreeMap<String, String>)>;

/// Fetches of signature material under way, by what they fetch, shared by the requests that
/// need them.
type Inflight = Mutex<HashMap<String, Shared<BoxFuture<'static, FetchResult>>>>;

/// The verifier shared by all requests.
pub struct ImageVerifier {
    registry: Arc<Registry>,
    ttl: Duration,
    negative_ttl: Duration,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    inflight: Arc<Inflight>,
    /// Fetches of signature material running at once, in all and per registry: with
    /// [`MAX_MATERIAL`](super::registry::MAX_MATERIAL) per fetch, this bounds the memory
    /// registries can make the webhook hold, and one slow registry cannot take every slot.
    fetches: Arc<Slots>,
    templates: Mutex<TemplateDigests>,
    pull_secrets: Option<Arc<dyn PullSecretSource>>,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl ImageVerifier {
    /// A verifier over `registry`.
    pub fn new(registry: Registry, ttl: Duration, negative_ttl: Duration) -> Self {
        ImageVerifier {
            registry: Arc::new(registry),
            ttl,
            negative_ttl,
            cache: Mutex::new(HashMap::new()),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            fetches: Arc::new(Slots::default()),
            templates: Mutex::new(HashMap::new()),
            pull_secrets: None,
            hits: std::sync::atomic::AtomicU64::new(0),
            misses: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The `imagePullSecrets` of ServiceAccount `name` in `namespace`, as the kubelet's pods
    /// get them (the ServiceAccount admission plugin copies them into pods that name none).
    pub async fn service_account_pull_secrets(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<String>, crate::FactError> {
        match &self.pull_secrets {
            Some(source) => source.service_account_pull_secrets(namespace, name).await,
            None => Ok(Vec::new()),
        }
    }

    /// Reads pull secrets through `source`; without one, registries are read anonymously.
    #[must_use]
    pub fn with_pull_secrets(mut self, source: Arc<dyn PullSecretSource>) -> Self {
        self.pull_secrets = Some(source);
        self
    }

    /// Records that the template of workload `owner` verified with `digests`
    /// (image as written → digest), for the pods it will own.
    pub fn remember_template(&self, owner: OwnerKey, digests: BTreeMap<String, String>) {
        if digests.is_empty() {
            return;
        }
        let mut templates = lock(&self.templates);
        let now = Instant::now();
        if templates.len() > 10_000 {
            templates.retain(|_, (until, _)| *until > now);
        }
        templates.insert(owner, (now + self.ttl, digests));
    }

    /// The digest the owner's template verified `image` at, while remembered, when that
    /// template lists every image of the pod.
    fn template_digest(&self, scope: &Scope, image: &str) -> Option<String> {
        let owner = scope.owner.as_ref()?;
        // An owner in another namespace, or the object naming itself, is no owner.
        if owner.namespace != scope.namespace || scope.own_uid.as_deref() == Some(&owner.uid) {
            return None;
        }
        let templates = lock(&self.templates);
        let (until, digests) = templates.get(owner)?;
        let lists_all = scope.images.iter().all(|i| digests.contains_key(i));
        (*until > Instant::now() && lists_all)
            .then(|| digests.get(image).cloned())
            .flatten()
    }

    /// Registry requests made so far.
    pub fn registry_requests(&self) -> u64 {
        self.registry.requests()
    }

    fn cached(&self, key: &CacheKey) -> Option<Result<(), String>> {
        let cache = lock(&self.cache);
        let hit = cache
            .get(key)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, r)| r.clone());
        let counter = if hit.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        hit
    }

    /// Registry requests and errors, verdict-cache hits and misses so far.
    pub fn stats(&self) -> crate::metrics::ImageStats {
        use std::sync::atomic::Ordering::Relaxed;
        crate::metrics::ImageStats {
            registry_requests: self.registry.requests(),
            registry_errors: self.registry.errors(),
            cache_hits: self.hits.load(Relaxed),
            cache_misses: self.misses.load(Relaxed),
        }
    }

    fn remember(&self, key: CacheKey, outcome: &Result<(), String>) {
        let ttl = if outcome.is_ok() {
            self.ttl
        } else {
            self.negative_ttl
        };
        let mut cache = lock(&self.cache);
        let now = Instant::now();
        if cache.len() > 10_000 {
            cache.retain(|_, (until, _)| *until > now);
        }
        cache.insert(key, (now + ttl, outcome.clone()));
    }

    /// The layers of `digest` (attestations only `with_atts`), fetched once however many
    /// requests ask at the same time.
    async fn fetch(
        &self,
        reference: &Reference,
        (repository, digest, credentials): (&str, &str, &str),
        auth: &RegistryAuth,
        deadline: Instant,
        with_atts: bool,
    ) -> FetchResult {
        let key = format!("{repository}@{digest} {credentials} {with_atts}");
        let started = Instant::now();
        // The fetch is shared: it runs for as long as any request may want it, not only as
        // long as the one that started it (a request with a short deadline must not make the
        // others that join it fail early).
        let fetch_deadline = deadline.max(started + MIN_FETCH_TIME);
        let shared = {
            let mut inflight = lock(&self.inflight);
            inflight
                .entry(key.clone())
                .or_insert_with(|| {
                    // The fetch runs as a task of its own, bounded by the deadline of the
                    // request that started it, and removes itself when done: nothing waits on
                    // a fetch nobody polls, and no stale fetch is joined later.
                    let task = tokio::spawn(fetch_material(
                        Arc::clone(&self.registry),
                        Arc::clone(&self.fetches),
                        (reference.clone(), digest.to_owned(), auth.clone()),
                        fetch_deadline,
                        with_atts,
                        (Arc::clone(&self.inflight), key),
                    ));
                    let registry = reference.resolve_registry().to_owned();
                    async move {
                        task.await.unwrap_or_else(|_| {
                            Arc::new(Err(RegistryError::Failed {
                                registry,
                                why: "the fetch of its signatures failed".to_owned(),
                            }))
                        })
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        // A request that joined another's fetch still answers by its own deadline.
        let Ok(out) = tokio::time::timeout_at(deadline.into(), shared).await else {
            return Arc::new(Err(RegistryError::Timeout {
                registry: reference.resolve_registry().to_owned(),
                millis: deadline.saturating_duration_since(started).as_millis(),
            }));
        };
        out
    }

    /// Verdicts of every policy in `policies` that covers `image` in a namespace with `labels`;
    /// empty (and no registry call) when none does.
    pub async fn check(
        &self,
        image: &ImageRef,
        as_written: &str,
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
                .map(|p| PolicyVerdict::of(p, Err(format!("{as_written}: {why}")), None))
                .collect()
        };
        let credentials = scope.credential_scope();
        let key = |digest: &str, p: &CompiledImagePolicy| -> CacheKey {
            (
                image.repository.clone(),
                digest.to_owned(),
                credentials.clone(),
                p.fingerprint.clone(),
            )
        };
        // A digest reference is checked against the cache before anything is fetched; a tag is
        // resolved at the registry every time (tags move), unless the pod's owner verified its
        // template at a digest for it and an enforced policy pins it there (otherwise the pod
        // would run whatever the tag names by then).
        let pins = covering
            .iter()
            .any(|p| p.policy.spec.pin_digest && p.mode() == EnforcementMode::Enforce);
        let pinned = image.digest.clone().or_else(|| {
            pins.then(|| self.template_digest(scope, as_written))
                .flatten()
        });
        if let Some(digest) = &pinned {
            let hits: Option<Vec<PolicyVerdict>> = covering
                .iter()
                .map(|p| {
                    self.cached(&key(digest, p)).map(|outcome| {
                        let outcome = outcome.map_err(|why| format!("{as_written}: {why}"));
                        PolicyVerdict::of(p, outcome, Some(digest))
                    })
                })
                .collect();
            if let Some(hits) = hits {
                return hits;
            }
        }
        let reference = &image.reference;
        let auth = match scope
            .auth(self.pull_secrets.as_deref(), reference.resolve_registry())
            .await
        {
            Ok(a) => a,
            Err(e) => return fail_all(e.to_string()),
        };
        let (reference, digest, resolved_here) = match &pinned {
            Some(d) => (reference.clone_with_digest(d.clone()), d.clone(), false),
            None => match self.registry.digest_of(reference, &auth, deadline).await {
                Ok(d) => (reference.clone(), d, true),
                Err(e) => return fail_all(format!("cannot resolve the image digest: {e}")),
            },
        };
        let with_atts = covering.iter().any(|p| !p.attestations.is_empty());
        let mut out = Vec::new();
        let mut fetched: Option<FetchResult> = None;
        for p in covering {
            let key = key(&digest, p);
            let outcome = if let Some(hit) = self.cached(&key) {
                hit
            } else {
                // Fetched at the first cache miss, then shared by the other policies.
                let layers = if let Some(f) = &fetched {
                    Arc::clone(f)
                } else {
                    let f = self
                        .fetch(
                            &reference,
                            (&image.repository, &digest, &credentials),
                            &auth,
                            deadline,
                            with_atts,
                        )
                        .await;
                    fetched = Some(Arc::clone(&f));
                    f
                };
                match &*layers {
                    Ok(layers) => {
                        let outcome = evaluate(p, &digest, layers);
                        // "No signature at all" for a digest nobody resolved here may only mean
                        // the repository named does not exist: not an answer to keep.
                        if outcome.is_ok() || resolved_here || !layers.sigs.is_empty() {
                            self.remember(key, &outcome);
                        }
                        outcome
                    }
                    Err(e) => Err(format!("cannot fetch signatures: {e}")),
                }
            };
            let outcome = outcome.map_err(|why| format!("{as_written} ({digest}): {why}"));
            out.push(PolicyVerdict::of(p, outcome, Some(&digest)));
        }
        out
    }
}

/// Whether `layers` satisfy policy `p` for `digest`: enough authorities verify the signature,
/// each by a signer of its own (one key or identity never counts for two authorities), and
/// every attestation requirement is met by an attestation one of them signed.
fn evaluate(p: &CompiledImagePolicy, digest: &str, layers: &Fetched) -> Result<(), String> {
    let mut why = Vec::new();
    let mut verified = Vec::new();
    let mut signers_of = Vec::new();
    for a in &p.authorities {
        match &a.signer {
            Err(e) => why.push(format!("authority {}: not loaded: {e}", a.name)),
            Ok(signer) => match verify_signatures(&layers.sigs, digest, signer) {
                Ok(who) => {
                    verified.push(signer);
                    signers_of.push(who);
                }
                Err(e) => why.push(format!("authority {}: {e}", a.name)),
            },
        }
    }
    let needed = p.needed();
    let distinct = distinct_signers(&signers_of);
    if distinct < needed {
        if verified.len() > distinct {
            why.push(format!(
                "{} authorities verified, but by {distinct} distinct signer(s)",
                verified.len()
            ));
        }
        return Err(format!(
            "{distinct} of {needed} required authorities verified: {}",
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

/// The largest number of authorities that can each be given a signer of their own, from the
/// signers each one accepted (a maximum bipartite matching; there are a handful of each).
fn distinct_signers(signers_of: &[BTreeSet<String>]) -> usize {
    fn assign(
        a: usize,
        signers_of: &[BTreeSet<String>],
        owner: &mut HashMap<String, usize>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for s in &signers_of[a] {
            if !seen.insert(s.clone()) {
                continue;
            }
            let free = match owner.get(s) {
                None => true,
                Some(&other) => assign(other, signers_of, owner, seen),
            };
            if free {
                owner.insert(s.clone(), a);
                return true;
            }
        }
        false
    }
    let mut owner = HashMap::new();
    (0..signers_of.len())
        .filter(|&a| assign(a, signers_of, &mut owner, &mut BTreeSet::new()))
        .count()
}

/// Fetches of signature material running at once (each holds at most
/// [`MAX_MATERIAL`](super::registry::MAX_MATERIAL)), in all and from one registry.
const MAX_FETCHES: usize = 8;
const MAX_FETCHES_PER_REGISTRY: usize = 2;
/// How long a shared fetch may run at least, whatever the deadline of the request that started
/// it.
const MIN_FETCH_TIME: Duration = Duration::from_secs(5);

/// Fetch slots: [`MAX_FETCHES`] in all, [`MAX_FETCHES_PER_REGISTRY`] per registry host.
struct Slots {
    all: Arc<tokio::sync::Semaphore>,
    per_registry: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            all: Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES)),
            per_registry: Mutex::new(HashMap::new()),
        }
    }
}

impl Slots {
    /// A slot for a fetch from `registry`, waiting no longer than `deadline`.
    async fn take(
        &self,
        registry: &str,
        deadline: Instant,
    ) -> Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        let host =
            {
                let mut map = lock(&self.per_registry);
                if map.len() > 1024 {
                    // Forget registries nothing is fetching from.
                    map.retain(|_, s| s.available_permits() < MAX_FETCHES_PER_REGISTRY);
                }
                Arc::clone(map.entry(registry.to_owned()).or_insert_with(|| {
                    Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES_PER_REGISTRY))
                }))
            };
        let both = async {
            let one = host.acquire_owned().await.ok()?;
            let all = Arc::clone(&self.all).acquire_owned().await.ok()?;
            Some((one, all))
        };
        tokio::time::timeout_at(deadline.into(), both)
            .await
            .ok()
            .flatten()
    }
}

/// The signature layers (and attestations `with_atts`) of `digest`, within one
/// [`MAX_MATERIAL`](super::registry::MAX_MATERIAL) budget and one of the [`MAX_FETCHES`] slots; removes `key` from
/// `inflight` when done.
async fn fetch_material(
    registry: Arc<Registry>,
    slots: Arc<Slots>,
    (reference, digest, auth): (Reference, String, RegistryAuth),
    deadline: Instant,
    with_atts: bool,
    (inflight, key): (Arc<Inflight>, String),
) -> FetchResult {
    let fetched = async {
        let host = reference.resolve_registry().to_owned();
        let Some(_slot) = slots.take(&host, deadline).await else {
            return Err(RegistryError::Failed {
                registry: host,
                why: "every slot for fetching its signatures stayed busy until the deadline"
                    .to_owned(),
            });
        };
        let budget = Budget::default();
        let mut sigs = registry
            .cosign_layers_within(&reference, (&digest, "sig"), &auth, deadline, &budget)
            .await?;
        let mut atts = if with_atts {
            registry
                .cosign_layers_within(&reference, (&digest, "att"), &auth, deadline, &budget)
                .await?
        } else {
            Vec::new()
        };
        // No tag-layout signatures (or attestations): look for Sigstore bundles among the
        // image's referrers (cosign v3's default).
        if sigs.is_empty() || (with_atts && atts.is_empty()) {
            let bundles = registry
                .bundle_layers(&reference, &digest, &auth, deadline, &budget)
                .await?;
            sigs.extend(bundles.iter().cloned());
            atts.extend(bundles);
        }
        Ok(Fetched { sigs, atts })
    };
    let started = Instant::now();
    let out = Arc::new(
        tokio::time::timeout_at(deadline.into(), fetched)
            .await
            .unwrap_or_else(|_| {
                Err(RegistryError::Timeout {
                    registry: reference.resolve_registry().to_owned(),
                    millis: deadline.saturating_duration_since(started).as_millis(),
                })
            }),
    );
    lock(&inflight).remove(&key);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn one_signer_counts_once_however_many_authorities_accept_it() {
        assert_eq!(distinct_signers(&[set(&["k"]), set(&["k"])]), 1);
        assert_eq!(distinct_signers(&[set(&["k1"]), set(&["k2"])]), 2);
        // Authority 0 accepts both; authority 1 only k1: both can be satisfied.
        assert_eq!(distinct_signers(&[set(&["k1", "k2"]), set(&["k1"])]), 2);
        assert_eq!(
            distinct_signers(&[set(&["a"]), set(&["a", "b"]), set(&["b"])]),
            2
        );
        assert_eq!(distinct_signers(&[]), 0);
    }

    #[test]
    fn template_digests_go_only_to_the_pods_of_that_template() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let verifier = ImageVerifier::new(
            Registry::new(&[]).expect("registry"),
            Duration::from_mins(1),
            Duration::from_secs(1),
        );
        let owner = |ns: &str, kind: &str, name: &str, uid: &str| OwnerKey {
            namespace: ns.into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
        };
        let rs = owner("shop", "ReplicaSet", "web-1", "uid-1");
        verifier.remember_template(
            rs.clone(),
            BTreeMap::from([("r.example/web:1".to_owned(), "sha256:aaa".to_owned())]),
        );
        let scope = |owner: OwnerKey, ns: &str, images: &[&str]| {
            let mut s = Scope::new(ns, vec![], Some(owner));
            s.images = images.iter().map(|i| (*i).to_owned()).collect();
            s
        };
        let lookup = |s: &Scope| verifier.template_digest(s, "r.example/web:1");
        assert_eq!(
            lookup(&scope(rs.clone(), "shop", &["r.example/web:1"])),
            Some("sha256:aaa".into())
        );
        // The same uid under another kind or name, or in another namespace, is not that owner.
        for forged in [
            owner("shop", "Job", "web-1", "uid-1"),
            owner("shop", "ReplicaSet", "other", "uid-1"),
            owner("shop", "ReplicaSet", "web-1", "uid-2"),
            owner("tenant-b", "ReplicaSet", "web-1", "uid-1"),
        ] {
            let ns = forged.namespace.clone();
            assert_eq!(lookup(&scope(forged, &ns, &["r.example/web:1"])), None);
        }
        // A pod that runs an image its template does not list gets nothing from it.
        assert_eq!(
            lookup(&scope(rs, "shop", &["r.example/web:1", "r.example/evil:1"])),
            None
        );
    }

    /// A template's digest stands in for a pod's tag only when an enforced policy pins the pod
    /// to it; otherwise the tag is resolved again (the pod would run whatever it names by then).
    #[tokio::test]
    async fn template_digests_stand_in_for_tags_only_when_pinned() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let verifier = ImageVerifier::new(
            Registry::new(&[]).expect("registry"),
            Duration::from_mins(1),
            Duration::from_secs(1),
        );
        let rs = OwnerKey {
            namespace: "shop".into(),
            kind: "ReplicaSet".into(),
            name: "web-1".into(),
            uid: "uid-1".into(),
        };
        let image = "registry.invalid/shop/web:1";
        verifier.remember_template(
            rs.clone(),
            BTreeMap::from([(image.to_owned(), format!("sha256:{}", "a".repeat(64)))]),
        );
        let mut scope = Scope::new("shop", vec![], Some(rs));
        scope.images = BTreeSet::from([image.to_owned()]);
        for (pin, resolved) in [(false, true), (true, false)] {
            let policy: palisade_api::ImagePolicy = serde_json::from_value(serde_json::json!({
                "apiVersion": "palisade.dev/v1alpha1", "kind": "ImagePolicy",
                "metadata": {"name": "p", "uid": "u", "generation": 1},
                "spec": {"images": [{"glob": "registry.invalid/shop/**"}], "pinDigest": pin,
                         "authorities": [{"name": "k", "key": {"publicKey": "x"}}]}
            }))
            .expect("policy");
            let policies = [Arc::new(CompiledImagePolicy::compile(&policy, &|_| None))];
            let verdicts = verifier
                .check(
                    &super::super::reference::parse(image).expect("reference"),
                    image,
                    &BTreeMap::new(),
                    &policies,
                    &scope,
                    Instant::now() + Duration::from_secs(3),
                )
                .await;
            let why = verdicts[0].outcome.clone().expect_err("refused");
            assert_eq!(
                why.contains("cannot resolve the image digest"),
                resolved,
                "pinDigest {pin}: {why}"
            );
        }
    }

    /// One registry gets at most two fetch slots, all registries together eight: a slow
    /// registry cannot hold every slot.
    #[tokio::test]
    async fn fetch_slots_are_bounded_per_registry_and_in_all() {
        let slots = Slots::default();
        let soon = || Instant::now() + Duration::from_millis(50);
        let slow_a = slots.take("slow.example", soon()).await.expect("first");
        let slow_b = slots.take("slow.example", soon()).await.expect("second");
        assert!(
            slots.take("slow.example", soon()).await.is_none(),
            "a third slot for one registry"
        );
        let mut held = vec![slow_a, slow_b];
        for i in 0..MAX_FETCHES - MAX_FETCHES_PER_REGISTRY {
            held.push(
                slots
                    .take(&format!("r{i}.example"), soon())
                    .await
                    .expect("other registries still get slots"),
            );
        }
        assert!(
            slots.take("fresh.example", soon()).await.is_none(),
            "more than 8 in all"
        );
        held.pop();
        assert!(
            slots.take("fresh.example", soon()).await.is_some(),
            "a freed slot is reused"
        );
    }

    #[test]
    fn credential_scopes_separate_namespaces_and_secrets() {
        let anon = Scope::new("a", vec![], None);
        let a = Scope::new("a", vec!["pull".into()], None);
        let b = Scope::new("b", vec!["pull".into()], None);
        assert_eq!(anon.credential_scope(), "anonymous");
        assert_ne!(a.credential_scope(), b.credential_scope());
        assert_eq!(
            Scope::new("a", vec!["y".into(), "x".into()], None).credential_scope(),
            Scope::new("a", vec!["x".into(), "y".into(), "x".into()], None).credential_scope()
        );
    }
}
