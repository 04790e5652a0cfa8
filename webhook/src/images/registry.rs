//! Fetching what verification needs from an OCI registry: the digest a tag points at, and the
//! layers of cosign's `sha256-<hex>.sig` and `.att` manifests. Every call is bounded by a
//! deadline, so a slow or dead registry yields an error in time, never a hang; the number of
//! registry requests is counted.

use std::{
    collections::BTreeMap,
    num::NonZeroUsize,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use oci_client::{
    Client, Reference,
    client::{ClientConfig, ClientProtocol},
    errors::{OciDistributionError, OciErrorCode},
    manifest::OciManifest,
    secrets::RegistryAuth,
};
use serde::Deserialize;

use super::verify::Layer;

/// Largest signature or attestation layer fetched.
const MAX_LAYER: i64 = 4 << 20;

/// Why the registry could not answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The deadline passed first.
    #[error("registry {registry} did not answer within {millis} ms")]
    Timeout {
        /// Registry host.
        registry: String,
        /// The deadline, in milliseconds.
        millis: u128,
    },
    /// The registry answered with an error, or could not be reached.
    #[error("registry {registry}: {why}")]
    Failed {
        /// Registry host.
        registry: String,
        /// Cause.
        why: String,
    },
    /// The reference does not parse.
    #[error("image reference {0:?} does not parse")]
    BadReference(String),
}

/// Most clients kept for distinct credentials; the least recently used goes first.
const MAX_CREDENTIALED_CLIENTS: NonZeroUsize = NonZeroUsize::new(256).unwrap();

/// An OCI registry client for verification.
///
/// oci-client remembers the first credentials it is given for a registry, so requests with
/// other credentials (another pod's imagePullSecrets) would silently reuse them: anonymous
/// reads go through one client, and each distinct (registry, credentials) pair through its own.
pub struct Registry {
    insecure: Vec<String>,
    client: Client,
    credentialed: Mutex<lru::LruCache<(String, String, String), Client>>,
    requests: AtomicU64,
    clients_made: AtomicU64,
}

impl Registry {
    /// A client; registries in `insecure` (`host:port`) are spoken to over plain HTTP.
    pub fn new(insecure: &[String]) -> Result<Self, RegistryError> {
        Self::keeping(insecure, MAX_CREDENTIALED_CLIENTS)
    }

    /// A client keeping at most `clients` clients for distinct credentials.
    fn keeping(insecure: &[String], clients: NonZeroUsize) -> Result<Self, RegistryError> {
        let client =
            Client::try_from(client_config(insecure)).map_err(|e| RegistryError::Failed {
                registry: String::new(),
                why: e.to_string(),
            })?;
        Ok(Registry {
            insecure: insecure.to_vec(),
            client,
            credentialed: Mutex::new(lru::LruCache::new(clients)),
            requests: AtomicU64::new(0),
            clients_made: AtomicU64::new(0),
        })
    }

    /// The client that speaks to `registry` with `auth`.
    fn client(&self, registry: &str, auth: &RegistryAuth) -> Result<Client, RegistryError> {
        let key = match auth {
            RegistryAuth::Anonymous => return Ok(self.client.clone()),
            RegistryAuth::Basic(user, password) => {
                (registry.to_owned(), user.clone(), password.clone())
            }
            RegistryAuth::Bearer(token) => (registry.to_owned(), String::new(), token.clone()),
        };
        let failed = |why: String| RegistryError::Failed {
            registry: registry.to_owned(),
            why,
        };
        let mut clients = self
            .credentialed
            .lock()
            .map_err(|_| failed("internal lock poisoned".into()))?;
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let client =
            Client::try_from(client_config(&self.insecure)).map_err(|e| failed(e.to_string()))?;
        self.clients_made.fetch_add(1, Ordering::Relaxed);
        clients.put(key, client.clone());
        Ok(client)
    }

    /// Registry requests made so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn bounded<T>(
        &self,
        registry: &str,
        deadline: Instant,
        call: impl Future<Output = Result<T, OciDistributionError>>,
    ) -> Result<T, RegistryError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, call).await {
            Err(_) => Err(RegistryError::Timeout {
                registry: registry.to_owned(),
                millis: left.as_millis(),
            }),
            Ok(Err(e)) => Err(RegistryError::Failed {
                registry: registry.to_owned(),
                why: e.to_string(),
            }),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// The digest `image` points at: the one it names, or the one its tag resolves to now.
    pub async fn resolve(
        &self,
        image: &str,
        auth: &RegistryAuth,
        deadline: Instant,
    ) -> Result<(Reference, String), RegistryError> {
        let reference: Reference = image
            .parse()
            .map_err(|_| RegistryError::BadReference(image.to_owned()))?;
        let digest = self.digest_of(&reference, auth, deadline).await?;
        Ok((reference, digest))
    }

    /// The digest `reference` names, or the one its tag resolves to now.
    pub async fn digest_of(
        &self,
        reference: &Reference,
        auth: &RegistryAuth,
        deadline: Instant,
    ) -> Result<String, RegistryError> {
        // A digest reference names its content: nothing to resolve.
        if let Some(digest) = reference.digest() {
            return Ok(digest.to_owned());
        }
        let registry = reference.resolve_registry().to_owned();
        let client = self.client(&registry, auth)?;
        self.bounded(
            &registry,
            deadline,
            client.fetch_manifest_digest(reference, auth),
        )
        .await
    }

    /// The content of layer `d` of `reference` (which oci-client checks against its digest).
    async fn blob(
        &self,
        client: &Client,
        reference: &Reference,
        d: &oci_client::manifest::OciDescriptor,
        deadline: Instant,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut blob = Vec::new();
        self.bounded(
            reference.resolve_registry(),
            deadline,
            client.pull_blob(reference, d, &mut blob),
        )
        .await?;
        Ok(blob)
    }

    /// The layers of `sha256-<hex>.<suffix>` (`sig` or `att`) next to `reference`; empty when
    /// the image has none.
    pub async fn cosign_layers(
        &self,
        reference: &Reference,
        digest: &str,
        suffix: &str,
        auth: &RegistryAuth,
        deadline: Instant,
    ) -> Result<Vec<Layer>, RegistryError> {
        let registry = reference.resolve_registry().to_owned();
        let client = self.client(&registry, auth)?;
        let tag = format!("{}.{suffix}", digest.replace(':', "-"));
        let sref = Reference::with_tag(
            reference.registry().to_owned(),
            reference.repository().to_owned(),
            tag,
        );
        // A missing signature manifest is an answer (no signatures), not an error.
        let pulled = self
            .bounded(&registry, deadline, async {
                match client.pull_manifest(&sref, auth).await {
                    Ok((m, _)) => Ok(Some(m)),
                    Err(e) if not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        let Some(manifest) = pulled else {
            return Ok(Vec::new());
        };
        let OciManifest::Image(manifest) = manifest else {
            return Err(RegistryError::Failed {
                registry,
                why: format!("{sref} is an index, not a signature manifest"),
            });
        };
        let mut layers = Vec::new();
        for d in manifest.layers.into_iter().filter(|d| d.size <= MAX_LAYER) {
            let blob = self.blob(&client, &sref, &d, deadline).await?;
            layers.push(Layer {
                media_type: d.media_type.clone(),
                annotations: d
                    .annotations
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                blob,
            });
        }
        Ok(layers)
    }
}

/// How every client is set up: plain HTTP for the `insecure` registries only, short connect
/// and read timeouts (each call is also bounded by the request's deadline).
fn client_config(insecure: &[String]) -> ClientConfig {
    ClientConfig {
        protocol: if insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(insecure.to_vec())
        },
        connect_timeout: Some(Duration::from_secs(2)),
        read_timeout: Some(Duration::from_secs(5)),
        ..ClientConfig::default()
    }
}

/// Most bundles read per image.
const MAX_BUNDLES: usize = 16;

impl Registry {
    /// The Sigstore bundles attached to `digest` as OCI referrers (cosign v3's default output;
    /// the referrers API, or the `sha256-<hex>` referrers tag where the registry lacks it),
    /// each as a DSSE layer; bundles that do not parse are left out.
    pub async fn bundle_layers(
        &self,
        reference: &Reference,
        digest: &str,
        auth: &RegistryAuth,
        deadline: Instant,
    ) -> Result<Vec<Layer>, RegistryError> {
        let registry = reference.resolve_registry().to_owned();
        let client = self.client(&registry, auth)?;
        client.store_auth_if_needed(&registry, auth).await;
        let subject = Reference::with_digest(
            reference.registry().to_owned(),
            reference.repository().to_owned(),
            digest.to_owned(),
        );
        let index = self
            .bounded(
                &registry,
                deadline,
                client.pull_referrers(&subject, Some(super::verify::BUNDLE)),
            )
            .await?;
        let mut layers = Vec::new();
        for m in index.manifests.iter().take(MAX_BUNDLES) {
            let mref = Reference::with_digest(
                reference.registry().to_owned(),
                reference.repository().to_owned(),
                m.digest.clone(),
            );
            let (manifest, _) = self
                .bounded(&registry, deadline, client.pull_manifest(&mref, auth))
                .await?;
            let OciManifest::Image(manifest) = manifest else {
                continue;
            };
            for d in manifest
                .layers
                .iter()
                .filter(|d| d.media_type == super::verify::BUNDLE && d.size <= MAX_LAYER)
            {
                let blob = self.blob(&client, &mref, d, deadline).await?;
                if let Ok(layer) = super::verify::bundle_layer(&blob) {
                    layers.push(layer);
                }
            }
        }
        Ok(layers)
    }
}

fn not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// The credentials for `registry` in a `.dockerconfigjson` (an imagePullSecret); anonymous when
/// it has none for that registry.
pub fn registry_auth(dockerconfigjson: &[u8], registry: &str) -> Result<RegistryAuth, String> {
    let config: DockerConfig = serde_json::from_slice(dockerconfigjson)
        .map_err(|e| format!("not a docker config: {e}"))?;
    for (key, a) in &config.auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        let host = match host {
            "docker.io" | "registry-1.docker.io" => "index.docker.io",
            h => h,
        };
        if host != registry {
            continue;
        }
        if let (Some(u), Some(p)) = (&a.username, &a.password) {
            return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
        }
        if let Some(b) = &a.auth {
            let decoded = B64
                .decode(b)
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or("auth is not base64")?;
            let (u, p) = decoded.split_once(':').ok_or("auth is not user:password")?;
            return Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()));
        }
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_secret_credentials_are_found_by_registry() {
        let config = serde_json::json!({"auths": {
            "https://registry.example.com/v1/": {"auth": B64.encode("robot:s3cret")},
            "docker.io": {"username": "hub", "password": "pw"},
        }})
        .to_string();
        assert_eq!(
            registry_auth(config.as_bytes(), "registry.example.com"),
            Ok(RegistryAuth::Basic("robot".into(), "s3cret".into()))
        );
        assert_eq!(
            registry_auth(config.as_bytes(), "index.docker.io"),
            Ok(RegistryAuth::Basic("hub".into(), "pw".into()))
        );
        assert_eq!(
            registry_auth(config.as_bytes(), "ghcr.io"),
            Ok(RegistryAuth::Anonymous)
        );
        assert!(registry_auth(b"\"a string\"", "ghcr.io").is_err());
    }

    /// Clients for credentials in use survive a crowd of one-off credentials: the least
    /// recently used one is dropped, not all of them.
    #[test]
    fn credentialed_clients_are_evicted_least_recently_used_first() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let full = 4;
        let reg = Registry::keeping(&[], NonZeroUsize::new(full).unwrap()).unwrap();
        let auth = |i: usize| RegistryAuth::Basic(format!("user{i}"), "pw".into());
        for i in 0..full {
            reg.client("registry.example", &auth(i)).unwrap();
        }
        // The first credentials are used again, then one more credential arrives.
        reg.client("registry.example", &auth(0)).unwrap();
        reg.client("registry.example", &auth(full)).unwrap();
        let made = reg.clients_made.load(Ordering::Relaxed);
        assert_eq!(made, full as u64 + 1);
        // The recently used client is still there; the least recently used one (1) is not.
        reg.client("registry.example", &auth(0)).unwrap();
        assert_eq!(reg.clients_made.load(Ordering::Relaxed), made);
        reg.client("registry.example", &auth(1)).unwrap();
        assert_eq!(reg.clients_made.load(Ordering::Relaxed), made + 1);
        // Anonymous reads share one client and make none.
        reg.client("registry.example", &RegistryAuth::Anonymous)
            .unwrap();
        assert_eq!(reg.clients_made.load(Ordering::Relaxed), made + 1);
    }
}
