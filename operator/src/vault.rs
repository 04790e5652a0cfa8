//! The operator's Vault/OpenBao client: logs in with Kubernetes auth using a short-lived token
//! of its own ServiceAccount (TokenRequest), then reads and writes exactly what SecretBindings
//! need, in typed, normalised form (durations in seconds, lists as sets).
//!
//! Built on vaultrs for login, Kubernetes-auth roles and database roles. What vaultrs models
//! differently or not at all goes through the same HTTP client as plain JSON calls: ACL policies
//! (vaultrs uses the legacy `sys/policy`, the operator's Vault policy grants only
//! `sys/policies/acl`), a Kubernetes role read (vaultrs drops `audience`, so its drift would go
//! unseen) and `sys/leases/revoke-prefix`.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount};
use kube::{Api, Client as KubeClient, api::PostParams};
use serde::Deserialize;
use tokio::sync::Mutex;
use vaultrs::{
    client::{Client as _, VaultClient, VaultClientSettingsBuilder},
    error::ClientError,
};

use crate::metrics::Metrics;
use crate::translate::vault::{AclPolicy, DatabaseRole, KubernetesRole, Tenancy, VaultDefaults};

/// The `vault` section of the operator configuration.
///
/// ```yaml
/// vault:
///   address: https://vault.vault.svc:8200
///   caFile: /etc/palisade/vault-ca.pem
///   authMount: kubernetes          # where the operator logs in
///   role: palisade-operator        # its login role
///   serviceAccount: {namespace: palisade-system, name: palisade-operator}
///   tokenAudience: vault           # audience of the operator's own TokenRequest
///   workloads: {kubernetesAuthMount: kubernetes, audience: vault}
///   cleanupTimeoutSeconds: 120     # then a deleted binding is released even if Vault is down
///   driftCorrection: true          # write back hand edits in Vault (false: report only)
///   tenancy: {...}                 # see translate::vault::Tenancy
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultSettings {
    /// Vault address, `https://...` (or `http://` on loopback only).
    pub address: String,
    /// PEM bundle of CAs that sign Vault's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
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
    /// Where workload roles go and the audience they require by default.
    #[serde(default)]
    pub workloads: VaultDefaults,
    /// What each namespace may grant.
    #[serde(default)]
    pub tenancy: Tenancy,
    /// How long a deleted binding waits for Vault cleanup before it is released anyway.
    #[serde(default = "default_cleanup_timeout")]
    pub cleanup_timeout_seconds: u64,
    /// Write back hand edits made in Vault (default); when off they are only reported
    /// (`Ready=False`, reason `Drifted`, and a `DriftDetected` event).
    #[serde(default = "default_true")]
    pub drift_correction: bool,
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
    /// Checks what serde cannot: the address is a URL, plain HTTP only on loopback.
    pub fn validate(&self) -> Result<(), String> {
        let url = url::Url::parse(&self.address)
            .map_err(|e| format!("vault.address {:?}: {e}", self.address))?;
        match url.scheme() {
            "https" => Ok(()),
            "http"
                if matches!(
                    url.host_str(),
                    Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
                ) =>
            {
                Ok(())
            }
            _ => Err(format!(
                "vault.address {:?}: use https:// (plain http is accepted on loopback only)",
                self.address
            )),
        }
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
}

impl VaultError {
    /// Condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            VaultError::Unavailable(_) => "VaultUnavailable",
            VaultError::Denied(_) => "VaultDenied",
            VaultError::Api(_) => "VaultError",
            VaultError::TokenRequest(_) => "TokenRequestFailed",
        }
    }
}

fn classify(e: ClientError) -> VaultError {
    classify_call(e.into())
}

fn is_not_found(e: &ClientError) -> bool {
    matches!(e, ClientError::APIError { code: 404, .. })
}

struct Session {
    client: Arc<VaultClient>,
    expires: Instant,
}

/// A failed call, before classification.
enum CallError {
    /// Vault answered with this status.
    Status(u16, String),
    /// Vault did not answer.
    Transport(String),
}

impl From<ClientError> for CallError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::APIError { code, errors } => CallError::Status(code, errors.join("; ")),
            other => CallError::Transport(other.to_string()),
        }
    }
}

fn classify_call(e: CallError) -> VaultError {
    match e {
        CallError::Status(403, text) => VaultError::Denied(format!("403: {text}")),
        CallError::Status(code @ 500.., text) => VaultError::Unavailable(format!("{code}: {text}")),
        CallError::Status(code, text) => VaultError::Api(format!("{code}: {text}")),
        CallError::Transport(text) => VaultError::Unavailable(text),
    }
}

/// A logged-in Vault client; re-logs in before its token expires or after a 403.
pub struct Vault {
    settings: VaultSettings,
    kube: KubeClient,
    session: Mutex<Option<Session>>,
    metrics: Arc<Metrics>,
}

/// A Kubernetes-auth role as Vault reports it.
#[derive(Debug, Deserialize)]
struct RoleData {
    #[serde(default)]
    bound_service_account_names: Vec<String>,
    #[serde(default)]
    bound_service_account_namespaces: Vec<String>,
    #[serde(default)]
    token_policies: Vec<String>,
    #[serde(default)]
    token_ttl: u64,
    #[serde(default)]
    token_max_ttl: u64,
    #[serde(default)]
    audience: String,
}

#[derive(Debug, Deserialize)]
struct DataEnvelope<T> {
    data: T,
}

impl Vault {
    /// A client for `settings`; nothing is contacted until the first call.
    pub fn new(settings: VaultSettings, kube: KubeClient, metrics: Arc<Metrics>) -> Self {
        Vault {
            settings,
            kube,
            session: Mutex::new(None),
            metrics,
        }
    }

    /// Settings in use.
    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    fn base_client(&self) -> Result<VaultClient, VaultError> {
        let mut b = VaultClientSettingsBuilder::default();
        b.address(&self.settings.address)
            .token("")
            .timeout(Some(Duration::from_secs(10)));
        if let Some(ca) = &self.settings.ca_file {
            b.ca_certs(vec![ca.display().to_string()]);
        }
        let settings = b.build().map_err(|e| VaultError::Api(e.to_string()))?;
        VaultClient::new(settings).map_err(classify)
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

    /// Logs in anew with a fresh ServiceAccount token.
    async fn login(&self) -> Result<Session, VaultError> {
        let jwt = self.service_account_token().await?;
        let mut client = self.base_client()?;
        self.metrics.vault_request(false);
        let auth = vaultrs::auth::kubernetes::login(
            &client,
            &self.settings.auth_mount,
            &self.settings.role,
            &jwt,
        )
        .await
        .map_err(classify)?;
        client.set_token(&auth.client_token);
        // Renew well before the end: re-login at 80% of the lease.
        let ttl = Duration::from_secs(auth.lease_duration.max(10) * 4 / 5);
        tracing::debug!(ttl = ttl.as_secs(), "logged in to Vault");
        Ok(Session {
            client: Arc::new(client),
            expires: Instant::now() + ttl,
        })
    }

    /// Runs `call` with a live session; on a 403 logs in once more and retries.
    async fn with_session<T, F, Fut>(&self, write: bool, call: F) -> Result<T, VaultError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        for attempt in 0..2 {
            let client = {
                let mut guard = self.session.lock().await;
                if attempt > 0 || guard.as_ref().is_none_or(|s| s.expires <= Instant::now()) {
                    *guard = Some(self.login().await?);
                }
                let Some(s) = guard.as_ref() else {
                    return Err(VaultError::Api("no session".into()));
                };
                Arc::clone(&s.client)
            };
            self.metrics.vault_request(write);
            match call(client).await {
                Err(CallError::Status(403, _)) if attempt == 0 => {}
                other => return other.map_err(classify_call),
            }
        }
        Err(VaultError::Denied(
            "permission denied after a fresh login".into(),
        ))
    }

    /// Reads an ACL policy's text; `None` when it does not exist.
    pub async fn read_policy(&self, name: &str) -> Result<Option<String>, VaultError> {
        #[derive(Deserialize)]
        struct Policy {
            policy: String,
        }
        let policy: Option<Policy> = self.get_json(&format!("sys/policies/acl/{name}")).await?;
        Ok(policy.map(|p| p.policy))
    }

    /// Writes an ACL policy.
    pub async fn write_policy(&self, policy: &AclPolicy) -> Result<(), VaultError> {
        let body = serde_json::json!({"policy": policy.hcl()});
        self.send_raw(
            Method::Put(body),
            &format!("sys/policies/acl/{}", policy.name),
        )
        .await
        .map(|_| ())
    }

    /// Deletes an ACL policy (absent is fine).
    pub async fn delete_policy(&self, name: &str) -> Result<(), VaultError> {
        self.send_raw(Method::Delete, &format!("sys/policies/acl/{name}"))
            .await
            .map(|_| ())
    }

    /// Reads a Kubernetes-auth role, normalised; `None` when it does not exist.
    pub async fn read_role(
        &self,
        mount: &str,
        name: &str,
    ) -> Result<Option<KubernetesRole>, VaultError> {
        let path = format!("auth/{mount}/role/{name}");
        let data: Option<RoleData> = self.get_json(&path).await?;
        Ok(data.map(|d| KubernetesRole {
            mount: mount.to_owned(),
            name: name.to_owned(),
            bound_service_account_names: d.bound_service_account_names.into_iter().collect(),
            bound_service_account_namespaces: d
                .bound_service_account_namespaces
                .into_iter()
                .collect(),
            token_policies: d.token_policies.into_iter().collect(),
            token_ttl: d.token_ttl,
            token_max_ttl: d.token_max_ttl,
            audience: d.audience,
        }))
    }

    /// Writes a Kubernetes-auth role.
    pub async fn write_role(&self, role: &KubernetesRole) -> Result<(), VaultError> {
        let role = role.clone();
        self.with_session(true, |c| {
            let role = role.clone();
            async move {
                let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
                let mut opts = vaultrs::api::auth::kubernetes::requests::CreateKubernetesRoleRequestBuilder::default();
                opts.bound_service_account_names(list(&role.bound_service_account_names))
                    .bound_service_account_namespaces(list(&role.bound_service_account_namespaces))
                    .token_policies(list(&role.token_policies))
                    .token_ttl(format!("{}s", role.token_ttl))
                    .token_max_ttl(format!("{}s", role.token_max_ttl))
                    .audience(role.audience.clone());
                Ok(vaultrs::auth::kubernetes::role::create(
                    &*c,
                    &role.mount,
                    &role.name,
                    Some(&mut opts),
                )
                .await?)
            }
        })
        .await
    }

    /// Deletes a Kubernetes-auth role (absent is fine).
    pub async fn delete_role(&self, mount: &str, name: &str) -> Result<(), VaultError> {
        let (mount, name) = (mount.to_owned(), name.to_owned());
        self.with_session(true, |c| {
            let (mount, name) = (mount.clone(), name.clone());
            async move {
                ignore_missing(vaultrs::auth::kubernetes::role::delete(&*c, &mount, &name).await)
            }
        })
        .await
    }

    /// Reads a database role, normalised; `None` when it does not exist.
    pub async fn read_database_role(
        &self,
        mount: &str,
        name: &str,
    ) -> Result<Option<DatabaseRole>, VaultError> {
        let (m, n) = (mount.to_owned(), name.to_owned());
        self.with_session(false, |c| {
            let (m, n) = (m.clone(), n.clone());
            async move {
                match vaultrs::database::role::read(&*c, &m, &n).await {
                    Ok(r) => Ok(Some(DatabaseRole {
                        mount: m,
                        name: n,
                        db_name: r.db_name,
                        creation_statements: r.creation_statements,
                        revocation_statements: r.revocation_statements,
                        default_ttl: r.default_ttl,
                        max_ttl: r.max_ttl,
                    })),
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
        })
        .await
    }

    /// Writes a database role.
    pub async fn write_database_role(&self, role: &DatabaseRole) -> Result<(), VaultError> {
        let role = role.clone();
        self.with_session(true, |c| {
            let role = role.clone();
            async move {
                let mut opts = vaultrs::api::database::requests::SetRoleRequestBuilder::default();
                opts.db_name(role.db_name.clone())
                    .creation_statements(role.creation_statements.clone())
                    .revocation_statements(role.revocation_statements.clone())
                    .default_ttl(format!("{}s", role.default_ttl))
                    .max_ttl(format!("{}s", role.max_ttl));
                Ok(
                    vaultrs::database::role::set(&*c, &role.mount, &role.name, Some(&mut opts))
                        .await?,
                )
            }
        })
        .await
    }

    /// Deletes a database role (absent is fine).
    pub async fn delete_database_role(&self, mount: &str, name: &str) -> Result<(), VaultError> {
        let (m, n) = (mount.to_owned(), name.to_owned());
        self.with_session(true, |c| {
            let (m, n) = (m.clone(), n.clone());
            async move { ignore_missing(vaultrs::database::role::delete(&*c, &m, &n).await) }
        })
        .await
    }

    /// Revokes every lease of `prefix` (e.g. `database/creds/<role>`), waiting until Vault has
    /// revoked them. Vault treats a prefix without a trailing `/` as `<prefix>/` (a path ending
    /// in `/` cannot be written), so the leases of role `<role>2` are not touched.
    pub async fn revoke_prefix(&self, prefix: &str) -> Result<(), VaultError> {
        self.send_raw(
            Method::Put(serde_json::json!({})),
            &format!("sys/leases/revoke-prefix/{prefix}?sync=true"),
        )
        .await
        .map(|_| ())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, VaultError> {
        match self.send_raw(Method::Get, path).await? {
            None => Ok(None),
            Some(body) => serde_json::from_slice::<DataEnvelope<T>>(&body)
                .map(|e| Some(e.data))
                .map_err(|e| VaultError::Api(format!("{path}: unexpected answer: {e}"))),
        }
    }

    /// A call outside what vaultrs models: `None` on 404, the body otherwise.
    async fn send_raw(&self, method: Method, path: &str) -> Result<Option<Vec<u8>>, VaultError> {
        let path = path.to_owned();
        let write = !matches!(method, Method::Get);
        self.with_session(write, |c| {
            let path = path.clone();
            let method = method.clone();
            async move {
                let url = format!(
                    "{}/v1/{path}",
                    c.settings().address.as_str().trim_end_matches('/')
                );
                let http = &c.http().http;
                let request = match method {
                    Method::Get => http.get(url),
                    Method::Put(body) => http.put(url).body(body.to_string()),
                    Method::Delete => http.delete(url),
                };
                let resp = request
                    .header("X-Vault-Token", c.settings().token.clone())
                    .header("Content-Type", "application/json")
                    .send()
                    .await
                    .map_err(|e| CallError::Transport(format!("{path}: {e}")))?;
                let code = resp.status().as_u16();
                let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                match code {
                    404 => Ok(None),
                    200..=299 => Ok(Some(body)),
                    _ => Err(CallError::Status(
                        code,
                        String::from_utf8_lossy(&body).into_owned(),
                    )),
                }
            }
        })
        .await
    }
}

/// The HTTP method of a raw call, with its JSON body.
#[derive(Clone)]
enum Method {
    Get,
    Put(serde_json::Value),
    Delete,
}

fn ignore_missing(r: Result<(), ClientError>) -> Result<(), CallError> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => Ok(other?),
    }
}
