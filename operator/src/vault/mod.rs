//! The operator's Vault/OpenBao side: settings, the [`VaultApi`] seam every Vault call goes
//! through, the HTTP client behind it, and (in [`sync`]) what is read, written and removed for a
//! binding.
//!
//! The client logs in with Kubernetes auth using a short-lived token of its own ServiceAccount
//! (TokenRequest), revokes the Vault token it replaces, and speaks Vault's HTTP API directly over
//! one rustls client that follows no redirects and whose only trust root is the configured CA.
//! Without one it uses the platform's roots (which `SSL_CERT_FILE`/`SSL_CERT_DIR` can change);
//! `VAULT_SKIP_VERIFY`, `VAULT_CACERT` and their OpenBao spellings are never read.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount};
use kube::{Api, Client as KubeClient, api::PostParams};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::metrics::Metrics;
use crate::translate::vault::{
    GrantProfile, Grants, Naming, Tenancy, VaultDefaults, is_namespace_name,
};

#[cfg(test)]
pub mod fake;
pub mod sync;

/// The `vault` section of the operator configuration.
///
/// ```yaml
/// vault:
///   address: https://vault.vault.svc:8200
///   caFile: /etc/palisade/vault-ca/ca.pem   # the only CA trusted for Vault when set
///   namespace: tenants             # Vault/OpenBao namespace everything lives in (optional)
///   clusterId: east                # names become palisade-east_<ns>.<name> (optional)
///   authMount: kubernetes          # where the operator logs in
///   role: palisade_operator        # its login role (never under the palisade- prefix)
///   serviceAccount: {namespace: palisade-system, name: palisade-operator}
///   tokenAudience: vault           # audience of the operator's own TokenRequest
///   workloads: {kubernetesAuthMount: kubernetes, audience: vault, allowedAudiences: []}
///   cleanupTimeoutSeconds: 120     # then a deleted binding is released even if Vault is down
///   sweepIntervalSeconds: 300      # how often objects without a binding are looked for
///   driftCorrection: true          # write back hand edits in Vault (false: report only)
///   allowRetain: false             # honour deletionPolicy: Retain
///   tenancy: {...}                 # see translate::vault::Tenancy
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultSettings {
    /// Vault address, `https://...` (or `http://` on loopback only).
    pub address: String,
    /// PEM bundle of the CAs that sign Vault's certificate; when set, the only roots trusted.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Vault/OpenBao namespace (sent as `X-Vault-Namespace`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// This cluster's id, when several clusters share one Vault.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// Mount of the Kubernetes auth method the operator logs in with.
    #[serde(default = "default_mount")]
    pub auth_mount: String,
    /// The operator's login role.
    pub role: String,
    /// The operator's own ServiceAccount, whose short-lived token it presents.
    pub service_account: ServiceAccountRef,
    /// Audience requested for that token.
    #[serde(default = "default_audience")]
    pub token_audience: String,
    /// Where workload roles go and the audiences they may require.
    #[serde(default)]
    pub workloads: VaultDefaults,
    /// What each namespace may grant.
    #[serde(default)]
    pub tenancy: Tenancy,
    /// How long a deleted binding waits for Vault cleanup before it is released anyway.
    #[serde(default = "default_cleanup_timeout")]
    pub cleanup_timeout_seconds: u64,
    /// How often Vault is searched for objects whose binding is gone.
    #[serde(default = "default_sweep_interval")]
    pub sweep_interval_seconds: u64,
    /// Write back hand edits made in Vault (default); when off they are only reported
    /// (`Ready=False`, reason `Drifted`, and a `DriftDetected` event). Changes of a binding or
    /// of this configuration are applied either way.
    #[serde(default = "default_true")]
    pub drift_correction: bool,
    /// Whether `deletionPolicy: Retain` is honoured; otherwise deleting a binding always
    /// removes its access.
    #[serde(default)]
    pub allow_retain: bool,
}

fn default_true() -> bool {
    true
}

fn default_mount() -> String {
    "kubernetes".into()
}

fn default_audience() -> String {
    "vault".into()
}

fn default_cleanup_timeout() -> u64 {
    120
}

fn default_sweep_interval() -> u64 {
    300
}

/// Audiences the API server issues tokens for by default; a workload role requiring one of them
/// would accept tokens minted for other purposes (legacy Secret-based tokens among them).
const API_SERVER_AUDIENCES: &[&str] = &[
    "https://kubernetes.default.svc.cluster.local",
    "https://kubernetes.default.svc",
    "kubernetes.default.svc",
    "api",
];

/// A ServiceAccount by namespace and name.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl VaultSettings {
    /// Checks what serde cannot: the address is a URL (plain HTTP only on loopback), the tenancy
    /// lets no namespace claim another's areas, and the cluster id and audiences are sound.
    pub fn validate(&self) -> Result<(), String> {
        let url = url::Url::parse(&self.address)
            .map_err(|e| format!("vault.address {:?}: {e}", self.address))?;
        match url.scheme() {
            "https" => {}
            "http"
                if matches!(
                    url.host_str(),
                    Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
                ) => {}
            _ => {
                return Err(format!(
                    "vault.address {:?}: use https:// (plain http is accepted on loopback only)",
                    self.address
                ));
            }
        }
        if let Some(c) = &self.cluster_id
            && !is_namespace_name(c)
        {
            return Err(format!(
                "vault.clusterId {c:?}: must be a DNS label (lower-case letters, digits, '-')"
            ));
        }
        let w = &self.workloads;
        if let Some(a) = std::iter::once(&w.audience)
            .chain(&w.allowed_audiences)
            .find(|a| a.is_empty() || API_SERVER_AUDIENCES.contains(&a.as_str()))
        {
            return Err(format!(
                "vault.workloads: audience {a:?} would let tokens issued for the API server log in"
            ));
        }
        let prefix = self.naming().prefix();
        if self.role.to_ascii_lowercase().starts_with(&prefix) {
            return Err(format!(
                "vault.role {:?}: the operator's own login role must not start with {prefix:?}, the prefix of everything it may write (it could rewrite its own grant)",
                self.role
            ));
        }
        if self.sweep_interval_seconds < 10 {
            return Err("vault.sweepIntervalSeconds: at least 10".into());
        }
        self.tenancy.validate().map_err(|e| format!("vault.{e}"))
    }

    /// How Vault objects are named.
    pub fn naming(&self) -> Naming {
        Naming {
            cluster: self.cluster_id.clone(),
        }
    }

    /// What bindings are translated against.
    pub fn grants<'a>(&'a self, naming: &'a Naming) -> Grants<'a> {
        Grants {
            tenancy: &self.tenancy,
            workloads: &self.workloads,
            naming,
            allow_retain: self.allow_retain,
        }
    }

    /// The database mounts bindings may use: where database roles are looked for.
    pub fn database_mounts(&self) -> BTreeSet<String> {
        self.tenancy
            .database
            .iter()
            .chain(
                self.tenancy
                    .namespaces
                    .values()
                    .flat_map(|n| n.database.iter()),
            )
            .map(|a| a.mount.clone())
            .collect()
    }
}

/// Why a Vault call failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Vault could not be reached, or answered 5xx/sealed: retry later.
    #[error("Vault unavailable: {0}")]
    Unavailable(String),
    /// Vault refused the operator (403) even after a fresh login.
    #[error("Vault denied the operator: {0}")]
    Denied(String),
    /// Any other error answer.
    #[error("Vault error: {0}")]
    Api(String),
    /// The operator's ServiceAccount token could not be obtained.
    #[error("cannot obtain a token for the operator's ServiceAccount: {0}")]
    TokenRequest(String),
    /// An object with this binding's name exists in Vault and was not written for it.
    #[error("{0}")]
    NotOwned(String),
    /// The client could not be set up (CA file).
    #[error("Vault client: {0}")]
    Setup(String),
}

impl VaultError {
    /// Condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            VaultError::Unavailable(_) => "VaultUnavailable",
            VaultError::Denied(_) => "VaultDenied",
            VaultError::Api(_) => "VaultError",
            VaultError::TokenRequest(_) => "TokenRequestFailed",
            VaultError::NotOwned(_) => "NotOwned",
            VaultError::Setup(_) => "VaultClientError",
        }
    }
}

/// Every Vault call the operator makes, at the level of Vault's HTTP API. The real client and
/// the in-memory fake of the unit tests implement it.
pub trait VaultApi: Send + Sync {
    /// GET `path`: its `data`, `None` when it does not exist.
    fn read(&self, path: &str) -> impl Future<Output = Result<Option<Value>, VaultError>> + Send;
    /// LIST `path`: its keys (none when it does not exist).
    fn list(&self, path: &str) -> impl Future<Output = Result<Vec<String>, VaultError>> + Send;
    /// PUT `body` to `path`: the answer's `data`, if any.
    fn write(
        &self,
        path: &str,
        body: Value,
    ) -> impl Future<Output = Result<Option<Value>, VaultError>> + Send;
    /// DELETE `path` (absent is fine).
    fn delete(&self, path: &str) -> impl Future<Output = Result<(), VaultError>> + Send;
}

struct Session {
    token: String,
    expires: Instant,
}

/// How one HTTP exchange ended.
enum Outcome {
    /// 2xx (with the body) or 404 (`None`).
    Done(Option<Vec<u8>>),
    /// Another status.
    Status(u16, String),
}

/// A logged-in Vault client; logs in again before its token expires or after a 403, and
/// revokes the token it replaces.
pub struct Vault {
    settings: VaultSettings,
    kube: KubeClient,
    http: reqwest::Client,
    session: Mutex<Option<Session>>,
    metrics: Arc<Metrics>,
}

/// The HTTP client for Vault: the configured CA as the only trust root when set, no
/// environment lookups, a 10 s timeout.
fn http_client(settings: &VaultSettings) -> Result<reqwest::Client, VaultError> {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        // A redirect would carry the Vault token (or the login JWT) elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| VaultError::Setup(format!("caFile {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| VaultError::Setup(format!("caFile {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(VaultError::Setup(format!(
                "caFile {}: no certificate in it",
                path.display()
            )));
        }
        b = b.tls_certs_only(certs);
    }
    b.build().map_err(|e| VaultError::Setup(e.to_string()))
}

impl Vault {
    /// A client for `settings`; nothing is contacted until the first call. Fails when the CA
    /// file cannot be read.
    pub fn new(
        settings: VaultSettings,
        kube: KubeClient,
        metrics: Arc<Metrics>,
    ) -> Result<Self, VaultError> {
        Ok(Vault {
            http: http_client(&settings)?,
            settings,
            kube,
            session: Mutex::new(None),
            metrics,
        })
    }

    /// Settings in use.
    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    async fn service_account_token(&self) -> Result<String, VaultError> {
        let sa = &self.settings.service_account;
        let api: Api<ServiceAccount> = Api::namespaced(self.kube.clone(), &sa.namespace);
        let request = TokenRequest {
            spec: Some(k8s_openapi::api::authentication::v1::TokenRequestSpec {
                audiences: Some(vec![self.settings.token_audience.clone()]),
                expiration_seconds: Some(600),
                ..Default::default()
            }),
            ..TokenRequest::default()
        };
        let out = api
            .create_token_request(&sa.name, &PostParams::default(), &request)
            .await
            .map_err(|e| VaultError::TokenRequest(format!("{}/{}: {e}", sa.namespace, sa.name)))?;
        out.status
            .and_then(|s| s.token)
            .ok_or_else(|| VaultError::TokenRequest("no token in the answer".into()))
    }

    /// One HTTP exchange with `token`.
    async fn exchange(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<Outcome, VaultError> {
        let outcome = exchange(&self.http, &self.settings, method, path, body, token).await;
        if matches!(&outcome, Err(_) | Ok(Outcome::Status(..))) {
            self.metrics.vault_error();
        }
        outcome
    }

    /// Logs in anew with a fresh ServiceAccount token.
    async fn login(&self) -> Result<Session, VaultError> {
        #[derive(Deserialize)]
        struct Auth {
            client_token: String,
            lease_duration: u64,
        }
        #[derive(Deserialize)]
        struct Answer {
            auth: Auth,
        }
        let jwt = self.service_account_token().await?;
        self.metrics.vault_request(false);
        let path = format!("auth/{}/login", self.settings.auth_mount);
        let body = json!({"role": self.settings.role, "jwt": jwt});
        let bytes = match self
            .exchange(reqwest::Method::POST, &path, Some(&body), None)
            .await?
        {
            Outcome::Done(Some(b)) => b,
            Outcome::Done(None) => return Err(VaultError::Api(format!("{path}: 404"))),
            Outcome::Status(code, text) => return Err(classify(code, &path, &text)),
        };
        let answer: Answer = serde_json::from_slice(&bytes)
            .map_err(|e| VaultError::Api(format!("{path}: unexpected answer: {e}")))?;
        // Renew well before the end: re-login at 80% of the lease.
        let ttl = Duration::from_secs(answer.auth.lease_duration.max(10) * 4 / 5);
        tracing::debug!(ttl = ttl.as_secs(), "logged in to Vault");
        Ok(Session {
            token: answer.auth.client_token,
            expires: Instant::now() + ttl,
        })
    }

    /// Revokes a token this client no longer uses (best effort: it expires anyway).
    async fn revoke_own(&self, token: &str) {
        revoke_token(&self.http, &self.settings, &self.metrics, token).await;
    }

    /// Replaces the session with a fresh login and revokes the token it replaces.
    /// Calls still in flight may hold the token it replaces: that one is revoked after they
    /// are bound to have finished (past the 10 s request timeout).
    async fn relogin(&self, guard: &mut Option<Session>) -> Result<String, VaultError> {
        let fresh = self.login().await?;
        let token = fresh.token.clone();
        if let Some(old) = guard.replace(fresh) {
            let http = self.http.clone();
            let settings = self.settings.clone();
            let metrics = Arc::clone(&self.metrics);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                revoke_token(&http, &settings, &metrics, &old.token).await;
            });
        }
        Ok(token)
    }

    /// Whether this client's current token is still valid (`auth/token/lookup-self`): a 403 on a
    /// valid token is a refusal, not a reason to log in again.
    async fn token_valid(&self, token: &str) -> bool {
        self.metrics.vault_request(false);
        matches!(
            self.exchange(
                reqwest::Method::GET,
                "auth/token/lookup-self",
                None,
                Some(token)
            )
            .await,
            Ok(Outcome::Done(Some(_)))
        )
    }

    /// Gives up the current session (on shutdown): its token is revoked.
    pub async fn logout(&self) {
        if let Some(old) = self.session.lock().await.take() {
            self.revoke_own(&old.token).await;
        }
    }

    /// Runs one call with a live session; on a 403 logs in once more and retries.
    async fn call(
        &self,
        method: &reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Vec<u8>>, VaultError> {
        let write = !matches!(*method, reqwest::Method::GET) && method.as_str() != "LIST";
        let mut refused: Option<String> = None;
        for attempt in 0..2 {
            let token = {
                let mut guard = self.session.lock().await;
                match guard.as_ref() {
                    // After a 403 with this token, a fresh login, unless another call has
                    // already replaced it.
                    Some(s)
                        if s.expires > Instant::now() && refused.as_deref() != Some(&s.token) =>
                    {
                        s.token.clone()
                    }
                    _ => self.relogin(&mut guard).await?,
                }
            };
            self.metrics.vault_request(write);
            match self
                .exchange(method.clone(), path, body, Some(&token))
                .await?
            {
                Outcome::Done(b) => return Ok(b),
                Outcome::Status(403, text) if attempt == 0 => {
                    if self.token_valid(&token).await {
                        return Err(classify(403, path, &text));
                    }
                    refused = Some(token);
                }
                Outcome::Status(code, text) => return Err(classify(code, path, &text)),
            }
        }
        Err(VaultError::Denied(format!(
            "{path}: permission denied after a fresh login"
        )))
    }
}

/// One HTTP exchange with Vault, as `token`.
async fn exchange(
    http: &reqwest::Client,
    settings: &VaultSettings,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> Result<Outcome, VaultError> {
    let url = format!("{}/v1/{path}", settings.address.trim_end_matches('/'));
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.header("X-Vault-Token", t);
    }
    if let Some(ns) = &settings.namespace {
        req = req.header("X-Vault-Namespace", ns);
    }
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| VaultError::Unavailable(format!("{path}: {}", chain(&e))))?;
    let code = resp.status().as_u16();
    let bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    Ok(match code {
        404 => Outcome::Done(None),
        200..=299 => Outcome::Done(Some(bytes)),
        _ => Outcome::Status(code, String::from_utf8_lossy(&bytes).trim().to_owned()),
    })
}

/// An error with its causes (a TLS refusal is only in the innermost one).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Revokes one of the operator's own tokens (best effort: it expires anyway).
async fn revoke_token(
    http: &reqwest::Client,
    settings: &VaultSettings,
    metrics: &Metrics,
    token: &str,
) {
    metrics.vault_request(true);
    let body = json!({});
    match exchange(
        http,
        settings,
        reqwest::Method::POST,
        "auth/token/revoke-self",
        Some(&body),
        Some(token),
    )
    .await
    {
        Ok(Outcome::Done(_)) => tracing::debug!("revoked a superseded Vault token"),
        Ok(Outcome::Status(code, text)) => {
            tracing::warn!(code, %text, "cannot revoke a superseded Vault token");
        }
        Err(e) => tracing::warn!(error = %e, "cannot revoke a superseded Vault token"),
    }
}

fn classify(code: u16, path: &str, text: &str) -> VaultError {
    match code {
        403 => VaultError::Denied(format!("{path}: 403 {text}")),
        429 | 500.. => VaultError::Unavailable(format!("{path}: {code} {text}")),
        _ => VaultError::Api(format!("{path}: {code} {text}")),
    }
}

fn data_of(path: &str, bytes: &[u8]) -> Result<Option<Value>, VaultError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| VaultError::Api(format!("{path}: unexpected answer: {e}")))?;
    Ok(v.get("data").cloned())
}

impl VaultApi for Vault {
    async fn read(&self, path: &str) -> Result<Option<Value>, VaultError> {
        match self.call(&reqwest::Method::GET, path, None).await? {
            None => Ok(None),
            Some(b) => data_of(path, &b),
        }
    }

    async fn list(&self, path: &str) -> Result<Vec<String>, VaultError> {
        let list =
            reqwest::Method::from_bytes(b"LIST").map_err(|e| VaultError::Setup(e.to_string()))?;
        let Some(b) = self.call(&list, path, None).await? else {
            return Ok(Vec::new());
        };
        Ok(data_of(path, &b)?
            .and_then(|d| d.get("keys").cloned())
            .and_then(|k| serde_json::from_value(k).ok())
            .unwrap_or_default())
    }

    async fn write(&self, path: &str, body: Value) -> Result<Option<Value>, VaultError> {
        match self.call(&reqwest::Method::PUT, path, Some(&body)).await? {
            None => Ok(None),
            Some(b) => data_of(path, &b),
        }
    }

    async fn delete(&self, path: &str) -> Result<(), VaultError> {
        self.call(&reqwest::Method::DELETE, path, None)
            .await
            .map(|_| ())
    }
}

fn hcl_list<I: IntoIterator<Item = String>>(items: I) -> String {
    let quoted: Vec<String> = items.into_iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

impl VaultSettings {
    /// The Vault policy the operator's own login role should carry, rendered from this
    /// configuration (`palisade-operator --config FILE --vault-policy` prints it). It reaches
    /// only objects named with this operator's prefix, and pins, with `allowed_parameters`,
    /// every field of what the operator writes to the forms Palisade writes:
    ///
    /// - login roles: token policies only `<prefix>*` and one of them, never `default`;
    ///   ServiceAccount names and namespaces without globs, not this operator's namespace;
    ///   the configured audiences; periods, use counts, CIDRs and explicit lifetimes at their
    ///   defaults;
    /// - database roles: creation and revocation statements exactly those of a configured grant
    ///   profile, nothing for rollback or renewal, password credentials only.
    ///
    /// What Vault cannot pin is the content of an ACL policy: whoever holds the operator's
    /// identity can write a `<prefix>*` policy granting any path of this Vault namespace and bind
    /// it to a ServiceAccount. Give Palisade its own Vault namespace (`vault.namespace`) to bound
    /// that to the tenants' mounts.
    pub fn operator_policy(&self) -> String {
        let p = self.naming().prefix();
        let w = &self.workloads.kubernetes_auth_mount;
        let first_chars = || {
            ('a'..='z')
                .chain('0'..='9')
                .map(|c| format!("{c}*"))
                .collect::<Vec<_>>()
        };
        let mut audiences = vec![self.workloads.audience.clone()];
        audiences.extend(self.workloads.allowed_audiences.iter().cloned());
        let mut out = format!(
            "# The Palisade operator's Vault policy, rendered from its configuration.\n\
             path \"sys/policies/acl/{p}*\" {{\n  capabilities = [\"create\", \"read\", \"update\", \"delete\"]\n}}\n\
             path \"sys/policies/acl\" {{\n  capabilities = [\"list\"]\n}}\n\
             path \"auth/{w}/role\" {{\n  capabilities = [\"list\"]\n}}\n\
             path \"auth/{w}/role/{p}*\" {{\n  capabilities = [\"create\", \"read\", \"update\", \"delete\"]\n  allowed_parameters = {{\n    \
             \"bound_service_account_names\" = {names}\n    \
             \"bound_service_account_namespaces\" = {names}\n    \
             \"bound_service_account_namespace_selector\" = [\"\"]\n    \
             \"audience\" = {audiences}\n    \
             \"alias_name_source\" = [\"serviceaccount_uid\"]\n    \
             \"token_policies\" = [\"{p}*\"]\n    \
             \"token_no_default_policy\" = [\"true\"]\n    \
             \"token_ttl\" = []\n    \"token_max_ttl\" = []\n    \
             \"token_explicit_max_ttl\" = [\"0\"]\n    \"token_period\" = [\"0\"]\n    \"token_num_uses\" = [\"0\"]\n    \
             \"token_bound_cidrs\" = [\"\"]\n    \"token_type\" = [\"default\"]\n    \"token_strictly_bind_ip\" = [\"false\"]\n  }}\n  \
             denied_parameters = {{\n    \
             \"bound_service_account_names\" = [\"***\"]\n    \
             \"bound_service_account_namespaces\" = [\"***\", \"*,*\", \"*{own}*\"]\n    \
             \"token_policies\" = [\"*,*\"]\n  }}\n}}\n\
             path \"auth/token/lookup-self\" {{\n  capabilities = [\"read\"]\n}}\n\
             path \"auth/token/revoke-self\" {{\n  capabilities = [\"update\"]\n}}\n\
             path \"auth/token/accessors\" {{\n  capabilities = [\"list\", \"sudo\"]\n}}\n\
             path \"auth/token/lookup-accessor\" {{\n  capabilities = [\"update\"]\n}}\n\
             path \"auth/token/revoke-accessor\" {{\n  capabilities = [\"update\"]\n}}\n",
            names = hcl_list(first_chars()),
            audiences = hcl_list(audiences),
            own = self.service_account.namespace,
        );
        // Each statement field may take exactly the list one profile gives it (`[""]` for none).
        let pinned = |field: fn(&GrantProfile) -> &Vec<String>| -> String {
            let lists: BTreeSet<String> = self
                .tenancy
                .profiles
                .values()
                .map(|g| match field(g).as_slice() {
                    [] => hcl_list([String::new()]),
                    s => hcl_list(s.iter().cloned()),
                })
                .collect();
            lists.into_iter().collect::<Vec<_>>().join(", ")
        };
        let renew = pinned(|g| &g.renew_statements);
        let creation = pinned(|g| &g.creation_statements);
        let revocation = pinned(|g| &g.revocation_statements);
        for m in self.database_mounts() {
            let _ = write!(
                out,
                "path \"{m}/roles\" {{\n  capabilities = [\"list\"]\n}}\n\
                 path \"{m}/roles/{p}*\" {{\n  capabilities = [\"create\", \"read\", \"update\", \"delete\"]\n  allowed_parameters = {{\n    \
                 \"db_name\" = []\n    \"default_ttl\" = []\n    \"max_ttl\" = []\n    \
                 \"credential_type\" = [\"password\"]\n    \
                 \"rollback_statements\" = [[\"\"]]\n    \"renew_statements\" = [{renew}]\n    \
                 \"creation_statements\" = [{creation}]\n    \
                 \"revocation_statements\" = [{revocation}]\n  }}\n}}\n\
                 path \"sys/leases/revoke-prefix/{m}/creds/{p}*\" {{\n  capabilities = [\"update\", \"sudo\"]\n}}\n",
            );
        }
        out
    }
}
