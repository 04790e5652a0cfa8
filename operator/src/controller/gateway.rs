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
    /// Accepted but displaced by another policy for an ancestor: the ancestor and the message.
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

/// The verdict on a BackendTrafficPolicy from its `status` and its current `generation` (the one
/// Palisade's write returned, when it wrote). `unseen`: the object is not in the cache yet.
pub fn verdict(generation: Option<i64>, status: Option<&Value>, unseen: bool) -> Verdict {
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
            let v = verdict(Some(2), status.as_ref(), written);
            assert!(check(&v), "{what}: {v:?}");
        }
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
