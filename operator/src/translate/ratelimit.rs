//! RateLimitPolicy → gateway configuration.
//!
//! - `EnvoyGateway`: one `gateway.envoyproxy.io/v1alpha1` `BackendTrafficPolicy` attached to the
//!   target. Every limit is one or more rules that all count (a request is refused when any is
//!   exhausted). Envoy Gateway counts per Second/Minute/Hour/Day and has no burst on global
//!   limits, so a limit with another period or a burst is reported and left out.
//! - `IstioLocal`: one `networking.istio.io/v1alpha3` `EnvoyFilter` attached to the target
//!   Gateway, with one Envoy `local_ratelimit` token bucket per limit (`max_tokens` = requests +
//!   burst, refilled by `requests` every `per`). Buckets are per gateway proxy and cannot be
//!   keyed or matched, so keyed or matched limits are reported and left out.

use std::fmt::Write as _;

use palisade_api::{
    RateLimitPolicy,
    auth_policy::PathPattern,
    rate_limit_policy::{Limit, LimitKey, RateLimitBackend},
};
use serde_json::{Map, Value, json};

use super::{Context, Desired, EnvoyGatewayRateLimit, Owner, put};
use crate::names;

/// Envoy Gateway's cap on global rate-limit rules in one policy.
pub const ENVOY_GATEWAY_MAX_GLOBAL_RULES: usize = 128;
/// Envoy Gateway's cap on local rate-limit rules in one policy.
pub const ENVOY_GATEWAY_MAX_LOCAL_RULES: usize = 16;

/// The backend a policy resolves to.
pub fn backend(policy: &RateLimitPolicy, ctx: &Context) -> RateLimitBackend {
    policy
        .spec
        .backend
        .unwrap_or(ctx.default_rate_limit_backend)
}

/// Translates one RateLimitPolicy.
pub fn translate(policy: &RateLimitPolicy, ctx: &Context) -> Desired {
    let owner = Owner {
        api_version: "palisade.dev/v1alpha1",
        kind: "RateLimitPolicy",
        name: policy.metadata.name.as_deref().unwrap_or_default(),
        namespace: policy.metadata.namespace.as_deref().unwrap_or_default(),
        uid: policy.metadata.uid.as_deref().unwrap_or_default(),
    };
    match backend(policy, ctx) {
        RateLimitBackend::EnvoyGateway => envoy_gateway(policy, ctx, &owner),
        RateLimitBackend::IstioLocal => istio_local(policy, &owner),
    }
}

fn target_ref(policy: &RateLimitPolicy) -> Value {
    let t = &policy.spec.target_ref;
    let mut r = Map::new();
    r.insert("group".into(), json!(t.group));
    r.insert("kind".into(), json!(t.kind));
    r.insert("name".into(), json!(t.name));
    if let Some(section) = &t.section_name {
        r.insert("sectionName".into(), json!(section));
    }
    Value::Object(r)
}

fn envoy_gateway(policy: &RateLimitPolicy, ctx: &Context, owner: &Owner<'_>) -> Desired {
    let mut out = Desired::default();
    let gateway_target = policy.spec.target_ref.kind == "Gateway";
    let mut rules = Vec::new();
    for limit in &policy.spec.limits {
        match eg_rules(limit, gateway_target) {
            Ok(mut r) => rules.append(&mut r),
            Err(why) => out.unsupported(
                "Unsupported",
                format!(
                    "limit {:?} is not enforced by Envoy Gateway: {why}",
                    limit.name
                ),
            ),
        }
    }
    let (kind, cap) = match ctx.envoy_gateway_rate_limit {
        EnvoyGatewayRateLimit::Global => ("Global", ENVOY_GATEWAY_MAX_GLOBAL_RULES),
        EnvoyGatewayRateLimit::Local => ("Local", ENVOY_GATEWAY_MAX_LOCAL_RULES),
    };
    if rules.len() > cap {
        out.unsupported(
            "TooManyRules",
            format!(
                "the limits need {} Envoy Gateway rules; {kind} rate limits allow at most {cap}, \
                 so none are enforced: split the policy or drop limits",
                rules.len()
            ),
        );
        return out;
    }
    if rules.is_empty() {
        return out;
    }
    if kind == "Local"
        && let Err((reason, why)) = local_rules_accepted(&rules)
    {
        out.unsupported(reason, why);
        return out;
    }
    let mut spec = json!({
        "targetRefs": [target_ref(policy)],
        "rateLimit": {
            "type": kind,
            kind.to_ascii_lowercase(): {"rules": rules},
        },
    });
    // A route's own policy would displace the Gateway's for that route: merged, both count.
    // Not Local ones: Envoy Gateway merges a Local limit's default bucket by replacing the
    // Gateway's with the route's (none: unlimited) and reports the Gateway's policy `Merged`;
    // unmerged, it reports that policy `Overridden` for the route, which its status then says.
    if !gateway_target && kind == "Global" {
        spec["mergeType"] = json!("StrategicMerge");
    }
    out.objects.push(owner.object(
        "gateway.envoyproxy.io/v1alpha1",
        "BackendTrafficPolicy",
        &names::generated(owner.name, "ratelimit"),
        spec,
    ));
    out
}

/// Whether Envoy Gateway accepts these Local rules, and means by them what the policy says: no
/// rule on several methods; one rule at most without client selectors (the default bucket); every unit a multiple of the
/// default's; and no default beside matched rules, since a request a matched rule counts never
/// takes a token from the default bucket.
fn local_rules_accepted(rules: &[Value]) -> Result<(), (&'static str, String)> {
    // Envoy Gateway writes a Local rule with several methods as one descriptor per method, all
    // with the same entries; Envoy refuses a route whose local rate limit repeats a descriptor
    // ("duplicate descriptor in the local rate descriptor"), so the gateway's whole route
    // configuration would be rejected.
    let several_methods = rules.iter().any(|r| {
        r["clientSelectors"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["methods"].as_array().is_some_and(|m| m.len() > 1))
    });
    if several_methods {
        return Err((
            "LocalMethods",
            "a limit on several methods: Envoy Gateway's Local rate limits write one identical \
             descriptor per method, which Envoy refuses together with the gateway's whole route \
             configuration; give the limit one method (one limit per method counts each \
             separately), drop the methods, or use Global"
                .into(),
        ));
    }
    let seconds = |r: &Value| match r["limit"]["unit"].as_str() {
        Some("Second") => 1,
        Some("Minute") => 60,
        Some("Hour") => 3_600,
        _ => 86_400,
    };
    let defaults: Vec<&Value> = rules
        .iter()
        .filter(|r| r.get("clientSelectors").is_none())
        .collect();
    if defaults.len() > 1 {
        return Err((
            "LocalDefaultRules",
            format!(
                "{} limits match every request; Envoy Gateway's Local rate limits allow one such \
                 limit per policy: merge them, or use Global",
                defaults.len()
            ),
        ));
    }
    if let Some(default) = defaults.first() {
        if rules.len() > 1 {
            return Err((
                "LocalDefaultBypassed",
                "a limit on every request beside limits on matched requests: with Local rate \
                 limits a request a matched limit counts is not counted by the limit on every \
                 request, so it would escape it; put the limit on every request in a policy of \
                 its own, or use Global"
                    .into(),
            ));
        }
        let unit = seconds(default);
        if rules.iter().any(|r| seconds(r) % unit != 0) {
            return Err((
                "LocalUnitNotMultiple",
                "Envoy Gateway's Local rate limits need every limit's period to be a multiple of \
                 the period of the limit on every request"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// Envoy Gateway's unit for a period, when it has one.
fn eg_unit(millis: u64) -> Option<&'static str> {
    match millis {
        1_000 => Some("Second"),
        60_000 => Some("Minute"),
        3_600_000 => Some("Hour"),
        86_400_000 => Some("Day"),
        _ => None,
    }
}

/// The Envoy Gateway rules for one limit (two for `clientIP`: one per address family, each
/// client getting its own counter).
fn eg_rules(limit: &Limit, gateway_target: bool) -> Result<Vec<Value>, String> {
    let unit = eg_unit(limit.per.as_millis()).ok_or_else(|| {
        format!(
            "per {} — Envoy Gateway counts per 1s, 1m, 1h or 24h only; restate the limit in one of those",
            limit.per
        )
    })?;
    if limit.burst.unwrap_or(0) > 0 {
        return Err(
            "burst — Envoy Gateway rate limits have no burst allowance; raise requests or use \
             backend IstioLocal"
                .into(),
        );
    }
    let mut selector = Map::new();
    if let Some(m) = &limit.match_ {
        put(
            &mut selector,
            "methods",
            json!(
                m.methods
                    .iter()
                    .map(|x| json!({"value": x.as_str()}))
                    .collect::<Vec<_>>()
            ),
        );
        if let Some(path) = eg_path(&m.paths) {
            selector.insert("path".into(), path);
        }
    }
    let mut selectors: Vec<Map<String, Value>> = vec![selector];
    match &limit.key {
        None => {}
        Some(LimitKey::ClientIp(_)) => {
            let base = selectors.remove(0);
            for cidr in ["0.0.0.0/0", "::/0"] {
                let mut s = base.clone();
                s.insert(
                    "sourceCIDR".into(),
                    json!({"type": "Distinct", "value": cidr}),
                );
                selectors.push(s);
            }
        }
        Some(LimitKey::Header(name)) => {
            // A request without the header is counted too: all such requests share one counter
            // (a Distinct match only counts requests that carry the header).
            let mut missing = selectors[0].clone();
            selectors[0].insert(
                "headers".into(),
                json!([{"name": name, "type": "Distinct"}]),
            );
            missing.insert(
                "headers".into(),
                json!([{"name": name, "type": "RegularExpression", "value": ".*", "invert": true}]),
            );
            selectors.push(missing);
        }
        Some(LimitKey::JwtClaim(claim)) => {
            return Err(format!(
                "jwtClaim {claim:?} — Envoy Gateway keys rate limits by header, not by JWT claim; \
                 copy the claim to a header (SecurityPolicy claimToHeaders) and key by header"
            ));
        }
        Some(LimitKey::SourceIdentity(_)) => {
            return Err(
                "sourceIdentity — an Envoy Gateway proxy sees no mesh identity of its clients; \
                 key by a header the client sets instead"
                    .into(),
            );
        }
    }
    Ok(selectors
        .into_iter()
        .map(|s| {
            let mut rule = Map::new();
            if !s.is_empty() {
                rule.insert("clientSelectors".into(), json!([s]));
            }
            rule.insert(
                "limit".into(),
                json!({"requests": limit.requests, "unit": unit}),
            );
            // On a Gateway target, Envoy Gateway gives each route its own counters unless
            // `shared`; a limit promises one counter (per key) for the whole target.
            if gateway_target {
                rule.insert("shared".into(), json!(true));
            }
            Value::Object(rule)
        })
        .collect())
}

/// One Envoy Gateway path match for a list of paths: a regular expression, so the paths share
/// one counter (separate rules would each count). Envoy matches it against `:path`, query
/// string included, so an exact path also matches itself followed by `?…` (otherwise
/// `/api/orders?x` would escape a limit on `/api/orders`).
fn eg_path(paths: &[PathPattern]) -> Option<Value> {
    if paths.is_empty() {
        return None;
    }
    let mut re = String::from("^(");
    for (i, p) in paths.iter().enumerate() {
        if i > 0 {
            re.push('|');
        }
        match p.strip_suffix('*') {
            Some(prefix) => {
                let _ = write!(re, "{}.*", regex_escape(prefix));
            }
            None => {
                let _ = write!(re, "{}(\\?.*)?", regex_escape(p));
            }
        }
    }
    re.push_str(")$");
    Some(json!({"type": "RegularExpression", "value": re}))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn istio_local(policy: &RateLimitPolicy, owner: &Owner<'_>) -> Desired {
    let mut out = Desired::default();
    if policy.spec.target_ref.kind != "Gateway" {
        out.unsupported(
            "Unsupported",
            "IstioLocal enforces limits in a gateway proxy: target the Gateway, not an HTTPRoute \
             (or use backend EnvoyGateway)"
                .into(),
        );
        return out;
    }
    if let Some(section) = &policy.spec.target_ref.section_name {
        out.unsupported(
            "SectionNameUnsupported",
            format!(
                "IstioLocal cannot limit one listener ({section:?}): an EnvoyFilter attaches to the \
                 whole Gateway (Istio's targetRefs have no sectionName), so the limits would apply \
                 to every listener; drop sectionName or use backend EnvoyGateway"
            ),
        );
        return out;
    }
    let mut patches = Vec::new();
    for limit in &policy.spec.limits {
        if limit.key.is_some() || limit.match_.is_some() {
            out.unsupported(
                "Unsupported",
                format!(
                    "limit {:?} is not enforced by IstioLocal: Envoy's local rate limit keeps one \
                     token bucket per proxy, so it cannot count per key or per match; use backend \
                     EnvoyGateway",
                    limit.name
                ),
            );
            continue;
        }
        let burst = limit.burst.unwrap_or(0);
        let fill_ms = limit.per.as_millis();
        let fill = if fill_ms.is_multiple_of(1000) {
            format!("{}s", fill_ms / 1000)
        } else {
            format!("{}.{:03}s", fill_ms / 1000, fill_ms % 1000)
        };
        patches.push(json!({
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": "GATEWAY",
                "listener": {"filterChain": {"filter": {
                    "name": "envoy.filters.network.http_connection_manager",
                    "subFilter": {"name": "envoy.filters.http.router"},
                }}},
            },
            "patch": {
                "operation": "INSERT_BEFORE",
                "value": {
                    "name": "envoy.filters.http.local_ratelimit",
                    "typed_config": {
                        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                        "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                        "value": {
                            "stat_prefix": format!("palisade_{}_{}", owner.name, limit.name).replace('-', "_"),
                            "token_bucket": {
                                "max_tokens": limit.requests.saturating_add(burst),
                                "tokens_per_fill": limit.requests,
                                "fill_interval": fill,
                            },
                            "filter_enabled": {"runtime_key": "palisade_rate_limit_enabled",
                                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                            "filter_enforced": {"runtime_key": "palisade_rate_limit_enforced",
                                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                        },
                    },
                },
            },
        }));
    }
    if !patches.is_empty() {
        let spec = json!({"targetRefs": [target_ref(policy)], "configPatches": patches});
        out.objects.push(owner.object(
            "networking.istio.io/v1alpha3",
            "EnvoyFilter",
            &names::generated(owner.name, "ratelimit"),
            spec,
        ));
    }
    out
}

/// Every object a RateLimitPolicy named `name` can produce, as `(apiVersion, kind, name)`.
pub fn candidates(name: &str) -> Vec<(&'static str, &'static str, String)> {
    let n = names::generated(name, "ratelimit");
    vec![
        (
            "gateway.envoyproxy.io/v1alpha1",
            "BackendTrafficPolicy",
            n.clone(),
        ),
        ("networking.istio.io/v1alpha3", "EnvoyFilter", n),
    ]
}

/// The Gateway API conflict rule for policies attached to one target: the oldest
/// (`creationTimestamp`) wins, ties broken by `{namespace}/{name}`. Returns, for `policy`, the
/// winner's `namespace/name` when another policy wins its target.
pub fn conflict_winner<'a>(
    policy: &RateLimitPolicy,
    all: impl IntoIterator<Item = &'a RateLimitPolicy>,
) -> Option<String> {
    let key = |p: &RateLimitPolicy| {
        (
            p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            ),
        )
    };
    let same_target = |p: &RateLimitPolicy| {
        p.metadata.namespace == policy.metadata.namespace
            && p.spec.target_ref.group == policy.spec.target_ref.group
            && p.spec.target_ref.kind == policy.spec.target_ref.kind
            && p.spec.target_ref.name == policy.spec.target_ref.name
    };
    let winner = all
        .into_iter()
        .filter(|p| same_target(p) && p.metadata.deletion_timestamp.is_none())
        .min_by_key(|p| key(p))?;
    let (_, winner_name) = key(winner);
    (winner_name != key(policy).1).then_some(winner_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_share_one_matcher() {
        assert_eq!(eg_path(&[]), None);
        assert_eq!(
            eg_path(&["/api/*".into(), "/v1.0/x".into()]),
            Some(json!({"type": "RegularExpression", "value": "^(/api/.*|/v1\\.0/x(\\?.*)?)$"}))
        );
    }

    /// Envoy matches the path regex against `:path`, query string included: an exact path
    /// matches with any query, and nothing else.
    #[test]
    fn exact_paths_match_with_a_query_string_and_nothing_else() {
        let m = eg_path(&["/api/orders".into()]).expect("a match");
        let re = regex::Regex::new(m["value"].as_str().expect("regex")).expect("valid");
        for hit in ["/api/orders", "/api/orders?x=1", "/api/orders?"] {
            assert!(re.is_match(hit), "{hit}");
        }
        for miss in ["/api/ordersx", "/api/orders/1", "/api", "/API/orders"] {
            assert!(!re.is_match(miss), "{miss}");
        }
    }

    #[test]
    fn only_whole_units_map() {
        assert_eq!(eg_unit(1_000), Some("Second"));
        assert_eq!(eg_unit(86_400_000), Some("Day"));
        assert_eq!(eg_unit(30_000), None);
    }
}
