//! Fetching what verification needs from an OCI registry: the digest a tag points at, and the
//! layers of cosign's `sha256-<hex>.sig` and `.att` manifests and of Sigstore bundles attached
//! as referrers. Every call is bounded by a deadline, so a slow or dead registry yields an error
//! in time, never a hang; the number of registry requests is counted.
//!
//! A registry is not trusted: every body is read in pieces and cut off at a cap (4 MiB for
//! manifests and layers, 64 KiB for tokens and error bodies) whatever length it declares;
//! content is checked against its digest (a manifest resolved by tag is digested here, never
//! taken from `Docker-Content-Digest`, and a header that disagrees is an error); redirects are
//! followed only to HTTPS (or a registry configured insecure), at most three, and never to a
//! loopback, link-local or unspecified address unless that address is a registry configured
//! insecure; what a registry writes in an error body never reaches a denial (only the status
//! and a well-formed error code do).

use crate::lock;
use std::{
    collections::BTreeMap,
    net::IpAddr,
    num::NonZeroUsize,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use oci_client::{Reference, secrets::RegistryAuth};
use reqwest::{StatusCode, header};
use serde::Deserialize;

use super::verify::Layer;

/// Largest manifest read (distribution's own limit).
pub const MAX_MANIFEST: usize = 4 << 20;
/// Largest signature manifest, referrers index or bundle manifest read: these list a few
/// signatures (a keyless one carries its certificates, a few KiB), never megabytes.
pub const MAX_SIGNATURE_MANIFEST: usize = 256 << 10;
/// Largest signature, attestation or bundle layer read.
pub const MAX_LAYER: usize = 4 << 20;
/// Largest token response or error body read.
const MAX_SMALL: usize = 64 << 10;
/// Redirects followed per request.
const MAX_REDIRECTS: usize = 3;

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

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
        /// Cause (never text the registry wrote).
        why: String,
    },
    /// The reference does not parse.
    #[error("image reference {0:?} does not parse")]
    BadReference(String),
}

/// Most bearer tokens kept.
const MAX_TOKENS: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

/// (host, repository, credential fingerprint).
type TokenKey = (String, String, String);

/// A token service's answer.
#[derive(Deserialize)]
struct Token {
    token: Option<String>,
    access_token: Option<String>,
}

/// How a registry asked to be authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// An OCI registry client for verification (see the module docs for what it does not trust).
pub struct Registry {
    insecure: Vec<String>,
    http: reqwest::Client,
    /// Clients of registries with their own CA bundle, by lower-case `host[:port]`.
    with_ca: BTreeMap<String, reqwest::Client>,
    /// Bearer tokens by (host, repository, credential fingerprint), with their expiry.
    tokens: Mutex<lru::LruCache<TokenKey, (Instant, String)>>,
    /// Hosts that asked for Basic credentials: sent at once next time.
    basic_hosts: Mutex<std::collections::BTreeSet<String>>,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// The HTTP client behind registry calls: redirects only to allowed targets, bounded in number
/// and time; `extra_roots` trusted beside the system's.
fn http_client(
    insecure: &[String],
    extra_roots: Vec<reqwest::Certificate>,
) -> Result<reqwest::Client, RegistryError> {
    let allowed = insecure.to_vec();
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        match allowed_target(attempt.url(), &allowed) {
            Ok(()) => attempt.follow(),
            Err(why) => attempt.error(format!("a redirect to {why}")),
        }
    });
    reqwest::Client::builder()
        .redirect(policy)
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(5))
        .user_agent(concat!("palisade-webhook/", env!("CARGO_PKG_VERSION")))
        .tls_certs_merge(extra_roots)
        .build()
        .map_err(|e| RegistryError::Failed {
            registry: String::new(),
            why: format!("cannot build the HTTP client: {e}"),
        })
}

/// A host (with port) that redirects may not lead to: loopback, link-local, unspecified.
fn forbidden_target(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost") || bare.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_link_local())
        }
        Err(_) => false,
    }
}

/// `host[:port]` of `url`.
fn authority(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

/// Why a redirect target or token realm is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetRefused {
    /// Plain HTTP (or another scheme) to a registry not configured insecure.
    #[error("{0} is not HTTPS")]
    NotHttps(String),
    /// An address a registry has no business sending the webhook to.
    #[error("a loopback, link-local or unspecified address")]
    LocalAddress,
}

/// Whether a request may go to `url` (a redirect target or a token realm): HTTPS, or a
/// registry configured insecure; never a loopback or link-local address unless configured.
fn allowed_target(url: &reqwest::Url, insecure: &[String]) -> Result<(), TargetRefused> {
    let host = authority(url);
    let configured = insecure.iter().any(|i| i.eq_ignore_ascii_case(&host));
    if url.scheme() != "https" && !configured {
        return Err(TargetRefused::NotHttps(url.scheme().to_owned()));
    }
    if !configured && forbidden_target(url.host_str().unwrap_or_default()) {
        return Err(TargetRefused::LocalAddress);
    }
    Ok(())
}

/// Why a pull secret gives no credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PullSecretError {
    /// The Secret could not be read.
    #[error("cannot read imagePullSecret {name}: {source}")]
    Unreadable {
        /// The Secret.
        name: String,
        /// Why.
        source: crate::FactError,
    },
    /// Its data is not a docker config.
    #[error("not a docker config: {0}")]
    NotDockerConfig(String),
    /// An `auth` entry that is not base64 of `user:password`.
    #[error("auth is not base64 of user:password")]
    BadAuth,
    /// One of the pod's pull secrets is unusable.
    #[error("imagePullSecret {name}: {source}")]
    In {
        /// The Secret.
        name: String,
        /// What is wrong with it.
        source: Box<PullSecretError>,
    },
}

/// Lower-case hex SHA-256 digest (`sha256:…`) of `bytes`.
fn sha256(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    format!("sha256:{}", super::policy::hex(d.as_ref()))
}

/// The error code a registry gave, if it is a well-formed one (`MANIFEST_UNKNOWN`); anything
/// else it wrote is dropped.
fn error_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<Code>,
    }
    #[derive(Deserialize)]
    struct Code {
        code: String,
    }
    let e: Errors = serde_json::from_slice(body).ok()?;
    let code = e.errors.into_iter().next()?.code;
    (!code.is_empty()
        && code.len() <= 32
        && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
    .then_some(code)
}

/// `key="value"` pairs of a `WWW-Authenticate` challenge.
fn parse_challenge(value: &str) -> Option<Challenge> {
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            after.split_once(',').map_or((after, ""), |(v, t)| (v, t))
        };
        params.insert(key.trim().to_ascii_lowercase(), value.to_owned());
        rest = tail.trim_start_matches([',', ' ']);
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
}

impl Manifest {
    fn is_index(&self) -> bool {
        self.media_type
            .as_deref()
            .is_some_and(|m| m.contains("index") || m.contains("manifest.list"))
            || (self.layers.is_empty() && !self.manifests.is_empty())
    }
}

/// What one GET brought back.
struct Answer {
    status: StatusCode,
    headers: header::HeaderMap,
    body: Vec<u8>,
}

impl Registry {
    /// A client; registries in `insecure` (`host:port`) are spoken to over plain HTTP.
    pub fn new(insecure: &[String]) -> Result<Self, RegistryError> {
        Self::with_cas(insecure, &BTreeMap::new())
    }

    /// A client that also trusts, for each registry in `cas` (`host[:port]` → PEM bundle), the
    /// CAs of its bundle beside the system's roots — for that registry (and its token service
    /// and redirects) only. A bundle without a certificate is refused.
    pub fn with_cas(
        insecure: &[String],
        cas: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Self, RegistryError> {
        let mut with_ca = BTreeMap::new();
        for (host, pem) in cas {
            let failed = |why: String| RegistryError::Failed {
                registry: host.clone(),
                why,
            };
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| failed(format!("its CA bundle is not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(failed("its CA bundle holds no certificate".into()));
            }
            let client = http_client(insecure, certs).map_err(|e| match e {
                RegistryError::Failed { why, .. } => {
                    failed(format!("its CA bundle is not usable: {why}"))
                }
                other => other,
            })?;
            with_ca.insert(host.to_ascii_lowercase(), client);
        }
        Ok(Registry {
            insecure: insecure.to_vec(),
            http: http_client(insecure, Vec::new())?,
            with_ca,
            tokens: Mutex::new(lru::LruCache::new(MAX_TOKENS)),
            basic_hosts: Mutex::new(std::collections::BTreeSet::new()),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// Registry requests made so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Registry requests that failed so far: no answer, a body over its limit, a 5xx status.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// `scheme://host` of `reference`'s registry (Docker Hub's API host for `docker.io`).
    fn base(&self, reference: &Reference) -> (String, String) {
        let host = match reference.resolve_registry() {
            "index.docker.io" | "docker.io" => "registry-1.docker.io".to_owned(),
            h => h.to_owned(),
        };
        let scheme = if self.insecure.iter().any(|i| i.eq_ignore_ascii_case(&host)) {
            "http"
        } else {
            "https"
        };
        (format!("{scheme}://{host}"), host)
    }

    /// A GET of `path` (below `/v2/<repository>/`) at `reference`'s registry, authenticated as
    /// the registry asks, its body capped at `cap`; within `deadline`.
    async fn get(
        &self,
        reference: &Reference,
        path: &str,
        accept: &str,
        auth: &RegistryAuth,
        cap: usize,
        deadline: Instant,
    ) -> Result<Answer, RegistryError> {
        let (base, host) = self.base(reference);
        let url = format!("{base}/v2/{}/{path}", reference.repository());
        let left = deadline.saturating_duration_since(Instant::now());
        let call = async {
            let fingerprint = credential_fingerprint(auth);
            let token_key = (host.clone(), reference.repository().to_owned(), fingerprint);
            let mut authorization = self.known_authorization(&host, &token_key, auth);
            for _ in 0..2 {
                let answer = self
                    .send(&url, accept, authorization.as_deref(), cap, &host)
                    .await?;
                if answer.status != StatusCode::UNAUTHORIZED {
                    return Ok(answer);
                }
                let challenge = answer
                    .headers
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                authorization = match challenge {
                    Some(Challenge::Basic) => {
                        let Some(basic) = basic_header(auth) else {
                            return Ok(answer);
                        };
                        lock(&self.basic_hosts).insert(host.clone());
                        Some(basic)
                    }
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope,
                    }) => {
                        let scope = scope.unwrap_or_else(|| {
                            format!("repository:{}:pull", reference.repository())
                        });
                        let token = self
                            .token(&host, &realm, service.as_deref(), &scope, auth)
                            .await?;
                        let expiry = Instant::now() + Duration::from_secs(50);
                        lock(&self.tokens).put(token_key.clone(), (expiry, token.clone()));
                        Some(format!("Bearer {token}"))
                    }
                    None => return Ok(answer),
                };
            }
            Err(RegistryError::Failed {
                registry: host.clone(),
                why: "refused the credentials it asked for (HTTP 401)".to_owned(),
            })
        };
        match tokio::time::timeout(left, call).await {
            Err(_) => Err(RegistryError::Timeout {
                registry: host,
                millis: left.as_millis(),
            }),
            Ok(r) => r,
        }
    }

    /// The Authorization header to send before being asked: a cached token, or Basic
    /// credentials for a host that asked for them before.
    fn known_authorization(
        &self,
        host: &str,
        token_key: &TokenKey,
        auth: &RegistryAuth,
    ) -> Option<String> {
        if let Some((until, token)) = lock(&self.tokens).get(token_key)
            && *until > Instant::now()
        {
            return Some(format!("Bearer {token}"));
        }
        if lock(&self.basic_hosts).contains(host) {
            return basic_header(auth);
        }
        None
    }

    /// One request, its body read in pieces up to `cap`; failures are counted.
    async fn send(
        &self,
        url: &str,
        accept: &str,
        authorization: Option<&str>,
        cap: usize,
        host: &str,
    ) -> Result<Answer, RegistryError> {
        let answer = self.send_once(url, accept, authorization, cap, host).await;
        if answer.as_ref().map_or(true, |a| a.status.is_server_error()) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    async fn send_once(
        &self,
        url: &str,
        accept: &str,
        authorization: Option<&str>,
        cap: usize,
        host: &str,
    ) -> Result<Answer, RegistryError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let failed = |why: String| RegistryError::Failed {
            registry: host.to_owned(),
            why,
        };
        let http = self
            .with_ca
            .get(&host.to_ascii_lowercase())
            .unwrap_or(&self.http);
        let mut request = http.get(url).header(header::ACCEPT, accept);
        if let Some(a) = authorization {
            request = request.header(header::AUTHORIZATION, a);
        }
        let mut resp = request.send().await.map_err(|e| failed(describe(&e)))?;
        let status = resp.status();
        // Only a success's body is used whole; of an error body a little is enough.
        let cap = if status.is_success() { cap } else { MAX_SMALL };
        if resp.content_length().is_some_and(|l| l > cap as u64) && status.is_success() {
            return Err(failed(format!(
                "declares a body of {} bytes, more than the {cap} allowed",
                resp.content_length().unwrap_or_default()
            )));
        }
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > cap {
                        if status.is_success() {
                            return Err(failed(format!("sent more than the {cap} bytes allowed")));
                        }
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(failed(describe(&e))),
            }
        }
        Ok(Answer {
            status,
            headers: resp.headers().clone(),
            body,
        })
    }

    /// A bearer token from `realm` for `scope`, with the credentials given (if any).
    async fn token(
        &self,
        host: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        auth: &RegistryAuth,
    ) -> Result<String, RegistryError> {
        let failed = |why: String| RegistryError::Failed {
            registry: host.to_owned(),
            why,
        };
        let mut url = reqwest::Url::parse(realm)
            .map_err(|_| failed("gave a token realm that is not a URL".into()))?;
        allowed_target(&url, &self.insecure)
            .map_err(|why| failed(format!("gave a token realm at {why}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let answer = self
            .send(
                url.as_str(),
                "application/json",
                basic_header(auth).as_deref(),
                MAX_SMALL,
                host,
            )
            .await?;
        if !answer.status.is_success() {
            return Err(failed(format!(
                "token service answered HTTP {}",
                answer.status.as_u16()
            )));
        }
        let t: Token = serde_json::from_slice(&answer.body)
            .map_err(|_| failed("token service answered something that is not a token".into()))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| failed("token service answered without a token".into()))
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

    /// The digest `reference` names, or the digest of the manifest its tag serves now
    /// (computed here from the manifest itself).
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
        let tag = reference.tag().unwrap_or("latest");
        let (_, host) = self.base(reference);
        let answer = self
            .get(
                reference,
                &format!("manifests/{tag}"),
                MANIFEST_TYPES,
                auth,
                MAX_MANIFEST,
                deadline,
            )
            .await?;
        expect_success(&answer, &host, &format!("manifest {tag}"))?;
        let digest = sha256(&answer.body);
        if let Some(claimed) = answer
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            && claimed != digest
        {
            return Err(RegistryError::Failed {
                registry: host,
                why: format!(
                    "its Docker-Content-Digest for {tag} does not match the manifest it served ({digest})"
                ),
            });
        }
        Ok(digest)
    }

    /// The signature manifest `reference` (`path`: `manifests/<tag or digest>`), checked
    /// against `digest` when given; `None` when the registry has no such manifest. Its bytes
    /// count against `budget` (parsed, its annotations are kept with the layers).
    async fn manifest(
        &self,
        reference: &Reference,
        (name, digest): (&str, Option<&str>),
        auth: &RegistryAuth,
        deadline: Instant,
        budget: &Budget,
    ) -> Result<Option<Manifest>, RegistryError> {
        let (_, host) = self.base(reference);
        let answer = self
            .get(
                reference,
                &format!("manifests/{name}"),
                MANIFEST_TYPES,
                auth,
                MAX_SIGNATURE_MANIFEST,
                deadline,
            )
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        budget.take(answer.body.len(), &host)?;
        expect_success(&answer, &host, &format!("manifest {name}"))?;
        if let Some(d) = digest
            && sha256(&answer.body) != d
        {
            return Err(RegistryError::Failed {
                registry: host,
                why: format!("served manifest {name} with content that does not match its digest"),
            });
        }
        serde_json::from_slice(&answer.body)
            .map(Some)
            .map_err(|_| RegistryError::Failed {
                registry: host,
                why: format!("manifest {name} is not an OCI manifest"),
            })
    }

    /// The content of layer `d` of `reference`, checked against its digest.
    async fn blob(
        &self,
        reference: &Reference,
        d: &Descriptor,
        auth: &RegistryAuth,
        (deadline, budget): (Instant, &Budget),
    ) -> Result<Vec<u8>, RegistryError> {
        let (_, host) = self.base(reference);
        let failed = |why: String| RegistryError::Failed {
            registry: host.clone(),
            why,
        };
        let size = usize::try_from(d.size)
            .ok()
            .filter(|s| *s <= MAX_LAYER)
            .ok_or_else(|| {
                failed(format!(
                    "layer {} is larger than {MAX_LAYER} bytes",
                    d.digest
                ))
            })?;
        budget.take(size, &host)?;
        if !d.digest.starts_with("sha256:") || d.digest.len() != 71 {
            return Err(failed(format!(
                "layer digest {:?} is not a sha256 digest",
                d.digest.chars().take(80).collect::<String>()
            )));
        }
        let answer = self
            .get(
                reference,
                &format!("blobs/{}", d.digest),
                "*/*",
                auth,
                size,
                deadline,
            )
            .await?;
        expect_success(&answer, &host, &format!("blob {}", d.digest))?;
        if sha256(&answer.body) != d.digest {
            return Err(failed(format!(
                "served blob {} with content that does not match its digest",
                d.digest
            )));
        }
        Ok(answer.body)
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
        self.cosign_layers_within(
            reference,
            (digest, suffix),
            auth,
            deadline,
            &Budget::default(),
        )
        .await
    }

    /// [`Registry::cosign_layers`], the layers kept counted against `budget`.
    pub async fn cosign_layers_within(
        &self,
        reference: &Reference,
        (digest, suffix): (&str, &str),
        auth: &RegistryAuth,
        deadline: Instant,
        budget: &Budget,
    ) -> Result<Vec<Layer>, RegistryError> {
        let tag = format!("{}.{suffix}", digest.replace(':', "-"));
        // A missing signature manifest is an answer (no signatures), not an error.
        let Some(manifest) = self
            .manifest(reference, (&tag, None), auth, deadline, budget)
            .await?
        else {
            return Ok(Vec::new());
        };
        if manifest.is_index() {
            let (_, host) = self.base(reference);
            return Err(RegistryError::Failed {
                registry: host,
                why: format!("{tag} is an index, not a signature manifest"),
            });
        }
        let mut layers = Vec::new();
        for d in manifest
            .layers
            .iter()
            .filter(|d| usize::try_from(d.size).is_ok_and(|s| s <= MAX_LAYER))
            .take(MAX_BUNDLES)
        {
            let blob = self.blob(reference, d, auth, (deadline, budget)).await?;
            layers.push(Layer {
                media_type: d.media_type.clone(),
                // Only what verification reads: signature, certificate, chain, bundle.
                annotations: d
                    .annotations
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with("dev.cosignproject.cosign/")
                            || k.starts_with("dev.sigstore.cosign/")
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                blob,
            });
        }
        Ok(layers)
    }
}

/// Most bundles read per image.
const MAX_BUNDLES: usize = 16;

/// Most bytes of signature material (signature layers, attestations, bundles) kept for one
/// image: a registry that lists many large layers (or the same one many times) is refused
/// rather than let one request hold an unbounded share of the webhook's memory.
pub const MAX_MATERIAL: usize = 8 << 20;

/// What is left of [`MAX_MATERIAL`] for one image's signature material.
#[derive(Debug)]
pub struct Budget(std::sync::atomic::AtomicUsize);

impl Default for Budget {
    fn default() -> Self {
        Budget(std::sync::atomic::AtomicUsize::new(MAX_MATERIAL))
    }
}

impl Budget {
    /// Takes `n` bytes, or says why it cannot.
    fn take(&self, n: usize, host: &str) -> Result<(), RegistryError> {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(n)
            })
            .map(|_| ())
            .map_err(|_| RegistryError::Failed {
                registry: host.to_owned(),
                why: format!(
                    "the image's signature material is larger than {} MiB",
                    MAX_MATERIAL >> 20
                ),
            })
    }
}

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
        budget: &Budget,
    ) -> Result<Vec<Layer>, RegistryError> {
        let (_, host) = self.base(reference);
        let answer = self
            .get(
                reference,
                &format!(
                    "referrers/{digest}?artifactType={}",
                    super::verify::BUNDLE.replace('+', "%2B")
                ),
                "application/vnd.oci.image.index.v1+json",
                auth,
                MAX_SIGNATURE_MANIFEST,
                deadline,
            )
            .await?;
        let index: Manifest = if answer.status.is_success() {
            budget.take(answer.body.len(), &host)?;
            serde_json::from_slice(&answer.body).map_err(|_| RegistryError::Failed {
                registry: host.clone(),
                why: "its referrers answer is not an OCI index".to_owned(),
            })?
        } else if answer.status.is_client_error()
            && answer.status != StatusCode::UNAUTHORIZED
            && answer.status != StatusCode::FORBIDDEN
        {
            // No referrers API: the referrers tag schema.
            match self
                .manifest(
                    reference,
                    (&digest.replace(':', "-"), None),
                    auth,
                    deadline,
                    budget,
                )
                .await?
            {
                Some(m) => m,
                None => return Ok(Vec::new()),
            }
        } else {
            expect_success(&answer, &host, "referrers")?;
            return Ok(Vec::new());
        };
        let mut layers = Vec::new();
        for m in index
            .manifests
            .iter()
            .filter(|m| {
                m.artifact_type
                    .as_deref()
                    .is_none_or(|t| t == super::verify::BUNDLE)
            })
            .take(MAX_BUNDLES)
        {
            let Some(manifest) = self
                .manifest(
                    reference,
                    (&m.digest, Some(&m.digest)),
                    auth,
                    deadline,
                    budget,
                )
                .await?
            else {
                continue;
            };
            if manifest.is_index() {
                continue;
            }
            for d in manifest
                .layers
                .iter()
                .filter(|d| {
                    d.media_type == super::verify::BUNDLE
                        && usize::try_from(d.size).is_ok_and(|s| s <= MAX_LAYER)
                })
                .take(MAX_BUNDLES)
            {
                let blob = self.blob(reference, d, auth, (deadline, budget)).await?;
                if let Ok(layer) = super::verify::bundle_layer(&blob) {
                    layers.push(layer);
                }
            }
        }
        Ok(layers)
    }
}

/// `Ok` for a 2xx answer; otherwise an error with the status and the registry's error code,
/// never its words.
fn expect_success(answer: &Answer, host: &str, what: &str) -> Result<(), RegistryError> {
    if answer.status.is_success() {
        return Ok(());
    }
    let code = error_code(&answer.body)
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    Err(RegistryError::Failed {
        registry: host.to_owned(),
        why: format!("{what}: HTTP {}{code}", answer.status.as_u16()),
    })
}

/// What went wrong with a request, in our words (connection refused, a refused redirect, ...).
fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut why = if e.is_redirect() {
        "refused to follow a redirect".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_body() || e.is_decode() {
        "broke off the answer".to_owned()
    } else {
        "request failed".to_owned()
    };
    // Only a refused redirect's reason is ours to repeat; other causes (TLS errors naming the
    // registry's certificate, say) may carry text the registry chose.
    if e.is_redirect() {
        let mut source = e.source();
        let mut last = None;
        while let Some(s) = source {
            last = Some(s.to_string());
            source = s.source();
        }
        if let Some(l) =
            last.filter(|l| l.starts_with("a redirect to") || l.starts_with("more than"))
        {
            why.push_str(": ");
            why.push_str(&l);
        }
    } else if untrusted_certificate(e) {
        why.push_str(
            ": its TLS certificate is not trusted (a registry with a private CA needs its bundle in images.registryCAFiles)",
        );
    }
    why
}

/// Whether `e` failed on the server's certificate (rustls refused it): a fixed reason of ours,
/// never the certificate's own text.
fn untrusted_certificate(e: &reqwest::Error) -> bool {
    fn refused(e: &(dyn std::error::Error + 'static), depth: usize) -> bool {
        if depth > 16 {
            return false;
        }
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        // An io::Error's `source` skips the error it wraps: look inside it too.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && refused(inner, depth + 1)
        {
            return true;
        }
        // Wrappers that hide the rustls error's type keep its text.
        if e.to_string().starts_with("invalid peer certificate") {
            return true;
        }
        e.source().is_some_and(|s| refused(s, depth + 1))
    }
    use std::error::Error as _;
    e.source().is_some_and(|s| refused(s, 0))
}

/// The `Authorization: Basic` value for `auth`, when it has a user and password.
fn basic_header(auth: &RegistryAuth) -> Option<String> {
    match auth {
        RegistryAuth::Basic(u, p) => Some(format!("Basic {}", B64.encode(format!("{u}:{p}")))),
        _ => None,
    }
}

/// A fingerprint of `auth` for cache keys (never the secret itself).
fn credential_fingerprint(auth: &RegistryAuth) -> String {
    match auth {
        RegistryAuth::Anonymous => "anonymous".to_owned(),
        RegistryAuth::Basic(u, p) => sha256(format!("basic\0{u}\0{p}").as_bytes()),
        RegistryAuth::Bearer(t) => sha256(format!("bearer\0{t}").as_bytes()),
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
pub fn registry_auth(
    dockerconfigjson: &[u8],
    registry: &str,
) -> Result<RegistryAuth, PullSecretError> {
    let config: DockerConfig = serde_json::from_slice(dockerconfigjson)
        .map_err(|e| PullSecretError::NotDockerConfig(e.to_string()))?;
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
                .ok_or(PullSecretError::BadAuth)?;
            let (u, p) = decoded.split_once(':').ok_or(PullSecretError::BadAuth)?;
            return Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()));
        }
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_ca_bundle_must_hold_certificates() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let host = "registry.corp:5000".to_owned();
        for (bundle, why) in [
            (&b"not a certificate"[..], "holds no certificate"),
            (&b""[..], "holds no certificate"),
            (
                &b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"[..],
                "CA bundle",
            ),
        ] {
            let cas = BTreeMap::from([(host.clone(), bundle.to_vec())]);
            let Err(e) = Registry::with_cas(&[], &cas) else {
                panic!("{bundle:?} accepted as a CA bundle");
            };
            let e = e.to_string();
            assert!(e.contains("registry.corp:5000") && e.contains(why), "{e}");
        }
        let ca = rcgen::generate_simple_self_signed(vec!["registry.corp".to_owned()])
            .expect("certificate")
            .cert
            .pem();
        let cas = BTreeMap::from([(host, ca.into_bytes())]);
        let registry = Registry::with_cas(&[], &cas).expect("a PEM certificate is a bundle");
        assert!(registry.with_ca.contains_key("registry.corp:5000"));
    }

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

    #[test]
    fn redirects_and_realms_stay_off_local_addresses() {
        let url = |u: &str| reqwest::Url::parse(u).expect("url");
        let none: &[String] = &[];
        assert!(allowed_target(&url("https://storage.example.com/blob"), none).is_ok());
        for bad in [
            "http://storage.example.com/blob",
            "https://127.0.0.1/x",
            "https://127.9.9.9:5000/x",
            "https://[::1]/x",
            "https://169.254.169.254/latest/meta-data",
            "https://localhost/x",
            "https://0.0.0.0/x",
            "https://[fe80::1]/x",
            "https://[::ffff:127.0.0.1]/x",
        ] {
            assert!(allowed_target(&url(bad), none).is_err(), "{bad}");
        }
        // A registry configured insecure may be local and plain HTTP.
        let insecure = ["127.0.0.1:5000".to_owned()];
        assert!(allowed_target(&url("http://127.0.0.1:5000/v2/"), &insecure).is_ok());
        assert!(allowed_target(&url("http://127.0.0.1:5001/v2/"), &insecure).is_err());
    }

    #[test]
    fn only_well_formed_error_codes_are_repeated() {
        assert_eq!(
            error_code(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"nope"}]}"#),
            Some("MANIFEST_UNKNOWN".into())
        );
        assert_eq!(
            error_code(br#"{"errors":[{"code":"<script>alert(1)</script>"}]}"#),
            None
        );
        assert_eq!(error_code(b"Your password is hunter2"), None);
    }

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
    }
}
