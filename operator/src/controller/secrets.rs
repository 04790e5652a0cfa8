//! The SecretBinding controller: tenancy guard, then Vault's policy, Kubernetes-auth role and
//! database roles made to match ([`crate::vault::sync`]), read-before-write so a no-op resync
//! writes nothing and a hand edit in Vault is repaired and reported.
//!
//! Access is taken away by default. A binding that is refused (tenancy narrowed, a grant edited
//! outside its area) loses what was written for it before. Deletion removes everything unless
//! the operator configuration allows `Retain`. What is removed is always found from names the
//! operator computes from the binding's namespace and name, never from its status. The
//! finalizer that guarantees removal is bounded: if Vault stays unreachable for
//! `cleanupTimeoutSeconds` after the deletion began, the binding is released anyway (with a
//! Warning event naming what was left), so a namespace deletion can never hang on Vault; the
//! periodic sweep removes what was left once Vault answers.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
};
use palisade_api::{SecretBinding, SecretBindingStatus};

use super::{Enforced, Error, RESYNC, State, publish_events, set_finalizers};
use crate::{
    controller::{
        auth::jiff_now,
        status::{self, Cond},
    },
    translate::vault::{self as tv, Naming, VaultDesired},
    vault::{
        Vault, VaultError,
        sync::{self as vs, Scope, Synced},
    },
};

/// Finalizer that removes a binding's Vault objects and revokes its leases and tokens.
pub const FINALIZER: &str = "palisade.dev/vault-cleanup";

/// State of the SecretBinding controller.
pub struct SecretState {
    /// Shared state.
    pub shared: Arc<State>,
    /// The Vault client; `None` when the operator has no `vault` configuration.
    pub vault: Option<Arc<Vault>>,
    naming: Naming,
    database_mounts: BTreeSet<String>,
    /// Consecutive Vault failures per binding, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Refused bindings whose access this process already removed, by key, with the uid and
    /// generation refused: a resync of an unchanged refused binding does not repeat it.
    removed: Mutex<HashMap<String, (String, Option<i64>)>>,
}

impl SecretState {
    /// State for the controller.
    pub fn new(shared: Arc<State>, vault: Option<Arc<Vault>>) -> Self {
        let (naming, database_mounts) = vault.as_ref().map_or_else(Default::default, |v| {
            (v.settings().naming(), v.settings().database_mounts())
        });
        SecretState {
            shared,
            vault,
            naming,
            database_mounts,
            failures: Mutex::new(HashMap::new()),
            removed: Mutex::new(HashMap::new()),
        }
    }

    /// Where syncs, removals and sweeps look.
    pub fn scope<'a>(&'a self, vault: &'a Vault) -> Scope<'a> {
        Scope {
            naming: &self.naming,
            auth_mount: &vault.settings().workloads.kubernetes_auth_mount,
            database_mounts: &self.database_mounts,
            correct_drift: vault.settings().drift_correction,
            allow_retain: vault.settings().allow_retain,
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

/// What a finalizer does after a removal attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Release the binding.
    Release,
    /// Release it although Vault cleanup failed: the timeout has passed.
    Abandon,
    /// Try again after this long.
    Retry(Duration),
}

/// The finalizer's decision: release after a successful removal; after a failed one, retry
/// (never later than the deadline) until `limit` seconds have passed since deletion began.
pub fn verdict(removed: bool, since: u64, limit: u64, backoff: Duration) -> Verdict {
    if removed {
        Verdict::Release
    } else if since >= limit {
        Verdict::Abandon
    } else {
        Verdict::Retry(backoff.min(Duration::from_secs((limit - since).max(1))))
    }
}

/// Reconciles one SecretBinding.
pub async fn reconcile(sb: Arc<SecretBinding>, st: Arc<SecretState>) -> Result<Action, Error> {
    let (ns, name) = (sb.namespace().unwrap_or_default(), sb.name_any());
    let work = reconcile_inner(&sb, &st);
    super::measured(&st.shared.metrics, "SecretBinding", &ns, &name, work).await
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

/// Whether deleting this binding leaves its Vault objects: only when it asks for `Retain` and
/// the operator configuration allows it.
fn retained(sb: &SecretBinding, vault: &Vault) -> bool {
    sb.spec.deletion_policy == palisade_api::secret_binding::DeletionPolicy::Retain
        && vault.settings().allow_retain
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
    let outcome = match &st.vault {
        Some(vault) if !retained(sb, vault) => {
            let base = st.naming.base(&ns, &name);
            Some(vs::remove(&**vault, &st.scope(vault), &base).await)
        }
        _ => None,
    };
    let since = sb
        .meta()
        .deletion_timestamp
        .as_ref()
        .map_or(0, |t| (jiff_now().as_second() - t.0.as_second()).max(0));
    let limit = st
        .vault
        .as_ref()
        .map_or(0, |v| v.settings().cleanup_timeout_seconds);
    let since = u64::try_from(since).unwrap_or(0);
    let v = verdict(
        outcome.as_ref().is_none_or(Result::is_ok),
        since,
        limit,
        st.backoff(&key),
    );
    match (&v, outcome) {
        (Verdict::Release, Some(Ok(done))) if !done.is_empty() => {
            publish(
                state,
                sb,
                EventType::Normal,
                "VaultCleanedUp",
                format!("removed {}", done.join(", ")),
            )
            .await;
        }
        (Verdict::Abandon, Some(Err(e))) => {
            publish(
                state,
                sb,
                EventType::Warning,
                "VaultCleanupAbandoned",
                format!(
                    "released after {since}s without Vault cleanup ({e}); the periodic sweep removes what is left of {} once Vault answers",
                    st.naming.base(&ns, &name)
                ),
            )
            .await;
        }
        (Verdict::Retry(delay), Some(Err(e))) => {
            tracing::warn!(binding = %key, error = %e, "Vault cleanup failed; retrying");
            return Ok(Action::requeue(*delay));
        }
        _ => {}
    }
    st.succeeded(&key);
    let rest: Vec<String> = sb
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    set_finalizers(state, api, &name, &rest).await?;
    Ok(Action::await_change())
}

/// The finalizer is there exactly when deletion has something to do (everything but an allowed
/// `Retain`).
async fn ensure_finalizer(
    state: &State,
    sb: &SecretBinding,
    api: &Api<SecretBinding>,
    wants: bool,
) -> Result<(), Error> {
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
/// configured) and takes away whatever was written for it before.
async fn refused(
    st: &SecretState,
    sb: &SecretBinding,
    refusal: tv::Refusal,
) -> Result<Action, Error> {
    let state = &*st.shared;
    let ns = sb.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", sb.name_any());
    let seen = (sb.uid().unwrap_or_default(), sb.meta().generation);
    let done_before = st.removed.lock().is_ok_and(|r| r.get(&key) == Some(&seen));
    let removal = match &st.vault {
        Some(_) if done_before => Some(Ok(Vec::new())),
        Some(vault) => {
            let base = st.naming.base(&ns, &sb.name_any());
            Some(vs::remove(&**vault, &st.scope(vault), &base).await)
        }
        None => None,
    };
    let (ready_msg, retry) = match &removal {
        None | Some(Ok(_)) => ("not accepted; it has no access in Vault".to_owned(), None),
        Some(Err(e)) => (
            format!("not accepted; removing the access it had failed and is retried: {e}"),
            Some(st.backoff(&key)),
        ),
    };
    if let Some(Ok(done)) = &removal
        && !done.is_empty()
    {
        publish(
            state,
            sb,
            EventType::Warning,
            "AccessRemoved",
            format!("refused binding: removed {}", done.join(", ")),
        )
        .await;
    }
    let previous = sb.status.clone().unwrap_or_default();
    let now = Time(jiff_now());
    let conds = [
        Cond::new("Accepted", false, &refusal.reason, refusal.message.clone()),
        Cond::new("Ready", false, &refusal.reason, ready_msg),
    ];
    let new = SecretBindingStatus {
        common: status::build(&previous.common, sb.meta().generation, &conds, &now),
        vault_policy: None,
        vault_role: None,
        database_roles: Vec::new(),
    };
    if new.common.conditions != previous.common.conditions {
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
    if retry.is_none() {
        st.succeeded(&key);
        if let Ok(mut r) = st.removed.lock() {
            r.insert(key.clone(), seen);
        }
    }
    Ok(retry.map_or_else(|| Action::requeue(RESYNC), Action::requeue))
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

fn accepted_condition(ns: &str, desired: &VaultDesired) -> Cond {
    let mut msg = format!(
        "within the tenancy of namespace {ns}: policy {}, role {}, {} database roles",
        desired.policy.name,
        desired.role.name,
        desired.database_roles.len()
    );
    for n in &desired.notes {
        msg.push_str("; ");
        msg.push_str(n);
    }
    Cond::new("Accepted", true, "Accepted", msg)
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
        return refused(st, sb, refusal).await;
    };
    let previous = sb.status.clone().unwrap_or_default();
    let now = Time(jiff_now());

    ensure_finalizer(state, sb, &api, !retained(sb, vault)).await?;

    let settings = vault.settings();
    let desired = match tv::translate(sb, &settings.grants(&st.naming)) {
        Ok(d) => d,
        Err(refusal) => return refused(st, sb, refusal).await,
    };
    let accepted = accepted_condition(&ns, &desired);
    if let Ok(mut r) = st.removed.lock() {
        r.remove(&key);
    }
    match vs::sync(&**vault, &st.scope(vault), &desired).await {
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
                ..Enforced::default()
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

/// Every `sweepIntervalSeconds`, finds Vault objects of this operator whose SecretBinding no
/// longer exists (its finalizer was removed by hand, cleanup was abandoned while Vault was
/// down, or it was deleted while the operator was away) and removes them, logging and counting
/// what it removed. The bindings are listed from the API server at each sweep; a sweep whose
/// list fails removes nothing.
pub async fn sweeper(st: Arc<SecretState>) {
    let Some(vault) = st.vault.clone() else {
        return;
    };
    let api: Api<SecretBinding> = Api::all(st.shared.client.clone());
    let every = Duration::from_secs(vault.settings().sweep_interval_seconds);
    loop {
        tokio::time::sleep(every).await;
        let scope = st.scope(&vault);
        let found = match vs::inventory(&*vault, &scope).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "Vault sweep: cannot list objects");
                continue;
            }
        };
        if found.is_empty() {
            continue;
        }
        let bindings = match api.list(&kube::api::ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!(error = %e, "Vault sweep: cannot list SecretBindings; nothing removed");
                continue;
            }
        };
        let live: BTreeMap<(String, String), String> = bindings
            .iter()
            .map(|b| {
                (
                    (b.namespace().unwrap_or_default(), b.name_any()),
                    b.uid().unwrap_or_default(),
                )
            })
            .collect();
        for (base, outcome) in vs::sweep(&*vault, &scope, &found, &live).await {
            match outcome {
                Ok(done) => {
                    st.shared.metrics.vault_swept();
                    tracing::warn!(object = %base, removed = ?done, "Vault sweep: removed the access of a SecretBinding that no longer exists");
                }
                Err(e) => {
                    tracing::warn!(object = %base, error = %e, "Vault sweep: removal failed; retried at the next sweep");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_cleanup_is_retried_until_the_deadline_then_abandoned() {
        let b = Duration::from_secs(8);
        assert_eq!(verdict(true, 500, 120, b), Verdict::Release);
        assert_eq!(verdict(false, 0, 120, b), Verdict::Retry(b));
        // Never retried later than the deadline.
        assert_eq!(
            verdict(false, 117, 120, b),
            Verdict::Retry(Duration::from_secs(3))
        );
        assert_eq!(verdict(false, 120, 120, b), Verdict::Abandon);
        assert_eq!(verdict(false, 121, 120, b), Verdict::Abandon);
    }
}
