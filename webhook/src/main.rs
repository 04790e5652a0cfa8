//! `palisade-webhook --config FILE`: the admission webhook server. Logs (including one
//! security event per decision, target `palisade::security`) are JSON lines on stderr.

use std::{
    collections::{BTreeMap, HashMap},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DynamicObject, GroupVersionKind};
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use palisade_api::ImagePolicy;
use palisade_webhook::{
    config::Config,
    config::TlsSource,
    identity::{IdentitySource, SpireRegistration},
    images::{
        check::{ImageVerifier, PullSecretSource, SecretData},
        policy::{CompiledImagePolicy, material_refs},
        registry::Registry,
    },
    secrets::SecretsPolicy,
    server::{AppState, FactSource, router, serve_tls},
    tls::{ReloadingCert, ServingCert, SvidCert},
};

struct ClusterFacts {
    namespaces: Store<PartialObjectMeta<Namespace>>,
    /// ClusterSPIFFEIDs, watched only when SPIRE is the identity source.
    spire: Option<Store<DynamicObject>>,
    /// ImagePolicies as written.
    image_policies: Store<ImagePolicy>,
    /// Compiled ImagePolicies by (uid, generation, version of the key material): each is
    /// compiled once, for admission and status alike.
    compiled: Mutex<HashMap<(String, i64, u64), Arc<CompiledImagePolicy>>>,
    /// Referenced Secrets' and ConfigMaps' keys, read when a policy changes.
    material: Material,
}

/// Key material read from Secrets and ConfigMaps, by `secret|configmap/<ns>/<name>/<key>`,
/// with a version that changes whenever any of it does (so compiled policies are redone).
#[derive(Default)]
struct Material {
    entries: Mutex<HashMap<String, Result<Vec<u8>, String>>>,
    version: AtomicU64,
}

impl Material {
    fn get(&self, key: &str) -> Option<Result<Vec<u8>, String>> {
        self.entries.lock().ok()?.get(key).cloned()
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Reads every reference of `policy` from the API server.
    async fn refresh(&self, client: &Client, policy: &ImagePolicy) {
        for r in material_refs(policy) {
            let parts: Vec<&str> = r.splitn(4, '/').collect();
            let [kind, ns, name, key] = parts.as_slice() else {
                continue;
            };
            let what = if *kind == "secret" {
                "Secret"
            } else {
                "ConfigMap"
            };
            let value = object_data(client, what, ns, name)
                .await
                .and_then(|d| d.ok_or_else(|| format!("{what} {ns}/{name} does not exist")))
                .and_then(|mut d| {
                    d.remove(*key)
                        .ok_or_else(|| format!("{what} {ns}/{name} has no key {key}"))
                })
                .map_err(|e| format!("{r}: {e}"));
            if let Ok(mut m) = self.entries.lock()
                && m.get(&r) != Some(&value)
            {
                m.insert(r, value);
                self.version.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// The data of Secret or ConfigMap (`kind`) `namespace/name`, by key (Secret values decoded);
/// `None` when it does not exist.
async fn object_data(
    client: &Client,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<SecretData>, String> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    if kind == "Secret" {
        let secret = Api::<Secret>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())?;
        Ok(secret.map(|s| {
            let data = s.data.unwrap_or_default();
            data.into_iter().map(|(k, v)| (k, v.0)).collect()
        }))
    } else {
        let map = Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())?;
        Ok(map.map(|c| {
            let data = c.data.unwrap_or_default();
            data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect()
        }))
    }
}

/// Pull secrets read from the API server when a registry call needs them.
struct ApiPullSecrets(Client);

impl PullSecretSource for ApiPullSecrets {
    fn read<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<SecretData>, String>> {
        Box::pin(object_data(&self.0, "Secret", namespace, name))
    }
}

impl ClusterFacts {
    /// The compiled form of `p` from `cache`, compiling it on first use.
    fn compiled_in(
        &self,
        cache: &mut HashMap<(String, i64, u64), Arc<CompiledImagePolicy>>,
        p: &ImagePolicy,
    ) -> Arc<CompiledImagePolicy> {
        let key = (
            p.metadata.uid.clone().unwrap_or_default(),
            p.metadata.generation.unwrap_or_default(),
            self.material.version(),
        );
        Arc::clone(cache.entry(key).or_insert_with(|| {
            Arc::new(CompiledImagePolicy::compile(p, &|r| self.material.get(r)))
        }))
    }

    /// The compiled form of `p`.
    fn compiled(&self, p: &ImagePolicy) -> Arc<CompiledImagePolicy> {
        match self.compiled.lock() {
            Ok(mut cache) => self.compiled_in(&mut cache, p),
            Err(_) => Arc::new(CompiledImagePolicy::compile(p, &|r| self.material.get(r))),
        }
    }
}

impl FactSource for ClusterFacts {
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&ObjectRef::new(namespace))
            .map(|n| n.metadata.labels.clone().unwrap_or_default())
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
        let Ok(mut compiled) = self.compiled.lock() else {
            return Vec::new();
        };
        let live: Vec<Arc<CompiledImagePolicy>> = self
            .image_policies
            .state()
            .iter()
            .map(|p| self.compiled_in(&mut compiled, p))
            .collect();
        // Forget generations no longer in the cluster.
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [flag, path] = args.as_slice() else {
        eprintln!("usage: palisade-webhook --config FILE");
        return ExitCode::from(2);
    };
    if flag != "--config" {
        eprintln!("usage: palisade-webhook --config FILE");
        return ExitCode::from(2);
    }
    let config = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| Config::parse(&t))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("palisade-webhook: invalid configuration {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("palisade-webhook: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "webhook stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // The certificate comes first: without one there is nothing to serve.
    let (cert, _cert_task): (Arc<ServingCert>, _) = match config.tls.source() {
        Ok(TlsSource::Files(files)) => {
            let files = ReloadingCert::new(files)?;
            (
                files.serving(),
                files.spawn_reloader(Duration::from_secs(2)),
            )
        }
        Ok(TlsSource::WorkloadApi(endpoint)) => {
            let svid = SvidCert::connect(&endpoint, Duration::from_mins(1)).await?;
            (svid.serving(), svid.spawn_follower())
        }
        Err(e) => anyhow::bail!(e),
    };
    let secrets = SecretsPolicy::new()?;
    let client = Client::try_default().await?;
    let (namespaces, writer) = reflector::store();
    let spire = if config.identity_source == IdentitySource::Spire {
        let gvk = GroupVersionKind::gvk("spire.spiffe.io", "v1alpha1", "ClusterSPIFFEID");
        let (ar, _) = kube::discovery::pinned_kind(&client, &gvk).await?;
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
        namespaces,
        spire,
        image_policies,
        compiled: Mutex::new(HashMap::new()),
        material: Material::default(),
    });
    let policy_stream = watcher(
        Api::<ImagePolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(policy_writer)
    .applied_objects()
    .for_each({
        let client = client.clone();
        let facts = Arc::clone(&facts);
        move |p| {
            let client = client.clone();
            let facts = Arc::clone(&facts);
            async move {
                if let Ok(p) = p {
                    facts.material.refresh(&client, &p).await;
                    write_policy_status(&client, &p, &facts.compiled(&p)).await;
                }
            }
        }
    });
    tokio::spawn(policy_stream);
    // The HTTP client behind registry calls uses the process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let verifier = ImageVerifier::new(
        Registry::new(&config.images.insecure_registries)?,
        Duration::from_secs(config.images.cache_ttl_seconds),
        Duration::from_secs(config.images.negative_cache_ttl_seconds),
    )
    .with_pull_secrets(Arc::new(ApiPullSecrets(client.clone())));
    let stream = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .for_each(|_| std::future::ready(()));
    tokio::spawn(stream);
    let state = Arc::new(AppState {
        secrets,
        facts,
        images: Some(Arc::new(verifier)),
        permits: tokio::sync::Semaphore::new(64),
        counters: palisade_webhook::server::Counters::default(),
        config: config.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, "serving admission reviews");
    serve_tls(listener, cert, router(state), shutdown_signal()).await?;
    Ok(())
}

/// Reports in an ImagePolicy's status whether its keys and predicate policies are loaded;
/// written only when it changes.
async fn write_policy_status(
    client: &Client,
    policy: &ImagePolicy,
    compiled: &CompiledImagePolicy,
) {
    let previous = policy.status.clone().unwrap_or_default();
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let status = compiled.status(&previous, &now);
    if status == previous {
        return;
    }
    let api: Api<ImagePolicy> = Api::all(client.clone());
    let patch = serde_json::json!({"status": status});
    if let Err(e) = api
        .patch_status(
            &compiled.name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        tracing::warn!(policy = %compiled.name, error = %e, "cannot write ImagePolicy status");
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}
