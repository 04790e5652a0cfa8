//! The RateLimitPolicy controller: resolve conflicts (oldest policy per target wins), translate,
//! apply, prune, status. A policy that loses its target produces nothing and says who won.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Resource, ResourceExt,
    runtime::{controller::Action, reflector::Store},
};
use palisade_api::{RateLimitPolicy, RateLimitPolicyStatus};

use super::{Error, RESYNC, State, enforce, publish_events, readiness};
use crate::{
    controller::{
        auth::jiff_now,
        gateway,
        status::{self, Cond},
    },
    translate::{self, Desired},
};

/// State of the RateLimitPolicy controller: the shared state plus its own cache of policies,
/// needed to resolve conflicts between policies on one target.
pub struct RateLimitState {
    /// Shared state.
    pub shared: Arc<State>,
    /// Every RateLimitPolicy.
    pub policies: Store<RateLimitPolicy>,
    /// Routes, Gateways and classes (none when the cluster does not serve the Gateway API).
    pub topology: Option<super::topology::Topology>,
}

/// Reconciles one RateLimitPolicy.
pub async fn reconcile(
    policy: Arc<RateLimitPolicy>,
    rl: Arc<RateLimitState>,
) -> Result<Action, Error> {
    let (ns, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
    let work = reconcile_inner(&policy, &rl);
    super::measured(&rl.shared.metrics, "RateLimitPolicy", &ns, &name, work).await
}

async fn reconcile_inner(policy: &RateLimitPolicy, rl: &RateLimitState) -> Result<Action, Error> {
    let state = &*rl.shared;
    if policy.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Until routes and Gateways are listed, where a target receives traffic is not known: wait
    // rather than report a state that is only the caches filling.
    if rl
        .topology
        .as_ref()
        .is_some_and(|t| !super::topology::ready(t))
    {
        return Ok(Action::requeue(std::time::Duration::from_secs(1)));
    }
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let all = rl.policies.state();
    let winner = translate::ratelimit::conflict_winner(policy, all.iter().map(|p| &**p));
    let backend = translate::ratelimit::backend(policy, &state.ctx);

    let mut conds = Vec::new();
    // Whether Envoy Gateway merges route policies into this one: see [`MERGED_RECHECK`].
    let mut recheck = false;
    let desired = if let Some(winner) = &winner {
        let msg = format!(
            "{winner} targets the same {} {:?} and is older, so it wins; this policy is not enforced",
            policy.spec.target_ref.kind, policy.spec.target_ref.name
        );
        conds.push(Cond::new("Accepted", false, "Conflicted", msg.clone()));
        conds.push(Cond::new("Conflicted", true, "Conflicted", msg.clone()));
        conds.push(Cond::new("Ready", false, "Conflicted", msg));
        Desired::default()
    } else {
        let d = translate::ratelimit::translate(policy, &state.ctx);
        conds.push(Cond::new(
            "Accepted",
            true,
            "Accepted",
            format!(
                "translated for {backend:?} into {} objects",
                d.objects.len()
            ),
        ));
        d
    };
    let enforced = enforce(
        state,
        &translate::ratelimit::candidates(&name),
        "RateLimitPolicy",
        &ns,
        &name,
        &desired.objects,
    )
    .await;
    let result = match enforced {
        Ok(r) => {
            if winner.is_none() {
                let parents = rl.topology.as_ref().map_or_else(
                    || Err("the cluster does not serve the Gateway API".to_owned()),
                    |t| super::topology::parents(t, policy),
                );
                let verdicts;
                (verdicts, recheck) =
                    gateway_verdicts(state, rl, &all, &ns, &desired.objects, &r, &parents);
                conds.extend(
                    readiness(&r, &desired.notes, desired.objects.len())
                        .into_iter()
                        .map(|c| {
                            if c.type_ == "Ready" {
                                gateway::ready(c, &verdicts)
                            } else {
                                c
                            }
                        }),
                );
            }
            Ok(r)
        }
        Err(e) => {
            conds.retain(|c| c.type_ != "Ready");
            conds.push(Cond::new("Ready", false, e.reason(), e.to_string()));
            Err(e)
        }
    };
    let previous = policy.status.clone().unwrap_or_default();
    let now = Time(jiff_now());
    let new = RateLimitPolicyStatus {
        common: status::build(&previous.common, policy.meta().generation, &conds, &now),
        backend: Some(backend),
        generated: status::generated_refs(&desired.objects),
    };
    super::write_status(state, policy, &new, &previous).await?;
    publish_events(state, &policy.object_ref(&()), result.as_ref()).await;
    // A failed apply is retried with backoff by the error policy, after status says why.
    result.map(|_| Action::requeue(if recheck { MERGED_RECHECK } else { RESYNC }))
}

/// How soon a Gateway-level policy that Envoy Gateway merges route policies into is judged
/// again. Not every change that decides it wakes it: a route's policy deleted, or its
/// RateLimitPolicy, can let a policy Palisade did not write take its place in the merge while
/// Envoy Gateway's report on the Gateway-level one stays the same.
pub const MERGED_RECHECK: std::time::Duration = std::time::Duration::from_secs(15);

/// Envoy Gateway's verdict on each generated BackendTrafficPolicy, read from the cache of
/// generated objects (which keeps their status), and whether Envoy Gateway merges route policies
/// into one of them.
fn gateway_verdicts(
    state: &State,
    rl: &RateLimitState,
    all: &[Arc<RateLimitPolicy>],
    ns: &str,
    desired: &[serde_json::Value],
    enforced: &super::Enforced,
    parents: &Result<Vec<super::topology::Parent>, String>,
) -> (Vec<(String, gateway::Verdict)>, bool) {
    const BTP: (&str, &str) = ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy");
    let Some(gk) = state.kinds.get(&(BTP.0.to_owned(), BTP.1.to_owned())) else {
        return (Vec::new(), false);
    };
    let mut merged = false;
    // Policies by the HTTPRoute they target, for the routes Envoy Gateway merges into a
    // Gateway-level policy: built only for one (a route-level policy never reads it).
    let by_route: std::cell::OnceCell<RoutePolicies<'_>> = std::cell::OnceCell::new();
    let by_route = || {
        by_route.get_or_init(|| {
            let mut index: RoutePolicies<'_> = std::collections::HashMap::new();
            for p in all.iter().filter(|p| p.spec.target_ref.kind == "HTTPRoute") {
                index
                    .entry((
                        p.metadata.namespace.as_deref().unwrap_or_default(),
                        p.spec.target_ref.name.as_str(),
                    ))
                    .or_default()
                    .push(&**p);
            }
            index
        })
    };
    let verdicts = desired
        .iter()
        .filter(|o| o["apiVersion"] == BTP.0 && o["kind"] == BTP.1)
        .map(|o| {
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            let written = enforced
                .generations
                .get(&format!("{}/{name}", BTP.1))
                .copied();
            let live = gk.store.get(
                &kube::runtime::reflector::ObjectRef::new_with(name, gk.resource.clone())
                    .within(ns),
            );
            let status: Option<serde_json::Value> = live
                .as_ref()
                .and_then(|l| l.status.as_ref())
                .and_then(|raw| serde_json::from_str(raw.get()).ok());
            // The cache may not hold this reconcile's write yet: the generation written counts.
            let generation = live
                .as_ref()
                .and_then(|l| l.metadata.generation)
                .max(written);
            let this = format!("{ns}/{name}");
            let gateway = o["spec"]["targetRefs"][0]["name"]
                .as_str()
                .map(|g| format!("{ns}/{g}"))
                .unwrap_or_default();
            let keeps = |route: &str| {
                let Some((route_ns, route_name)) = route.split_once('/') else {
                    return gateway::Merge::Replaces;
                };
                let on_route = by_route()
                    .get(&(route_ns, route_name))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                merge_of(
                    on_route,
                    &state.ctx,
                    |p| {
                        rl.topology
                            .as_ref()
                            .and_then(|t| super::topology::parents(t, p).ok())
                            .is_some_and(|parents| parents.iter().any(|x| x.gateway == gateway))
                    },
                    |name| cached(gk, route_ns, name),
                    &this,
                )
            };
            let gateway_level = o["spec"]["targetRefs"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["kind"] == "Gateway"));
            let verdict = gateway::verdict(
                generation,
                status.as_ref(),
                live.is_none(),
                gateway_level.then_some(&keeps as &dyn Fn(&str) -> gateway::Merge),
            );
            merged |= gateway_level
                && status
                    .as_ref()
                    .is_some_and(|s| !gateway::merged_messages(s).is_empty());
            (
                this.clone(),
                gateway::covering(verdict, status.as_ref(), parents),
            )
        })
        .collect();
    (verdicts, merged)
}

/// RateLimitPolicies on routes, by (namespace, route name).
type RoutePolicies<'a> = std::collections::HashMap<(&'a str, &'a str), Vec<&'a RateLimitPolicy>>;

/// The spec, status and generation of the cached generated object `name` in `ns` of kind `gk`.
fn cached(
    gk: &super::GeneratedKind,
    ns: &str,
    name: &str,
) -> Option<(serde_json::Value, serde_json::Value, Option<i64>)> {
    let live = gk.store.get(
        &kube::runtime::reflector::ObjectRef::new_with(name, gk.resource.clone()).within(ns),
    )?;
    let parse = |raw: Option<&serde_json::value::RawValue>| {
        raw.and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok())
            .unwrap_or_default()
    };
    Some((
        parse(live.spec.as_deref()),
        parse(live.status.as_deref()),
        live.metadata.generation,
    ))
}

/// What the policy Envoy Gateway merges into the Gateway-level BackendTrafficPolicy
/// `gateway_policy` on an HTTPRoute does to its limits, given the RateLimitPolicies on that route
/// (`on_route`), whether a policy's route is `attached` to the Gateway, and the `cached` spec,
/// status and generation of a generated BackendTrafficPolicy by name. It keeps them only when it
/// is the one Palisade generates there for a RateLimitPolicy that targets the whole route and
/// wins it, merged in a way that keeps every limit of the Gateway's. An object in Palisade's cache
/// under the name of a policy that generates none there (another backend, a lost conflict; made by
/// hand with Palisade's label and name) is not taken on trust, and neither is a policy Palisade
/// does not cache (one it did not write). Only cached objects are read, nothing is translated: a
/// Gateway-level policy with N routes merged into it costs N lookups, not N translations.
fn merge_of(
    on_route: &[&RateLimitPolicy],
    ctx: &crate::translate::Context,
    attached: impl Fn(&RateLimitPolicy) -> bool,
    cached: impl Fn(&str) -> Option<(serde_json::Value, serde_json::Value, Option<i64>)>,
    gateway_policy: &str,
) -> gateway::Merge {
    let (mut awaiting, mut unverified) = (false, None);
    let keeps = on_route.iter().any(|p| {
        if p.spec.target_ref.section_name.is_some() {
            unverified = Some(
                "Palisade's policy there limits one rule of the route: merged into this one, a \
                 policy on another rule of it would go unreported; target the whole route",
            );
            return false;
        }
        let wins = translate::ratelimit::conflict_winner(p, on_route.iter().copied()).is_none();
        let envoy_gateway = translate::ratelimit::backend(p, ctx)
            == palisade_api::rate_limit_policy::RateLimitBackend::EnvoyGateway;
        // A policy's status outlives its route: it counts only while the route is attached to
        // this Gateway.
        wins && envoy_gateway
            && attached(p)
            && cached(&crate::names::generated(&p.name_any(), "ratelimit")).is_some_and(
                |(spec, status, generation)| {
                    let keeps = gateway::merge_keeps_limits(
                        &spec,
                        &status,
                        generation,
                        ("HTTPRoute", &p.spec.target_ref.name),
                        gateway_policy,
                    );
                    awaiting |= !keeps && !gateway::reported_on(&status, generation);
                    keeps
                },
            )
    });
    match (keeps, awaiting, unverified) {
        (true, _, _) => gateway::Merge::Keeps,
        (false, true, _) => gateway::Merge::Awaiting,
        (false, false, Some(why)) => gateway::Merge::Unverified(why),
        (false, false, None) => gateway::Merge::Replaces,
    }
}

/// The policies that share `policy`'s target (including itself): a change to one can change who
/// wins for all of them.
pub fn same_target(
    store: &Store<RateLimitPolicy>,
    policy: &RateLimitPolicy,
) -> Vec<kube::runtime::reflector::ObjectRef<RateLimitPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| {
            p.metadata.namespace == policy.metadata.namespace
                && p.spec.target_ref.kind == policy.spec.target_ref.kind
                && p.spec.target_ref.name == policy.spec.target_ref.name
        })
        .map(|p| kube::runtime::reflector::ObjectRef::from_obj(&**p))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn policy(name: &str, created: &str, extra: &Value) -> RateLimitPolicy {
        let mut spec = json!({
            "targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "api"},
            "limits": [{"name": "all", "requests": 100, "per": "1m"}],
        });
        if let (Value::Object(s), Value::Object(e)) = (&mut spec, extra) {
            s.extend(e.clone());
        }
        serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
            "spec": spec,
        }))
        .expect("policy")
    }

    /// Palisade's route policy as Envoy Gateway reports it merged with `shop/edge-btp`.
    fn merged_btp() -> (Value, Value, Option<i64>) {
        let spec = json!({"mergeType": "StrategicMerge",
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "api"}],
            "rateLimit": {"type": "Global", "global": {"rules": []}}});
        let status = json!({"ancestors": [{
            "ancestorRef": {"kind": "Gateway", "namespace": "shop", "name": "shop"},
            "conditions": [
                {"type": "Accepted", "status": "True", "observedGeneration": 1},
                {"type": "Merged", "status": "True", "observedGeneration": 1,
                 "message": "Merged with policy shop/edge-btp"}]}]});
        (spec, status, Some(1))
    }

    fn judge(on_route: &[&RateLimitPolicy], attached: bool) -> gateway::Merge {
        merge_of(
            on_route,
            &crate::translate::Context::default(),
            |_| attached,
            |name| (name == "palisade-api-ratelimit").then(merged_btp),
            "shop/edge-btp",
        )
    }

    #[test]
    fn only_palisades_winning_whole_route_policy_on_an_attached_route_vouches() {
        let eg = json!({"backend": "EnvoyGateway"});
        let api = policy("api", "2026-01-01T00:00:00Z", &eg);
        assert_eq!(judge(&[&api], true), gateway::Merge::Keeps);
        // The route has left the Gateway: the report on the policy is its last word, stale.
        assert_eq!(judge(&[&api], false), gateway::Merge::Replaces);
        // Nothing Palisade generates there: no policy, or one whose object is not cached.
        assert_eq!(judge(&[], true), gateway::Merge::Replaces);
        let other = policy("other", "2026-01-01T00:00:00Z", &eg);
        assert_eq!(judge(&[&other], true), gateway::Merge::Replaces);
        // An object under the name of a policy that generates none: another backend, or a lost
        // conflict (an older policy on the route wins).
        let istio = policy(
            "api",
            "2026-01-01T00:00:00Z",
            &json!({"backend": "IstioLocal"}),
        );
        assert_eq!(judge(&[&istio], true), gateway::Merge::Replaces);
        let older = policy("aaa", "2025-01-01T00:00:00Z", &eg);
        assert_eq!(judge(&[&api, &older], true), gateway::Merge::Replaces);
        // Palisade's own policy on one rule of the route: cannot be confirmed, and says why.
        let rule = policy(
            "api",
            "2026-01-01T00:00:00Z",
            &json!({"backend": "EnvoyGateway", "targetRef": {"group": "gateway.networking.k8s.io",
                    "kind": "HTTPRoute", "name": "api", "sectionName": "ra"}}),
        );
        assert!(matches!(
            judge(&[&rule], true),
            gateway::Merge::Unverified(why) if why.contains("one rule")
        ));
    }
}
