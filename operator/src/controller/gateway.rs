//! What Envoy Gateway's controller says of the BackendTrafficPolicies a RateLimitPolicy generated.
//!
//! A BackendTrafficPolicy that passed the CRD schema may still be refused by Envoy Gateway's
//! translator (`Accepted=False`), displaced for some routes by another policy (`Overridden=True`),
//! or never looked at (its target's Gateway is of a class no running Envoy Gateway controls).
//! Envoy Gateway writes its verdict per ancestor Gateway into the policy's `status.ancestors`
//! (Gateway API `PolicyStatus`); a RateLimitPolicy is `Ready` only when every one of its
//! BackendTrafficPolicies is accepted, on the generation Palisade wrote, for every ancestor.

use serde_json::Value;

use super::status::Cond;

/// Envoy Gateway's verdict on one BackendTrafficPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted, on the current generation, for every ancestor (named `namespace/name`).
    Accepted(Vec<String>),
    /// No verdict on the current generation yet.
    Pending(String),
    /// Refused for an ancestor: the ancestor, Envoy Gateway's reason and message.
    Refused(String, String, String),
    /// Accepted but displaced by another policy for an ancestor, or merged with one that replaces
    /// some of its limits: the ancestor and the message.
    Overridden(String, String),
    /// Accepted, but the target also receives traffic where Envoy Gateway enforces nothing (a
    /// parent Gateway of another class): why.
    Uncovered(String),
}

/// Ready reasons for Envoy Gateway's verdicts.
pub mod reason {
    /// Applied; Envoy Gateway has not yet accepted it (retried on its own: the verdict's status
    /// write wakes the policy).
    pub const AWAITING_GATEWAY: &str = "AwaitingGateway";
    /// Envoy Gateway refused a generated BackendTrafficPolicy.
    pub const GATEWAY_REJECTED: &str = "GatewayRejected";
    /// Envoy Gateway applies another policy in place of the generated one for some routes.
    pub const GATEWAY_OVERRIDDEN: &str = "GatewayOverridden";
    /// The target receives traffic through a Gateway Envoy Gateway does not control.
    pub const GATEWAY_NOT_COVERED: &str = "GatewayNotCovered";
}

/// `verdict` checked against the Gateways the target receives traffic through (`parents`, from
/// the cluster): an accepted policy must be accepted for every one of them, and each must be one
/// Envoy Gateway controls. Envoy Gateway reports only on Gateways it controls and leaves a
/// verdict in place when a route moves away, so acceptance alone proves neither.
pub fn covering(
    verdict: Verdict,
    status: Option<&Value>,
    parents: &Result<Vec<super::topology::Parent>, String>,
) -> Verdict {
    if !matches!(verdict, Verdict::Accepted(_)) {
        return verdict;
    }
    let parents = match parents {
        Ok(p) => p,
        Err(why) => return Verdict::Pending(why.clone()),
    };
    if parents.is_empty() {
        return Verdict::Pending("the target is attached to no Gateway".into());
    }
    if let Some(why) = parents.iter().find_map(|p| p.uncovered.clone()) {
        return Verdict::Uncovered(why);
    }
    let accepted: Vec<&Value> = status
        .and_then(|s| s["ancestors"].as_array())
        .into_iter()
        .flatten()
        .filter(|a| condition(a, "Accepted").is_some_and(|c| c["status"] == "True"))
        .collect();
    if let Some(p) = parents
        .iter()
        .find(|p| !accepted.iter().any(|a| super::topology::is_ancestor(a, p)))
    {
        return Verdict::Pending(format!(
            "no verdict of Envoy Gateway for Gateway {}, a parent of the target",
            p.gateway
        ));
    }
    verdict
}

fn ancestor_name(a: &Value) -> String {
    let r = &a["ancestorRef"];
    let name = format!(
        "{} {}/{}",
        r["kind"].as_str().unwrap_or("Gateway"),
        r["namespace"].as_str().unwrap_or_default(),
        r["name"].as_str().unwrap_or_default()
    );
    match r["sectionName"].as_str() {
        Some(section) => format!("{name} ({section})"),
        None => name,
    }
}

fn condition<'a>(a: &'a Value, type_: &str) -> Option<&'a Value> {
    a["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// What Envoy Gateway's `Merged` condition on a Gateway-level policy says: the routes
/// (`namespace/name`) whose own policy is merged with it, or `None` when the message says
/// anything else (a scope other than routes, or a wording this reading does not know).
fn merged_routes(message: &str) -> Option<Vec<&str>> {
    let list = message
        .strip_prefix(
            "This policy is being merged by other backendTrafficPolicies for these routes: [",
        )?
        .strip_suffix(']')?;
    let routes: Vec<&str> = list.split(' ').collect();
    let well_formed = routes.iter().all(|r| {
        let mut parts = r.split('/');
        matches!((parts.next(), parts.next(), parts.next()), (Some(ns), Some(name), None)
            if !ns.is_empty() && !name.is_empty())
    });
    // The message names routes without their kind: a name twice is two kinds of route (an
    // HTTPRoute and a GRPCRoute), and which policy merged into which cannot be told apart.
    let distinct = routes
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        == routes.len();
    (well_formed && distinct).then_some(routes)
}

/// The messages of the `Merged=True` conditions in Envoy Gateway's `status`.
fn merged_conditions(status: &Value) -> impl Iterator<Item = &str> {
    status["ancestors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| condition(a, "Merged"))
        .filter(|m| m["status"] == "True")
        .filter_map(|m| m["message"].as_str())
}

/// The messages of the `Merged=True` conditions Envoy Gateway writes on a Gateway-level policy
/// with `status` when it merges route policies into it (a route policy's own note that it is
/// merged left out): empty when it merges none.
pub fn merged_messages(status: &Value) -> Vec<&str> {
    merged_conditions(status)
        .filter(|m| !m.starts_with("Merged with policy "))
        .collect()
}

/// The Gateway-level policies (`(namespace, name)`) a route-level BackendTrafficPolicy with
/// `status` is merged into, as Envoy Gateway reports it.
pub fn merged_into(status: &Value) -> Vec<(String, String)> {
    merged_conditions(status)
        .filter_map(|m| m.strip_prefix("Merged with policy "))
        .filter_map(|p| p.split_once('/'))
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
        .collect()
}

/// Whether the route-level BackendTrafficPolicy with `spec`, `status` and `generation`, which
/// must target the whole of route `kind`/`name` (no rule of it, no selector), is merged with the
/// Gateway-level policy `gateway_policy` (`namespace/name`) in a way that keeps every rate limit
/// of it there: Envoy Gateway merges the route's rate limits into the Gateway's, and with
/// `StrategicMerge` its global rules are added to the Gateway's (named apart, so none replaces
/// another). A `JSONMerge` replaces the Gateway's list of rules with the route's, and a `local`
/// section, with either merge, replaces the Gateway's default bucket (with none: unlimited).
/// A policy on one rule of the route displaces this one there, and Envoy Gateway reports that
/// only as this one `Overridden`: any such verdict, a refusal, or a verdict not on the current
/// generation fails.
pub fn merge_keeps_limits(
    spec: &Value,
    status: &Value,
    generation: Option<i64>,
    (kind, name): (&str, &str),
    gateway_policy: &str,
) -> bool {
    let Some(generation) = generation else {
        return false;
    };
    let current = |c: &Value| {
        c["observedGeneration"]
            .as_i64()
            .is_some_and(|o| o >= generation)
    };
    let ancestors = status["ancestors"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let merged_here = ancestors
        .iter()
        .filter_map(|a| condition(a, "Merged"))
        .any(|m| {
            m["status"] == "True"
                && m["message"].as_str() == Some(&format!("Merged with policy {gateway_policy}"))
                && current(m)
        });
    let accepted = ancestors
        .iter()
        .filter_map(|a| condition(a, "Accepted"))
        .any(|c| c["status"] == "True" && current(c));
    let displaced = ancestors.iter().any(|a| {
        condition(a, "Overridden").is_some_and(|o| o["status"] == "True")
            || condition(a, "Accepted").is_some_and(|c| c["status"] != "True")
    });
    let whole_route = spec["targetRefs"].as_array().is_some_and(|t| {
        matches!(t.as_slice(), [t] if t["group"] == "gateway.networking.k8s.io"
            && t["kind"] == kind && t["name"] == name && t.get("sectionName").is_none())
    }) && spec.get("targetRef").is_none()
        && spec.get("targetSelectors").is_none();
    merged_here
        && accepted
        && !displaced
        && whole_route
        && spec["mergeType"] == "StrategicMerge"
        && spec["rateLimit"].get("local").is_none()
}

/// What the policy Envoy Gateway merges into a Gateway-level one on a route does to that one's
/// limits there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Keeps every one of them: Palisade's own route policy (see [`merge_keeps_limits`]).
    Keeps,
    /// Palisade's own route policy, on a version Envoy Gateway has not reported on yet.
    Awaiting,
    /// Palisade's own route policy, but a merge whose effect Palisade cannot confirm: why.
    Unverified(&'static str),
    /// May replace some: any other policy.
    Replaces,
}

/// Whether Envoy Gateway's `status` is about `generation` of its object: every condition it
/// wrote is of that generation (or a later one).
pub fn reported_on(status: &Value, generation: Option<i64>) -> bool {
    let Some(generation) = generation else {
        return false;
    };
    let mut conditions = status["ancestors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["conditions"].as_array())
        .flatten()
        .peekable();
    conditions.peek().is_some()
        && conditions.all(|c| {
            c["observedGeneration"]
                .as_i64()
                .is_some_and(|o| o >= generation)
        })
}

/// The verdict on a BackendTrafficPolicy from its `status` and its current `generation` (the one
/// Palisade's write returned, when it wrote). `unseen`: the object is not in the cache yet.
/// For a Gateway-level policy, `keeps_limits` says of a route (`namespace/name`) whose own policy
/// Envoy Gateway merges with this one whether that merge keeps all of this one's limits there
/// (see [`merge_keeps_limits`]); `None` for a route-level policy.
pub fn verdict(
    generation: Option<i64>,
    status: Option<&Value>,
    unseen: bool,
    keeps_limits: Option<&dyn Fn(&str) -> Merge>,
) -> Verdict {
    const SILENT: &str = "Envoy Gateway has not reported on this version of it (is the target \
         attached to a Gateway of a GatewayClass that a running Envoy Gateway controls?)";
    let ancestors = status
        .and_then(|s| s["ancestors"].as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    if unseen || ancestors.is_empty() {
        return Verdict::Pending(SILENT.into());
    }
    let mut accepted = Vec::new();
    for a in ancestors {
        let name = ancestor_name(a);
        let Some(acc) = condition(a, "Accepted") else {
            // Envoy Gateway adds an entry per listener where a route's policy is merged with the
            // Gateway's (`Merged=True`, no `Accepted`): a note on an accepted policy.
            if condition(a, "Merged").is_some_and(|m| m["status"] == "True") {
                continue;
            }
            return Verdict::Pending(format!("no Accepted condition for {name} yet"));
        };
        // A verdict without the generation it is about could be about an older spec.
        let seen = acc["observedGeneration"].as_i64();
        if let Some(gen_) = generation
            && seen.is_none_or(|seen| seen < gen_)
        {
            return Verdict::Pending(format!(
                "Envoy Gateway's status for {name} is of generation {}, not {gen_}",
                seen.map_or_else(|| "unknown".to_owned(), |s| s.to_string())
            ));
        }
        if acc["status"] != "True" {
            return Verdict::Refused(
                name,
                acc["reason"].as_str().unwrap_or_default().to_owned(),
                acc["message"].as_str().unwrap_or_default().to_owned(),
            );
        }
        if let Some(o) = condition(a, "Overridden")
            && o["status"] == "True"
        {
            return Verdict::Overridden(name, o["message"].as_str().unwrap_or_default().to_owned());
        }
        // A route's policy merged into this Gateway-level one is what that route enforces: only
        // a merge that keeps every limit of this one leaves it enforced as written there.
        if let Some(keeps) = keeps_limits
            && let Some(m) = condition(a, "Merged")
            && m["status"] == "True"
        {
            let message = m["message"].as_str().unwrap_or_default();
            let Some(routes) = merged_routes(message) else {
                return Verdict::Overridden(
                    name,
                    format!(
                        "{message}; Palisade cannot tell what that merge leaves of this policy's \
                         limits"
                    ),
                );
            };
            let judged: Vec<(&str, Merge)> = routes.into_iter().map(|r| (r, keeps(r))).collect();
            if let Some((r, _)) = judged.iter().find(|(_, m)| *m == Merge::Replaces) {
                return Verdict::Overridden(
                    name,
                    format!(
                        "{message}; on route {r} the merged policy is not one that only adds to \
                         this one's limits (a JSONMerge replaces its rules, a local section its \
                         default limit)"
                    ),
                );
            }
            if let Some((r, Merge::Unverified(why))) = judged
                .iter()
                .find(|(_, m)| matches!(m, Merge::Unverified(_)))
            {
                return Verdict::Overridden(name, format!("{message}; on route {r}: {why}"));
            }
            if let Some((r, _)) = judged.iter().find(|(_, m)| *m == Merge::Awaiting) {
                return Verdict::Pending(format!(
                    "Envoy Gateway has not reported on the current version of Palisade's policy \
                     on route {r}, merged into this one"
                ));
            }
        }
        accepted.push(name);
    }
    if accepted.is_empty() {
        return Verdict::Pending("no Accepted condition from Envoy Gateway yet".into());
    }
    accepted.sort();
    accepted.dedup();
    Verdict::Accepted(accepted)
}

/// The `Ready` condition for a RateLimitPolicy whose generated objects are applied (`ready`, as
/// [`super::readiness`] says), given Envoy Gateway's verdict on each of its
/// BackendTrafficPolicies (`(name, verdict)`). A policy that is not ready for another reason keeps
/// that reason; a refusal outranks an override, which outranks a pending verdict.
pub fn ready(ready: Cond, verdicts: &[(String, Verdict)]) -> Cond {
    if !ready.status || verdicts.is_empty() {
        return ready;
    }
    // The first of the most serious verdicts decides.
    let rank = |v: &Verdict| match v {
        Verdict::Refused(..) => 0,
        Verdict::Overridden(..) => 1,
        Verdict::Uncovered(_) => 2,
        Verdict::Pending(_) => 3,
        Verdict::Accepted(_) => 4,
    };
    let not_ready = |reason, message| Cond::new("Ready", false, reason, message);
    match verdicts.iter().min_by_key(|(_, v)| rank(v)) {
        Some((obj, Verdict::Refused(anc, why, msg))) => {
            return not_ready(
                reason::GATEWAY_REJECTED,
                format!(
                    "Envoy Gateway did not accept BackendTrafficPolicy {obj} for {anc} ({why}): \
                     {msg}; none of this policy's limits are enforced there"
                ),
            );
        }
        Some((obj, Verdict::Overridden(anc, msg))) => {
            return not_ready(
                reason::GATEWAY_OVERRIDDEN,
                format!(
                    "Envoy Gateway applies another policy in place of BackendTrafficPolicy {obj} \
                     on {anc}: {msg}"
                ),
            );
        }
        Some((obj, Verdict::Uncovered(why))) => {
            return not_ready(
                reason::GATEWAY_NOT_COVERED,
                format!("Envoy Gateway accepted BackendTrafficPolicy {obj}, but {why}"),
            );
        }
        Some((obj, Verdict::Pending(why))) => {
            return not_ready(
                reason::AWAITING_GATEWAY,
                format!(
                    "{}; waiting for Envoy Gateway to accept BackendTrafficPolicy {obj}: {why}",
                    ready.message
                ),
            );
        }
        Some((_, Verdict::Accepted(_))) | None => {}
    }
    let ancestors: Vec<&str> = verdicts
        .iter()
        .filter_map(|(_, v)| match v {
            Verdict::Accepted(a) => Some(a),
            _ => None,
        })
        .flatten()
        .map(String::as_str)
        .collect();
    Cond::new(
        "Ready",
        true,
        &ready.reason,
        format!(
            "{}; Envoy Gateway accepted them for {}",
            ready.message,
            ancestors.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ancestor(conds: &Value) -> Value {
        json!({
            "ancestorRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                            "namespace": "shop", "name": "shop"},
            "controllerName": "gateway.envoyproxy.io/gatewayclass-controller",
            "conditions": conds,
        })
    }

    fn accepted(generation: i64) -> Value {
        json!([{"type": "Accepted", "status": "True", "reason": "Accepted",
                "message": "Policy has been accepted.", "observedGeneration": generation}])
    }

    type Case = (&'static str, Option<Value>, bool, fn(&Verdict) -> bool);

    #[test]
    fn verdicts_from_envoy_gateway_status() {
        let refused = json!([{"type": "Accepted", "status": "False", "reason": "Invalid",
            "message": "Enable Ratelimit in the EnvoyGateway config to configure global rateLimit.",
            "observedGeneration": 2}]);
        let overridden = json!([
            {"type": "Accepted", "status": "True", "reason": "Accepted", "observedGeneration": 2},
            {"type": "Overridden", "status": "True", "reason": "Overridden",
             "message": "This policy is being overridden by other backendTrafficPolicies for these routes: [shop/api]",
             "observedGeneration": 2}]);
        let overridden_false = json!([
            {"type": "Accepted", "status": "True", "reason": "Accepted", "observedGeneration": 2},
            {"type": "Overridden", "status": "False", "reason": "x", "observedGeneration": 2}]);
        let mut merged = ancestor(
            &json!([{"type": "Merged", "status": "True", "reason": "Merged",
            "message": "Merged with policy shop/edge", "observedGeneration": 2}]),
        );
        merged["ancestorRef"]["sectionName"] = json!("http");
        let table: Vec<Case> = vec![
            ("no status", None, false, |v| {
                matches!(v, Verdict::Pending(_))
            }),
            (
                "empty ancestors",
                Some(json!({"ancestors": []})),
                false,
                |v| matches!(v, Verdict::Pending(_)),
            ),
            (
                "accepted",
                Some(json!({"ancestors": [ancestor(&accepted(2))]})),
                false,
                |v| *v == Verdict::Accepted(vec!["Gateway shop/shop".into()]),
            ),
            (
                "accepted but not in the cache",
                Some(json!({"ancestors": [ancestor(&accepted(2))]})),
                true,
                |v| matches!(v, Verdict::Pending(_)),
            ),
            (
                "accepted without observedGeneration",
                Some(json!({"ancestors": [ancestor(&json!([
                    {"type": "Accepted", "status": "True", "reason": "Accepted"}]))]})),
                false,
                |v| matches!(v, Verdict::Pending(m) if m.contains("generation unknown")),
            ),
            (
                "accepted an older generation",
                Some(json!({"ancestors": [ancestor(&accepted(1))]})),
                false,
                |v| matches!(v, Verdict::Pending(m) if m.contains("generation 1, not 2")),
            ),
            (
                "no Accepted condition",
                Some(json!({"ancestors": [ancestor(&json!([]))]})),
                false,
                |v| matches!(v, Verdict::Pending(_)),
            ),
            (
                "refused",
                Some(json!({"ancestors": [ancestor(&refused)]})),
                false,
                |v| matches!(v, Verdict::Refused(a, r, m) if a == "Gateway shop/shop" && r == "Invalid" && m.contains("Enable Ratelimit")),
            ),
            (
                "overridden",
                Some(json!({"ancestors": [ancestor(&overridden)]})),
                false,
                |v| matches!(v, Verdict::Overridden(_, m) if m.contains("shop/api")),
            ),
            (
                "Overridden=False is accepted",
                Some(json!({"ancestors": [ancestor(&overridden_false)]})),
                false,
                |v| matches!(v, Verdict::Accepted(_)),
            ),
            (
                "one refused ancestor of two",
                Some(json!({"ancestors": [ancestor(&accepted(2)), ancestor(&refused)]})),
                false,
                |v| matches!(v, Verdict::Refused(..)),
            ),
        ];
        for (what, status, written, check) in table {
            let v = verdict(Some(2), status.as_ref(), written, None);
            assert!(check(&v), "{what}: {v:?}");
        }
    }

    /// A Gateway-level policy's ancestor, accepted, with Envoy Gateway's `Merged` condition.
    fn merged_into(message: &str) -> Value {
        json!({"ancestors": [ancestor(&json!([
            {"type": "Accepted", "status": "True", "reason": "Accepted", "observedGeneration": 2},
            {"type": "Merged", "status": "True", "reason": "Merged", "message": message,
             "observedGeneration": 2}]))]})
    }

    #[test]
    fn a_gateway_policy_merged_with_a_route_policy_that_replaces_its_limits_is_not_accepted() {
        const TWO: &str = "This policy is being merged by other backendTrafficPolicies for these \
                           routes: [shop/api shop/third]";
        let ours = |r: &str| {
            if r == "shop/api" {
                Merge::Keeps
            } else {
                Merge::Replaces
            }
        };
        let all = |_: &str| Merge::Keeps;
        let lagging = |r: &str| {
            if r == "shop/api" {
                Merge::Keeps
            } else {
                Merge::Awaiting
            }
        };
        let status = merged_into(TWO);
        // Both routes' policies keep the Gateway's limits: accepted.
        assert_eq!(
            verdict(Some(2), Some(&status), false, Some(&all)),
            Verdict::Accepted(vec!["Gateway shop/shop".into()])
        );
        // One of them does not (or is not Palisade's): that route is named.
        assert!(matches!(
            verdict(Some(2), Some(&status), false, Some(&ours)),
            Verdict::Overridden(a, m) if a == "Gateway shop/shop" && m.contains("on route shop/third")
                && !m.contains("route shop/api ")
        ));
        let rule_level = |r: &str| {
            if r == "shop/api" {
                Merge::Keeps
            } else {
                Merge::Unverified("one rule")
            }
        };
        assert!(matches!(
            verdict(Some(2), Some(&status), false, Some(&rule_level)),
            Verdict::Overridden(_, m) if m.ends_with("on route shop/third: one rule")
        ));
        // Palisade's own route policy, not yet reported on in its current version: waiting.
        assert!(matches!(
            verdict(Some(2), Some(&status), false, Some(&lagging)),
            Verdict::Pending(m) if m.contains("route shop/third")
        ));
        // A message of another shape is not read as harmless.
        for odd in [
            "This policy is being merged by other backendTrafficPolicies for these gateway \
             listeners: [shop/shop/http] and these routes: [shop/api]",
            "This policy is being merged by other backendTrafficPolicies for these routes: []",
            "This policy is being merged by other backendTrafficPolicies for these routes: [shop/api",
            // An HTTPRoute and a GRPCRoute of one name: which merged what cannot be told.
            "This policy is being merged by other backendTrafficPolicies for these routes: [shop/api shop/api]",
            "merged",
        ] {
            assert!(
                matches!(
                    verdict(Some(2), Some(&merged_into(odd)), false, Some(&all)),
                    Verdict::Overridden(_, m) if m.contains("cannot tell")
                ),
                "{odd}"
            );
        }
        // Merged=False, or a route-level policy (its own note that it is merged): accepted.
        let mut not_merged = merged_into(TWO);
        not_merged["ancestors"][0]["conditions"][1]["status"] = json!("False");
        assert!(matches!(
            verdict(Some(2), Some(&not_merged), false, Some(&ours)),
            Verdict::Accepted(_)
        ));
        assert!(matches!(
            verdict(Some(2), Some(&status), false, None),
            Verdict::Accepted(_)
        ));
    }

    /// A route policy's status: merged with `shop/palisade-edge-ratelimit` (its own entry for
    /// the listener) and accepted, on `generation`.
    fn route_merged(generation: i64) -> Value {
        json!({"ancestors": [
            {"ancestorRef": {"kind": "Gateway", "namespace": "shop", "name": "shop",
                             "sectionName": "http"},
             "conditions": [{"type": "Merged", "status": "True", "reason": "Merged",
                "message": "Merged with policy shop/palisade-edge-ratelimit",
                "observedGeneration": generation}]},
            ancestor(&accepted(generation))]})
    }

    /// Palisade's route policy on HTTPRoute `api`: Global rules, merged strategically.
    fn route_global() -> Value {
        json!({"mergeType": "StrategicMerge",
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "api"}],
            "rateLimit": {"type": "Global", "global": {"rules": [{"limit": {"requests": 1, "unit": "Minute"}}]}}})
    }

    const EDGE: &str = "shop/palisade-edge-ratelimit";

    fn keeps(spec: &Value, status: &Value, generation: i64, with: &str) -> bool {
        merge_keeps_limits(spec, status, Some(generation), ("HTTPRoute", "api"), with)
    }

    #[test]
    fn only_a_strategic_merge_of_global_rules_keeps_the_gateways_limits() {
        let merged = route_merged;
        let global = route_global();
        assert!(keeps(&global, &merged(3), 3, EDGE));
        // Merged with another Gateway-level policy, or on an older generation: not this merge.
        assert!(!keeps(&global, &merged(3), 3, "shop/other"));
        assert!(!keeps(&global, &merged(2), 3, EDGE));
        assert!(!keeps(&global, &json!({}), 3, EDGE));
        // A JSONMerge replaces the Gateway's rules; a local section its default bucket.
        let mut json_merge = global.clone();
        json_merge["mergeType"] = json!("JSONMerge");
        assert!(!keeps(&json_merge, &merged(3), 3, EDGE));
        let mut local = global.clone();
        local["rateLimit"]["local"] = json!({"rules": []});
        assert!(!keeps(&local, &merged(3), 3, EDGE));
        let mut unmerged = global.clone();
        unmerged.as_object_mut().map(|o| o.remove("mergeType"));
        assert!(!keeps(&unmerged, &merged(3), 3, EDGE));
    }

    #[test]
    fn reported_on_means_every_condition_is_of_that_generation() {
        assert!(reported_on(&route_merged(3), Some(3)));
        assert!(reported_on(&route_merged(4), Some(3)));
        assert!(!reported_on(&route_merged(2), Some(3)));
        assert!(!reported_on(&route_merged(3), None));
        assert!(!reported_on(&json!({}), Some(3)));
        let mut mixed = route_merged(3);
        mixed["ancestors"][0]["conditions"][0]["observedGeneration"] = json!(2);
        assert!(!reported_on(&mixed, Some(3)));
    }

    #[test]
    fn a_merged_route_policy_counts_only_whole_accepted_and_undisplaced() {
        let merged = route_merged;
        let global = route_global();
        // It must cover the whole of that route: not one rule of it, not another route, no
        // selector.
        for (what, pointer, value) in [
            ("a rule", "/targetRefs/0/sectionName", json!("rb")),
            ("another route", "/targetRefs/0/name", json!("other")),
            ("another kind", "/targetRefs/0/kind", json!("GRPCRoute")),
        ] {
            let mut narrower = global.clone();
            match narrower.pointer_mut(pointer) {
                Some(slot) => *slot = value,
                None => narrower["targetRefs"][0]["sectionName"] = value,
            }
            assert!(!keeps(&narrower, &merged(3), 3, EDGE), "{what}");
        }
        let mut two = global.clone();
        two["targetRefs"]
            .as_array_mut()
            .expect("refs")
            .push(json!({"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "x"}));
        assert!(!keeps(&two, &merged(3), 3, EDGE));
        let mut selected = global.clone();
        selected["targetSelectors"] = json!([{"kind": "HTTPRoute", "matchLabels": {"a": "b"}}]);
        assert!(!keeps(&selected, &merged(3), 3, EDGE));
        // A rule-level policy on that route displaces it there: Envoy Gateway says Overridden.
        let mut over = merged(3);
        over["ancestors"][1]["conditions"]
            .as_array_mut()
            .expect("conditions")
            .push(json!({"type": "Overridden", "status": "True", "reason": "Overridden",
                "message": "This policy is being overridden by other backendTrafficPolicy for these route rules: [rb]",
                "observedGeneration": 3}));
        assert!(!keeps(&global, &over, 3, EDGE));
        // Refused (e.g. Conflicted with an older policy on the route), or not yet accepted.
        let mut conflicted = merged(3);
        conflicted["ancestors"][1]["conditions"][0]["status"] = json!("False");
        assert!(!keeps(&global, &conflicted, 3, EDGE));
        let only_merged = json!({"ancestors": [merged(3)["ancestors"][0].clone()]});
        assert!(!keeps(&global, &only_merged, 3, EDGE));
        assert!(!merge_keeps_limits(
            &global,
            &merged(3),
            None,
            ("HTTPRoute", "api"),
            EDGE
        ));
    }

    #[test]
    fn accepted_only_for_every_parent_envoy_gateway_controls() {
        use crate::controller::topology::Parent;
        let status = json!({"ancestors": [ancestor(&accepted(2))]});
        let ok = Verdict::Accepted(vec!["Gateway shop/shop".into()]);
        let parent = |g: &str, uncovered: Option<&str>| Parent {
            gateway: g.into(),
            controller: "gateway.envoyproxy.io/gatewayclass-controller".into(),
            uncovered: uncovered.map(Into::into),
        };
        let check =
            |parents: Result<Vec<Parent>, String>| covering(ok.clone(), Some(&status), &parents);
        assert_eq!(check(Ok(vec![parent("shop/shop", None)])), ok);
        // A second parent of another class: its traffic is not limited.
        assert!(matches!(
            check(Ok(vec![parent("shop/shop", None), parent("shop/side", Some("not Envoy Gateway"))])),
            Verdict::Uncovered(m) if m == "not Envoy Gateway"
        ));
        // The route moved to another Gateway: the verdict left for the old one does not count.
        assert!(matches!(
            check(Ok(vec![parent("shop/new", None)])),
            Verdict::Pending(m) if m.contains("shop/new")
        ));
        assert!(matches!(check(Ok(vec![])), Verdict::Pending(_)));
        // The Gateway moved to another class whose name merely looks like Envoy Gateway's: the
        // verdict Envoy Gateway left under its own name does not count.
        let mut spoofed = parent("shop/shop", None);
        spoofed.controller = "gateway.envoyproxy.io/spoof".into();
        assert!(matches!(check(Ok(vec![spoofed])), Verdict::Pending(_)));
        // A verdict for another kind of parent of the same name does not count either.
        let mut listener_set = status.clone();
        listener_set["ancestors"][0]["ancestorRef"]["kind"] = json!("ListenerSet");
        assert!(matches!(
            covering(
                ok.clone(),
                Some(&listener_set),
                &Ok(vec![parent("shop/shop", None)])
            ),
            Verdict::Pending(_)
        ));
        assert!(matches!(check(Err("no route".into())), Verdict::Pending(m) if m == "no route"));
        // Other verdicts pass through.
        let refused = Verdict::Refused("a".into(), "b".into(), "c".into());
        assert_eq!(
            covering(refused.clone(), Some(&status), &Ok(vec![])),
            refused
        );
    }

    #[test]
    fn ready_only_when_every_policy_is_accepted() {
        let applied = Cond::new("Ready", true, "Enforced", "1 generated objects applied");
        let ok = (
            "shop/a".to_owned(),
            Verdict::Accepted(vec!["Gateway shop/shop".into()]),
        );
        let pending = ("shop/b".to_owned(), Verdict::Pending("no status".into()));
        let refused = (
            "shop/c".to_owned(),
            Verdict::Refused("Gateway shop/shop".into(), "Invalid".into(), "bad".into()),
        );
        let over = (
            "shop/d".to_owned(),
            Verdict::Overridden("Gateway shop/shop".into(), "by shop/x".into()),
        );
        let r = ready(applied.clone(), std::slice::from_ref(&ok));
        assert!(
            r.status && r.message.contains("accepted them for Gateway shop/shop"),
            "{r:?}"
        );
        let r = ready(applied.clone(), &[ok.clone(), pending.clone()]);
        assert!(!r.status && r.reason == reason::AWAITING_GATEWAY, "{r:?}");
        let r = ready(
            applied.clone(),
            &[pending.clone(), over.clone(), refused.clone()],
        );
        assert!(!r.status && r.reason == reason::GATEWAY_REJECTED, "{r:?}");
        assert!(
            r.message.contains("shop/c") && r.message.contains("bad"),
            "{r:?}"
        );
        let r = ready(applied.clone(), &[pending, over]);
        assert!(!r.status && r.reason == reason::GATEWAY_OVERRIDDEN, "{r:?}");
        // Not ready for another reason: that reason stays.
        let partial = Cond::new("Ready", false, "PartiallyEnforced", "m");
        assert_eq!(ready(partial.clone(), std::slice::from_ref(&ok)), partial);
        // No BackendTrafficPolicy (the IstioLocal backend): nothing to wait for.
        assert_eq!(ready(applied.clone(), &[]), applied);
    }
}
