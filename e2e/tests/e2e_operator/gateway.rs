//! The real Envoy Gateway controller decides whether a RateLimitPolicy is `Ready`: Palisade reports
//! `Ready=True` only when Envoy Gateway accepted every BackendTrafficPolicy it wrote, on the
//! generation it wrote, and says why not otherwise (refused, displaced by another policy, or no
//! word from any controller).

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    ControlPlane,
    envoygateway::{
        Bucket, EnvoyGateway, GATEWAY_CLASS, LocalLimit, RateLimits, RateRequest, local_buckets,
        local_rate_limits,
    },
    operator::OperatorProcess,
};
use serde_json::Value;

use super::{WAIT, apply_yaml, condition, get, rlp};
use crate::Env;

fn gateway_and_routes(ns: &str) -> String {
    let mut routes = String::new();
    for r in ["api", "other", "third"] {
        let _ = write!(
            routes,
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {r}, namespace: {ns}}}
spec:
  parentRefs: [{{name: shop}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /{r}}}}}]
      backendRefs: [{{name: orders, port: 8080}}]
"
        );
    }
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: shop, namespace: {ns}}}
spec:
  gatewayClassName: {GATEWAY_CLASS}
  listeners:
    - {{name: http, protocol: HTTP, port: 80}}
---
apiVersion: v1
kind: Service
metadata: {{name: orders, namespace: {ns}}}
spec:
  ports: [{{port: 8080}}]
---
# A ready endpoint, so the routes forward (a route without one is a direct 503 response, which
# Envoy Gateway gives no rate limit).
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: orders-1
  namespace: {ns}
  labels: {{kubernetes.io/service-name: orders, endpointslice.kubernetes.io/managed-by: palisade-e2e}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints: [{{addresses: [10.0.0.10], conditions: {{ready: true}}}}]
{routes}"
    )
}

/// `kubectl patch --type=merge` of `kind` `name` in `ns` with `patch`.
fn merge_patch(cp: &ControlPlane, ns: &str, kind: &str, name: &str, patch: &str) -> Result<()> {
    palisade_e2e::run_ok(cp.kubectl().args([
        "patch",
        kind,
        name,
        "-n",
        ns,
        "--type=merge",
        "-p",
        patch,
    ]))?;
    Ok(())
}

/// The `Ready` condition of RateLimitPolicy `name` once its reason is `reason`.
fn ready_with(cp: &ControlPlane, ns: &str, name: &str, reason: &str) -> Result<Value> {
    let mut last = Value::Null;
    cp.eventually(
        &format!("RateLimitPolicy {name} Ready reason {reason}"),
        WAIT,
        || {
            let p = get(cp, ns, "ratelimitpolicy", name)?;
            let ready = condition(&p, "Ready")?.clone();
            last = p["status"].clone();
            (ready["reason"] == reason).then_some(ready)
        },
    )
    .with_context(|| {
        let btp = get(
            cp,
            ns,
            "backendtrafficpolicy",
            &format!("palisade-{name}-ratelimit"),
        );
        format!(
            "last status of {name}: {last}; its BackendTrafficPolicy's status: {}",
            btp.map(|b| b["status"].clone()).unwrap_or_default()
        )
    })
}

pub fn envoy_gateway_decides_ready(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "eg-ready", "")?;
    cp.with_temp_ns("op-eg", |ns| {
        apply_yaml(cp, ns, &gateway_and_routes(ns))?;
        // No controller runs: applied, but nothing enforces it, and the policy says so.
        apply_yaml(
            cp,
            ns,
            &rlp("api", "    - {name: all, requests: 100, per: 1m}\n"),
        )?;
        let waiting = ready_with(cp, ns, "api", "AwaitingGateway")?;
        if waiting["status"] != "False"
            || !waiting["message"]
                .as_str()
                .unwrap_or_default()
                .contains("Envoy Gateway has not reported on this version")
        {
            bail!("without a gateway controller the policy must not be Ready: {waiting}");
        }

        let eg = EnvoyGateway::start(cp, &env.opts.bin_dir, RateLimits::Global)?;
        let with_eg =
            |r: Result<Value>| r.with_context(|| format!("Envoy Gateway log:\n{}", eg.log_tail()));
        // Accepted by the real controller for the route's Gateway: Ready, and it says by whom.
        let ready = with_eg(ready_with(cp, ns, "api", "Enforced"))?;
        let msg = ready["message"].as_str().unwrap_or_default();
        if ready["status"] != "True"
            || !msg.contains(&format!(
                "Envoy Gateway accepted them for Gateway {ns}/shop"
            ))
        {
            bail!("accepted policy not reported as such: {ready}");
        }

        // A Gateway-level policy beside the route's: the route's policy is merged with it
        // (mergeType), so Envoy Gateway overrides neither and both are Ready.
        apply_yaml(
            cp,
            ns,
            &rlp("edge", "    - {name: all, requests: 1000, per: 1m}\n")
                .replace("kind: HTTPRoute, name: api}", "kind: Gateway, name: shop}"),
        )?;
        with_eg(ready_with(cp, ns, "edge", "Enforced"))?;
        with_eg(ready_with(cp, ns, "api", "Enforced"))?;

        attacker_policy_displaces_palisades(cp, ns, &eg)?;
        attacker_merge_replaces_gateway_limits(cp, ns, &eg)?;
        attacker_displaces_or_replaces_palisades_merged_policy(cp, ns, &eg)?;
        parents_envoy_gateway_does_not_control(cp, ns, &eg)?;

        // An install without the global rate-limit service: Envoy Gateway refuses Global limits,
        // and every policy that relies on them says so (none is enforced there).
        drop(eg);
        let eg = EnvoyGateway::start(cp, &env.opts.bin_dir, RateLimits::LocalOnly)?;
        let refused = ready_with(cp, ns, "api", "GatewayRejected")
            .with_context(|| format!("Envoy Gateway log:\n{}", eg.log_tail()))?;
        if !refused["message"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("ratelimit")
        {
            bail!("the refusal should carry Envoy Gateway's reason: {refused}");
        }
        Ok(())
    })
}

/// An older BackendTrafficPolicy made by hand displaces Palisade's on a route (refused) and the
/// Gateway-level one there (overridden); both policies say so until it goes.
fn attacker_policy_displaces_palisades(
    cp: &ControlPlane,
    ns: &str,
    eg: &EnvoyGateway,
) -> Result<()> {
    let with_eg =
        |r: Result<Value>| r.with_context(|| format!("Envoy Gateway log:\n{}", eg.log_tail()));
    // The attacker's move: an older BackendTrafficPolicy of their own on the same route, with
    // a limit a thousand times looser. Envoy Gateway keeps the oldest policy per target, so
    // Palisade's is no longer what the route enforces; the policy must stop saying Ready.
    apply_yaml(
        cp,
        ns,
        "apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: aaa-loose}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: other}]
  rateLimit:
    type: Global
    global:
      rules: [{limit: {requests: 100000, unit: Minute}}]
",
    )?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    apply_yaml(
        cp,
        ns,
        &rlp("other", "    - {name: all, requests: 100, per: 1m}\n")
            .replace("name: api}", "name: other}"),
    )?;
    let refused = with_eg(ready_with(cp, ns, "other", "GatewayRejected"))?;
    let msg = refused["message"].as_str().unwrap_or_default();
    if refused["status"] != "False"
        || !msg.contains(&format!(
            "BackendTrafficPolicy {ns}/palisade-other-ratelimit"
        ))
    {
        bail!("a displaced policy must say which of its objects Envoy Gateway refused: {refused}");
    }
    let p = get(cp, ns, "ratelimitpolicy", "other").context("policy")?;
    if condition(&p, "Stalled").map(|c| &c["status"]) != Some(&Value::from("True")) {
        bail!(
            "a refused policy needs the user: Stalled=True expected: {}",
            p["status"]
        );
    }
    // The loose policy is not merged with the Gateway's either: on that route it replaces
    // the Gateway-level limit too, and the Gateway's policy says so.
    let overridden = with_eg(ready_with(cp, ns, "edge", "GatewayOverridden"))?;
    if !overridden["message"]
        .as_str()
        .unwrap_or_default()
        .contains(&format!("{ns}/other"))
    {
        bail!("the override should name the route: {overridden}");
    }
    // The loose policy goes: Envoy Gateway accepts Palisade's, and the policy is Ready again.
    palisade_e2e::run_ok(cp.kubectl().args([
        "delete",
        "backendtrafficpolicy",
        "aaa-loose",
        "-n",
        ns,
    ]))?;
    with_eg(ready_with(cp, ns, "other", "Enforced"))?;
    with_eg(ready_with(cp, ns, "edge", "Enforced"))?;
    Ok(())
}

/// Applies the hand-made BackendTrafficPolicy `zz-merge` on route `third`, merged (`merge_type`)
/// with the Gateway's, with a limit a thousand times looser than Palisade's.
fn hand_made_merge(cp: &ControlPlane, ns: &str, merge_type: &str) -> Result<()> {
    apply_yaml(
        cp,
        ns,
        &format!(
            "apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {{name: zz-merge}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: third}}]
  mergeType: {merge_type}
  rateLimit:
    type: Global
    global:
      rules: [{{limit: {{requests: 100000, unit: Minute}}}}]
"
        ),
    )
}

/// The Gateway-level policy `edge` is `GatewayOverridden`, naming route `third` (and not `api`,
/// whose policy is Palisade's own).
fn edge_overridden_on_third(
    cp: &ControlPlane,
    ns: &str,
    eg: &EnvoyGateway,
    what: &str,
) -> Result<()> {
    let merged = ready_under(cp, ns, eg, "edge", "GatewayOverridden").context(what.to_owned())?;
    let msg = merged["message"].as_str().unwrap_or_default();
    if merged["status"] != "False" || !msg.contains(&format!("on route {ns}/third")) {
        bail!("{what}: the Gateway-level policy must name route third: {merged}");
    }
    if msg.contains(&format!("on route {ns}/api")) {
        bail!("{what}: Palisade's own merged route policy must not count against it: {merged}");
    }
    Ok(())
}

/// [`ready_with`], with Envoy Gateway's log when it fails.
fn ready_under(
    cp: &ControlPlane,
    ns: &str,
    eg: &EnvoyGateway,
    name: &str,
    reason: &str,
) -> Result<Value> {
    ready_with(cp, ns, name, reason)
        .with_context(|| format!("Envoy Gateway log:\n{}", eg.log_tail()))
}

fn delete(cp: &ControlPlane, ns: &str, kind: &str, name: &str) -> Result<()> {
    palisade_e2e::run_ok(cp.kubectl().args(["delete", kind, name, "-n", ns]))?;
    Ok(())
}

/// A BackendTrafficPolicy made by hand on a route with `mergeType: JSONMerge`: Envoy Gateway
/// merges it into the Gateway-level policy, reports that one `Merged` (not `Overridden`), and on
/// that route the hand-made rules replace the Gateway's. The Gateway's policy stops saying Ready
/// and names the route; Palisade's own route policy, merged with it the same way, does not count
/// against it.
fn attacker_merge_replaces_gateway_limits(
    cp: &ControlPlane,
    ns: &str,
    eg: &EnvoyGateway,
) -> Result<()> {
    hand_made_merge(cp, ns, "JSONMerge")?;
    edge_overridden_on_third(cp, ns, eg, "a hand-made JSONMerge")?;
    ready_under(cp, ns, eg, "api", "Enforced")?;
    // A strategic merge of a policy Palisade did not write: it cannot read it, so the Gateway's
    // policy is not Ready either.
    hand_made_merge(cp, ns, "StrategicMerge")?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    edge_overridden_on_third(cp, ns, eg, "a hand-made StrategicMerge")?;
    delete(cp, ns, "backendtrafficpolicy", "zz-merge")?;
    ready_under(cp, ns, eg, "edge", "Enforced")?;
    Ok(())
}

/// Palisade's own policy on route `third`, merged with the Gateway's: displaced on the route's
/// one rule by a hand-made policy (Envoy Gateway still reports the Gateway's policy only
/// `Merged` for the route), then deleted while a hand-made merge waits to take its place (Envoy
/// Gateway's report on the Gateway's policy stays word for word the same). The Gateway's policy
/// says so both times.
fn attacker_displaces_or_replaces_palisades_merged_policy(
    cp: &ControlPlane,
    ns: &str,
    eg: &EnvoyGateway,
) -> Result<()> {
    merge_patch(
        cp,
        ns,
        "httproute",
        "third",
        r#"{"spec":{"rules":[{"name":"ra","matches":[{"path":{"type":"PathPrefix","value":"/third"}}],"backendRefs":[{"name":"orders","port":8080}]}]}}"#,
    )?;
    apply_yaml(
        cp,
        ns,
        &rlp("third", "    - {name: all, requests: 100, per: 1m}\n")
            .replace("name: api}", "name: third}"),
    )?;
    ready_under(cp, ns, eg, "third", "Enforced")?;
    ready_under(cp, ns, eg, "edge", "Enforced")?;
    apply_yaml(
        cp,
        ns,
        "apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: zz-rule}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: third, sectionName: ra}]
  rateLimit:
    type: Global
    global:
      rules: [{limit: {requests: 100000, unit: Minute}}]
",
    )?;
    edge_overridden_on_third(cp, ns, eg, "a rule-level policy")?;
    delete(cp, ns, "backendtrafficpolicy", "zz-rule")?;
    ready_under(cp, ns, eg, "edge", "Enforced")?;
    // The HTTPRoute leaves the Gateway (Envoy Gateway's last word on Palisade's route policy,
    // merged, stays on it) and a GRPCRoute of the same name takes its place with a hand-made
    // JSONMerge: the Gateway's policy lists the name once, and Palisade's stale policy does not
    // vouch for it.
    merge_patch(
        cp,
        ns,
        "httproute",
        "third",
        r#"{"spec":{"parentRefs":[{"name":"nowhere"}]}}"#,
    )?;
    apply_yaml(
        cp,
        ns,
        "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: third}
spec:
  parentRefs: [{name: shop}]
  rules: [{backendRefs: [{name: orders, port: 8080}]}]
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: zz-grpc}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: GRPCRoute, name: third}]
  mergeType: JSONMerge
  rateLimit:
    type: Global
    global:
      rules: [{limit: {requests: 100000, unit: Minute}}]
",
    )?;
    edge_overridden_on_third(cp, ns, eg, "a GRPCRoute in the HTTPRoute's place")?;
    delete(cp, ns, "backendtrafficpolicy", "zz-grpc")?;
    delete(cp, ns, "grpcroute", "third")?;
    merge_patch(
        cp,
        ns,
        "httproute",
        "third",
        r#"{"spec":{"parentRefs":[{"name":"shop"}]}}"#,
    )?;
    ready_under(cp, ns, eg, "edge", "Enforced")?;
    // A newer hand-made merge on the route loses to Palisade's (Envoy Gateway keeps the oldest).
    hand_made_merge(cp, ns, "JSONMerge")?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    ready_under(cp, ns, eg, "edge", "Enforced")?;
    delete(cp, ns, "ratelimitpolicy", "third")?;
    edge_overridden_on_third(cp, ns, eg, "the route's RateLimitPolicy deleted")?;
    delete(cp, ns, "backendtrafficpolicy", "zz-merge")?;
    ready_under(cp, ns, eg, "edge", "Enforced")?;
    Ok(())
}

/// The route is also attached to a Gateway of another class (whose traffic Envoy Gateway does
/// not limit), then only to it (Envoy Gateway's last verdict, for the old Gateway, stays on the
/// object): the policy says so both times, and is Ready again when the route comes back.
fn parents_envoy_gateway_does_not_control(
    cp: &ControlPlane,
    ns: &str,
    eg: &EnvoyGateway,
) -> Result<()> {
    let with_eg =
        |r: Result<Value>| r.with_context(|| format!("Envoy Gateway log:\n{}", eg.log_tail()));
    apply_yaml(
        cp,
        ns,
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: other-class}}
spec: {{controllerName: example.com/other-gateway}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: side, namespace: {ns}}}
spec:
  gatewayClassName: other-class
  listeners: [{{name: http, protocol: HTTP, port: 80}}]
"
        ),
    )?;
    let parents = |refs: &str| {
        merge_patch(
            cp,
            ns,
            "httproute",
            "api",
            &format!("{{\"spec\":{{\"parentRefs\":{refs}}}}}"),
        )
    };
    parents(r#"[{"name":"shop"},{"name":"side"}]"#)?;
    let uncovered = with_eg(ready_with(cp, ns, "api", "GatewayNotCovered"))?;
    if !uncovered["message"]
        .as_str()
        .unwrap_or_default()
        .contains(&format!("Gateway {ns}/side"))
    {
        bail!("the uncovered Gateway should be named: {uncovered}");
    }
    parents(r#"[{"name":"side"}]"#)?;
    with_eg(ready_with(cp, ns, "api", "GatewayNotCovered"))?;
    parents(r#"[{"name":"shop"}]"#)?;
    with_eg(ready_with(cp, ns, "api", "Enforced"))?;
    // The Gateway moved to a class whose controller name only looks like Envoy Gateway's: the
    // verdict Envoy Gateway left on the object, under its own name, does not count.
    apply_yaml(
        cp,
        ns,
        "apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: look-alike}
spec: {controllerName: gateway.envoyproxy.io/look-alike}
",
    )?;
    let class = |c: &str| {
        merge_patch(
            cp,
            ns,
            "gateway",
            "shop",
            &format!("{{\"spec\":{{\"gatewayClassName\":\"{c}\"}}}}"),
        )
    };
    class("look-alike")?;
    with_eg(ready_with(cp, ns, "api", "AwaitingGateway"))?;
    class(GATEWAY_CLASS)?;
    with_eg(ready_with(cp, ns, "api", "Enforced"))?;
    Ok(())
}

fn bucket(requests: u64, every: &str) -> Bucket {
    Bucket {
        max_tokens: requests,
        tokens_per_fill: requests,
        fill_interval: every.into(),
    }
}

/// Local rate limits as the gateway's Envoy would receive them from the real Envoy Gateway: the
/// token buckets carry exactly the policies' limits, and nothing Palisade writes makes Envoy
/// refuse the route configuration. A limit on several methods, which Envoy Gateway would turn
/// into descriptors Envoy refuses, is not written (`LocalMethods`); the same limit written by hand
/// shows the refusal in the captured configuration.
pub fn local_limits_as_envoy_receives_them(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "eg-local", "envoyGatewayRateLimit: Local")?;
    let eg = EnvoyGateway::start(cp, &env.opts.bin_dir, RateLimits::LocalOnly)?;
    let with_eg =
        |r: Result<Value>| r.with_context(|| format!("Envoy Gateway log:\n{}", eg.log_tail()));
    cp.with_temp_ns("op-eg-local", |ns| {
        apply_yaml(cp, ns, &gateway_and_routes(ns))?;
        apply_yaml(cp, ns, &rlp("api", "    - {name: all, requests: 10, per: 1s}\n"))?;
        apply_yaml(
            cp,
            ns,
            &rlp(
                "other",
                "    - {name: writes, requests: 5, per: 1m, match: {methods: [POST]}}\n    - {name: per-key, requests: 7, per: 1h, key: {header: x-api-key}, match: {paths: [/other/*]}}\n",
            )
            .replace("name: api}", "name: other}"),
        )?;
        with_eg(ready_with(cp, ns, "api", "Enforced"))?;
        with_eg(ready_with(cp, ns, "other", "Enforced"))?;
        let route_of = |limits: &[LocalLimit], name: &str| -> Option<LocalLimit> {
            let prefix = format!("httproute/{ns}/{name}/");
            limits.iter().find(|l| l.route.starts_with(&prefix)).cloned()
        };
        let mut last = String::new();
        let limits = cp
            .eventually("local rate limits in the xDS", WAIT, || {
                let dump = eg.xds_dump(cp, ns, "shop").map_err(|e| last = format!("{e:#}")).ok()?;
                last = dump["routes"].to_string();
                let limits = local_rate_limits(&dump);
                (route_of(&limits, "api").is_some() && route_of(&limits, "other").is_some())
                    .then_some(limits)
            })
            .with_context(|| format!("last xDS dump: {}", &last[..last.len().min(3000)]))?;
        let api = route_of(&limits, "api").context("api")?;
        let ten_a_second = bucket(10, "1s");
        if api.default.as_ref() != Some(&ten_a_second) || !api.descriptors.is_empty() {
            bail!("route api should count every request in one bucket of 10 a second: {api:?}");
        }
        let other = route_of(&limits, "other").context("other")?;
        if !other.descriptors.iter().any(|(_, b)| *b == bucket(5, "60s")) {
            bail!("route other should count POST requests in a bucket of 5 a minute: {other:?}");
        }
        let dump = eg.xds_dump(cp, ns, "shop")?;
        let n = requests_decided_as_the_policies_say(&dump)?;
        println!(
            "  {n} requests decided by the local rate limits in Envoy Gateway's xDS, each as the policies say"
        );
        if let Some(refused) = limits.iter().find_map(LocalLimit::envoy_refuses) {
            bail!("Envoy would refuse what Palisade wrote: {refused}");
        }
        println!(
            "  {} routes with local rate limits in Envoy Gateway's xDS, as the policies say; none that Envoy refuses",
            limits.len()
        );

        // Several methods: not written, and said why.
        apply_yaml(
            cp,
            ns,
            &rlp(
                "writes",
                "    - {name: writes, requests: 5, per: 1m, match: {methods: [POST, PUT]}}\n",
            )
            .replace("kind: HTTPRoute, name: api}", "kind: Gateway, name: shop}"),
        )?;
        let p = cp.eventually("LocalMethods reported", WAIT, || {
            let p = get(cp, ns, "ratelimitpolicy", "writes")?;
            (condition(&p, "Unsupported")?["reason"] == "LocalMethods").then_some(p)
        })?;
        if condition(&p, "Ready").map(|c| &c["status"]) != Some(&Value::from("False"))
            || get(cp, ns, "backendtrafficpolicy", "palisade-writes-ratelimit").is_some()
        {
            bail!("a limit Envoy would refuse must not be written: {}", p["status"]);
        }
        // The same limit by hand reaches Envoy as a configuration it refuses: the check above
        // would catch it.
        apply_yaml(
            cp,
            ns,
            "apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: by-hand}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: third}]
  rateLimit:
    type: Local
    local:
      rules:
        - clientSelectors: [{methods: [{value: POST}, {value: PUT}]}]
          limit: {requests: 5, unit: Minute}
",
        )?;
        let refused = cp.eventually("the hand-made limit in the xDS", WAIT, || {
            let dump = eg.xds_dump(cp, ns, "shop").ok()?;
            local_rate_limits(&dump)
                .iter()
                .find_map(LocalLimit::envoy_refuses)
        })?;
        println!("  the same limit written by hand: {refused}");
        Ok(())
    })
}

/// Every generated request, decided as Envoy's local rate limit filter decides it with the
/// configuration Envoy Gateway sent, against what the policies say: the buckets it takes a token
/// from (requests, period) and, for a keyed limit, whether two requests share a bucket.
fn requests_decided_as_the_policies_say(limits_dump: &Value) -> Result<usize> {
    use std::net::{IpAddr, Ipv4Addr};
    const UNLIMITED: u64 = 4_294_967_295;
    let mut requests = Vec::new();
    for method in ["GET", "POST", "PUT"] {
        for path in [
            "/api",
            "/api/x?y=1",
            "/other",
            "/other/a",
            "/other/a?b=c",
            "/third",
        ] {
            for key in [None, Some("k1"), Some("k2")] {
                for client in [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)] {
                    requests.push(RateRequest {
                        method: method.into(),
                        path: path.into(),
                        headers: key
                            .map(|k| ("x-api-key".to_owned(), k.to_owned()))
                            .into_iter()
                            .collect(),
                        client: IpAddr::V4(client),
                    });
                }
            }
        }
    }
    // What the policies say: `api` counts every request 10 a second; `other` counts POSTs 5 a
    // minute and requests under /other/ 7 an hour per API key (those without one together).
    let said = |r: &RateRequest| -> Vec<(u64, String, Option<String>)> {
        let path = r.path.split('?').next().unwrap_or_default();
        let mut out = Vec::new();
        if path.starts_with("/api") {
            out.push((10, "1s".to_owned(), None));
        } else if path.starts_with("/other") {
            if r.method == "POST" {
                out.push((5, "60s".to_owned(), None));
            }
            if path.starts_with("/other/") {
                let key = r.header("x-api-key").unwrap_or("<none>").to_owned();
                out.push((7, "3600s".to_owned(), Some(key)));
            }
        }
        out.sort();
        out
    };
    let mut decided = Vec::new();
    for r in &requests {
        let taken: Vec<(String, Bucket)> = local_buckets(limits_dump, r)?
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, b)| b.max_tokens < UNLIMITED)
            .collect();
        let mut got: Vec<(u64, String)> = taken
            .iter()
            .map(|(_, b)| (b.max_tokens, b.fill_interval.clone()))
            .collect();
        got.sort();
        let want: Vec<(u64, String)> = said(r).into_iter().map(|(n, p, _)| (n, p)).collect();
        if got != want {
            bail!(
                "{} {} key {:?}: Envoy would count {taken:?}, the policies say {want:?}",
                r.method,
                r.path,
                r.header("x-api-key")
            );
        }
        decided.push((r, taken));
    }
    // Keyed buckets: shared exactly when the key is.
    for (a, ta) in &decided {
        for (b, tb) in &decided {
            let bucket = |t: &[(String, Bucket)]| {
                t.iter()
                    .find(|(_, b)| b.max_tokens == 7)
                    .map(|(n, _)| n.clone())
            };
            if let (Some(x), Some(y)) = (bucket(ta), bucket(tb)) {
                let same_key = a.header("x-api-key") == b.header("x-api-key");
                if (x == y) != same_key {
                    bail!(
                        "keyed bucket {x} / {y} for keys {:?} / {:?}",
                        a.header("x-api-key"),
                        b.header("x-api-key")
                    );
                }
            }
        }
    }
    Ok(decided.len())
}
