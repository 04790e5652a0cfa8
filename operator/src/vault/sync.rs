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

/// Whether the login role at `auth/<mount>/role/<base>` is one Palisade wrote for the policy
/// `base`: it attaches that policy only. A policy whose ownership line was edited away still
/// belongs to Palisade when such a role exists (a hand edit, repaired as drift); without one it
/// is somebody else's.
async fn role_vouches<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    base: &str,
) -> Result<bool, VaultError> {
    let Some(role) = read_map(api, &role_path(scope.auth_mount, base)).await? else {
        return Ok(false);
    };
    Ok(role.get("token_policies").map(normalised_list) == Some(vec![base.to_owned()]))
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

/// Who a policy text says it belongs to, checked against `want`: `Ok(None)` when it is
/// `want`'s binding, `Ok(Some(old))` when it is an earlier binding of the same name (whose
/// access must go first), an error when it is not Palisade's or another binding's.
fn ownership(
    name: &str,
    text: &str,
    want: &Marker,
    vouched: bool,
) -> Result<Option<Marker>, VaultError> {
    let Some(m) = Marker::parse(text) else {
        if vouched {
            return Ok(None);
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
    Ok((!m.uid.is_empty() && !want.uid.is_empty() && m.uid != want.uid).then_some(m))
}

/// Whether to write one object, recording why in `out`. A difference while the desired state is
/// unchanged is drift: written back when correcting, otherwise only reported.
/// How one object compares: whether it exists and whether it differs from what is wanted.
#[derive(Clone, Copy)]
struct Compared {
    existed: bool,
    differs: bool,
}

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

/// Makes Vault hold `desired`: the policy first (it carries the ownership marker; a narrowed
/// binding loses access there before anything else), then database roles, then the login
/// role; database roles the binding no longer lists are removed with their leases.
pub async fn sync<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    desired: &VaultDesired,
) -> Result<Synced, VaultError> {
    let mut out = Synced::default();
    let policy = &desired.policy;
    let mut live = read_policy(api, &policy.name).await?;
    let vouched = match &live {
        Some(text) if Marker::parse(text).is_none() => {
            role_vouches(api, scope, &policy.name).await?
        }
        _ => false,
    };
    if let Some(text) = &live
        && let Some(old) = ownership(&policy.name, text, &policy.marker, vouched)?
    {
        // The same name, an earlier binding: its tokens and leases must not carry over.
        let removed = remove(api, scope, &policy.name).await?;
        tracing::info!(policy = %policy.name, old_uid = %old.uid, ?removed, "removed an earlier binding's access");
        out.deleted.extend(removed);
        live = None;
    }
    let fresh = live.is_none();
    // Without its ownership line the digest is unknown: what differs is a hand edit.
    let changed = !vouched
        && live
            .as_deref()
            .and_then(Marker::parse)
            .is_none_or(|m| m.digest != policy.marker.digest);
    let text = policy.hcl();
    let differs = live.as_deref() != Some(text.as_str());
    let c = Compared {
        existed: !fresh,
        differs,
    };
    if plan(
        format!("policy {}", policy.name),
        c,
        changed,
        scope,
        &mut out,
    ) {
        api.write(&policy_path(&policy.name), json!({"policy": text}))
            .await?;
    }
    for role in &desired.database_roles {
        let body = role.body();
        let live = if fresh {
            None
        } else {
            read_map(api, &role.path()).await?
        };
        let diff = live.as_ref().map(|l| differences(&body, l));
        let differs = diff.as_ref().is_none_or(|d| !d.is_empty());
        let what = described(format!("database role {}", role.path()), diff.as_deref());
        let c = Compared {
            existed: live.is_some(),
            differs,
        };
        if plan(what, c, changed, scope, &mut out) {
            api.write(&role.path(), role.request()).await?;
        }
    }
    let role = &desired.role;
    let body = role.body();
    let path = role_path(&role.mount, &role.name);
    let live = if fresh {
        None
    } else {
        read_map(api, &path).await?
    };
    let diff = live.as_ref().map(|l| differences(&body, l));
    let differs = diff.as_ref().is_none_or(|d| !d.is_empty());
    let c = Compared {
        existed: live.is_some(),
        differs,
    };
    if plan(
        described(format!("role {path}"), diff.as_deref()),
        c,
        changed,
        scope,
        &mut out,
    ) {
        api.write(&path, role.request()).await?;
    }
    if changed {
        let wanted: BTreeSet<String> = desired
            .database_roles
            .iter()
            .map(crate::translate::vault::DatabaseRole::path)
            .collect();
        for (mount, name) in database_roles_of(api, scope, &policy.name).await? {
            let path = format!("{mount}/roles/{name}");
            if !wanted.contains(&path) {
                retire_database_role(api, &mount, &name).await?;
                out.deleted
                    .push(format!("database role {path} and its leases"));
            }
        }
    }
    Ok(out)
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
    api.write(
        &format!("sys/leases/revoke-prefix/{mount}/creds/{name}?sync=true"),
        json!({}),
    )
    .await?;
    api.delete(&format!("{mount}/roles/{name}")).await?;
    Ok(())
}

/// Revokes every token issued by logging in to login role `role` on `auth_mount`.
async fn revoke_tokens<V: VaultApi>(
    api: &V,
    auth_mount: &str,
    role: &str,
) -> Result<usize, VaultError> {
    let login = format!("auth/{auth_mount}/login");
    let mut revoked = 0;
    for accessor in api.list("auth/token/accessors").await? {
        let Some(info) = api
            .write("auth/token/lookup-accessor", json!({"accessor": accessor}))
            .await?
        else {
            continue;
        };
        let from_role = info.pointer("/meta/role").and_then(Value::as_str) == Some(role);
        let via_login = info
            .get("path")
            .and_then(Value::as_str)
            .is_some_and(|p| p.starts_with(&login));
        if from_role && via_login {
            api.write("auth/token/revoke-accessor", json!({"accessor": accessor}))
                .await?;
            revoked += 1;
        }
    }
    Ok(revoked)
}

/// Takes away everything binding `base` (a name this operator computed) has in Vault, in the
/// order that never widens: the login role (no new logins), the policy (existing tokens lose
/// access at once, and nothing can read new credentials), the leases of the database roles and
/// the roles themselves, then the tokens.
/// Every step is tried even when an earlier one failed; the first error is returned after all
/// were tried. A policy that is not Palisade's, or another binding's, is left alone.
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
    let role = role_path(scope.auth_mount, base);
    let vouched = role_vouches(api, scope, base).await.unwrap_or(false);
    let r = api.delete(&role).await;
    if r.is_ok() {
        done.push(format!("role {role}"));
    }
    keep(r);
    match read_policy(api, base).await {
        Ok(Some(text)) => {
            let ours = Marker::parse(&text).map_or(vouched, |m| {
                scope.naming.binding_of(base) == Some((m.namespace.clone(), m.name.clone()))
                    && m.cluster == scope.naming.cluster.clone().unwrap_or_else(|| "-".into())
            });
            if ours {
                let r = api.delete(&policy_path(base)).await;
                if r.is_ok() {
                    done.push(format!("policy {base}"));
                }
                keep(r);
            } else {
                keep(Err(VaultError::NotOwned(format!(
                    "policy {base} was not written for this binding; left in place"
                ))));
            }
        }
        Ok(None) => {}
        Err(e) => keep(Err(e)),
    }
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
    match revoke_tokens(api, scope.auth_mount, base).await {
        Ok(0) => {}
        Ok(n) => done.push(format!("{n} tokens of role {base}")),
        Err(e) => keep(Err(e)),
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// One binding name found in Vault by the sweep.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The uid its policy records, when there is one.
    pub uid: Option<String>,
}

/// Every binding this operator has objects for in Vault: from policy names (with the uid their
/// marker records; foreign policies are skipped), login roles and database roles.
pub async fn inventory<V: VaultApi>(api: &V, scope: &Scope<'_>) -> Result<Vec<Found>, VaultError> {
    let mut found = std::collections::BTreeMap::new();
    for name in api.list("sys/policies/acl").await? {
        let Some((ns, n)) = scope.naming.binding_of(&name) else {
            continue;
        };
        let Some(text) = read_policy(api, &name).await? else {
            continue;
        };
        let Some(m) = Marker::parse(&text) else {
            continue;
        };
        if (m.namespace.as_str(), m.name.as_str()) == (ns.as_str(), n.as_str()) {
            found.insert((ns, n), Some(m.uid));
        }
    }
    let mut names: Vec<String> = api.list(&format!("auth/{}/role", scope.auth_mount)).await?;
    for mount in scope.database_mounts {
        for role in api.list(&format!("{mount}/roles")).await? {
            if let Some((base, _)) = role.rsplit_once('.') {
                names.push(base.to_owned());
            }
        }
    }
    for name in names {
        if let Some(key) = scope.naming.binding_of(&name) {
            found.entry(key).or_insert(None);
        }
    }
    Ok(found
        .into_iter()
        .map(|((namespace, name), uid)| Found {
            namespace,
            name,
            uid,
        })
        .collect())
}

/// Removes the Vault objects of every binding in `found` that `live` (the current bindings'
/// uids by namespace and name) does not have; returns what it removed, per binding.
pub async fn sweep<V: VaultApi>(
    api: &V,
    scope: &Scope<'_>,
    found: &[Found],
    live: &std::collections::BTreeMap<(String, String), String>,
) -> Vec<(String, Result<Vec<String>, VaultError>)> {
    let mut out = Vec::new();
    for f in found {
        let current = live.get(&(f.namespace.clone(), f.name.clone()));
        let orphan = match (current, &f.uid) {
            (None, _) => true,
            (Some(uid), Some(recorded)) => {
                !recorded.is_empty() && !uid.is_empty() && uid != recorded
            }
            (Some(_), None) => false,
        };
        if orphan {
            let base = scope.naming.base(&f.namespace, &f.name);
            out.push((base.clone(), remove(api, scope, &base).await));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::translate::vault::{Grants, Tenancy, VaultDefaults, translate};
    use crate::vault::fake::FakeVault;
    use palisade_api::SecretBinding;

    const TENANCY: &str = "kv: [{mount: secret, version: 2, pathPrefix: \"{namespace}/\"}]\ndatabase: [{mount: database, connection: \"{namespace}_*\", profiles: [ro, rw]}]\nprofiles:\n  ro: {creationStatements: [\"CREATE ROLE ro\"]}\n  rw: {creationStatements: [\"CREATE ROLE rw\"], revocationStatements: [\"DROP ROLE x\"]}\n";

    fn desired(uid: &str, profile: &str, tenancy: &str) -> VaultDesired {
        let tenancy: Tenancy = serde_yaml::from_str(tenancy).expect("tenancy");
        let sb: SecretBinding = serde_yaml::from_str(&format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: SecretBinding\nmetadata: {{name: orders, namespace: shop, uid: {uid}}}\nspec:\n  serviceAccountNames: [orders]\n  kv: [{{mount: secret, path: shop/orders/*}}]\n  database: [{{mount: database, connection: shop_pg, profile: {profile}, defaultTTL: 1h, maxTTL: 2h}}]\n"
        ))
        .expect("binding");
        let naming = Naming::default();
        let grants = Grants {
            tenancy: &tenancy,
            workloads: &VaultDefaults::default(),
            naming: &naming,
            allow_retain: false,
        };
        translate(&sb, &grants).expect("granted")
    }

    fn scope(correct_drift: bool) -> (Naming, BTreeSet<String>, bool) {
        (
            Naming::default(),
            BTreeSet::from(["database".to_owned()]),
            correct_drift,
        )
    }

    async fn run_sync(
        v: &FakeVault,
        d: &VaultDesired,
        correct: bool,
    ) -> Result<Synced, VaultError> {
        let (naming, mounts, c) = scope(correct);
        let s = Scope {
            naming: &naming,
            auth_mount: "kubernetes",
            database_mounts: &mounts,
            correct_drift: c,
        };
        sync(v, &s, d).await
    }

    async fn run_remove(v: &FakeVault, base: &str) -> Result<Vec<String>, VaultError> {
        let (naming, mounts, c) = scope(true);
        let s = Scope {
            naming: &naming,
            auth_mount: "kubernetes",
            database_mounts: &mounts,
            correct_drift: c,
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
            "auth/kubernetes/role/palisade-shop.orders",
            Value::Object(d.role.body()),
        );
        for r in &d.database_roles {
            v.put(&r.path(), Value::Object(r.body()));
        }
    }

    const BASE: &str = "palisade-shop.orders";
    const ROLE: &str = "auth/kubernetes/role/palisade-shop.orders";
    const DB_ROLE: &str = "database/roles/palisade-shop.orders.shop_pg";

    #[tokio::test]
    async fn a_new_binding_takes_three_writes_policy_first_and_a_resync_none() {
        let v = FakeVault::default();
        let d = desired("u1", "ro", TENANCY);
        let out = run_sync(&v, &d, true).await.expect("sync");
        assert_eq!(
            writes(&v.take_calls()),
            [
                format!("PUT sys/policies/acl/{BASE}"),
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
        let d = desired("u1", "ro", TENANCY);
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
            &format!("sys/policies/acl/{BASE}"),
            json!({"policy": "path \"secret/data/*\" { capabilities = [\"read\"] }"}),
        );
        let out = run_sync(&v, &d, true).await.expect("sync");
        assert_eq!(out.drift, [format!("policy {BASE}")]);
    }

    #[tokio::test]
    async fn a_configuration_change_is_applied_even_without_drift_correction() {
        let v = FakeVault::default();
        run_sync(&v, &desired("u1", "rw", TENANCY), true)
            .await
            .expect("sync");
        as_vault_reports(&v, &desired("u1", "rw", TENANCY));
        // The platform team narrows the profile: no longer drift, a change.
        let narrowed = TENANCY.replace("CREATE ROLE rw", "CREATE ROLE rw NOINHERIT");
        let d = desired("u1", "rw", &narrowed);
        v.take_calls();
        let out = run_sync(&v, &d, false).await.expect("sync");
        assert!(out.drift_left.is_empty(), "{out:?}");
        assert!(writes(&v.take_calls()).contains(&format!("PUT {DB_ROLE}")));
    }

    #[tokio::test]
    async fn objects_palisade_did_not_write_are_never_overwritten_or_deleted() {
        for text in [
            "path \"*\" { capabilities = [\"sudo\"] }",
            "# palisade-owner cluster=west namespace=shop name=orders uid=x desired=y\n",
        ] {
            let v = FakeVault::default();
            v.put(&format!("sys/policies/acl/{BASE}"), json!({"policy": text}));
            let err = run_sync(&v, &desired("u1", "ro", TENANCY), true)
                .await
                .expect_err("not owned");
            assert!(matches!(err, VaultError::NotOwned(_)), "{err}");
            assert!(writes(&v.take_calls()).is_empty());
            let err = run_remove(&v, BASE).await.expect_err("not owned");
            assert!(matches!(err, VaultError::NotOwned(_)), "{err}");
            assert!(
                v.get(&format!("sys/policies/acl/{BASE}")).is_some(),
                "left in place"
            );
        }
    }

    fn with_tokens_and_leases(v: &FakeVault) {
        v.put(
            "token/a1",
            json!({"meta": {"role": BASE}, "path": "auth/kubernetes/login"}),
        );
        v.put(
            "token/a2",
            json!({"meta": {"role": "palisade-shop.other"}, "path": "auth/kubernetes/login"}),
        );
        v.put(
            "token/a3",
            json!({"meta": {"role": BASE}, "path": "auth/other/login"}),
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
        run_sync(&v, &desired("u1", "ro", TENANCY), true)
            .await
            .expect("sync");
        v.put("database/roles/palisade-shop.orders.x.shop_pg", json!({}));
        with_tokens_and_leases(&v);
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
            at("PUT sys/leases/revoke-prefix/") < at("PUT auth/token/revoke-accessor"),
            "{w:?}"
        );
        let left = v.paths();
        assert_eq!(
            left,
            [
                "database/roles/palisade-shop.orders.x.shop_pg",
                "lease/database/creds/palisade-shop.orders.x.shop_pg/l2",
                "token/a2",
                "token/a3",
            ],
            "only binding orders's objects, leases and tokens are gone"
        );
    }

    #[tokio::test]
    async fn a_failing_step_does_not_stop_the_others() {
        let v = FakeVault::default();
        run_sync(&v, &desired("u1", "ro", TENANCY), true)
            .await
            .expect("sync");
        with_tokens_and_leases(&v);
        v.fail("DELETE sys/policies/acl/");
        let err = run_remove(&v, BASE).await.expect_err("reported");
        assert!(matches!(err, VaultError::Unavailable(_)));
        let left = v.paths();
        assert!(!left.contains(&ROLE.to_owned()));
        assert!(!left.contains(&DB_ROLE.to_owned()));
        assert!(!left.contains(&"token/a1".to_owned()));
    }

    #[tokio::test]
    async fn a_binding_recreated_under_the_same_name_does_not_inherit_tokens() {
        let v = FakeVault::default();
        run_sync(&v, &desired("old", "ro", TENANCY), true)
            .await
            .expect("sync");
        with_tokens_and_leases(&v);
        let out = run_sync(&v, &desired("new", "ro", TENANCY), true)
            .await
            .expect("sync");
        assert!(!out.deleted.is_empty());
        assert!(
            v.get("token/a1").is_none(),
            "the earlier binding's token is revoked"
        );
        assert!(
            v.get("lease/database/creds/palisade-shop.orders.shop_pg/l1")
                .is_none()
        );
        let text =
            v.get(&format!("sys/policies/acl/{BASE}")).expect("policy")["policy"].to_string();
        assert!(text.contains("uid=new"));
    }

    #[tokio::test]
    async fn the_sweep_removes_only_objects_whose_binding_is_gone() {
        let v = FakeVault::default();
        run_sync(&v, &desired("u1", "ro", TENANCY), true)
            .await
            .expect("sync");
        v.put("auth/kubernetes/role/palisade-gone.app", json!({}));
        v.put("database/roles/palisade-gone.app.gone_pg", json!({}));
        v.put(
            "sys/policies/acl/palisade-hand.made",
            json!({"policy": "path \"x\" {}"}),
        );
        v.put("sys/policies/acl/admin", json!({"policy": "path \"*\" {}"}));
        let (naming, mounts, _) = scope(true);
        let s = Scope {
            naming: &naming,
            auth_mount: "kubernetes",
            database_mounts: &mounts,
            correct_drift: true,
        };
        let found = inventory(&v, &s).await.expect("inventory");
        let names: Vec<(&str, &str)> = found
            .iter()
            .map(|f| (f.namespace.as_str(), f.name.as_str()))
            .collect();
        assert_eq!(names, [("gone", "app"), ("shop", "orders")]);
        let live = BTreeMap::from([(("shop".to_owned(), "orders".to_owned()), "u1".to_owned())]);
        let swept = sweep(&v, &s, &found, &live).await;
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].0, "palisade-gone.app");
        assert!(v.get("auth/kubernetes/role/palisade-gone.app").is_none());
        assert!(v.get("database/roles/palisade-gone.app.gone_pg").is_none());
        assert!(v.get(ROLE).is_some(), "a live binding keeps its role");
        assert!(
            v.get("sys/policies/acl/palisade-hand.made").is_some(),
            "not Palisade's"
        );
        // A binding recreated with a new uid: the old incarnation's objects are swept.
        let live = BTreeMap::from([(("shop".to_owned(), "orders".to_owned()), "u2".to_owned())]);
        let swept = sweep(&v, &s, &found, &live).await;
        assert_eq!(swept.len(), 2);
    }
}
