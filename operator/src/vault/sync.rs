//! What Vault holds for a binding, made to match: read before write, whole objects compared,
//! ownership checked before anything is overwritten or deleted; removal that takes access away
//! in the order that leaves no window; and the sweep that finds objects whose binding is gone.
//!
//! Everything here goes through [`VaultApi`], so ordering, partial failures, drift and sweeping
//! are unit-tested against the in-memory fake, and the same code runs against OpenBao.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::{VaultApi, VaultError};
use crate::translate::vault::{Marker, Naming, VaultDesired, differences};

/// Where a sync or removal looks: naming, the workloads' auth mount, the database mounts of the
/// tenancy, and whether hand edits are written back.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// Object names.
    pub naming: &'a Naming,
    /// Auth mount of workload login roles.
    pub auth_mount: &'a str,
    /// Database mounts bindings may use.
    pub database_mounts: &'a BTreeSet<String>,
    /// Write back hand edits.
    pub correct_drift: bool,
    /// Whether `Retain` is honoured (the sweep keeps what a policy marks so only then).
    pub allow_retain: bool,
}

/// What one sync changed in Vault.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Objects written because they were missing or different, as `kind name`.
    pub changed: Vec<String>,
    /// Of those, the ones that differed although neither the binding nor the configuration had
    /// changed: hand edits, written back.
    pub drift: Vec<String>,
    /// Hand edits left in place because drift correction is off.
    pub drift_left: Vec<String>,
    /// Objects removed because the binding no longer asks for them.
    pub deleted: Vec<String>,
}

fn policy_path(name: &str) -> String {
    format!("sys/policies/acl/{name}")
}

fn role_path(mount: &str, name: &str) -> String {
    format!("auth/{mount}/role/{name}")
}

/// A policy's text as Vault reports it.
async fn read_policy<V: VaultApi>(api: &V, name: &str) -> Result<Option<String>, VaultError> {
    Ok(api.read(&policy_path(name)).await?.map(|d| {
        d.get("policy")
            .or_else(|| d.get("rules"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }))
}

async fn read_map<V: VaultApi>(
    api: &V,
    path: &str,
) -> Result<Option<Map<String, Value>>, VaultError> {
    Ok(api.read(path).await?.map(|d| match d {
        Value::Object(m) => m,
        _ => Map::new(),
    }))
}

fn normalised_list(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Value::String(s) => s.split(',').map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn list_field(m: &Map<String, Value>, key: &str) -> BTreeSet<String> {
    m.get(key)
        .map(normalised_list)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Whether the login role `role` attaches exactly `policy`: such a role vouches that a policy
/// whose ownership line was edited away is still Palisade's (a hand edit, repaired as drift);
/// without one it is somebody else's.
async fn role_vouches<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    role: &str,
    policy: &str,
) -> Result<bool, VaultError> {
    let Some(role) = read_map(api, &role_path(scope.auth_mount, role)).await? else {
        return Ok(false);
    };
    Ok(list_field(&role, "token_policies") == BTreeSet::from([policy.to_owned()]))
}

/// Checks who a policy text says it belongs to against `want`: an error when it is not
/// Palisade's (and no login role vouches for it) or another binding's or cluster's.
fn ownership(name: &str, text: &str, want: &Marker, vouched: bool) -> Result<(), VaultError> {
    let Some(m) = Marker::parse(text) else {
        if vouched {
            return Ok(());
        }
        return Err(VaultError::NotOwned(format!(
            "policy {name} exists in Vault and was not written by Palisade; nothing was changed (rename or remove it)"
        )));
    };
    if !m.same_binding(want) {
        return Err(VaultError::NotOwned(format!(
            "policy {name} belongs to SecretBinding {}/{} of cluster {}; nothing was changed",
            m.namespace, m.name, m.cluster
        )));
    }
    Ok(())
}

/// Whether a login role is one Palisade wrote for binding `namespace/name`: it attaches policies,
/// all of them the binding's. A role attaching nothing is not (Palisade never writes one).
fn attaches_only_own(
    role: &Map<String, Value>,
    scope: &Scope<'_>,
    namespace: &str,
    name: &str,
) -> bool {
    let attached = list_field(role, "token_policies");
    !attached.is_empty()
        && attached
            .iter()
            .all(|p| scope.naming.is_policy_of(p, namespace, name))
}

/// Before a binding's objects are first written: a login role of the same name must be absent
/// or one Palisade wrote for this binding (attaching only its policies); a hand-made one is not
/// overwritten. Whether one exists.
async fn check_role_owner<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    desired: &VaultDesired,
) -> Result<bool, VaultError> {
    let path = role_path(scope.auth_mount, &desired.role.name);
    let Some(role) = read_map(api, &path).await? else {
        return Ok(false);
    };
    let m = &desired.policy.marker;
    if attaches_only_own(&role, scope, &m.namespace, &m.name) {
        Ok(true)
    } else {
        Err(VaultError::NotOwned(format!(
            "role {path} exists in Vault and attaches policies that are not this binding's; nothing was changed (rename or remove it)"
        )))
    }
}

/// How one object compares: whether it exists and whether it differs from what is wanted.
#[derive(Clone, Copy)]
struct Compared {
    existed: bool,
    differs: bool,
}

/// Whether to write one object, recording why in `out`. A difference while the desired state is
/// unchanged is drift: written back when correcting, otherwise only reported.
fn plan(what: String, c: Compared, changed: bool, scope: &Scope<'_>, out: &mut Synced) -> bool {
    if !c.differs {
        return false;
    }
    let drift = c.existed && !changed;
    if drift && !scope.correct_drift {
        out.drift_left.push(what);
        return false;
    }
    if drift {
        out.drift.push(what.clone());
    }
    tracing::info!(object = %what, drift, "writing to Vault");
    out.changed.push(what);
    true
}

/// Makes Vault hold `desired`: the policy first (it carries the ownership record; a narrowed
/// binding loses access there before anything else), then database roles, then the login
/// role. On a change, what the binding no longer has goes too: database roles with their
/// leases, the credentials of a role whose SQL changed, the tokens of ServiceAccounts no longer
/// listed, and the policies of earlier bindings of the same name with their tokens.
pub async fn sync<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    desired: &VaultDesired,
) -> Result<Synced, VaultError> {
    let mut out = Synced::default();
    let policy = &desired.policy;
    let live = read_policy(api, &policy.name).await?;
    let live_marker = live.as_deref().and_then(Marker::parse);
    let vouched = match &live {
        Some(_) if live_marker.is_none() => {
            role_vouches(api, scope, &desired.role.name, &policy.name).await?
        }
        _ => false,
    };
    if let Some(text) = &live {
        ownership(&policy.name, text, &policy.marker, vouched)?;
    }
    let fresh = live.is_none();
    // A login role left by an earlier binding of this name (recreation) makes a fresh policy a
    // change to stage like any other.
    let earlier_role = fresh && check_role_owner(api, scope, desired).await?;
    // Without its ownership line the digest is unknown: what differs is a hand edit.
    let changed = !vouched
        && live_marker
            .as_ref()
            .is_none_or(|m| m.digest != policy.marker.digest);
    // A change to existing objects is staged: the policy first records no digest, so a sync
    // interrupted halfway is finished as a change next time, not taken for drift. A brand-new
    // binding (no policy, no login role of its name) is not: it has nothing to finish, and
    // nothing stale to look for either (listing every policy and role per new binding would
    // cost O(n) each; what an abandoned cleanup left of an earlier binding is the sweep's).
    let staged = changed && (!fresh || earlier_role);
    let text = policy.hcl();
    let c = Compared {
        existed: !fresh,
        differs: live.as_deref() != Some(text.as_str()),
    };
    let wrote_policy = plan(
        format!("policy {}", policy.name),
        c,
        changed,
        scope,
        &mut out,
    );
    if wrote_policy {
        let first = if staged {
            let mut pending = policy.clone();
            "pending".clone_into(&mut pending.marker.digest);
            pending.hcl()
        } else {
            text.clone()
        };
        api.write(&policy_path(&policy.name), json!({"policy": first}))
            .await?;
    }
    sync_database_roles(api, scope, desired, fresh, changed, &mut out).await?;
    sync_login_role(api, scope, desired, fresh, changed, &mut out).await?;
    if staged {
        retire_stale(api, scope, desired, &mut out).await?;
    }
    if wrote_policy && staged {
        api.write(&policy_path(&policy.name), json!({"policy": text}))
            .await?;
    }
    Ok(out)
}

/// Reads the object at `path` (unless the binding is fresh: nothing of it exists) and compares
/// it whole with `body`: the fields that differ, and the comparison.
async fn compare<V: VaultApi>(
    api: &V,
    path: &str,
    body: &Map<String, Value>,
    fresh: bool,
) -> Result<(Option<Vec<String>>, Compared), VaultError> {
    let live = if fresh {
        None
    } else {
        read_map(api, path).await?
    };
    let diff = live.as_ref().map(|l| differences(body, l));
    let c = Compared {
        existed: live.is_some(),
        differs: diff.as_ref().is_none_or(|d| !d.is_empty()),
    };
    Ok((diff, c))
}

/// The database roles of a sync; a role whose SQL changed loses the credentials made with it.
async fn sync_database_roles<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    desired: &VaultDesired,
    fresh: bool,
    changed: bool,
    out: &mut Synced,
) -> Result<(), VaultError> {
    for role in &desired.database_roles {
        let (diff, c) = compare(api, &role.path(), &role.body(), fresh).await?;
        let what = described(format!("database role {}", role.path()), diff.as_deref());
        if plan(what, c, changed, scope, out) {
            let sql_changed = diff
                .as_ref()
                .is_some_and(|d| d.iter().any(|f| f.ends_with("_statements")));
            // Credentials made with other SQL must not outlive it: revoked before the write (so
            // a failed write is retried with them) and after it (for any issued in between).
            if sql_changed {
                revoke_leases(api, &role.mount, &role.name).await?;
            }
            api.write(&role.path(), role.request()).await?;
            if sql_changed {
                revoke_leases(api, &role.mount, &role.name).await?;
                out.deleted
                    .push(format!("leases of {} (its SQL changed)", role.path()));
            }
        }
    }
    Ok(())
}

/// The login role of a sync; ServiceAccounts it no longer lists lose their tokens.
async fn sync_login_role<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    desired: &VaultDesired,
    fresh: bool,
    changed: bool,
    out: &mut Synced,
) -> Result<(), VaultError> {
    let role = &desired.role;
    let path = role_path(&role.mount, &role.name);
    let (diff, c) = compare(api, &path, &role.body(), fresh).await?;
    if plan(
        described(format!("role {path}"), diff.as_deref()),
        c,
        changed,
        scope,
        out,
    ) {
        api.write(&path, role.request()).await?;
    }
    // On every change (not only the sync that rewrote the role, which may have failed after
    // the write): tokens of ServiceAccounts the binding no longer lists are revoked.
    if changed && !fresh {
        let m = TokenMatch {
            auth_mount: scope.auth_mount,
            role: &role.name,
            policies: &role.token_policies,
            keep: Some(&role.bound_service_account_names),
        };
        let n = revoke_tokens(api, &m).await?;
        if n > 0 {
            out.deleted
                .push(format!("{n} tokens of ServiceAccounts no longer listed"));
        }
    }
    Ok(())
}

/// On a change: removes the database roles the binding no longer lists (with their leases), and
/// the policies of earlier bindings of the same name (with their tokens).
async fn retire_stale<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    desired: &VaultDesired,
    out: &mut Synced,
) -> Result<(), VaultError> {
    let base = &desired.role.name;
    let wanted: BTreeSet<String> = desired
        .database_roles
        .iter()
        .map(crate::translate::vault::DatabaseRole::path)
        .collect();
    for (mount, name) in database_roles_of(api, scope, base).await? {
        let path = format!("{mount}/roles/{name}");
        if !wanted.contains(&path) {
            retire_database_role(api, &mount, &name).await?;
            out.deleted
                .push(format!("database role {path} and its leases"));
        }
    }
    let m = &desired.policy.marker;
    let earlier: BTreeSet<String> = incarnations(api, scope, &m.namespace, &m.name)
        .await?
        .into_iter()
        .filter(|p| *p != desired.policy.name)
        .collect();
    if !earlier.is_empty() {
        out.deleted
            .extend(remove_policies(api, scope, &earlier).await?);
    }
    Ok(())
}

/// The policies of every incarnation of binding `namespace/name` (any uid), by listing.
async fn incarnations<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    namespace: &str,
    name: &str,
) -> Result<Vec<String>, VaultError> {
    Ok(api
        .list("sys/policies/acl")
        .await?
        .into_iter()
        .filter(|p| scope.naming.is_policy_of(p, namespace, name))
        .collect())
}

/// `what`, with the fields that differ when some do.
fn described(what: String, diff: Option<&[String]>) -> String {
    match diff {
        Some(d) if !d.is_empty() => format!("{what} ({})", d.join(", ")),
        _ => what,
    }
}

/// The database roles of binding `base` on every database mount, found by listing (never from
/// the binding's status).
async fn database_roles_of<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    base: &str,
) -> Result<Vec<(String, String)>, VaultError> {
    let mut out = Vec::new();
    for mount in scope.database_mounts {
        for name in api.list(&format!("{mount}/roles")).await? {
            if Naming::is_database_role_of(base, &name) {
                out.push((mount.clone(), name));
            }
        }
    }
    Ok(out)
}

/// Revokes every lease issued under a database role (`sync=true`: the database users are
/// dropped before this returns), then deletes the role. In that order because Vault revokes a
/// credential with its role's statements: once the role is gone, revocation fails. Callers have
/// already taken away every policy that reads the role's credentials, so none is issued in
/// between.
async fn retire_database_role<V: VaultApi>(
    api: &V,
    mount: &str,
    name: &str,
) -> Result<(), VaultError> {
    revoke_leases(api, mount, name).await?;
    api.delete(&format!("{mount}/roles/{name}")).await?;
    Ok(())
}

/// Revokes every lease issued under database role `mount`/`name`, waiting until Vault has run
/// the revocation statements (`sync=true`). Vault treats the prefix as `<prefix>/`, so role
/// `<name>2`'s leases are not touched.
async fn revoke_leases<V: VaultApi>(api: &V, mount: &str, name: &str) -> Result<(), VaultError> {
    api.write(
        &format!("sys/leases/revoke-prefix/{mount}/creds/{name}?sync=true"),
        json!({}),
    )
    .await
    .map(|_| ())
}

/// Which tokens to revoke: issued through `auth_mount`'s login, and either carrying one of
/// `policies` (Vault reports them lower-cased) or logged in to `role` (in any case: Vault finds
/// roles case-insensitively and records the name as sent); when `keep` is set, the tokens of
/// those ServiceAccounts are kept.
struct TokenMatch<'a> {
    auth_mount: &'a str,
    role: &'a str,
    policies: &'a BTreeSet<String>,
    keep: Option<&'a BTreeSet<String>>,
}

impl TokenMatch<'_> {
    fn matches(&self, info: &Value) -> bool {
        let login = format!("auth/{}/login", self.auth_mount);
        let via_login = info
            .get("path")
            .and_then(Value::as_str)
            .is_some_and(|p| p.starts_with(&login));
        let held: BTreeSet<String> = info
            .get("policies")
            .map(normalised_list)
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.to_ascii_lowercase())
            .collect();
        let by_policy = self
            .policies
            .iter()
            .any(|p| held.contains(&p.to_ascii_lowercase()));
        let by_role = !self.role.is_empty()
            && info
                .pointer("/meta/role")
                .and_then(Value::as_str)
                .is_some_and(|r| r.eq_ignore_ascii_case(self.role));
        let sa_ok = self.keep.is_none_or(|s| {
            !info
                .pointer("/meta/service_account_name")
                .and_then(Value::as_str)
                .is_some_and(|n| s.contains(n))
        });
        via_login && (by_policy || by_role) && sa_ok
    }
}

/// Whether Vault's answer says the token behind an accessor is gone (expired, revoked or never
/// there): 400 "invalid accessor", 403 "bad token". Other refusals are real.
fn vanished(e: &VaultError) -> bool {
    match e {
        VaultError::Api(t) => t.contains(" 400 "),
        VaultError::Denied(t) => t.contains("bad token") || t.contains("invalid accessor"),
        _ => false,
    }
}

/// Revokes every token `m` matches. An accessor that vanished or expired while the list was
/// read (Vault answers 400 or 403 for it) is skipped, not fatal; Vault being unavailable is.
async fn revoke_tokens<V: VaultApi>(api: &V, m: &TokenMatch<'_>) -> Result<usize, VaultError> {
    let mut revoked = 0;
    for accessor in api.list("auth/token/accessors").await? {
        let info = match api
            .write("auth/token/lookup-accessor", json!({"accessor": accessor}))
            .await
        {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(e),
        };
        if m.matches(&info) {
            match api
                .write("auth/token/revoke-accessor", json!({"accessor": accessor}))
                .await
            {
                Ok(_) => revoked += 1,
                Err(e) if vanished(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(revoked)
}

/// Takes away everything binding `base` (a name this operator computed) has in Vault, every
/// incarnation, in the order that never widens: the login role (no new logins), its policies
/// (existing tokens lose access at once, and nothing can read new credentials), the leases of
/// the database roles and the roles themselves, then the tokens. Every step is tried even when
/// an earlier one failed; the first error is returned after all were tried. A login role or
/// policy that is not Palisade's, or another binding's, is left alone and reported.
pub async fn remove<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    base: &str,
) -> Result<Vec<String>, VaultError> {
    let mut done = Vec::new();
    let mut first_error = None;
    let mut keep = |r: Result<(), VaultError>| {
        if let Err(e) = r
            && first_error.is_none()
        {
            first_error = Some(e);
        }
    };
    let Some((ns, name)) = scope.naming.binding_of(base) else {
        return Ok(done);
    };
    let role = role_path(scope.auth_mount, base);
    let mut policies = match incarnations(api, scope, &ns, &name).await {
        Ok(p) => p.into_iter().collect::<BTreeSet<String>>(),
        Err(e) => {
            keep(Err(e));
            BTreeSet::new()
        }
    };
    let mut vouched = BTreeSet::new();
    match read_map(api, &role).await {
        Ok(Some(r)) => {
            let attached = list_field(&r, "token_policies");
            if attaches_only_own(&r, scope, &ns, &name) {
                let r = api.delete(&role).await;
                if r.is_ok() {
                    done.push(format!("role {role}"));
                }
                keep(r);
                policies.extend(attached.iter().cloned());
                vouched = attached;
            } else {
                // Not Palisade's: nothing under this name is touched, its tokens and
                // database roles included.
                return Err(VaultError::NotOwned(format!(
                    "role {role} attaches policies that are not this binding's; nothing was removed"
                )));
            }
        }
        Ok(None) => {}
        Err(e) => keep(Err(e)),
    }
    let removed_policies =
        remove_own_policies(api, scope, &policies, &vouched, &mut done, &mut keep).await;
    match database_roles_of(api, scope, base).await {
        Ok(roles) => {
            for (mount, name) in roles {
                let r = retire_database_role(api, &mount, &name).await;
                if r.is_ok() {
                    done.push(format!("database role {mount}/roles/{name} and its leases"));
                }
                keep(r);
            }
        }
        Err(e) => keep(Err(e)),
    }
    let m = TokenMatch {
        auth_mount: scope.auth_mount,
        role: base,
        policies: &removed_policies,
        keep: None,
    };
    match revoke_tokens(api, &m).await {
        Ok(0) => {}
        Ok(n) => done.push(format!("{n} tokens of role {base}")),
        Err(e) => keep(Err(e)),
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Deletes those of `policies` that are this binding's (its ownership record says so, or, without
/// one, its login role attached it); the ones gone.
async fn remove_own_policies<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    policies: &BTreeSet<String>,
    vouched: &BTreeSet<String>,
    done: &mut Vec<String>,
    keep: &mut impl FnMut(Result<(), VaultError>),
) -> BTreeSet<String> {
    let cluster = scope.naming.marker_cluster();
    let mut removed_policies = BTreeSet::new();
    for p in policies {
        let Some((m_ns, m_name, _)) = scope.naming.policy_of(p) else {
            continue;
        };
        match read_policy(api, p).await {
            Ok(Some(text)) => {
                let ours = Marker::parse(&text).map_or(vouched.contains(p), |m| {
                    (m.cluster.as_str(), m.namespace.as_str(), m.name.as_str())
                        == (cluster.as_str(), m_ns.as_str(), m_name.as_str())
                });
                if ours {
                    let r = api.delete(&policy_path(p)).await;
                    if r.is_ok() {
                        done.push(format!("policy {p}"));
                        removed_policies.insert(p.clone());
                    }
                    keep(r);
                } else {
                    keep(Err(VaultError::NotOwned(format!(
                        "policy {p} was not written for this binding; left in place"
                    ))));
                }
            }
            Ok(None) => {
                removed_policies.insert(p.clone());
            }
            Err(e) => keep(Err(e)),
        }
    }
    removed_policies
}

/// One binding found in Vault by the sweep.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The uids its policies record.
    pub uids: BTreeSet<String>,
    /// Whether a policy records an allowed `Retain`.
    pub retain: bool,
}

/// The entry of binding `ns/name` in an inventory, made empty when new.
fn found_entry(
    found: &mut std::collections::BTreeMap<(String, String), Found>,
    ns: String,
    name: String,
) -> &mut Found {
    found
        .entry((ns.clone(), name.clone()))
        .or_insert_with(|| Found {
            namespace: ns,
            name,
            uids: BTreeSet::new(),
            retain: false,
        })
}

/// Every binding this operator has objects for in Vault: from policy names (with the uids and
/// `Retain` their ownership records state; policies without one, or another's, are skipped),
/// login roles and database roles.
pub async fn inventory<V: VaultApi>(api: &V, scope: &Scope<'_>) -> Result<Vec<Found>, VaultError> {
    let mut found: std::collections::BTreeMap<(String, String), Found> =
        std::collections::BTreeMap::new();
    for p in api.list("sys/policies/acl").await? {
        let Some((ns, n, _)) = scope.naming.policy_of(&p) else {
            continue;
        };
        let Some(m) = read_policy(api, &p)
            .await?
            .as_deref()
            .and_then(Marker::parse)
        else {
            continue;
        };
        if (m.namespace.as_str(), m.name.as_str()) != (ns.as_str(), n.as_str()) {
            continue;
        }
        let f = found_entry(&mut found, ns, n);
        f.uids.insert(m.uid);
        f.retain |= m.retain;
    }
    let mut bases: Vec<String> = api.list(&format!("auth/{}/role", scope.auth_mount)).await?;
    for mount in scope.database_mounts {
        for role in api.list(&format!("{mount}/roles")).await? {
            if let Some((base, _)) = role.rsplit_once('.') {
                bases.push(base.to_owned());
            }
        }
    }
    for b in bases {
        if let Some((ns, n)) = scope.naming.binding_of(&b) {
            found_entry(&mut found, ns, n);
        }
    }
    Ok(found.into_values().collect())
}

/// Removes the Vault objects of every binding in `found` that `live` (the current bindings'
/// uids by namespace and name) does not have — except an allowed `Retain` — and the policies of
/// earlier incarnations of the ones it has; returns what it removed, per binding.
pub async fn sweep<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    found: &[Found],
    live: &std::collections::BTreeMap<(String, String), String>,
) -> Vec<(String, Result<Vec<String>, VaultError>)> {
    let mut out = Vec::new();
    for f in found {
        let base = scope.naming.base(&f.namespace, &f.name);
        match live.get(&(f.namespace.clone(), f.name.clone())) {
            None if f.retain && scope.allow_retain => {}
            None => out.push((base.clone(), remove(api, scope, &base).await)),
            Some(uid) => {
                let current = crate::translate::vault::uid_tag(uid);
                let earlier: BTreeSet<String> = f
                    .uids
                    .iter()
                    .filter(|u| crate::translate::vault::uid_tag(u) != current)
                    .map(|u| scope.naming.policy(&f.namespace, &f.name, u))
                    .collect();
                if !earlier.is_empty() {
                    out.push((base.clone(), remove_policies(api, scope, &earlier).await));
                }
            }
        }
    }
    out
}

/// Deletes `policies` (earlier incarnations of a live binding) and revokes their tokens.
async fn remove_policies<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    policies: &BTreeSet<String>,
) -> Result<Vec<String>, VaultError> {
    let mut done = Vec::new();
    for p in policies {
        api.delete(&policy_path(p)).await?;
        done.push(format!("policy {p}"));
    }
    let m = TokenMatch {
        auth_mount: scope.auth_mount,
        role: "",
        policies,
        keep: None,
    };
    let n = revoke_tokens(api, &m).await?;
    done.push(format!("{n} tokens"));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::translate::vault::{Grants, Tenancy, VaultDefaults, translate};
    use crate::vault::fake::FakeVault;
    use palisade_api::SecretBinding;

    const TENANCY: &str = "kv: [{mount: secret, version: 2, pathPrefix: \"{namespace}/\"}]\ndatabase: [{mount: database, connection: \"{namespace}_*\", profiles: [ro, rw]}]\nprofiles:\n  ro: {creationStatements: [\"CREATE ROLE ro\"]}\n  rw: {creationStatements: [\"CREATE ROLE rw\"], revocationStatements: [\"DROP ROLE x\"]}\n";

    fn binding(uid: &str, profile: &str, sas: &str) -> SecretBinding {
        serde_yaml::from_str(&format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: SecretBinding\nmetadata: {{name: orders, namespace: shop, uid: {uid}}}\nspec:\n  serviceAccountNames: [{sas}]\n  kv: [{{mount: secret, path: shop/orders/*}}]\n  database: [{{mount: database, connection: shop_pg, profile: {profile}, defaultTTL: 1h, maxTTL: 2h}}]\n"
        ))
        .expect("binding")
    }

    fn translated(sb: &SecretBinding, tenancy: &str) -> VaultDesired {
        let tenancy: Tenancy = serde_yaml::from_str(tenancy).expect("tenancy");
        let naming = Naming::default();
        let grants = Grants {
            tenancy: &tenancy,
            workloads: &VaultDefaults::default(),
            naming: &naming,
            allow_retain: false,
        };
        translate(sb, &grants).expect("granted")
    }

    fn desired(uid: &str, profile: &str, tenancy: &str) -> VaultDesired {
        translated(&binding(uid, profile, "orders"), tenancy)
    }

    fn with_scope<T>(correct_drift: bool, f: impl FnOnce(&Scope<'_>) -> T) -> T {
        let naming = Naming::default();
        let mounts = BTreeSet::from(["database".to_owned()]);
        f(&Scope {
            naming: &naming,
            auth_mount: "kubernetes",
            database_mounts: &mounts,
            correct_drift,
            allow_retain: true,
        })
    }

    async fn run_sync(
        v: &FakeVault,
        d: &VaultDesired,
        correct: bool,
    ) -> Result<Synced, VaultError> {
        let naming = Naming::default();
        let mounts = BTreeSet::from(["database".to_owned()]);
        let s = Scope {
            naming: &naming,
            auth_mount: "kubernetes",
            database_mounts: &mounts,
            correct_drift: correct,
            allow_retain: true,
        };
        sync(v, &s, d).await
    }

    async fn run_remove(v: &FakeVault, base: &str) -> Result<Vec<String>, VaultError> {
        let naming = Naming::default();
        let mounts = BTreeSet::from(["database".to_owned()]);
        let s = Scope {
            naming: &naming,
            auth_mount: "kubernetes",
            database_mounts: &mounts,
            correct_drift: true,
            allow_retain: true,
        };
        remove(v, &s, base).await
    }

    fn writes(calls: &[String]) -> Vec<String> {
        calls
            .iter()
            .filter(|c| !c.starts_with("GET") && !c.starts_with("LIST"))
            .cloned()
            .collect()
    }

    /// Stands in for what Vault reports on a read: the fields a write stores, typed.
    fn as_vault_reports(v: &FakeVault, d: &VaultDesired) {
        v.put(
            &format!("auth/kubernetes/role/{}", d.role.name),
            Value::Object(d.role.body()),
        );
        for r in &d.database_roles {
            v.put(&r.path(), Value::Object(r.body()));
        }
    }

    const BASE: &str = "palisade-shop.orders";
    const POLICY_A: &str = "sys/policies/acl/palisade-shop.orders.a1000000";
    const ROLE: &str = "auth/kubernetes/role/palisade-shop.orders";
    const DB_ROLE: &str = "database/roles/palisade-shop.orders.shop_pg";

    #[tokio::test]
    async fn a_new_binding_takes_three_writes_policy_first_and_a_resync_none() {
        let v = FakeVault::default();
        let d = desired("a1", "ro", TENANCY);
        let out = run_sync(&v, &d, true).await.expect("sync");
        assert_eq!(
            writes(&v.take_calls()),
            [
                format!("PUT {POLICY_A}"),
                format!("PUT {DB_ROLE}"),
                format!("PUT {ROLE}")
            ]
        );
        assert!(out.drift.is_empty());
        as_vault_reports(&v, &d);
        let out = run_sync(&v, &d, true).await.expect("resync");
        assert_eq!(writes(&v.take_calls()), Vec::<String>::new(), "{out:?}");
    }

    #[tokio::test]
    async fn a_hand_edit_of_any_field_is_drift_and_left_only_when_correction_is_off() {
        let v = FakeVault::default();
        let d = desired("a1", "ro", TENANCY);
        run_sync(&v, &d, true).await.expect("sync");
        as_vault_reports(&v, &d);
        for (field, value) in [
            ("token_period", json!(86400)),
            ("bound_service_account_namespace_selector", json!("{}")),
            ("token_no_default_policy", json!(false)),
        ] {
            let mut role = d.role.body();
            role.insert(field.into(), value);
            v.put(ROLE, Value::Object(role.clone()));
            v.take_calls();
            let out = run_sync(&v, &d, false).await.expect("sync");
            assert_eq!(
                out.drift_left,
                [format!("role {ROLE} ({field})")],
                "{field}"
            );
            assert!(writes(&v.take_calls()).is_empty(), "{field}: left in place");
            let out = run_sync(&v, &d, true).await.expect("sync");
            assert_eq!(out.drift, [format!("role {ROLE} ({field})")], "{field}");
            assert_eq!(writes(&v.take_calls()), [format!("PUT {ROLE}")]);
            as_vault_reports(&v, &d);
        }
        let mut db = d.database_roles[0].body();
        db.insert(
            "rollback_statements".into(),
            json!(["ALTER ROLE x SUPERUSER"]),
        );
        v.put(DB_ROLE, Value::Object(db));
        let out = run_sync(&v, &d, true).await.expect("sync");
        assert_eq!(
            out.drift,
            [format!("database role {DB_ROLE} (rollback_statements)")]
        );
        // A policy whose ownership line was edited away is still this binding's (its login
        // role attaches only it): repaired as drift, not refused.
        v.put(
            POLICY_A,
            json!({"policy": "path \"secret/data/*\" { capabilities = [\"read\"] }"}),
        );
        as_vault_reports(&v, &d);
        let out = run_sync(&v, &d, true).await.expect("sync");
        assert_eq!(out.drift, [format!("policy {}", d.policy.name)]);
    }

    #[tokio::test]
    async fn a_change_is_applied_without_drift_correction_and_an_interrupted_one_is_finished() {
        let v = FakeVault::default();
        run_sync(&v, &desired("a1", "rw", TENANCY), true)
            .await
            .expect("sync");
        as_vault_reports(&v, &desired("a1", "rw", TENANCY));
        v.put(
            "lease/database/creds/palisade-shop.orders.shop_pg/l1",
            json!({}),
        );
        // The platform team narrows the profile: no longer drift, a change.
        let narrowed = TENANCY.replace("CREATE ROLE rw", "CREATE ROLE rw NOINHERIT");
        let d = desired("a1", "rw", &narrowed);
        v.take_calls();
        // The login role write fails halfway: the policy says "pending", not the new digest.
        v.fail(&format!("PUT {ROLE}"));
        let d2 = translated(&binding("a1", "rw", "orders, batch"), &narrowed);
        run_sync(&v, &d2, false).await.expect_err("interrupted");
        let text = v.get(POLICY_A).expect("policy")["policy"].to_string();
        assert!(text.contains("desired=pending"), "{text}");
        assert!(
            v.get("lease/database/creds/palisade-shop.orders.shop_pg/l1")
                .is_none(),
            "credentials made with the old SQL are revoked"
        );
        let v2 = FakeVault::default();
        run_sync(&v2, &desired("a1", "rw", TENANCY), true)
            .await
            .expect("sync");
        as_vault_reports(&v2, &desired("a1", "rw", TENANCY));
        v2.take_calls();
        let out = run_sync(&v2, &d, false).await.expect("sync");
        assert!(out.drift_left.is_empty(), "{out:?}");
        let w = writes(&v2.take_calls());
        assert!(w.contains(&format!("PUT {DB_ROLE}")), "{w:?}");
        assert_eq!(
            w.last(),
            Some(&format!("PUT {POLICY_A}")),
            "the digest is written last"
        );
    }

    #[tokio::test]
    async fn objects_palisade_did_not_write_are_never_overwritten_or_deleted() {
        for text in [
            "path \"*\" { capabilities = [\"sudo\"] }",
            "# palisade-owner cluster=west namespace=shop name=orders uid=x desired=y\n",
        ] {
            let v = FakeVault::default();
            v.put(POLICY_A, json!({"policy": text}));
            let err = run_sync(&v, &desired("a1", "ro", TENANCY), true)
                .await
                .expect_err("not owned");
            assert!(matches!(err, VaultError::NotOwned(_)), "{err}");
            assert!(writes(&v.take_calls()).is_empty());
            let err = run_remove(&v, BASE).await.expect_err("not owned");
            assert!(matches!(err, VaultError::NotOwned(_)), "{err}");
            assert!(v.get(POLICY_A).is_some(), "left in place");
        }
        // A hand-made login role attaching another policy is neither overwritten nor deleted.
        let v = FakeVault::default();
        v.put(ROLE, json!({"token_policies": ["admin"]}));
        let err = run_sync(&v, &desired("a1", "ro", TENANCY), true)
            .await
            .expect_err("not owned");
        assert!(matches!(err, VaultError::NotOwned(_)), "{err}");
        assert!(writes(&v.take_calls()).is_empty());
        v.put(DB_ROLE, json!({"db_name": "shop_pg"}));
        v.put(
            "token/t1",
            json!({"meta": {"role": BASE}, "path": "auth/kubernetes/login", "policies": ["admin"]}),
        );
        run_remove(&v, BASE).await.expect_err("not owned");
        assert_eq!(v.get(ROLE), Some(json!({"token_policies": ["admin"]})));
        assert!(
            v.get(DB_ROLE).is_some() && v.get("token/t1").is_some(),
            "nothing under its name is touched"
        );
        // Neither is a role that attaches no policy at all.
        v.put(ROLE, json!({"token_policies": []}));
        run_remove(&v, BASE).await.expect_err("not owned");
        assert!(v.get(ROLE).is_some());
        // Nor overwritten by a new binding of that name.
        v.take_calls();
        let err = run_sync(&v, &desired("a1", "ro", TENANCY), true)
            .await
            .expect_err("not owned");
        assert!(matches!(err, VaultError::NotOwned(_)), "{err}");
        assert!(writes(&v.take_calls()).is_empty());
        assert_eq!(v.get(ROLE), Some(json!({"token_policies": []})));
    }

    fn with_tokens_and_leases(v: &FakeVault, policy: &str) {
        let login = "auth/kubernetes/login";
        v.put("token/a1", json!({"meta": {"role": BASE, "service_account_name": "orders"}, "path": login, "policies": [policy]}));
        // Logged in with the role name in upper case: Vault records it as sent.
        v.put("token/a4", json!({"meta": {"role": BASE.to_ascii_uppercase(), "service_account_name": "orders"}, "path": login, "policies": [policy]}));
        v.put("token/a2", json!({"meta": {"role": "palisade-shop.other"}, "path": login, "policies": ["palisade-shop.other.b2000000"]}));
        v.put(
            "token/a3",
            json!({"meta": {"role": BASE}, "path": "auth/other/login", "policies": [policy]}),
        );
        v.put(
            "lease/database/creds/palisade-shop.orders.shop_pg/l1",
            json!({}),
        );
        v.put(
            "lease/database/creds/palisade-shop.orders.x.shop_pg/l2",
            json!({}),
        );
    }

    #[tokio::test]
    async fn removal_stops_logins_and_access_before_revoking_and_revokes_only_its_own() {
        let v = FakeVault::default();
        let d = desired("a1", "ro", TENANCY);
        run_sync(&v, &d, true).await.expect("sync");
        v.put("database/roles/palisade-shop.orders.x.shop_pg", json!({}));
        with_tokens_and_leases(&v, &d.policy.name);
        // An accessor that vanished meanwhile (Vault answers 400) does not stop the rest.
        v.put("token/a0", json!(null));
        v.take_calls();
        run_remove(&v, BASE).await.expect("removed");
        let w = writes(&v.take_calls());
        let at = |c: &str| {
            w.iter()
                .position(|x| x.starts_with(c))
                .unwrap_or(usize::MAX)
        };
        assert!(
            at(&format!("DELETE {ROLE}")) < at("DELETE sys/policies/acl/"),
            "{w:?}"
        );
        assert!(
            at("DELETE sys/policies/acl/") < at("PUT sys/leases/revoke-prefix/"),
            "{w:?}"
        );
        assert!(
            at("PUT sys/leases/revoke-prefix/") < at(&format!("DELETE {DB_ROLE}")),
            "{w:?}"
        );
        assert!(
            at(&format!("DELETE {DB_ROLE}")) < at("PUT auth/token/revoke-accessor"),
            "{w:?}"
        );
        assert_eq!(
            v.paths(),
            [
                "database/roles/palisade-shop.orders.x.shop_pg",
                "lease/database/creds/palisade-shop.orders.x.shop_pg/l2",
                "token/a0",
                "token/a2",
                "token/a3",
            ],
            "only binding orders's objects, leases and tokens are gone"
        );
    }

    #[tokio::test]
    async fn a_failing_step_does_not_stop_the_others() {
        let v = FakeVault::default();
        let d = desired("a1", "ro", TENANCY);
        run_sync(&v, &d, true).await.expect("sync");
        with_tokens_and_leases(&v, &d.policy.name);
        v.fail("DELETE sys/policies/acl/");
        let err = run_remove(&v, BASE).await.expect_err("reported");
        assert!(matches!(err, VaultError::Unavailable(_)));
        let left = v.paths();
        assert!(!left.contains(&ROLE.to_owned()));
        assert!(!left.contains(&DB_ROLE.to_owned()));
        assert!(!left.contains(&"token/a1".to_owned()));
    }

    #[tokio::test]
    async fn a_binding_recreated_under_the_same_name_never_revives_earlier_tokens() {
        let v = FakeVault::default();
        let old = desired("a1", "ro", TENANCY);
        run_sync(&v, &old, true).await.expect("sync");
        with_tokens_and_leases(&v, &old.policy.name);
        let new = desired("b2", "ro", TENANCY);
        assert_ne!(
            old.policy.name, new.policy.name,
            "each incarnation has its own policy"
        );
        assert!(!new.role.token_policies.contains(&old.policy.name));
        let out = run_sync(&v, &new, true).await.expect("sync");
        assert!(!out.deleted.is_empty(), "{out:?}");
        assert!(v.get(POLICY_A).is_none(), "the earlier policy is gone");
        assert!(
            v.get("token/a1").is_none(),
            "the earlier binding's tokens are revoked"
        );
    }

    #[tokio::test]
    async fn service_accounts_taken_off_a_binding_lose_their_tokens() {
        let v = FakeVault::default();
        let both = translated(&binding("a1", "ro", "orders, batch"), TENANCY);
        run_sync(&v, &both, true).await.expect("sync");
        as_vault_reports(&v, &both);
        let login = "auth/kubernetes/login";
        let p = &both.policy.name;
        v.put("token/t1", json!({"meta": {"role": BASE, "service_account_name": "orders"}, "path": login, "policies": [p]}));
        v.put("token/t2", json!({"meta": {"role": BASE, "service_account_name": "batch"}, "path": login, "policies": [p]}));
        let one = translated(&binding("a1", "ro", "orders"), TENANCY);
        run_sync(&v, &one, true).await.expect("sync");
        assert!(v.get("token/t2").is_none(), "batch is no longer listed");
        assert!(v.get("token/t1").is_some(), "orders still is");
    }

    #[tokio::test]
    async fn the_sweep_removes_only_objects_whose_binding_is_gone() {
        let v = FakeVault::default();
        run_sync(&v, &desired("a1", "ro", TENANCY), true)
            .await
            .expect("sync");
        v.put(
            "auth/kubernetes/role/palisade-gone.app",
            json!({"token_policies": ["palisade-gone.app.e5000000"]}),
        );
        v.put("database/roles/palisade-gone.app.gone_pg", json!({}));
        v.put(
            "sys/policies/acl/palisade-kept.app.c3000000",
            json!({"policy": "# palisade-owner cluster=- namespace=kept name=app uid=c3 desired=x retain=true\n"}),
        );
        v.put(
            "sys/policies/acl/palisade-hand.made.d4000000",
            json!({"policy": "path \"x\" {}"}),
        );
        v.put("sys/policies/acl/admin", json!({"policy": "path \"*\" {}"}));
        let live = BTreeMap::from([(("shop".to_owned(), "orders".to_owned()), "a1".to_owned())]);
        let (found, swept) = with_scope(true, |s| {
            futures::executor::block_on(async {
                let found = inventory(&v, s).await.expect("inventory");
                let swept = sweep(&v, s, &found, &live).await;
                (found, swept)
            })
        });
        let names: Vec<(&str, &str)> = found
            .iter()
            .map(|f| (f.namespace.as_str(), f.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [("gone", "app"), ("kept", "app"), ("shop", "orders")]
        );
        assert_eq!(swept.len(), 1, "{swept:?}");
        assert_eq!(swept[0].0, "palisade-gone.app");
        assert!(v.get("auth/kubernetes/role/palisade-gone.app").is_none());
        assert!(v.get("database/roles/palisade-gone.app.gone_pg").is_none());
        assert!(v.get(ROLE).is_some(), "a live binding keeps its role");
        assert!(
            v.get("sys/policies/acl/palisade-kept.app.c3000000")
                .is_some(),
            "Retain allowed"
        );
        assert!(
            v.get("sys/policies/acl/palisade-hand.made.d4000000")
                .is_some(),
            "not Palisade's"
        );
        // The binding recreated with another uid: only the earlier incarnation's policy goes.
        let live = BTreeMap::from([(("shop".to_owned(), "orders".to_owned()), "b2".to_owned())]);
        let swept = with_scope(true, |s| {
            futures::executor::block_on(async {
                let found = inventory(&v, s).await.expect("inventory");
                sweep(&v, s, &found, &live).await
            })
        });
        assert_eq!(swept.len(), 1, "{swept:?}");
        assert!(v.get(POLICY_A).is_none());
        assert!(v.get(ROLE).is_some(), "the live binding's login role stays");
    }

    #[tokio::test]
    async fn a_binding_whose_name_extends_another_keeps_everything_when_the_other_goes() {
        let v = FakeVault::default();
        let short = desired("a1", "ro", TENANCY);
        let long: SecretBinding = serde_yaml::from_str(
            "apiVersion: palisade.dev/v1alpha1\nkind: SecretBinding\nmetadata: {name: orders.a1000000, namespace: shop, uid: b2}\nspec:\n  serviceAccountNames: [orders]\n  database: [{mount: database, connection: shop_pg, profile: ro, defaultTTL: 1h, maxTTL: 2h}]\n",
        )
        .expect("binding");
        let long = translated(&long, TENANCY);
        // Binding `orders.a1000000`'s login role has the name of binding `orders`'s policy.
        assert_eq!(long.role.name, short.policy.name);
        run_sync(&v, &short, true).await.expect("sync");
        run_sync(&v, &long, true).await.expect("sync");
        as_vault_reports(&v, &long);
        let login = "auth/kubernetes/login";
        v.put("token/l1", json!({"meta": {"role": long.role.name}, "path": login, "policies": [long.policy.name]}));
        v.put(
            &format!(
                "lease/{}/l1",
                long.database_roles[0].path().replace("/roles/", "/creds/")
            ),
            json!({}),
        );
        let kept = |v: &FakeVault| -> Vec<String> {
            v.paths()
                .into_iter()
                .filter(|p| p.contains("orders.a1000000") || p == "token/l1")
                .collect()
        };
        let before = kept(&v);
        run_remove(&v, BASE).await.expect("removed");
        let live = BTreeMap::from([(
            ("shop".to_owned(), "orders.a1000000".to_owned()),
            "b2".to_owned(),
        )]);
        let swept = with_scope(true, |s| {
            futures::executor::block_on(async {
                let found = inventory(&v, s).await.expect("inventory");
                sweep(&v, s, &found, &live).await
            })
        });
        assert!(
            swept
                .iter()
                .all(|(b, _)| b != "palisade-shop.orders.a1000000"),
            "{swept:?}"
        );
        let after = kept(&v);
        assert!(
            before.iter().all(|p| after.contains(p)
                || p == &short
                    .policy
                    .name
                    .replace("palisade", "sys/policies/acl/palisade")),
            "{before:?} -> {after:?}"
        );
        assert!(
            v.get(&format!("sys/policies/acl/{}", long.policy.name))
                .is_some()
        );
        assert!(
            v.get(&format!("auth/kubernetes/role/{}", long.role.name))
                .is_some()
        );
        assert!(v.get("token/l1").is_some());
    }

    #[tokio::test]
    async fn a_recreated_binding_is_staged_like_any_change() {
        let v = FakeVault::default();
        let old = desired("a1", "ro", TENANCY);
        run_sync(&v, &old, true).await.expect("sync");
        as_vault_reports(&v, &old);
        let new = desired("b2", "ro", TENANCY);
        v.fail(&format!("PUT {ROLE}"));
        run_sync(&v, &new, false).await.expect_err("interrupted");
        let p = format!("sys/policies/acl/{}", new.policy.name);
        let text = v.get(&p).expect("policy")["policy"].to_string();
        assert!(
            text.contains("desired=pending"),
            "an interrupted recreation is not taken as done"
        );
    }
}
