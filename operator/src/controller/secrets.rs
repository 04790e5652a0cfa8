//! The SecretBinding controller: tenancy guard, then Vault's policy, Kubernetes-auth role and
//! database roles made to match, read-before-write so a no-op resync writes nothing and a hand
//! edit in Vault is repaired and reported.
//!
//! Deletion (with `deletionPolicy: Delete`) revokes the leases issued under the binding's
//! database roles, then removes the roles, the login role and the policy. The finalizer that
//! guarantees this is bounded: if Vault stays unreachable for `cleanupTimeoutSeconds` after the
//! deletion began, the binding is released anyway (with a Warning event naming what was left), so
//! a namespace deletion can never hang on Vault.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
};
use palisade_api::{SecretBinding, SecretBindingStatus, secret_binding::DeletionPolicy};

use super::{Enforced, Error, RESYNC, State, publish_events, set_finalizers};
use crate::{
    controller::{
        auth::jiff_now,
        status::{self, Cond},
    },
    translate::vault::{self as tv, VaultDesired},
    vault::{Vault, VaultError},
};

/// Finalizer that removes a binding's Vault objects and revokes its leases.
pub const FINALIZER: &str = "palisade.dev/vault-cleanup";

/// State of the SecretBinding controller.
pub struct SecretState {
    /// Shared state.
    pub shared: Arc<State>,
    /// The Vault client; `None` when the operator has no `vault` configuration.
    pub vault: Option<Arc<Vault>>,
    /// Consecutive Vault failures per binding, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl SecretState {
    /// State for the controller.
    pub fn new(shared: Arc<State>, vault: Option<Arc<Vault>>) -> Self {
        SecretState {
            shared,
            vault,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Exponential backoff for a binding whose Vault calls keep failing: 2 s, 4 s, … 5 min.
    fn backoff(&self, key: &str) -> Duration {
        let Ok(mut f) = self.failures.lock() else {
            return Duration::from_secs(30);
        };
        let n = f.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 2u64.saturating_pow((*n).min(9)).min(300);
        Duration::from_secs(secs)
    }

    fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }
}

/// What one sync changed in Vault.
#[derive(Debug, Default)]
pub struct Synced {
    /// Objects written because they were missing or different, as `kind name`.
    pub changed: Vec<String>,
    /// Of those, the ones that existed with different content although the binding had not
    /// changed: hand edits, written back.
    pub drift: Vec<String>,
    /// Hand edits left in place because drift correction is off.
    pub drift_left: Vec<String>,
    /// Objects removed because the binding no longer asks for them.
    pub deleted: Vec<String>,
}

/// How one object compares with what is wanted.
struct Compared {
    /// Whether it exists in Vault.
    existed: bool,
    /// Whether it differs from what is wanted.
    differs: bool,
}

/// What to do about one object: write it or not, recording why in `out`. A difference on an
/// object that exists while the binding is unchanged is drift: written back when
/// `correct_drift`, otherwise only reported.
fn plan(
    what: String,
    c: &Compared,
    spec_changed: bool,
    correct_drift: bool,
    out: &mut Synced,
) -> bool {
    if !c.differs {
        return false;
    }
    let drift = c.existed && !spec_changed;
    if drift && !correct_drift {
        out.drift_left.push(what);
        return false;
    }
    if drift {
        out.drift.push(what.clone());
    }
    out.changed.push(what);
    true
}

/// Makes Vault hold `desired`, removing the database roles in `previous_db_roles`
/// (`<mount>/roles/<name>`) it no longer lists, with their leases. `spec_changed` says whether
/// the binding changed since the last successful sync (so differences are updates, not drift).
pub async fn sync(
    vault: &Vault,
    desired: &VaultDesired,
    previous_db_roles: &[String],
    spec_changed: bool,
) -> Result<Synced, VaultError> {
    let mut out = Synced::default();
    let correct = vault.settings().drift_correction;
    // Database roles first, the policy that lets workloads use them next, the login role last:
    // a workload can never log in to a role whose policy points at missing roles.
    for role in &desired.database_roles {
        let live = vault.read_database_role(&role.mount, &role.name).await?;
        let c = Compared {
            existed: live.is_some(),
            differs: live.as_ref() != Some(role),
        };
        if plan(
            format!("database role {}", role.path()),
            &c,
            spec_changed,
            correct,
            &mut out,
        ) {
            vault.write_database_role(role).await?;
        }
    }
    let text = desired.policy.hcl();
    let live = vault.read_policy(&desired.policy.name).await?;
    let c = Compared {
        existed: live.is_some(),
        differs: live.as_deref() != Some(text.as_str()),
    };
    if plan(
        format!("policy {}", desired.policy.name),
        &c,
        spec_changed,
        correct,
        &mut out,
    ) {
        vault.write_policy(&desired.policy).await?;
    }
    let live = vault
        .read_role(&desired.role.mount, &desired.role.name)
        .await?;
    let c = Compared {
        existed: live.is_some(),
        differs: live.as_ref() != Some(&desired.role),
    };
    let what = format!(
        "role auth/{}/role/{}",
        desired.role.mount, desired.role.name
    );
    if plan(what, &c, spec_changed, correct, &mut out) {
        vault.write_role(&desired.role).await?;
    }
    let wanted: BTreeSet<String> = desired
        .database_roles
        .iter()
        .map(tv::DatabaseRole::path)
        .collect();
    for stale in previous_db_roles.iter().filter(|p| !wanted.contains(*p)) {
        if retire_database_role(vault, stale).await? {
            out.deleted.push(format!("database role {stale}"));
        }
    }
    Ok(out)
}

/// Revokes every lease issued under the database role at `path` (`<mount>/roles/<name>`),
/// then deletes the role; `false` when `path` does not name a role.
async fn retire_database_role(vault: &Vault, path: &str) -> Result<bool, VaultError> {
    let Some((mount, name)) = path.split_once("/roles/") else {
        return Ok(false);
    };
    vault
        .revoke_prefix(&format!("{mount}/creds/{name}"))
        .await?;
    vault.delete_database_role(mount, name).await?;
    Ok(true)
}

/// Removes everything a binding owns in Vault: leases first, then database roles, the login
/// role and the policy. Returns what it removed.
pub async fn remove(
    vault: &Vault,
    namespace: &str,
    name: &str,
    db_roles: &[String],
) -> Result<Vec<String>, VaultError> {
    let base = tv::base_name(namespace, name);
    let mut done = Vec::new();
    for path in db_roles {
        if retire_database_role(vault, path).await? {
            done.push(format!("database role {path} and its leases"));
        }
    }
    let mount = vault.settings().workloads.kubernetes_auth_mount.clone();
    vault.delete_role(&mount, &base).await?;
    done.push(format!("role auth/{mount}/role/{base}"));
    vault.delete_policy(&base).await?;
    done.push(format!("policy {base}"));
    Ok(done)
}

/// Reconciles one SecretBinding.
pub async fn reconcile(sb: Arc<SecretBinding>, st: Arc<SecretState>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&sb, &st).await;
    st.shared.metrics.reconciled(
        "SecretBinding",
        result.as_ref().err().map(Error::reason),
        started.elapsed(),
    );
    result
}

/// The database roles a binding may own in Vault: those its status records and those its spec
/// asks for (a status write can lag behind a Vault write).
fn owned_db_roles(sb: &SecretBinding) -> Vec<String> {
    let ns = sb.namespace().unwrap_or_default();
    let name = sb.name_any();
    let mut all: BTreeSet<String> = sb
        .status
        .as_ref()
        .map(|s| s.database_roles.iter().cloned().collect())
        .unwrap_or_default();
    for db in sb.spec.database.iter().flatten() {
        all.insert(format!(
            "{}/roles/{}",
            db.mount,
            tv::database_role_name(&ns, &name, &db.connection)
        ));
    }
    all.into_iter().collect()
}

async fn publish(state: &State, sb: &SecretBinding, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Vault".into(),
        secondary: None,
    };
    if let Err(e) = state.recorder.publish(&ev, &sb.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish event");
    }
}

async fn finalize(
    sb: &SecretBinding,
    st: &SecretState,
    api: &Api<SecretBinding>,
) -> Result<Action, Error> {
    let state = &*st.shared;
    let ns = sb.namespace().unwrap_or_default();
    let name = sb.name_any();
    let key = format!("{ns}/{name}");
    if !sb.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let outcome = match (&st.vault, sb.spec.deletion_policy) {
        (Some(vault), DeletionPolicy::Delete) => {
            Some(remove(vault, &ns, &name, &owned_db_roles(sb)).await)
        }
        _ => None,
    };
    let release = match outcome {
        None => true,
        Some(Ok(done)) => {
            publish(
                state,
                sb,
                EventType::Normal,
                "VaultCleanedUp",
                format!("removed {}", done.join(", ")),
            )
            .await;
            true
        }
        Some(Err(e)) => {
            let since = sb
                .meta()
                .deletion_timestamp
                .as_ref()
                .map_or(0, |t| (jiff_now().as_second() - t.0.as_second()).max(0));
            let limit = st
                .vault
                .as_ref()
                .map_or(0, |v| v.settings().cleanup_timeout_seconds);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            if since >= limit {
                publish(
                    state,
                    sb,
                    EventType::Warning,
                    "VaultCleanupAbandoned",
                    format!(
                        "released after {since}s without Vault cleanup ({e}); remove policy and role {} and its database roles by hand",
                        tv::base_name(&ns, &name)
                    ),
                )
                .await;
                true
            } else {
                tracing::warn!(binding = %key, error = %e, "Vault cleanup failed; retrying");
                return Ok(Action::requeue(st.backoff(&key).min(Duration::from_secs(
                    u64::try_from(limit - since).unwrap_or(1).max(1),
                ))));
            }
        }
    };
    if release {
        st.succeeded(&key);
        let rest: Vec<String> = sb
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        set_finalizers(state, api, &name, &rest).await?;
    }
    Ok(Action::await_change())
}

/// The finalizer is there exactly when deletion has something to do (`deletionPolicy: Delete`).
async fn ensure_finalizer(
    state: &State,
    sb: &SecretBinding,
    api: &Api<SecretBinding>,
) -> Result<(), Error> {
    let wants = sb.spec.deletion_policy == DeletionPolicy::Delete;
    let has = sb.finalizers().iter().any(|f| f == FINALIZER);
    if wants != has {
        let mut all: Vec<String> = sb
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        if wants {
            all.push(FINALIZER.into());
        }
        set_finalizers(state, api, &sb.name_any(), &all).await?;
    }
    Ok(())
}

/// Reports a binding that is not accepted (refused by the tenancy guard, or no Vault is
/// configured); nothing is written to Vault.
async fn refused(state: &State, sb: &SecretBinding, refusal: tv::Refusal) -> Result<Action, Error> {
    let previous = sb.status.clone().unwrap_or_default();
    let now = Time(jiff_now());
    let conds = [
        Cond::new("Accepted", false, &refusal.reason, refusal.message.clone()),
        Cond::new(
            "Ready",
            false,
            &refusal.reason,
            "not accepted; nothing was written to Vault",
        ),
    ];
    let new = SecretBindingStatus {
        common: status::build(&previous.common, sb.meta().generation, &conds, &now),
        ..previous.clone()
    };
    if new != previous {
        publish(
            state,
            sb,
            EventType::Warning,
            &refusal.reason,
            refusal.message,
        )
        .await;
    }
    super::write_status(state, sb, &new, &previous).await?;
    Ok(Action::await_change())
}

/// `Ready` after a successful sync: true, unless hand edits were left in place (drift
/// correction off), which is also published as a `DriftDetected` event.
async fn ready_condition(state: &State, sb: &SecretBinding, synced: &Synced) -> Cond {
    if synced.drift_left.is_empty() {
        return Cond::new(
            "Ready",
            true,
            "Synced",
            "Vault holds the policy, role and database roles",
        );
    }
    let msg = format!(
        "edited in Vault and left so (drift correction is off): {}",
        synced.drift_left.join(", ")
    );
    publish(state, sb, EventType::Warning, "DriftDetected", msg.clone()).await;
    Cond::new("Ready", false, "Drifted", msg)
}

async fn reconcile_inner(sb: &SecretBinding, st: &SecretState) -> Result<Action, Error> {
    let state = &*st.shared;
    let ns = sb.namespace().unwrap_or_default();
    let name = sb.name_any();
    let key = format!("{ns}/{name}");
    let api: Api<SecretBinding> = Api::namespaced(state.client.clone(), &ns);
    if sb.meta().deletion_timestamp.is_some() {
        return finalize(sb, st, &api).await;
    }
    let Some(vault) = &st.vault else {
        let refusal = tv::Refusal {
            reason: "VaultNotConfigured".into(),
            message: "the operator has no vault configuration".into(),
        };
        return refused(state, sb, refusal).await;
    };
    let previous = sb.status.clone().unwrap_or_default();
    let now = Time(jiff_now());

    ensure_finalizer(state, sb, &api).await?;

    let settings = vault.settings();
    let desired = match tv::translate(sb, &settings.tenancy, &settings.workloads) {
        Ok(d) => d,
        Err(refusal) => return refused(state, sb, refusal).await,
    };

    let accepted = Cond::new(
        "Accepted",
        true,
        "Accepted",
        format!(
            "within the tenancy of namespace {ns}: policy {}, role {}, {} database roles",
            desired.policy.name,
            desired.role.name,
            desired.database_roles.len()
        ),
    );
    // Unchanged since the last successful sync: differences found now are hand edits.
    let spec_changed = !(previous.common.observed_generation == sb.meta().generation
        && palisade_api::common::find_condition(&previous.common.conditions, "Ready")
            .is_some_and(|c| c.status == "True"));
    match sync(vault, &desired, &previous.database_roles, spec_changed).await {
        Ok(synced) => {
            st.succeeded(&key);
            let ready = ready_condition(state, sb, &synced).await;
            let conds = [
                accepted,
                Cond::new("VaultUnavailable", false, "Reachable", "Vault answered"),
                ready,
            ];
            let new = SecretBindingStatus {
                common: status::build(&previous.common, sb.meta().generation, &conds, &now),
                vault_policy: Some(desired.policy.name.clone()),
                vault_role: Some(desired.role.name.clone()),
                database_roles: desired
                    .database_roles
                    .iter()
                    .map(tv::DatabaseRole::path)
                    .collect(),
            };
            super::write_status(state, sb, &new, &previous).await?;
            let enforced = Enforced {
                changed: synced.changed,
                drift: synced.drift,
                deleted: synced.deleted,
                missing: Vec::new(),
            };
            publish_events(state, &sb.object_ref(&()), Ok(&enforced)).await;
            Ok(Action::requeue(RESYNC))
        }
        Err(e) => {
            let unavailable = matches!(e, VaultError::Unavailable(_));
            let conds = [
                accepted,
                Cond::new(
                    "VaultUnavailable",
                    unavailable,
                    if unavailable {
                        "Unreachable"
                    } else {
                        "Reachable"
                    },
                    e.to_string(),
                ),
                Cond::new("Ready", false, e.reason(), e.to_string()),
            ];
            let new = SecretBindingStatus {
                common: status::build(&previous.common, sb.meta().generation, &conds, &now),
                ..previous.clone()
            };
            super::write_status(state, sb, &new, &previous).await?;
            let delay = st.backoff(&key);
            tracing::warn!(binding = %key, error = %e, retry_in = delay.as_secs(), "Vault sync failed");
            Ok(Action::requeue(delay))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_differences_on_an_unchanged_binding_are_drift() {
        let c = |existed, differs| Compared { existed, differs };
        let mut out = Synced::default();
        assert!(!plan("same".into(), &c(true, false), false, true, &mut out));
        assert!(plan(
            "created".into(),
            &c(false, true),
            false,
            true,
            &mut out
        ));
        assert!(plan("updated".into(), &c(true, true), true, true, &mut out));
        assert!(plan("edited".into(), &c(true, true), false, true, &mut out));
        assert_eq!(out.changed, ["created", "updated", "edited"]);
        assert_eq!(out.drift, ["edited"]);
        // With correction off, a hand edit is reported and left; creations still happen.
        let mut out = Synced::default();
        assert!(!plan(
            "edited".into(),
            &c(true, true),
            false,
            false,
            &mut out
        ));
        assert!(plan(
            "created".into(),
            &c(false, true),
            false,
            false,
            &mut out
        ));
        assert_eq!(out.drift_left, ["edited"]);
        assert_eq!(out.changed, ["created"]);
    }
}
