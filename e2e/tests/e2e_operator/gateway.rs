//! The real Envoy Gateway controller decides whether a RateLimitPolicy is `Ready`: Palisade reports
//! `Ready=True` only when Envoy Gateway accepted every BackendTrafficPolicy it wrote, on the
//! generation it wrote, and says why not otherwise (refused, displaced by another policy, or no
//! word from any controller).

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    ControlPlane,
    envoygateway::{EnvoyGateway, GATEWAY_CLASS, RateLimits},
    operator::OperatorProcess,
};
use serde_json::Value;

use super::{WAIT, apply_yaml, condition, get, rlp};
use crate::Env;

fn gateway_and_routes(ns: &str) -> String {
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
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: api, namespace: {ns}}}
spec:
  parentRefs: [{{name: shop}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
      backendRefs: [{{name: orders, port: 8080}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: other, namespace: {ns}}}
spec:
  parentRefs: [{{name: shop}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /other}}}}]
      backendRefs: [{{name: orders, port: 8080}}]
"
    )
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
