//! SecretBinding → what Vault/OpenBao should hold: one ACL policy, one Kubernetes-auth role and
//! one database role per granted connection, after the tenancy guard has checked every grant.
//!
//! Pure: the binding and the operator's tenancy rules in, typed desired state (or a refusal
//! naming the offending grant) out. Durations are seconds and lists are sets here, so the
//! controller compares what Vault reports with what is wanted without false drift.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use palisade_api::{
    SecretBinding,
    secret_binding::{DatabaseGrant, KvCapability, KvGrant, KvVersion},
};
use serde::{Deserialize, Serialize};

/// Which Vault paths and database connections the bindings of a namespace may grant. Every
/// string may hold `{namespace}`, replaced by the binding's namespace.
///
/// ```yaml
/// kv:
///   - {mount: secret, version: 2, pathPrefix: "{namespace}/"}
/// database:
///   - {mount: database, connection: "{namespace}-*"}
/// namespaces:                      # extra grants for named namespaces
///   shop: {database: [{mount: database, connection: orders-pg}]}
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tenancy {
    /// KV areas every namespace may grant (templated).
    #[serde(default)]
    pub kv: Vec<KvArea>,
    /// Database connections every namespace may grant (templated).
    #[serde(default)]
    pub database: Vec<DatabaseArea>,
    /// Additional areas for particular namespaces.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceAreas>,
}

/// Areas granted to one namespace on top of the templated ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceAreas {
    /// KV areas.
    #[serde(default)]
    pub kv: Vec<KvArea>,
    /// Database connections.
    #[serde(default)]
    pub database: Vec<DatabaseArea>,
}

/// A KV mount and the path prefix a namespace owns in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KvArea {
    /// Mount path, e.g. `secret`.
    pub mount: String,
    /// The mount's real KV version (1 or 2): a binding must agree with it.
    pub version: u8,
    /// Path prefix the namespace owns, ending in `/`, e.g. `{namespace}/`.
    pub path_prefix: String,
}

/// A database mount and the connections a namespace may issue credentials for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseArea {
    /// Mount path, e.g. `database`.
    pub mount: String,
    /// Connection name; a trailing `*` matches any suffix, e.g. `{namespace}-*`.
    pub connection: String,
}

/// Operator-wide defaults a binding may leave out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultDefaults {
    /// Mount of the Kubernetes auth method workload roles are written to.
    pub kubernetes_auth_mount: String,
    /// Audience a workload's ServiceAccount token must carry, unless the binding names one.
    pub audience: String,
}

impl Default for VaultDefaults {
    fn default() -> Self {
        VaultDefaults {
            kubernetes_auth_mount: "kubernetes".into(),
            audience: "vault".into(),
        }
    }
}

/// One `path` block of an ACL policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyRule {
    /// Vault path (a final `*` is a prefix match).
    pub path: String,
    /// Capabilities, as a set.
    pub capabilities: BTreeSet<String>,
}

/// The ACL policy of a binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclPolicy {
    /// Policy name.
    pub name: String,
    /// Rules, one per path, sorted.
    pub rules: Vec<PolicyRule>,
}

impl AclPolicy {
    /// The policy text Vault stores.
    pub fn hcl(&self) -> String {
        let mut out =
            String::from("# Written by Palisade from a SecretBinding; edits are reverted.\n");
        for r in &self.rules {
            let caps: Vec<String> = r.capabilities.iter().map(|c| format!("{c:?}")).collect();
            let _ = writeln!(
                out,
                "path {:?} {{\n  capabilities = [{}]\n}}",
                r.path,
                caps.join(", ")
            );
        }
        out
    }
}

/// The Kubernetes-auth role of a binding, in the units Vault reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesRole {
    /// Auth mount.
    pub mount: String,
    /// Role name.
    pub name: String,
    /// ServiceAccount names allowed to log in.
    pub bound_service_account_names: BTreeSet<String>,
    /// Their namespace (only the binding's own).
    pub bound_service_account_namespaces: BTreeSet<String>,
    /// Policies attached to the token.
    pub token_policies: BTreeSet<String>,
    /// Token lifetime, seconds.
    pub token_ttl: u64,
    /// Longest lifetime with renewals, seconds.
    pub token_max_ttl: u64,
    /// Required audience of the ServiceAccount token.
    pub audience: String,
}

/// A database secrets-engine role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseRole {
    /// Database mount.
    pub mount: String,
    /// Role name.
    pub name: String,
    /// Connection (`db_name`).
    pub db_name: String,
    /// SQL creating the user.
    pub creation_statements: Vec<String>,
    /// SQL dropping it.
    pub revocation_statements: Vec<String>,
    /// Credential lifetime, seconds.
    pub default_ttl: u64,
    /// Longest lifetime, seconds.
    pub max_ttl: u64,
}

impl DatabaseRole {
    /// `<mount>/roles/<name>`, as reported in status.
    pub fn path(&self) -> String {
        format!("{}/roles/{}", self.mount, self.name)
    }
}

/// Everything one binding should have in Vault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultDesired {
    /// ACL policy.
    pub policy: AclPolicy,
    /// Login role.
    pub role: KubernetesRole,
    /// Database roles, sorted by mount and name.
    pub database_roles: Vec<DatabaseRole>,
}

/// Why a binding is refused; nothing is written to Vault for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Condition reason (`OutsideTenancy`, `InvalidPath`).
    pub reason: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn refuse(reason: &str, message: String) -> Refusal {
    Refusal {
        reason: reason.into(),
        message,
    }
}

/// Name of a binding's policy and role: `palisade-<namespace>.<name>`. A namespace name never
/// holds a `.`, so the first `.` ends it and no two bindings share a name; with `-` as the
/// separator, binding `a-b` in `shop` and binding `b` in `shop-a` would both be
/// `palisade-shop-a-b`, and one tenant could rewrite the other's role.
pub fn base_name(namespace: &str, name: &str) -> String {
    format!("palisade-{namespace}.{name}")
}

/// The database role of one connection of a binding: `palisade-<namespace>.<name>.<connection>`
/// (a connection name never holds a `.`, so the last one starts it).
pub fn database_role_name(namespace: &str, name: &str, connection: &str) -> String {
    format!("{}.{connection}", base_name(namespace, name))
}

fn template(s: &str, namespace: &str) -> String {
    s.replace("{namespace}", namespace)
}

/// Checks a KV path segment by segment: the same rules as the CRD's validation, enforced again
/// here so an object stored under an older schema cannot slip through.
fn check_kv_path(path: &str) -> Result<(), String> {
    let body = path.strip_suffix("/*").unwrap_or(path);
    if body.is_empty() {
        return Err("the path is empty".into());
    }
    for seg in body.split('/') {
        if seg.is_empty() {
            return Err("empty path segment ('//' or a leading/trailing '/')".into());
        }
        if seg == "." || seg == ".." {
            return Err(format!("'{seg}' segment"));
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!(
                "character {c:?} (wildcards other than a final '/*' are not allowed)"
            ));
        }
    }
    Ok(())
}

fn connection_allowed(pattern: &str, connection: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => connection.starts_with(prefix) && connection.len() > prefix.len(),
        None => pattern == connection,
    }
}

/// Translates one binding, or refuses it.
pub fn translate(
    sb: &SecretBinding,
    tenancy: &Tenancy,
    defaults: &VaultDefaults,
) -> Result<VaultDesired, Refusal> {
    let namespace = sb.metadata.namespace.clone().unwrap_or_default();
    let name = sb.metadata.name.clone().unwrap_or_default();
    let spec = &sb.spec;
    let extra = tenancy.namespaces.get(&namespace);
    let kv_areas: Vec<KvArea> = tenancy
        .kv
        .iter()
        .chain(extra.map(|e| e.kv.iter()).into_iter().flatten())
        .map(|a| KvArea {
            mount: template(&a.mount, &namespace),
            version: a.version,
            path_prefix: template(&a.path_prefix, &namespace),
        })
        .collect();
    let db_areas: Vec<DatabaseArea> = tenancy
        .database
        .iter()
        .chain(extra.map(|e| e.database.iter()).into_iter().flatten())
        .map(|a| DatabaseArea {
            mount: template(&a.mount, &namespace),
            connection: template(&a.connection, &namespace),
        })
        .collect();

    for sa in &spec.service_account_names {
        if sa.contains(':') || sa.contains('/') || sa == "*" {
            return Err(refuse(
                "ForeignServiceAccount",
                format!(
                    "serviceAccountNames: {sa:?} is not a ServiceAccount name of namespace {namespace}; a binding can only grant to its own namespace"
                ),
            ));
        }
    }

    let policy_name = base_name(&namespace, &name);
    let mut rules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, kv) in spec.kv.iter().flatten().enumerate() {
        check_kv(i, kv, &kv_areas, &namespace, &mut rules)?;
    }
    let mut database_roles = Vec::new();
    for (i, db) in spec.database.iter().flatten().enumerate() {
        let role = check_database(i, db, &db_areas, &namespace, &name)?;
        rules
            .entry(format!("{}/creds/{}", role.mount, role.name))
            .or_default()
            .insert("read".into());
        database_roles.push(role);
    }
    database_roles.sort_by(|a, b| (&a.mount, &a.name).cmp(&(&b.mount, &b.name)));

    let token_ttl = spec
        .token_ttl
        .as_ref()
        .map_or(3600, palisade_api::Duration::as_secs);
    let token_max_ttl = spec
        .token_max_ttl
        .as_ref()
        .map_or(token_ttl, palisade_api::Duration::as_secs);
    Ok(VaultDesired {
        policy: AclPolicy {
            name: policy_name.clone(),
            rules: rules
                .into_iter()
                .map(|(path, capabilities)| PolicyRule { path, capabilities })
                .collect(),
        },
        role: KubernetesRole {
            mount: defaults.kubernetes_auth_mount.clone(),
            name: policy_name.clone(),
            bound_service_account_names: spec.service_account_names.iter().cloned().collect(),
            bound_service_account_namespaces: BTreeSet::from([namespace]),
            token_policies: BTreeSet::from([policy_name]),
            token_ttl,
            token_max_ttl,
            audience: spec
                .audience
                .clone()
                .unwrap_or_else(|| defaults.audience.clone()),
        },
        database_roles,
    })
}

/// Checks one KV grant against the namespace's areas and adds its policy rules.
fn check_kv(
    i: usize,
    kv: &KvGrant,
    kv_areas: &[KvArea],
    namespace: &str,
    rules: &mut BTreeMap<String, BTreeSet<String>>,
) -> Result<(), Refusal> {
    let at = format!("kv[{i}] ({}/{})", kv.mount, kv.path);
    check_kv_path(&kv.path).map_err(|why| refuse("InvalidPath", format!("{at}: {why}")))?;
    let version = match kv.version {
        KvVersion::V1 => 1,
        KvVersion::V2 => 2,
    };
    let mount_areas: Vec<&KvArea> = kv_areas.iter().filter(|a| a.mount == kv.mount).collect();
    if mount_areas.is_empty() {
        return Err(refuse(
            "OutsideTenancy",
            format!(
                "{at}: mount {:?} is not open to namespace {namespace}",
                kv.mount
            ),
        ));
    }
    // The mount's real version decides the policy paths: a v1 mount read as v2 would turn
    // `secret/data/<ns>/...` into another tenant's `data/...` prefix.
    if let Some(a) = mount_areas.iter().find(|a| a.version != version) {
        return Err(refuse(
            "OutsideTenancy",
            format!(
                "{at}: mount {:?} is KV version {}, the binding says {version}",
                kv.mount, a.version
            ),
        ));
    }
    let inside = mount_areas.iter().any(|a| {
        let prefix = a.path_prefix.trim_end_matches('/');
        prefix.is_empty()
            || kv
                .path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
    });
    if !inside {
        let allowed: Vec<String> = mount_areas
            .iter()
            .map(|a| format!("{}/{}", a.mount, a.path_prefix))
            .collect();
        return Err(refuse(
            "OutsideTenancy",
            format!(
                "{at}: outside what namespace {namespace} may grant ({})",
                allowed.join(", ")
            ),
        ));
    }
    for cap in &kv.capabilities {
        for (path, caps) in kv_rules(&kv.mount, &kv.path, version, *cap) {
            rules
                .entry(path)
                .or_default()
                .extend(caps.iter().map(|c| (*c).to_owned()));
        }
    }
    Ok(())
}

/// Checks one database grant against the namespace's connections and builds its role.
fn check_database(
    i: usize,
    db: &DatabaseGrant,
    db_areas: &[DatabaseArea],
    namespace: &str,
    name: &str,
) -> Result<DatabaseRole, Refusal> {
    let at = format!("database[{i}] ({}/{})", db.mount, db.connection);
    let ok = db_areas
        .iter()
        .any(|a| a.mount == db.mount && connection_allowed(&a.connection, &db.connection));
    if !ok {
        let allowed: Vec<String> = db_areas
            .iter()
            .map(|a| format!("{}/{}", a.mount, a.connection))
            .collect();
        return Err(refuse(
            "OutsideTenancy",
            format!(
                "{at}: connection not open to namespace {namespace} (allowed: {})",
                if allowed.is_empty() {
                    "none".into()
                } else {
                    allowed.join(", ")
                }
            ),
        ));
    }
    let role = DatabaseRole {
        mount: db.mount.clone(),
        name: database_role_name(namespace, name, &db.connection),
        db_name: db.connection.clone(),
        creation_statements: db.creation_statements.clone(),
        revocation_statements: db.revocation_statements.clone(),
        default_ttl: db.default_ttl.as_secs(),
        max_ttl: db.max_ttl.as_secs(),
    };
    Ok(role)
}

/// Policy paths and capabilities for one KV capability. KV v2 keeps data under `data/`, key
/// listings under `metadata/`, soft deletion under `delete/`.
fn kv_rules(
    mount: &str,
    path: &str,
    version: u8,
    cap: KvCapability,
) -> Vec<(String, &'static [&'static str])> {
    if version == 1 {
        let caps: &'static [&'static str] = match cap {
            KvCapability::Read => &["read"],
            KvCapability::List => &["list"],
            KvCapability::Create => &["create"],
            KvCapability::Update | KvCapability::Patch => &["update"],
            KvCapability::Delete => &["delete"],
        };
        return vec![(format!("{mount}/{path}"), caps)];
    }
    let data = format!("{mount}/data/{path}");
    match cap {
        KvCapability::Read => vec![(data, &["read"])],
        KvCapability::List => vec![(format!("{mount}/metadata/{path}"), &["list"])],
        KvCapability::Create => vec![(data, &["create"])],
        KvCapability::Update => vec![(data, &["update"])],
        KvCapability::Patch => vec![(data, &["patch"])],
        KvCapability::Delete => vec![
            (data, &["delete"]),
            (format!("{mount}/delete/{path}"), &["update"]),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_different_bindings_never_collide() {
        assert_ne!(base_name("shop", "a-b"), base_name("shop-a", "b"));
        assert_ne!(
            database_role_name("shop", "a", "b-c"),
            database_role_name("shop", "a-b", "c")
        );
    }
}
