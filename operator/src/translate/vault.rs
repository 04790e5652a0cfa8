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
    secret_binding::{DatabaseGrant, DeletionPolicy, KvCapability, KvGrant, KvVersion},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Which Vault paths and database connections the bindings of a namespace may grant, and the
/// grant profiles (SQL) database credentials may be created with. Strings may hold
/// `{namespace}`, replaced by the binding's namespace.
///
/// ```yaml
/// kv:
///   - {mount: secret, version: 2, pathPrefix: "{namespace}/"}
/// database:
///   - {mount: database, connection: "{namespace}_*", profiles: [readonly]}
/// namespaces:                      # extra grants for named namespaces
///   shop: {database: [{mount: database, connection: orders-pg, profiles: [readonly, readwrite]}]}
/// profiles:
///   readonly:
///     creationStatements: ["CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';", ...]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tenancy {
    /// KV areas every namespace may grant (templated; each must name `{namespace}`).
    #[serde(default)]
    pub kv: Vec<KvArea>,
    /// Database connections every namespace may grant (templated; each must name
    /// `{namespace}`).
    #[serde(default)]
    pub database: Vec<DatabaseArea>,
    /// Additional areas for particular namespaces.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceAreas>,
    /// Grant profiles by name: the only SQL Vault ever runs for a binding.
    #[serde(default)]
    pub profiles: BTreeMap<String, GrantProfile>,
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

/// A database mount, the connections a namespace may issue credentials for, and the grant
/// profiles it may choose on them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseArea {
    /// Mount path, e.g. `database` (never templated).
    pub mount: String,
    /// Connection name; a trailing `*` matches any non-empty suffix, e.g. `{namespace}_*`.
    pub connection: String,
    /// Names of the grant profiles bindings may choose on these connections.
    pub profiles: Vec<String>,
}

/// What a database credential may do: the SQL Vault runs, as the connection's account, to
/// create and drop the credential's user. Written by the platform team only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantProfile {
    /// SQL creating the user (`{{name}}`, `{{password}}`, `{{expiration}}` filled in by Vault).
    pub creation_statements: Vec<String>,
    /// SQL dropping it; the plugin's own when empty.
    #[serde(default)]
    pub revocation_statements: Vec<String>,
    /// SQL run when a credential's lease is renewed (e.g. extending PostgreSQL's
    /// `VALID UNTIL`); none when empty, so a renewal then extends only the lease.
    #[serde(default)]
    pub renew_statements: Vec<String>,
}

/// Mount paths Vault reserves for itself; no area may name them.
pub const RESERVED_MOUNTS: &[&str] = &["sys", "auth", "identity", "cubbyhole", "token"];

const NS: &str = "{namespace}";

fn namespace_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// Whether `s` is a namespace name (a DNS label).
pub fn is_namespace_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(namespace_char)
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks where `{namespace}` may stand in `text`: at most once, and delimited by `delimiter`
/// (a character no namespace holds) or the ends, so that the namespace a name belongs to can be
/// read back from it and `shop` never claims what `shop-eu` owns.
fn check_placement(text: &str, what: &str, delimiter: fn(char) -> bool) -> Result<(), String> {
    let count = text.matches(NS).count();
    if count > 1 {
        return Err(format!(
            "{what} {text:?}: {{namespace}} may appear only once"
        ));
    }
    if let Some(at) = text.find(NS) {
        let before = text[..at].chars().next_back();
        let after = text[at + NS.len()..].chars().next();
        if before.is_some_and(|c| !delimiter(c)) || after.is_some_and(|c| !delimiter(c)) {
            return Err(format!(
                "{what} {text:?}: {{namespace}} must be set apart by a character no namespace name holds (for example '_' or '/'), or `shop` would also own what belongs to `shop-eu`"
            ));
        }
    }
    Ok(())
}

fn check_mount(mount: &str, what: &str) -> Result<(), String> {
    let first = mount.split('/').next().unwrap_or_default();
    if mount.is_empty() || mount.starts_with('/') || mount.ends_with('/') || mount.contains('*') {
        return Err(format!(
            "{what} mount {mount:?}: must be a plain mount path"
        ));
    }
    if RESERVED_MOUNTS.contains(&first) {
        return Err(format!(
            "{what} mount {mount:?}: {first}/ is reserved by Vault and can never be granted"
        ));
    }
    Ok(())
}

impl KvArea {
    fn check(&self, what: &str, templated: bool) -> Result<(), String> {
        check_mount(&self.mount, what)?;
        if self.mount.contains(NS) {
            return Err(format!(
                "{what} mount {:?}: KV mounts are not templated (a namespace named like another mount, `database` say, would own it); template the pathPrefix",
                self.mount
            ));
        }
        if self.path_prefix.contains('*') {
            return Err(format!(
                "{what} pathPrefix {:?}: no wildcards",
                self.path_prefix
            ));
        }
        if !matches!(self.version, 1 | 2) {
            return Err(format!("{what}: version must be 1 or 2"));
        }
        let whole = format!("{}/{}", self.mount, self.path_prefix);
        check_placement(&whole, what, |c| c == '/')?;
        if templated && !whole.contains(NS) {
            return Err(format!(
                "{what} {whole:?}: a templated area must name {{namespace}} in its mount or pathPrefix; otherwise every namespace shares it (list shared areas under namespaces.<name>)"
            ));
        }
        Ok(())
    }

    /// The ACL path prefixes the area covers for `namespace` (KV v2 keeps data, metadata and
    /// versions under separate prefixes of the mount).
    fn acl_prefixes(&self, namespace: &str) -> Vec<String> {
        let m = template(&self.mount, namespace);
        let p = template(&self.path_prefix, namespace)
            .trim_end_matches('/')
            .to_owned();
        let join = |a: &str| {
            [m.as_str(), a, p.as_str()]
                .iter()
                .filter(|x| !x.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("/")
        };
        if self.version == 1 {
            vec![join("")]
        } else {
            ["data", "metadata", "delete", "undelete", "destroy"]
                .iter()
                .map(|k| join(k))
                .collect()
        }
    }
}

impl DatabaseArea {
    fn check(
        &self,
        what: &str,
        templated: bool,
        profiles: &BTreeMap<String, GrantProfile>,
    ) -> Result<(), String> {
        check_mount(&self.mount, what)?;
        if self.mount.contains(NS) {
            return Err(format!(
                "{what} mount {:?}: database mounts are not templated",
                self.mount
            ));
        }
        let c = &self.connection;
        if c.is_empty()
            || c == "*"
            || c.trim_end_matches('*').contains('*')
            || c.matches('*').count() > 1
        {
            return Err(format!(
                "{what} connection {c:?}: a name, or a prefix followed by one final '*'"
            ));
        }
        check_placement(c, what, |ch| !namespace_char(ch) && ch != '*')?;
        if c.contains(&format!("{NS}*")) {
            return Err(format!(
                "{what} connection {c:?}: '{{namespace}}*' lets `shop` claim `shop-eu`'s connections; put a '_' between them"
            ));
        }
        if templated && !c.contains(NS) {
            return Err(format!(
                "{what} connection {c:?}: a templated connection must name {{namespace}} (list shared connections under namespaces.<name>)"
            ));
        }
        if self.profiles.is_empty() {
            return Err(format!("{what}: name at least one grant profile"));
        }
        if let Some(p) = self.profiles.iter().find(|p| !profiles.contains_key(*p)) {
            return Err(format!(
                "{what}: profile {p:?} is not defined under tenancy.profiles"
            ));
        }
        Ok(())
    }
}

/// A KV or database area.
#[derive(Clone, Copy)]
enum Area<'a> {
    Kv(&'a KvArea),
    Db(&'a DatabaseArea),
}

/// One area as the collision check sees it: whose it is (`None`: every namespace's), what, and
/// where the configuration states it.
struct AreaRef<'a> {
    owner: Option<&'a str>,
    area: Area<'a>,
    at: String,
}

/// Whether ACL path `x` is `y` or a whole-segment prefix of it.
fn seg_prefix(x: &str, y: &str) -> bool {
    y == x || y.strip_prefix(x).is_some_and(|r| r.starts_with('/'))
}

fn kv_overlap(a: &[String], b: &[String]) -> bool {
    a.iter()
        .any(|x| b.iter().any(|y| seg_prefix(x, y) || seg_prefix(y, x)))
}

fn connection_overlap(a: &str, b: &str) -> bool {
    match (a.strip_suffix('*'), b.strip_suffix('*')) {
        (None, None) => a == b,
        (Some(p), None) => b.starts_with(p) && b.len() > p.len(),
        (None, Some(q)) => a.starts_with(q) && a.len() > q.len(),
        (Some(p), Some(q)) => p.starts_with(q) || q.starts_with(p),
    }
}

impl Tenancy {
    /// Refuses a tenancy in which one namespace could grant what belongs to another: reserved
    /// mounts, templates without `{namespace}` (or with it where `shop` also matches `shop-eu`),
    /// undefined profiles, and any two areas of different namespaces that overlap.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in &self.profiles {
            if p.creation_statements.is_empty() {
                return Err(format!(
                    "tenancy.profiles.{name}: creationStatements is empty"
                ));
            }
        }
        let mut areas = Vec::new();
        let templated = std::iter::once((None, "tenancy".to_owned(), &self.kv, &self.database));
        let listed = self.namespaces.iter().map(|(ns, e)| {
            let at = format!("tenancy.namespaces.{ns}");
            (Some(ns.as_str()), at, &e.kv, &e.database)
        });
        for (owner, base, kv, database) in templated.chain(listed) {
            if let Some(ns) = owner
                && !is_namespace_name(ns)
            {
                return Err(format!(
                    "tenancy.namespaces: {ns:?} is not a namespace name"
                ));
            }
            for (i, a) in kv.iter().enumerate() {
                let at = format!("{base}.kv[{i}]");
                a.check(&at, owner.is_none())?;
                let area = Area::Kv(a);
                areas.push(AreaRef { owner, area, at });
            }
            for (i, a) in database.iter().enumerate() {
                let at = format!("{base}.database[{i}]");
                a.check(&at, owner.is_none(), &self.profiles)?;
                let area = Area::Db(a);
                areas.push(AreaRef { owner, area, at });
            }
        }
        let names = Self::probe_names(&areas);
        Self::check_collisions(&areas, &names)?;
        Self::check_kv_beside_database(&areas, &names)
    }

    /// No KV area may reach into a database mount (whose roles and credentials live there).
    fn check_kv_beside_database(
        areas: &[AreaRef<'_>],
        names: &BTreeSet<String>,
    ) -> Result<(), String> {
        let db_mounts: BTreeSet<&str> = areas
            .iter()
            .filter_map(|a| match a.area {
                Area::Db(d) => Some(d.mount.as_str()),
                Area::Kv(_) => None,
            })
            .collect();
        for a in areas {
            let Area::Kv(kv) = a.area else { continue };
            for n in names {
                for prefix in kv.acl_prefixes(n) {
                    if let Some(m) = db_mounts
                        .iter()
                        .find(|m| seg_prefix(m, &prefix) || seg_prefix(&prefix, m))
                    {
                        return Err(format!(
                            "{} reaches into database mount {m:?}: a namespace could write its roles or read every credential",
                            a.at
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Namespace names worth trying: every run of namespace characters in any area and every
    /// namespace named in the configuration, plus two that appear nowhere.
    fn probe_names(areas: &[AreaRef<'_>]) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = ["probe-a", "probe-b"].map(String::from).into();
        for a in areas {
            if let Some(o) = a.owner {
                out.insert(o.to_owned());
            }
            let text = match a.area {
                Area::Kv(k) => format!("{}/{}", k.mount, k.path_prefix),
                Area::Db(d) => d.connection.clone(),
            }
            .replace(NS, "/");
            for run in text.split(|c: char| !namespace_char(c)) {
                let mut acc = String::new();
                for part in run.split('-') {
                    if !acc.is_empty() {
                        acc.push('-');
                    }
                    acc.push_str(part);
                    if is_namespace_name(&acc) {
                        out.insert(acc.clone());
                    }
                }
            }
        }
        // A name that continues another (`shop-eu` after `shop`) catches patterns that would
        // reach past a namespace's own names.
        let extended: Vec<String> = out
            .iter()
            .flat_map(|n| [format!("{n}-x"), format!("{n}x")])
            .filter(|n| is_namespace_name(n))
            .collect();
        out.extend(extended);
        out
    }

    fn check_collisions(areas: &[AreaRef<'_>], names: &BTreeSet<String>) -> Result<(), String> {
        let owners = |a: &AreaRef<'_>| -> Vec<String> {
            a.owner
                .map_or_else(|| names.iter().cloned().collect(), |o| vec![o.to_owned()])
        };
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i..] {
                // Two namespaces' own listings may share an area on purpose.
                if a.owner.is_some() && b.owner.is_some() {
                    continue;
                }
                for na in owners(a) {
                    for nb in owners(b) {
                        if na == nb {
                            continue;
                        }
                        let clash = match (a.area, b.area) {
                            (Area::Kv(x), Area::Kv(y)) => {
                                kv_overlap(&x.acl_prefixes(&na), &y.acl_prefixes(&nb))
                            }
                            (Area::Db(x), Area::Db(y)) => {
                                x.mount == y.mount
                                    && connection_overlap(
                                        &template(&x.connection, &na),
                                        &template(&y.connection, &nb),
                                    )
                            }
                            _ => false,
                        };
                        if clash {
                            return Err(format!(
                                "{} for namespace {na} overlaps {} for namespace {nb}: one namespace could grant what belongs to another",
                                a.at, b.at
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Operator-wide defaults a binding may leave out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultDefaults {
    /// Mount of the Kubernetes auth method workload roles are written to.
    pub kubernetes_auth_mount: String,
    /// Audience a workload's ServiceAccount token must carry, unless the binding names one.
    pub audience: String,
    /// Other audiences a binding may name. The API server's own audience must never be among
    /// them: with it, any token the cluster issues for other purposes would log in.
    #[serde(default)]
    pub allowed_audiences: Vec<String>,
}

impl Default for VaultDefaults {
    fn default() -> Self {
        VaultDefaults {
            kubernetes_auth_mount: "kubernetes".into(),
            audience: "vault".into(),
            allowed_audiences: Vec::new(),
        }
    }
}

/// How Vault objects are named. With a cluster id every name starts with
/// `palisade-<cluster>_`, without one with `palisade-`; neither a cluster id nor a namespace
/// holds a `_` or a `.`, so names of different clusters and namespaces never meet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Naming {
    /// This cluster's id (a DNS label), when several clusters share one Vault.
    pub cluster: Option<String>,
}

impl Naming {
    /// What every name this operator writes starts with.
    pub fn prefix(&self) -> String {
        match &self.cluster {
            Some(c) => format!("palisade-{c}_"),
            None => "palisade-".into(),
        }
    }

    /// Name of a binding's policy and login role: `<prefix><namespace>.<name>`. A namespace
    /// never holds a `.`, so the first `.` ends it and no two bindings share a name (with `-`
    /// as the separator, binding `a-b` in `shop` and `b` in `shop-a` would).
    pub fn base(&self, namespace: &str, name: &str) -> String {
        format!("{}{namespace}.{name}", self.prefix())
    }

    /// The database role of one connection of a binding: `<base>.<connection>` (a connection
    /// name never holds a `.`, so the last one starts it).
    pub fn database_role(&self, namespace: &str, name: &str, connection: &str) -> String {
        format!("{}.{connection}", self.base(namespace, name))
    }

    /// The policy of one incarnation of a binding: `<base>.<first 8 characters of its uid>`.
    /// A binding deleted and created again under the same name gets another policy name, so a
    /// token issued for the earlier one (which holds only that name) never regains access.
    pub fn policy(&self, namespace: &str, name: &str, uid: &str) -> String {
        format!("{}.{}", self.base(namespace, name), uid_tag(uid))
    }

    /// The (namespace, binding name, uid tag) a policy name of this operator belongs to.
    pub fn policy_of(&self, policy: &str) -> Option<(String, String, String)> {
        let (base, tag) = policy.rsplit_once('.')?;
        let (ns, name) = self.binding_of(base)?;
        (tag.len() == 8
            && tag
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()))
        .then(|| (ns, name, tag.to_owned()))
    }

    /// Whether `policy` is the policy of some incarnation of binding `namespace/name`.
    pub fn is_policy_of(&self, policy: &str, namespace: &str, name: &str) -> bool {
        self.policy_of(policy)
            .is_some_and(|(ns, n, _)| ns == namespace && n == name)
    }

    /// The cluster as an ownership record states it (`-` when none).
    pub fn marker_cluster(&self) -> String {
        self.cluster.clone().unwrap_or_else(|| "-".into())
    }

    /// The (namespace, binding name) a login role name of this operator belongs to;
    /// `None` for names it does not write.
    pub fn binding_of(&self, object: &str) -> Option<(String, String)> {
        let rest = object.strip_prefix(&self.prefix())?;
        let (ns, name) = rest.split_once('.')?;
        (is_namespace_name(ns) && !name.is_empty()).then(|| (ns.to_owned(), name.to_owned()))
    }

    /// Whether `role` is one of binding `base`'s database roles (`<base>.<connection>`; a
    /// binding named `orders.x` has roles `<ns>.orders.x.<connection>`, which are not
    /// `orders`'s).
    pub fn is_database_role_of(base: &str, role: &str) -> bool {
        role.strip_prefix(base)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|c| !c.is_empty() && !c.contains('.'))
    }
}

/// The first 8 characters of a uid (lower-case hex), `00000000` when there is none.
pub fn uid_tag(uid: &str) -> String {
    let tag: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("{tag:0<8}")
}

/// Who wrote a policy, as recorded in its first line: which cluster, which binding (and which
/// incarnation of it) and a digest of everything desired for it. Only the policy carries it;
/// the login role and database roles are named after it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Cluster id, `-` when none.
    pub cluster: String,
    /// The binding's namespace.
    pub namespace: String,
    /// The binding's name.
    pub name: String,
    /// The binding's uid.
    pub uid: String,
    /// Digest of the desired policy, role and database roles.
    pub digest: String,
    /// Whether the binding's objects stay after it is deleted (an allowed `Retain`): the sweep
    /// leaves them.
    #[serde(default)]
    pub retain: bool,
}

const MARKER: &str = "# palisade-owner";

impl Marker {
    fn line(&self) -> String {
        format!(
            "{MARKER} cluster={} namespace={} name={} uid={} desired={}{}",
            self.cluster,
            self.namespace,
            self.name,
            self.uid,
            self.digest,
            if self.retain { " retain=true" } else { "" }
        )
    }

    /// The marker in a policy's text; `None` when it has none (not written by Palisade).
    pub fn parse(text: &str) -> Option<Marker> {
        let line = text.lines().find(|l| l.starts_with(MARKER))?;
        let mut m = Marker::default();
        for kv in line[MARKER.len()..].split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let slot = match k {
                "cluster" => &mut m.cluster,
                "namespace" => &mut m.namespace,
                "name" => &mut m.name,
                "uid" => &mut m.uid,
                "desired" => &mut m.digest,
                "retain" => {
                    m.retain = v == "true";
                    continue;
                }
                _ => continue,
            };
            v.clone_into(slot);
        }
        Some(m)
    }

    /// Whether `other` was written for the same binding name on the same cluster.
    pub fn same_binding(&self, other: &Marker) -> bool {
        (&self.cluster, &self.namespace, &self.name)
            == (&other.cluster, &other.namespace, &other.name)
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
    /// Ownership record written as its first line.
    pub marker: Marker,
}

impl AclPolicy {
    /// The policy text Vault stores.
    pub fn hcl(&self) -> String {
        let mut out = self.marker.line();
        out.push_str("\n# Written by Palisade from a SecretBinding; edits are reverted.\n");
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
    /// Policies attached to the token (only the binding's; never `default`).
    pub token_policies: BTreeSet<String>,
    /// Token lifetime, seconds.
    pub token_ttl: u64,
    /// Longest lifetime with renewals, seconds.
    pub token_max_ttl: u64,
    /// Required audience of the ServiceAccount token.
    pub audience: String,
}

impl KubernetesRole {
    /// Every field of the role as Vault stores it: what Palisade sets, and the value each other
    /// field must have (its default, stated), so a hand edit of any of them is drift.
    pub fn body(&self) -> Map<String, Value> {
        let list = |s: &BTreeSet<String>| Value::from(s.iter().cloned().collect::<Vec<_>>());
        let v = json!({
            "bound_service_account_names": list(&self.bound_service_account_names),
            "bound_service_account_namespaces": list(&self.bound_service_account_namespaces),
            "bound_service_account_namespace_selector": "",
            "audience": self.audience,
            "alias_name_source": "serviceaccount_uid",
            "token_policies": list(&self.token_policies),
            "token_no_default_policy": true,
            "token_ttl": self.token_ttl,
            "token_max_ttl": self.token_max_ttl,
            "token_explicit_max_ttl": 0,
            "token_period": 0,
            "token_num_uses": 0,
            "token_bound_cidrs": [],
            "token_type": "default",
            "token_strictly_bind_ip": false,
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// What is written: every field of [`KubernetesRole::body`], as the strings the operator's
    /// own Vault policy pins (`allowed_parameters` compares strings; see
    /// [`operator_policy`]), durations as numbers.
    pub fn request(&self) -> Value {
        let joined = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        json!({
            "bound_service_account_names": joined(&self.bound_service_account_names),
            "bound_service_account_namespaces": joined(&self.bound_service_account_namespaces),
            "bound_service_account_namespace_selector": "",
            "audience": self.audience,
            "alias_name_source": "serviceaccount_uid",
            "token_policies": joined(&self.token_policies),
            "token_no_default_policy": "true",
            "token_ttl": self.token_ttl,
            "token_max_ttl": self.token_max_ttl,
            "token_explicit_max_ttl": "0",
            "token_period": "0",
            "token_num_uses": "0",
            "token_bound_cidrs": "",
            "token_type": "default",
            "token_strictly_bind_ip": "false",
        })
    }
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
    /// The grant profile its statements come from.
    pub profile: String,
    /// SQL creating the user (the profile's).
    pub creation_statements: Vec<String>,
    /// SQL dropping it (the profile's).
    pub revocation_statements: Vec<String>,
    /// SQL run on renewal (the profile's).
    #[serde(default)]
    pub renew_statements: Vec<String>,
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

    /// Every field of the role as Vault stores it (see [`KubernetesRole::body`]).
    pub fn body(&self) -> Map<String, Value> {
        let v = json!({
            "db_name": self.db_name,
            "creation_statements": self.creation_statements,
            "revocation_statements": self.revocation_statements,
            "rollback_statements": [],
            "renew_statements": self.renew_statements,
            "default_ttl": self.default_ttl,
            "max_ttl": self.max_ttl,
            "credential_type": "password",
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// What is written: every field, empty statement lists as `[""]` (which Vault stores as
    /// empty) so the operator's Vault policy can pin each list exactly.
    pub fn request(&self) -> Value {
        let pinned = |s: &[String]| {
            if s.is_empty() {
                vec![String::new()]
            } else {
                s.to_vec()
            }
        };
        json!({
            "db_name": self.db_name,
            "creation_statements": self.creation_statements,
            "revocation_statements": pinned(&self.revocation_statements),
            "rollback_statements": [""],
            "renew_statements": pinned(&self.renew_statements),
            "default_ttl": self.default_ttl,
            "max_ttl": self.max_ttl,
            "credential_type": "password",
        })
    }
}

/// Fields whose default Vault may leave out of a read: absent counts as the stated value.
const MAY_BE_ABSENT: &[&str] = &[
    "alias_name_source",
    "bound_service_account_namespace_selector",
    "credential_type",
    "token_type",
];

/// Older names Vault still reports beside the `token_` fields.
const ALIASES: &[(&str, &str)] = &[
    ("policies", "token_policies"),
    ("ttl", "token_ttl"),
    ("max_ttl", "token_max_ttl"),
    ("period", "token_period"),
    ("num_uses", "token_num_uses"),
    ("bound_cidrs", "token_bound_cidrs"),
];

fn normalised(v: &Value) -> Value {
    match v {
        Value::Array(items) => {
            let mut s: Vec<String> = items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                .filter(|i| !i.is_empty())
                .collect();
            s.sort();
            s.dedup();
            Value::from(s)
        }
        Value::Number(n) => n.as_f64().map_or(Value::Null, Value::from),
        Value::String(t) => Value::from(t.as_str()),
        other => other.clone(),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// The fields in which what Vault holds (`live`, a whole read) differs from `desired` (a whole
/// body): every field Palisade states must match, and every field it does not know must be
/// empty. Lists compare as sets.
pub fn differences(desired: &Map<String, Value>, live: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, want) in desired {
        match live.get(k) {
            None if is_empty(want) || MAY_BE_ABSENT.contains(&k.as_str()) => {}
            None => out.push(k.clone()),
            Some(have) if is_empty(&normalised(want)) && is_empty(&normalised(have)) => {}
            Some(have) if normalised(have) != normalised(want) => out.push(k.clone()),
            Some(_) => {}
        }
    }
    for (k, have) in live {
        if desired.contains_key(k) {
            continue;
        }
        let alias = ALIASES.iter().find(|(a, _)| a == k).map(|(_, t)| *t);
        let fine = match alias.and_then(|t| desired.get(t)) {
            Some(want) => normalised(have) == normalised(want),
            None => is_empty(&normalised(have)),
        };
        if !fine {
            out.push(k.clone());
        }
    }
    out
}

/// Everything one binding should have in Vault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultDesired {
    /// ACL policy (carrying the ownership marker).
    pub policy: AclPolicy,
    /// Login role.
    pub role: KubernetesRole,
    /// Database roles, sorted by mount and name.
    pub database_roles: Vec<DatabaseRole>,
    /// Whether deleting the binding leaves its Vault objects (`Retain`, where allowed).
    pub retain: bool,
    /// What the operator changed from the binding, for its `Accepted` message.
    pub notes: Vec<String>,
}

/// Condition reasons of a refused binding.
pub mod reason {
    /// A path, mount or connection outside the namespace's tenancy.
    pub const OUTSIDE_TENANCY: &str = "OutsideTenancy";
    /// A path that is not a plain relative path.
    pub const INVALID_PATH: &str = "InvalidPath";
    /// A ServiceAccount name that is not one of this namespace.
    pub const FOREIGN_SERVICE_ACCOUNT: &str = "ForeignServiceAccount";
    /// A grant profile not offered for the connection (or none named).
    pub const PROFILE_NOT_ALLOWED: &str = "ProfileNotAllowed";
    /// An audience the operator configuration does not allow.
    pub const AUDIENCE_NOT_ALLOWED: &str = "AudienceNotAllowed";
}

/// Why a binding is refused; nothing is written to Vault for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Condition reason (see [`reason`]).
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

fn template(s: &str, namespace: &str) -> String {
    s.replace(NS, namespace)
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

/// A ServiceAccount name exactly as Kubernetes allows it (a DNS subdomain): Vault reads `*`
/// and a `*` at either end of a bound name as a glob, so nothing else may pass.
fn is_service_account_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(namespace_char)
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// What a binding is translated against: the operator's tenancy and defaults.
#[derive(Clone, Copy, Debug)]
pub struct Grants<'a> {
    /// What each namespace may grant.
    pub tenancy: &'a Tenancy,
    /// Workload defaults.
    pub workloads: &'a VaultDefaults,
    /// Object names.
    pub naming: &'a Naming,
    /// Whether `deletionPolicy: Retain` is honoured.
    pub allow_retain: bool,
}

/// The areas of `namespace`, templates filled in.
fn areas_of(tenancy: &Tenancy, namespace: &str) -> (Vec<KvArea>, Vec<DatabaseArea>) {
    let extra = tenancy.namespaces.get(namespace);
    let kv = tenancy
        .kv
        .iter()
        .chain(extra.map(|e| e.kv.iter()).into_iter().flatten())
        .map(|a| KvArea {
            mount: template(&a.mount, namespace),
            version: a.version,
            path_prefix: template(&a.path_prefix, namespace),
        })
        .collect();
    let db = tenancy
        .database
        .iter()
        .chain(extra.map(|e| e.database.iter()).into_iter().flatten())
        .map(|a| DatabaseArea {
            mount: template(&a.mount, namespace),
            connection: template(&a.connection, namespace),
            profiles: a.profiles.clone(),
        })
        .collect();
    (kv, db)
}

fn check_identity(
    sb: &SecretBinding,
    namespace: &str,
    workloads: &VaultDefaults,
) -> Result<String, Refusal> {
    for sa in &sb.spec.service_account_names {
        if !is_service_account_name(sa) {
            return Err(refuse(
                reason::FOREIGN_SERVICE_ACCOUNT,
                format!(
                    "serviceAccountNames: {sa:?} is not a ServiceAccount name of namespace {namespace}; a binding can only grant to its own namespace's ServiceAccounts, named exactly"
                ),
            ));
        }
    }
    let audience = sb
        .spec
        .audience
        .clone()
        .unwrap_or_else(|| workloads.audience.clone());
    if audience != workloads.audience && !workloads.allowed_audiences.contains(&audience) {
        let mut allowed = vec![workloads.audience.clone()];
        allowed.extend(workloads.allowed_audiences.iter().cloned());
        return Err(refuse(
            reason::AUDIENCE_NOT_ALLOWED,
            format!(
                "audience {audience:?} is not allowed (allowed: {})",
                allowed.join(", ")
            ),
        ));
    }
    Ok(audience)
}

/// Translates one binding, or refuses it.
pub fn translate(sb: &SecretBinding, grants: &Grants<'_>) -> Result<VaultDesired, Refusal> {
    let namespace = sb.metadata.namespace.clone().unwrap_or_default();
    let name = sb.metadata.name.clone().unwrap_or_default();
    let spec = &sb.spec;
    let (kv_areas, db_areas) = areas_of(grants.tenancy, &namespace);
    let audience = check_identity(sb, &namespace, grants.workloads)?;

    let base = grants.naming.base(&namespace, &name);
    let uid = sb.metadata.uid.clone().unwrap_or_default();
    let policy_name = grants.naming.policy(&namespace, &name, &uid);
    let mut rules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, kv) in spec.kv.iter().flatten().enumerate() {
        check_kv(i, kv, &kv_areas, &namespace, &mut rules)?;
    }
    let mut database_roles = Vec::new();
    for (i, db) in spec.database.iter().flatten().enumerate() {
        let at = format!("database[{i}] ({}/{})", db.mount, db.connection);
        let area = check_database(&at, db, &db_areas, &namespace)?;
        let profile = check_profile(&at, db, area, grants.tenancy)?;
        let role = DatabaseRole {
            mount: db.mount.clone(),
            name: grants
                .naming
                .database_role(&namespace, &name, &db.connection),
            db_name: db.connection.clone(),
            profile: db.profile.clone().unwrap_or_default(),
            creation_statements: profile.creation_statements.clone(),
            revocation_statements: profile.revocation_statements.clone(),
            renew_statements: profile.renew_statements.clone(),
            default_ttl: db.default_ttl.as_secs(),
            max_ttl: db.max_ttl.as_secs(),
        };
        rules
            .entry(format!("{}/creds/{}", role.mount, role.name))
            .or_default()
            .insert("read".into());
        database_roles.push(role);
    }
    database_roles.sort_by(|a, b| (&a.mount, &a.name).cmp(&(&b.mount, &b.name)));

    // Without tokenTTL, an hour, but never more than tokenMaxTTL (Vault refuses ttl > max_ttl).
    let max = spec
        .token_max_ttl
        .as_ref()
        .map(palisade_api::Duration::as_secs);
    let token_ttl = spec.token_ttl.as_ref().map_or(
        max.map_or(3600, |m| m.min(3600)),
        palisade_api::Duration::as_secs,
    );
    let token_max_ttl = max.unwrap_or(token_ttl);
    // What a workload needs to keep its token and leases alive within their maximum lifetimes
    // (the `default` policy, which would give it, is not attached).
    for (path, cap) in [
        ("auth/token/lookup-self", "read"),
        ("auth/token/renew-self", "update"),
        ("sys/leases/renew", "update"),
    ] {
        rules.entry(path.into()).or_default().insert(cap.into());
    }
    let role = KubernetesRole {
        mount: grants.workloads.kubernetes_auth_mount.clone(),
        name: base.clone(),
        bound_service_account_names: spec.service_account_names.iter().cloned().collect(),
        bound_service_account_namespaces: BTreeSet::from([namespace.clone()]),
        token_policies: BTreeSet::from([policy_name.clone()]),
        token_ttl,
        token_max_ttl,
        audience,
    };
    let rules: Vec<PolicyRule> = rules
        .into_iter()
        .map(|(path, capabilities)| PolicyRule { path, capabilities })
        .collect();
    let digest = digest(&rules, &role, &database_roles);
    let mut notes = Vec::new();
    let wants_retain = spec.deletion_policy == DeletionPolicy::Retain;
    if wants_retain && !grants.allow_retain {
        notes.push("deletionPolicy Retain is not allowed by the operator configuration: deleting the binding removes its access".into());
    }
    Ok(VaultDesired {
        policy: AclPolicy {
            name: policy_name,
            rules,
            marker: Marker {
                cluster: grants.naming.marker_cluster(),
                namespace,
                name,
                uid,
                digest,
                retain: wants_retain && grants.allow_retain,
            },
        },
        role,
        database_roles,
        retain: wants_retain && grants.allow_retain,
        notes,
    })
}

/// A digest of everything desired for a binding, so that a later sync can tell a change of
/// the binding or of the operator's configuration (applied) from a hand edit (drift).
fn digest(rules: &[PolicyRule], role: &KubernetesRole, dbs: &[DatabaseRole]) -> String {
    let text = json!({
        "rules": rules,
        "role": role.body(),
        "databaseRoles": dbs.iter().map(|d| (d.path(), d.body())).collect::<Vec<_>>(),
    })
    .to_string();
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    d.as_ref()[..12].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
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
    check_kv_path(&kv.path).map_err(|why| refuse(reason::INVALID_PATH, format!("{at}: {why}")))?;
    let version = match kv.version {
        KvVersion::V1 => 1,
        KvVersion::V2 => 2,
    };
    let mount_areas: Vec<&KvArea> = kv_areas.iter().filter(|a| a.mount == kv.mount).collect();
    if mount_areas.is_empty()
        || RESERVED_MOUNTS.contains(&kv.mount.split('/').next().unwrap_or_default())
    {
        return Err(refuse(
            reason::OUTSIDE_TENANCY,
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
            reason::OUTSIDE_TENANCY,
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
            reason::OUTSIDE_TENANCY,
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

/// Checks one database grant against the namespace's connections; the area that admits it.
fn check_database<'a>(
    at: &str,
    db: &DatabaseGrant,
    db_areas: &'a [DatabaseArea],
    namespace: &str,
) -> Result<&'a DatabaseArea, Refusal> {
    let found = db_areas
        .iter()
        .find(|a| a.mount == db.mount && connection_allowed(&a.connection, &db.connection));
    found.ok_or_else(|| {
        let allowed: Vec<String> = db_areas
            .iter()
            .map(|a| format!("{}/{}", a.mount, a.connection))
            .collect();
        refuse(
            reason::OUTSIDE_TENANCY,
            format!(
                "{at}: connection not open to namespace {namespace} (allowed: {})",
                if allowed.is_empty() {
                    "none".into()
                } else {
                    allowed.join(", ")
                }
            ),
        )
    })
}

/// The grant profile a database grant names, if its connection offers it.
fn check_profile<'a>(
    at: &str,
    db: &DatabaseGrant,
    area: &DatabaseArea,
    tenancy: &'a Tenancy,
) -> Result<&'a GrantProfile, Refusal> {
    let offered = area.profiles.join(", ");
    let Some(wanted) = db.profile.as_deref() else {
        return Err(refuse(
            reason::PROFILE_NOT_ALLOWED,
            format!("{at}: no profile named; this connection offers {offered}"),
        ));
    };
    area.profiles
        .iter()
        .any(|p| p == wanted)
        .then(|| tenancy.profiles.get(wanted))
        .flatten()
        .ok_or_else(|| {
            refuse(
                reason::PROFILE_NOT_ALLOWED,
                format!("{at}: profile {wanted:?} is not offered for this connection (offered: {offered})"),
            )
        })
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
    fn names_of_different_bindings_and_clusters_never_collide() {
        let plain = Naming::default();
        let east = Naming {
            cluster: Some("east".into()),
        };
        assert_ne!(plain.base("shop", "a-b"), plain.base("shop-a", "b"));
        assert_ne!(
            plain.database_role("shop", "a", "b-c"),
            plain.database_role("shop", "a-b", "c")
        );
        // Cluster `east`, namespace `shop` against no cluster, namespace `east`, binding
        // `shop.orders`: the `_` keeps them apart.
        assert_ne!(
            east.base("shop", "orders"),
            plain.base("east", "shop.orders")
        );
        assert_eq!(
            plain.binding_of(&east.base("shop", "orders")),
            None,
            "a cluster's names are not another's"
        );
        assert_eq!(east.binding_of(&plain.base("shop", "orders")), None);
        assert_eq!(
            east.binding_of(&east.base("shop", "orders.v2")),
            Some(("shop".into(), "orders.v2".into()))
        );
        let base = plain.base("shop", "orders");
        assert!(Naming::is_database_role_of(
            &base,
            &format!("{base}.orders-pg")
        ));
        assert!(!Naming::is_database_role_of(
            &base,
            &plain.database_role("shop", "orders.x", "pg")
        ));
    }

    fn tenancy(yaml: &str) -> Tenancy {
        let base = "profiles: {ro: {creationStatements: [\"CREATE ROLE x\"]}}\n";
        serde_yaml::from_str(&format!("{base}{yaml}")).expect("tenancy parses")
    }

    #[test]
    fn tenancy_that_lets_one_namespace_claim_another_is_refused() {
        let refused = [
            (
                "database: [{mount: database, connection: \"{namespace}-*\", profiles: [ro]}]",
                "set apart",
            ),
            (
                "database: [{mount: database, connection: \"{namespace}*\", profiles: [ro]}]",
                "set apart",
            ),
            (
                "database: [{mount: database, connection: \"pg-{namespace}\", profiles: [ro]}]",
                "set apart",
            ),
            (
                "database: [{mount: database, connection: shared, profiles: [ro]}]",
                "must name {namespace}",
            ),
            (
                "database: [{mount: database, connection: \"{namespace}_*\", profiles: [rw]}]",
                "not defined",
            ),
            (
                "database: [{mount: database, connection: \"{namespace}_*\", profiles: []}]",
                "at least one",
            ),
            (
                "database: [{mount: \"db-{namespace}\", connection: \"{namespace}\", profiles: [ro]}]",
                "not templated",
            ),
            (
                "kv: [{mount: secret, version: 2, pathPrefix: \"\"}]",
                "must name {namespace}",
            ),
            (
                "kv: [{mount: sys, version: 2, pathPrefix: \"{namespace}/\"}]",
                "reserved",
            ),
            (
                "kv: [{mount: cubbyhole, version: 2, pathPrefix: \"{namespace}/\"}]",
                "reserved",
            ),
            (
                "kv: [{mount: secret, version: 2, pathPrefix: \"team-{namespace}/\"}]",
                "set apart",
            ),
            (
                "kv: [{mount: secret, version: 2, pathPrefix: \"{namespace}/{namespace}/\"}]",
                "only once",
            ),
            // Namespace `apps` would own `secret/apps/`, and with it every namespace's
            // `secret/apps/<ns>/`.
            (
                "kv: [{mount: secret, version: 2, pathPrefix: \"{namespace}/\"}, {mount: secret, version: 2, pathPrefix: \"apps/{namespace}/\"}]",
                "overlaps",
            ),
            // Namespace `orders-pg` would get connection `orders-pg`, given to `shop`.
            (
                "database: [{mount: database, connection: \"{namespace}\", profiles: [ro]}]\nnamespaces: {shop: {database: [{mount: database, connection: orders-pg, profiles: [ro]}]}}",
                "overlaps",
            ),
            (
                "namespaces: {shop: {database: [{mount: database, connection: \"*\", profiles: [ro]}]}}",
                "final",
            ),
            (
                "namespaces: {shop: {kv: [{mount: secret, version: 2, pathPrefix: \"\"}]}}\nkv: [{mount: secret, version: 2, pathPrefix: \"{namespace}/\"}]",
                "overlaps",
            ),
        ];
        for (yaml, needle) in refused {
            let err = tenancy(yaml).validate().expect_err(yaml);
            assert!(err.contains(needle), "{yaml}: {err}");
        }
        let fine = [
            "database: [{mount: database, connection: \"{namespace}_*\", profiles: [ro]}, {mount: database, connection: \"{namespace}\", profiles: [ro]}]",
            "kv: [{mount: secret, version: 2, pathPrefix: \"{namespace}/\"}, {mount: kv, version: 1, pathPrefix: \"teams/{namespace}/\"}]",
            "kv: [{mount: secret, version: 2, pathPrefix: \"{namespace}/\"}]\nnamespaces: {shop: {kv: [{mount: shared, version: 2, pathPrefix: reports/}]}, billing: {kv: [{mount: shared, version: 2, pathPrefix: reports/}]}}",
            "database: [{mount: database, connection: \"{namespace}_*\", profiles: [ro]}]\nnamespaces: {shop: {database: [{mount: database, connection: orders-pg, profiles: [ro]}]}}",
        ];
        for yaml in fine {
            tenancy(yaml)
                .validate()
                .unwrap_or_else(|e| panic!("{yaml}: {e}"));
        }
    }

    #[test]
    fn every_field_vault_reports_is_compared() {
        let role = KubernetesRole {
            mount: "kubernetes".into(),
            name: "palisade-shop.orders".into(),
            bound_service_account_names: BTreeSet::from(["orders".into()]),
            bound_service_account_namespaces: BTreeSet::from(["shop".into()]),
            token_policies: BTreeSet::from(["palisade-shop.orders".into()]),
            token_ttl: 3600,
            token_max_ttl: 3600,
            audience: "vault".into(),
        };
        let desired = role.body();
        let mut live = desired.clone();
        live.remove("alias_name_source");
        live.insert("policies".into(), json!(["palisade-shop.orders"]));
        live.insert("ttl".into(), json!(3600));
        live.insert("period".into(), json!(0));
        live.insert("some_new_field".into(), json!(""));
        assert!(
            differences(&desired, &live).is_empty(),
            "{:?}",
            differences(&desired, &live)
        );
        for (k, v) in [
            ("token_period", json!(86400)),
            ("token_bound_cidrs", json!(["10.0.0.0/8"])),
            (
                "bound_service_account_namespace_selector",
                json!("{\"matchLabels\":{}}"),
            ),
            ("token_no_default_policy", json!(false)),
            ("alias_name_source", json!("serviceaccount_name")),
            ("policies", json!(["palisade-shop.orders", "admin"])),
            ("some_new_field", json!("set")),
        ] {
            let mut edited = live.clone();
            edited.insert(k.into(), v);
            assert_eq!(differences(&desired, &edited), [k], "{k}");
        }
        let mut edited = live.clone();
        edited.insert(
            "bound_service_account_names".into(),
            json!(["orders", "intruder"]),
        );
        assert_eq!(
            differences(&desired, &edited),
            ["bound_service_account_names"]
        );
    }
}
