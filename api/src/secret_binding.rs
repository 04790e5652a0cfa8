//! `SecretBinding`: which Vault/OpenBao secrets the ServiceAccounts of one namespace may read.
//!
//! The operator turns one SecretBinding into a Vault ACL policy, a Kubernetes-auth role bound to
//! the listed ServiceAccounts, and database secrets-engine roles, after checking every path and
//! connection against the tenancy rules in its own configuration.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, Duration};

/// Grants ServiceAccounts of this namespace short-lived access to Vault secrets: KV paths and
/// database dynamic credentials.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "SecretBinding",
    namespaced,
    status = "SecretBindingStatus",
    shortname = "sb",
    category = "palisade",
    doc = "SecretBinding grants ServiceAccounts of its namespace short-lived access to Vault/OpenBao secrets (KV paths, database credentials) and becomes a Vault policy, a Kubernetes-auth role and database roles.",
    cel,
    printcolumn(name = "Role", type_ = "string", json_path = ".status.vaultRole"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.kv) || has(self.database)")
    .message("a SecretBinding must grant at least one kv path or database role"))]
#[x_kube(validation = Rule::new("!has(self.tokenTTL) || !has(self.tokenMaxTTL) || duration(self.tokenTTL) <= duration(self.tokenMaxTTL)")
    .message("tokenTTL must not exceed tokenMaxTTL"))]
#[serde(rename_all = "camelCase")]
pub struct SecretBindingSpec {
    /// ServiceAccounts of this namespace that may log in with this binding's role. Names only:
    /// a binding can never grant anything to another namespace's ServiceAccounts.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new("self.all(n, n.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'))")
        .message("serviceAccountNames must be ServiceAccount names of this namespace (lower-case DNS names, no namespace prefix)"))]
    pub service_account_names: Vec<String>,

    /// Lifetime of the Vault token a workload gets at login. Defaults to 1h.
    #[serde(default, rename = "tokenTTL", skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m') && duration(self) <= duration('24h')")
        .message("must be between 1m and 24h"))]
    pub token_ttl: Option<Duration>,

    /// Longest lifetime of a renewed Vault token. Defaults to tokenTTL.
    #[serde(
        default,
        rename = "tokenMaxTTL",
        skip_serializing_if = "Option::is_none"
    )]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m') && duration(self) <= duration('720h')")
        .message("must be between 1m and 720h"))]
    pub token_max_ttl: Option<Duration>,

    /// The audience the workload's ServiceAccount token must carry to log in. Defaults to the
    /// operator's configured audience; any other must be among the audiences the operator
    /// configuration allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub audience: Option<String>,

    /// KV secrets the ServiceAccounts may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub kv: Option<Vec<KvGrant>>,

    /// Database dynamic credentials the ServiceAccounts may request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(d, self.exists_one(e, e.mount == d.mount && e.connection == d.connection))")
        .message("each (mount, connection) pair may appear only once"))]
    pub database: Option<Vec<DatabaseGrant>>,

    /// What happens to the Vault role, policy and database roles when this binding is deleted:
    /// `Delete` (default) removes them and revokes the leases and tokens issued under them;
    /// `Retain` leaves them in Vault, and is honoured only where the operator configuration
    /// allows it (otherwise deletion removes access all the same).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Whether deleting a binding removes what it created in Vault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Remove the role, policy and database roles, and revoke their leases.
    #[default]
    Delete,
    /// Leave everything in Vault.
    Retain,
}

/// Access to a KV secrets path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvGrant {
    /// The KV mount, e.g. `secret`.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$')")
        .message("must be a mount path of letters, digits, '-', '_' and '/', without leading or trailing '/'"))]
    pub mount: String,

    /// The secret path under the mount, as the application reads it (without KV v2's `data/`).
    /// A final `/*` grants everything below a directory; no other wildcards are allowed.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*(/[*])?$') && !self.matches('(^|/)[.][.]?(/|$)')")
        .message("must be a relative path of letters, digits, '.', '-', '_' segments, optionally ending in /*; no '.' or '..' segments and no other wildcards"))]
    pub path: String,

    /// What the ServiceAccounts may do with the secret. Defaults to `[read]`.
    #[serde(default = "default_kv_capabilities")]
    #[schemars(length(min = 1, max = 6))]
    pub capabilities: Vec<KvCapability>,

    /// KV engine version of the mount. Defaults to 2.
    #[serde(default)]
    pub version: KvVersion,
}

fn default_kv_capabilities() -> Vec<KvCapability> {
    vec![KvCapability::Read]
}

/// An operation on a KV secret.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum KvCapability {
    /// Read the secret.
    Read,
    /// List keys below the path.
    List,
    /// Create a secret.
    Create,
    /// Overwrite a secret.
    Update,
    /// Partially update a secret (KV v2).
    Patch,
    /// Delete a secret.
    Delete,
}

/// KV secrets engine version, written as the integer `1` or `2`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvVersion {
    /// KV version 1: paths are used as written.
    V1,
    /// KV version 2: data lives under `<mount>/data/`, metadata under `<mount>/metadata/`.
    #[default]
    V2,
}

impl Serialize for KvVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(match self {
            KvVersion::V1 => 1,
            KvVersion::V2 => 2,
        })
    }
}

impl<'de> Deserialize<'de> for KvVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            1 => Ok(KvVersion::V1),
            2 => Ok(KvVersion::V2),
            n => Err(serde::de::Error::custom(format!(
                "KV version must be 1 or 2, not {n}"
            ))),
        }
    }
}

impl JsonSchema for KvVersion {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "KvVersion".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "integer",
            "enum": [1, 2],
            "default": 2,
        })
    }
}

/// Access to dynamic credentials from a database secrets engine connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.defaultTTL) <= duration(self.maxTTL)")
    .message("defaultTTL must not exceed maxTTL"))]
#[x_kube(validation = Rule::new("has(self.profile)")
    .message("profile is required: name one of the grant profiles the operator configuration offers for this connection"))]
pub struct DatabaseGrant {
    /// The database secrets engine mount, e.g. `database`.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$')")
        .message("must be a mount path of letters, digits, '-', '_' and '/', without leading or trailing '/'"))]
    pub mount: String,

    /// The configured connection (`db_name`) the role issues credentials for.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_-]+$')")
        .message("must be a connection name of letters, digits, '-' and '_'"))]
    pub connection: String,

    /// The grant profile: which SQL Vault runs to create and drop the credential's user, chosen
    /// among the profiles the platform team configured for this connection (for example
    /// `readonly`). A binding never supplies SQL itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("must be a profile name (lower-case letters, digits and '-')"))]
    pub profile: Option<String>,

    /// Lifetime of a credential unless renewed.
    #[serde(rename = "defaultTTL")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m')").message("must be at least 1m"))]
    pub default_ttl: Duration,

    /// Longest lifetime of a credential, renewals included.
    #[serde(rename = "maxTTL")]
    #[x_kube(validation = Rule::new("duration(self) <= duration('720h')").message("must be at most 720h"))]
    pub max_ttl: Duration,
}

/// Observed state of a SecretBinding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretBindingStatus {
    /// Generation, conditions (`Accepted`, `Ready`, `VaultUnavailable`, `Refused`).
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Name of the Vault ACL policy written for this binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_policy: Option<String>,
    /// Name of the Kubernetes-auth role written for this binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_role: Option<String>,
    /// Database roles written for this binding, as `<mount>/roles/<name>` (a report only: the
    /// operator never acts on what status says).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub database_roles: Vec<String>,
}
