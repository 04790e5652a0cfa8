//! The operator against the real API server (with the garbage collector running): generated
//! Istio and Envoy Gateway objects are accepted by those projects' own schemas, follow updates,
//! revert hand edits, disappear with their policy; conflicts and unsupported limits are
//! reported; a crash mid-way converges without duplicates; a resync writes nothing; two
//! replicas never both lead.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use palisade_e2e::{ControlPlane, operator::OperatorProcess, run, run_ok};
use serde_json::Value;

use crate::{Env, TestFn};

mod gateway;

pub const TESTS: &[(&str, TestFn)] = &[
    ("e2e_operator::auth_policy_lifecycle", auth_policy_lifecycle),
    (
        "e2e_operator::rate_limit_conflict_and_unsupported",
        rate_limit_conflict_and_unsupported,
    ),
    (
        "e2e_operator::istio_local_and_updates",
        istio_local_and_updates,
    ),
    (
        "e2e_operator::spire_identities_are_cleaned_up_by_the_finalizer",
        spire_identities_are_cleaned_up_by_the_finalizer,
    ),
    (
        "e2e_operator::crash_converges_and_resync_writes_nothing",
        crash_converges_and_resync_writes_nothing,
    ),
    (
        "e2e_operator::two_replicas_one_leader",
        two_replicas_one_leader,
    ),
    (
        "e2e_operator::allow_policies_that_add_up_are_reported",
        allow_policies_that_add_up_are_reported,
    ),
    (
        "e2e_operator::ambient_workloads_make_http_rules_not_ready",
        ambient_workloads_make_http_rules_not_ready,
    ),
    (
        "e2e_operator::a_refused_allow_policy_relaxes_nothing",
        a_refused_allow_policy_relaxes_nothing,
    ),
    (
        "e2e_operator::added_fields_that_disable_a_policy_are_removed",
        added_fields_that_disable_a_policy_are_removed,
    ),
    (
        "e2e_operator::cli_render_is_what_the_operator_applies",
        cli_render_is_what_the_operator_applies,
    ),
    (
        "e2e_operator::envoy_gateway_decides_ready",
        gateway::envoy_gateway_decides_ready,
    ),
    (
        "e2e_operator::local_limits_as_envoy_receives_them",
        gateway::local_limits_as_envoy_receives_them,
    ),
];

const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn get(cp: &ControlPlane, ns: &str, kind: &str, name: &str) -> Option<Value> {
    let out = run(cp
        .kubectl()
        .args(["get", kind, name, "-n", ns, "-o", "json"]))
    .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

pub(crate) fn apply_yaml(cp: &ControlPlane, ns: &str, yaml: &str) -> Result<()> {
    let file = cp.work_dir.join(format!("apply-{ns}-{}.yaml", yaml.len()));
    std::fs::write(&file, yaml)?;
    run_ok(cp.kubectl().args(["apply", "-n", ns, "-f"]).arg(&file))?;
    Ok(())
}

pub(crate) fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn count(cp: &ControlPlane, ns: &str, kind: &str) -> Result<usize> {
    let out = run_ok(cp.kubectl().args([
        "get",
        kind,
        "-n",
        ns,
        "-l",
        "app.kubernetes.io/managed-by=palisade",
        "-o",
        "name",
    ]))?;
    Ok(out.lines().filter(|l| !l.is_empty()).count())
}

const ORDERS: &str = r"
apiVersion: palisade.dev/v1alpha1
kind: AuthPolicy
metadata:
  name: orders
spec:
  selector: {matchLabels: {app: orders}}
  jwt: {issuer: https://auth.example.com, audiences: [orders]}
  rules:
    - from: [{serviceAccount: {name: frontend}}]
      to: [{methods: [GET], paths: [/api/*]}]
      when: [{jwtScopes: [orders:read]}]
  deny:
    - to: [{paths: [/admin/*], ports: [8080]}]
";

/// A status someone else wrote is not the operator's word: it is put right, though the
/// operator's own status writes wake no reconcile. Each round first makes the operator write a
/// status of its own (a namespace-wide policy comes or goes, and `orders` says whether it is
/// widened), then forges one soon after: the forgery must not be taken for the operator's write.
fn forged_status_is_put_right(cp: &ControlPlane, ns: &str) -> Result<()> {
    let widened_by_open = |p: &Value| {
        condition(p, "Warning")
            .and_then(|c| c["message"].as_str())
            .is_some_and(|m| m.contains("AuthPolicies open also apply"))
    };
    let open = "apiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: open}\nspec:\n  rules: [{}]\n";
    for round in 0..4 {
        let widened = round % 2 == 0;
        if widened {
            apply_yaml(cp, ns, open)?;
        } else {
            run_ok(
                cp.kubectl()
                    .args(["delete", "authpolicy", "open", "-n", ns]),
            )?;
        }
        cp.eventually("the operator's own status write", WAIT, || {
            let p = get(cp, ns, "authpolicy", "orders")?;
            (widened_by_open(&p) == widened).then_some(())
        })?;
        std::thread::sleep(Duration::from_millis(500));
        run_ok(cp.kubectl().args([
            "patch",
            "authpolicy",
            "orders",
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"False","reason":"Forged","message":"forged","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#,
        ]))?;
        cp.eventually(
            &format!("the forged status put right (round {round})"),
            WAIT,
            || {
                let p = get(cp, ns, "authpolicy", "orders")?;
                (condition(&p, "Ready")?["reason"] == "Enforced"
                    && condition(&p, "Accepted").is_some()
                    && widened_by_open(&p) == widened)
                    .then_some(())
            },
        )?;
    }
    Ok(())
}

fn auth_policy_lifecycle(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "lifecycle", "")?;
    cp.with_temp_ns("op-auth", |ns| {
        apply_yaml(cp, ns, ORDERS)?;
        let policy = cp.eventually("AuthPolicy Ready", WAIT, || {
            let p = get(cp, ns, "authpolicy", "orders")?;
            (condition(&p, "Ready")?["status"] == "True").then_some(p)
        })?;
        if policy["status"]["observedGeneration"] != 1
            || policy["status"]["generated"].as_array().map(Vec::len) != Some(4)
        {
            bail!("unexpected status: {}", policy["status"]);
        }
        forged_status_is_put_right(cp, ns)?;
        let allow =
            get(cp, ns, "authorizationpolicy", "palisade-orders-allow").context("ALLOW policy")?;
        let principal = &allow["spec"]["rules"][0]["from"][0]["source"]["principals"][0];
        if principal.as_str() != Some(format!("cluster.local/ns/{ns}/sa/frontend").as_str()) {
            bail!("ALLOW policy principal is {principal}");
        }
        for (kind, name) in [
            ("authorizationpolicy", "palisade-orders-deny"),
            ("requestauthentication", "palisade-orders-jwt"),
            ("peerauthentication", "palisade-orders-mtls"),
        ] {
            get(cp, ns, kind, name).with_context(|| format!("{kind}/{name} missing"))?;
        }

        // Update: without jwt (and the token conditions that need it) the RequestAuthentication
        // goes and the DENY policy loses its "no token" rule.
        apply_yaml(
            cp,
            ns,
            &ORDERS
                .replace(
                    "  jwt: {issuer: https://auth.example.com, audiences: [orders]}\n",
                    "",
                )
                .replace("      when: [{jwtScopes: [orders:read]}]\n", ""),
        )?;
        cp.eventually(
            "RequestAuthentication pruned, DENY updated, generation 2 observed",
            WAIT,
            || {
                let p = get(cp, ns, "authpolicy", "orders")?;
                let deny = get(cp, ns, "authorizationpolicy", "palisade-orders-deny")?;
                (get(cp, ns, "requestauthentication", "palisade-orders-jwt").is_none()
                    // the deny entry and "no peer identity" (mtls: Strict)
                    && deny["spec"]["rules"].as_array()?.len() == 2
                    && p["status"]["observedGeneration"] == 2)
                    .then_some(())
            },
        )?;

        // Drift: a hand edit of a generated object is reverted and reported.
        run_ok(cp.kubectl().args([
            "patch",
            "authorizationpolicy",
            "palisade-orders-allow",
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"action":"DENY"}}"#,
        ]))?;
        cp.eventually("drift reverted", WAIT, || {
            let a = get(cp, ns, "authorizationpolicy", "palisade-orders-allow")?;
            (a["spec"]["action"] == "ALLOW").then_some(())
        })?;
        cp.eventually("DriftReverted event", WAIT, || {
            let out = run_ok(cp.kubectl().args([
                "get",
                "events.events.k8s.io",
                "-n",
                ns,
                "-o",
                "jsonpath={.items[*].reason}",
            ]))
            .ok()?;
            out.contains("DriftReverted").then_some(())
        })?;

        // Delete: the garbage collector removes everything the policy owned.
        run_ok(
            cp.kubectl()
                .args(["delete", "authpolicy", "orders", "-n", ns]),
        )?;
        cp.eventually("generated objects collected", WAIT, || {
            (count(cp, ns, "authorizationpolicies").ok()? == 0
                && count(cp, ns, "peerauthentications").ok()? == 0)
                .then_some(())
        })
    })
}

fn rlp(name: &str, limits: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: {name}
spec:
  targetRef: {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: api}}
  limits:
{limits}"
    )
}

fn rate_limit_conflict_and_unsupported(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "ratelimit", "")?;
    cp.with_temp_ns("op-rl", |ns| {
        apply_yaml(cp, ns, &rlp("first", "    - {name: per-ip, requests: 100, per: 1m, key: {clientIP: {}}}\n"))?;
        let btp = cp.eventually("BackendTrafficPolicy of the first policy", WAIT, || {
            get(cp, ns, "backendtrafficpolicy", "palisade-first-ratelimit")
        })?;
        if btp["spec"]["rateLimit"]["global"]["rules"].as_array().map(Vec::len) != Some(2) {
            bail!("clientIP should give one rule per address family: {}", btp["spec"]);
        }
        // creationTimestamp has one-second resolution: make the second policy clearly newer.
        std::thread::sleep(Duration::from_millis(1100));
        apply_yaml(cp, ns, &rlp("second", "    - {name: all, requests: 10, per: 1s}\n"))?;
        let second = cp.eventually("second policy Conflicted", WAIT, || {
            let p = get(cp, ns, "ratelimitpolicy", "second")?;
            (condition(&p, "Conflicted")?["status"] == "True").then_some(p)
        })?;
        let msg = condition(&second, "Conflicted").map(|c| c["message"].to_string()).unwrap_or_default();
        if !msg.contains(&format!("{ns}/first")) || condition(&second, "Accepted").map(|c| &c["status"]) != Some(&Value::from("False")) {
            bail!("the conflict does not name the winner: {}", second["status"]);
        }
        if get(cp, ns, "backendtrafficpolicy", "palisade-second-ratelimit").is_some() {
            bail!("the losing policy produced gateway config");
        }
        // The winner goes: the other policy takes over the target.
        run_ok(cp.kubectl().args(["delete", "ratelimitpolicy", "first", "-n", ns]))?;
        // Its BackendTrafficPolicy is applied, but no Envoy Gateway runs here to accept it (the
        // route does not even exist): not Ready, and the policy says what it waits for.
        cp.eventually("second policy takes over", WAIT, || {
            let p = get(cp, ns, "ratelimitpolicy", "second")?;
            (condition(&p, "Ready")?["reason"] == "AwaitingGateway"
                && condition(&p, "Ready")?["status"] == "False"
                && get(cp, ns, "backendtrafficpolicy", "palisade-second-ratelimit").is_some())
            .then_some(())
        })?;

        // A limit Envoy Gateway cannot express is reported, the rest enforced.
        let other = rlp("partial", "    - {name: every-30s, requests: 10, per: 30s}\n    - {name: per-minute, requests: 60, per: 1m}\n")
            .replace("name: api}", "name: other}");
        apply_yaml(cp, ns, &other)?;
        let p = cp.eventually("Unsupported reported", WAIT, || {
            let p = get(cp, ns, "ratelimitpolicy", "partial")?;
            condition(&p, "Unsupported").is_some().then_some(p)
        })?;
        let unsupported = condition(&p, "Unsupported").map(|c| c["message"].to_string()).unwrap_or_default();
        let ready = condition(&p, "Ready").cloned().unwrap_or_default();
        if !unsupported.contains("every-30s") || ready["reason"] != "PartiallyEnforced" || ready["status"] != "False" {
            bail!("unsupported limit not reported as such: {}", p["status"]);
        }
        let btp = get(cp, ns, "backendtrafficpolicy", "palisade-partial-ratelimit").context("partial BTP")?;
        if btp["spec"]["rateLimit"]["global"]["rules"].as_array().map(Vec::len) != Some(1) {
            bail!("the expressible limit should be enforced: {}", btp["spec"]);
        }
        Ok(())
    })
}

fn istio_local_and_updates(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "istio-local", "")?;
    cp.with_temp_ns("op-local", |ns| {
        let edge = |requests: u32| {
            rlp("edge", &format!("    - {{name: steady, requests: {requests}, per: 1s, burst: 50}}\n"))
                .replace("kind: HTTPRoute, name: api}", "kind: Gateway, name: edge}\n  backend: IstioLocal")
        };
        apply_yaml(cp, ns, &edge(100))?;
        // The EnvoyFilter passed Istio's own schema when the API server stored it.
        let bucket = |ef: &Value| {
            ef["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["value"]["token_bucket"].clone()
        };
        cp.eventually("EnvoyFilter with the token bucket", WAIT, || {
            let ef = get(cp, ns, "envoyfilter", "palisade-edge-ratelimit")?;
            (bucket(&ef)["max_tokens"] == 150).then_some(())
        })?;
        // An update of the policy updates the generated object.
        apply_yaml(cp, ns, &edge(10))?;
        cp.eventually("EnvoyFilter updated", WAIT, || {
            let ef = get(cp, ns, "envoyfilter", "palisade-edge-ratelimit")?;
            (bucket(&ef)["max_tokens"] == 60 && bucket(&ef)["tokens_per_fill"] == 10).then_some(())
        })?;
        Ok(())
    })
}

fn spire_identities_are_cleaned_up_by_the_finalizer(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(
        cp,
        "spire",
        "identitySource: Spire\ntrustDomain: prod.example\nspireClassName: prod",
    )?;
    cp.with_temp_ns("op-spire", |ns| {
        apply_yaml(cp, ns, ORDERS)?;
        let name = format!("palisade-{ns}.orders-id");
        let id = cp.eventually("ClusterSPIFFEID", WAIT, || {
            let out = run(cp
                .kubectl()
                .args(["get", "clusterspiffeid", &name, "-o", "json"]))
            .ok()?;
            out.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&out.stdout).ok())
                .flatten()
        })?;
        if id["spec"]["podSelector"]["matchLabels"]["app"] != "orders"
            || id["spec"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] != ns
            || id["spec"]["className"] != "prod"
        {
            bail!("ClusterSPIFFEID selects the wrong pods: {}", id["spec"]);
        }
        let allow = cp.eventually("ALLOW policy", WAIT, || {
            get(cp, ns, "authorizationpolicy", "palisade-orders-allow")
        })?;
        let principal = &allow["spec"]["rules"][0]["from"][0]["source"]["principals"][0];
        if principal.as_str() != Some(format!("prod.example/ns/{ns}/sa/frontend").as_str()) {
            bail!("principal {principal} does not use the configured trust domain");
        }
        run_ok(
            cp.kubectl()
                .args(["delete", "authpolicy", "orders", "-n", ns, "--timeout=30s"]),
        )?;
        let out = run(cp.kubectl().args(["get", "clusterspiffeid", &name]))?;
        if out.status.success() {
            bail!("the ClusterSPIFFEID outlived its AuthPolicy");
        }
        Ok(())
    })
}

fn many_policies(n: usize) -> String {
    use std::fmt::Write as _;
    (0..n).fold(String::new(), |mut out, i| {
        let _ = write!(
            out,
            "apiVersion: palisade.dev/v1alpha1
kind: AuthPolicy
metadata:
  name: svc-{i}
spec:
  selector: {{matchLabels: {{app: svc-{i}}}}}
  rules:
    - from: [{{serviceAccount: {{name: caller-{i}}}}}]
      to: [{{ports: [8080]}}]
---
"
        );
        out
    })
}

fn crash_converges_and_resync_writes_nothing(env: &Env) -> Result<()> {
    const N: u32 = 30;
    let cp = &env.cp;
    cp.with_temp_ns("op-crash", |ns| {
        let op = OperatorProcess::start(cp, "crash-1", "")?;
        apply_yaml(cp, ns, &many_policies(N as usize))?;
        // Crash as soon as the first objects appear: mid-way through the work.
        cp.eventually("first generated objects", WAIT, || (count(cp, ns, "authorizationpolicies").ok()? > 0).then_some(()))?;
        op.kill()?;
        let op = OperatorProcess::start(cp, "crash-2", "")?;
        cp.eventually("all policies Ready after the restart", Duration::from_mins(1), || {
            let out = run_ok(cp.kubectl().args([
                "get", "authpolicies", "-n", ns, "-o",
                r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
            ]))
            .ok()?;
            (out.lines().filter(|l| *l == "True").count() == N as usize).then_some(())
        })?;
        let (ap, pa) = (count(cp, ns, "authorizationpolicies")?, count(cp, ns, "peerauthentications")?);
        // Each policy: ALLOW, DENY ("no peer identity", mtls: Strict) and a PeerAuthentication.
        if (ap, pa) != (2 * N as usize, N as usize) {
            bail!("expected {} AuthorizationPolicies and {N} PeerAuthentications, found {ap} and {pa}", 2 * N);
        }
        let status = op.terminate()?;
        if !status.success() {
            bail!("graceful shutdown exited with {status}");
        }
        // A fresh replica reconciles everything once; nothing needs writing. Namespaces other
        // tests are still deleting would make it try (and count) writes there: wait them out.
        cp.eventually("no namespace terminating", Duration::from_mins(2), || {
            let phases = run_ok(cp.kubectl().args([
                "get", "namespaces", "-o", "jsonpath={.items[*].status.phase}",
            ]))
            .ok()?;
            (!phases.contains("Terminating")).then_some(())
        })?;
        let op = OperatorProcess::start(cp, "resync", "")?;
        cp.eventually("a full resync", WAIT, || {
            (op.counter("palisade_operator_reconciles_total").ok()? >= f64::from(N)).then_some(())
        })?;
        std::thread::sleep(Duration::from_secs(1));
        let (_, metrics) = op.get("/metrics")?;
        if !metrics.contains("palisade_operator_api_writes_total{what=\"apply\"}") {
            bail!("the write counter is not exported: {metrics}");
        }
        let writes = op.counter("palisade_operator_api_writes_total")? + 0.0;
        eprintln!("  writes during a resync of {N} converged AuthPolicies: {writes}");
        if writes != 0.0 {
            bail!("a no-op resync wrote {writes} times: {}", op.log_tail());
        }
        Ok(())
    })
}

fn lease_holder(cp: &ControlPlane) -> Result<String> {
    run_ok(cp.kubectl().args([
        "get",
        "lease",
        "palisade-e2e-leader",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]))
}

fn two_replicas_one_leader(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let lease = "leaderElection: {enabled: true, leaseName: palisade-e2e-leader, leaseNamespace: default, leaseSeconds: 6}";
    let first = OperatorProcess::start(cp, "leader-a", lease)?;
    // The second replica is ready while the first leads: readiness does not wait for the Lease,
    // so a Deployment of two replicas is fully available and a rolling upgrade can proceed.
    let mut second = OperatorProcess::start_standby(cp, "leader-b", lease)?;
    // While the first renews its lease, the second must not lead. (7 s: not a whole number
    // of the standby's 2 s retries, so the failover figure is not one lucky retry.)
    std::thread::sleep(Duration::from_secs(7));
    if !first.is_leading() {
        bail!("the first replica lost its lease while renewing it");
    }
    if second.is_leading() {
        bail!("the second replica leads while the first holds the lease");
    }
    if !second.is_ready() {
        bail!(
            "the standby is not ready while the first leads: a two-replica Deployment would never become available"
        );
    }
    first.terminate()?;
    let stopped = std::time::Instant::now();
    // A replica stopped gracefully gives its lease up rather than leaving it to run out.
    let holder = lease_holder(cp)?;
    if holder == "operator-leader-a" {
        bail!("the stopped replica still holds the lease: it was not released on shutdown");
    }
    second
        .wait_leading(Duration::from_secs(20))
        .context("the second replica never took over")?;
    // The standby tries every 2 s (a third of 6 s); waiting the lease out would take 4 s or more.
    let takeover = stopped.elapsed();
    eprintln!(
        "  failover after a graceful stop: standby leading {:.1} s later (lease 6 s)",
        takeover.as_secs_f64()
    );
    if takeover > Duration::from_secs(4) {
        bail!(
            "the standby took {takeover:?} to lead after the leader stopped: the lease was waited out"
        );
    }
    let holder = lease_holder(cp)?;
    if holder != "operator-leader-b" {
        bail!("lease held by {holder:?} after failover");
    }
    drop(second);
    Ok(())
}

/// Istio allows a request any ALLOW policy on the workload matches: a namespace-wide
/// `rules: [{}]` reopens the workloads another AuthPolicy restricts. Both policies say so in a
/// Warning condition naming the other, and the warning goes when the wide policy does.
fn allow_policies_that_add_up_are_reported(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "widen", "")?;
    cp.with_temp_ns("op-widen", |ns| {
        apply_yaml(
            cp,
            ns,
            "apiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: orders}\nspec:\n  selector: {matchLabels: {app: orders}}\n  rules: [{from: [{serviceAccount: {name: frontend}}]}]\n",
        )?;
        apply_yaml(
            cp,
            ns,
            "apiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: open}\nspec:\n  rules: [{}]\n",
        )?;
        let warning = |name: &str| -> Option<String> {
            let p = get(cp, ns, "authpolicy", name)?;
            condition(&p, "Warning").and_then(|c| c["message"].as_str().map(str::to_owned))
        };
        cp.eventually("orders reports that open widens it", WAIT, || {
            warning("orders").filter(|m| m.contains("AuthPolicies open also apply"))
        })?;
        cp.eventually("open reports that it widens orders", WAIT, || {
            warning("open").filter(|m| m.contains("AuthPolicies orders select"))
        })?;
        run_ok(cp.kubectl().args(["delete", "authpolicy", "open", "-n", ns]))?;
        cp.eventually("orders no longer widened", WAIT, || {
            let p = get(cp, ns, "authpolicy", "orders")?;
            condition(&p, "Warning").is_none().then_some(())
        })?;
        Ok(())
    })
}

/// Istio's ambient mesh enforces policies with ztunnel, which drops HTTP-level rules (an ALLOW
/// rule with paths never matches, a DENY loses its paths and so refuses more, no JWT is checked).
/// A policy with paths is `Ready` until its namespace is labelled for ambient, then not `Ready`
/// with the reason `AmbientNeedsWaypoint`, and `Ready` again when the label goes; an L4-only
/// policy stays `Ready` until the namespace also sends its traffic through a waypoint
/// (`AmbientWaypointIdentity`: ztunnel would check the waypoint's identity). A pod labelled for ambient in a namespace that is not makes the policy
/// selecting it not `Ready` either, and only that one.
fn ambient_workloads_make_http_rules_not_ready(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "ambient", "")?;
    cp.with_temp_ns("op-ambient", |ns| {
        apply_yaml(
            cp,
            ns,
            "apiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: orders}\nspec:\n  selector: {matchLabels: {app: orders}}\n  rules: [{from: [{serviceAccount: {name: frontend}}], to: [{methods: [GET], paths: [/api/orders]}]}]\n  deny: [{to: [{paths: [/admin/*]}]}]\n---\napiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: l4}\nspec:\n  selector: {matchLabels: {app: l4}}\n  rules: [{from: [{serviceAccount: {name: frontend}}], to: [{ports: [8080]}]}]\n---\napiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: payments}\nspec:\n  selector: {matchLabels: {app: payments}}\n  rules: [{to: [{paths: [/api/payments]}]}]\n",
        )?;
        let ready = |name: &str| -> Option<(String, String)> {
            let p = get(cp, ns, "authpolicy", name)?;
            let r = condition(&p, "Ready")?["status"].as_str()?.to_owned();
            let u = condition(&p, "Unsupported")
                .map(|c| format!("{}: {}", c["reason"].as_str().unwrap_or_default(), c["message"].as_str().unwrap_or_default()))
                .unwrap_or_default();
            Some((r, u))
        };
        for name in ["orders", "l4", "payments"] {
            cp.eventually(&format!("{name} Ready"), WAIT, || {
                ready(name).filter(|r| r.0 == "True")
            })?;
        }
        // One pod enrolled by its own label: only the policy selecting it is concerned.
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: payments-1, labels: {app: payments, istio.io/dataplane-mode: ambient}}\nspec: {containers: [{name: app, image: registry.example.com/payments:v1}]}\n";
        apply_yaml(cp, ns, pod)?;
        let why = cp.eventually("payments not Ready for its ambient pod", WAIT, || {
            ready("payments").filter(|r| r.0 == "False").map(|r| r.1)
        })?;
        if !why.starts_with("AmbientNeedsWaypoint: ") || !why.contains(&format!("pods {ns}/payments-1 it selects")) {
            bail!("payments: {why}");
        }
        if ready("orders").is_none_or(|r| r.0 != "True") {
            bail!("orders selects no ambient pod but is not Ready: {:?}", ready("orders"));
        }
        // The whole namespace.
        run_ok(cp.kubectl().args(["label", "namespace", ns, "istio.io/dataplane-mode=ambient"]))?;
        let why = cp.eventually("orders not Ready in an ambient namespace", WAIT, || {
            ready("orders").filter(|r| r.0 == "False").map(|r| r.1)
        })?;
        for says in ["AmbientNeedsWaypoint: ", "never match", "the deny applies without them", "istio.io/use-waypoint"] {
            if !why.contains(says) {
                bail!("orders' Unsupported condition does not say {says:?}: {why}");
            }
        }
        if ready("l4").is_none_or(|r| r.0 != "True") {
            bail!("an L4-only policy is not Ready in an ambient namespace: {:?}", ready("l4"));
        }
        // Behind a waypoint, ztunnel sees the waypoint's identity: identity rules are reported.
        run_ok(cp.kubectl().args(["label", "namespace", ns, "istio.io/use-waypoint=waypoint"]))?;
        let why = cp.eventually("l4 not Ready behind a waypoint", WAIT, || {
            ready("l4").filter(|r| r.0 == "False").map(|r| r.1)
        })?;
        if !why.starts_with("AmbientWaypointIdentity: ") || !why.contains("waypoint waypoint") {
            bail!("l4 behind a waypoint: {why}");
        }
        run_ok(cp.kubectl().args(["label", "namespace", ns, "istio.io/dataplane-mode-", "istio.io/use-waypoint-"]))?;
        cp.eventually("orders Ready again without the label", WAIT, || {
            ready("orders").filter(|r| r.0 == "True")
        })?;
        run_ok(cp.kubectl().args(["delete", "pod", "payments-1", "-n", ns, "--wait=false"]))?;
        cp.eventually("payments Ready again without its ambient pod", WAIT, || {
            ready("payments").filter(|r| r.0 == "True")
        })?;
        Ok(())
    })
}

/// When the API server refuses the ALLOW policy (here a ValidatingAdmissionPolicy standing in
/// for istiod's validation), nothing that could widen what the workload accepts is applied:
/// no PeerAuthentication or RequestAuthentication appears, and the AuthPolicy is not Ready.
fn a_refused_allow_policy_relaxes_nothing(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "tiers", "")?;
    cp.with_temp_ns("op-tiers", |ns| {
        let vap = format!(
            "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy\nmetadata: {{name: refuse-allow-{ns}}}\nspec:\n  failurePolicy: Fail\n  matchConstraints:\n    resourceRules: [{{apiGroups: [security.istio.io], apiVersions: ['*'], operations: [CREATE, UPDATE], resources: [authorizationpolicies]}}]\n  validations: [{{expression: \"object.metadata.name != 'palisade-orders-allow'\", message: refused for the test}}]\n---\napiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicyBinding\nmetadata: {{name: refuse-allow-{ns}}}\nspec:\n  policyName: refuse-allow-{ns}\n  validationActions: [Deny]\n  matchResources: {{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}}}\n"
        );
        let file = cp.work_dir.join(format!("vap-{ns}.yaml"));
        std::fs::write(&file, vap)?;
        run_ok(cp.kubectl().arg("apply").arg("-f").arg(&file))?;
        // The binding takes a moment to be in force: wait until a probe is refused.
        cp.eventually("the refusal in force", WAIT, || {
            let probe = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: palisade-orders-allow}\nspec: {action: ALLOW}\n";
            let f = cp.work_dir.join(format!("probe-{ns}.yaml"));
            std::fs::write(&f, probe).ok()?;
            let out = run(cp.kubectl().args(["apply", "--dry-run=server", "-n", ns, "-f"]).arg(&f)).ok()?;
            (!out.status.success()).then_some(())
        })?;
        apply_yaml(cp, ns, ORDERS)?;
        let policy = cp.eventually("AuthPolicy not Ready", WAIT, || {
            let p = get(cp, ns, "authpolicy", "orders")?;
            (condition(&p, "Ready")?["status"] == "False").then_some(p)
        })?;
        // The condition names the step and the object that failed.
        let message = condition(&policy, "Ready").and_then(|c| c["message"].as_str()).unwrap_or_default();
        if !message.starts_with("applying AuthorizationPolicy/palisade-orders-allow: ") {
            bail!("Ready=False does not name the failed step and object: {message}");
        }
        std::thread::sleep(Duration::from_secs(2));
        for (kind, name) in [
            ("peerauthentication", "palisade-orders-mtls"),
            ("requestauthentication", "palisade-orders-jwt"),
        ] {
            if get(cp, ns, kind, name).is_some() {
                bail!("{kind} {name} applied although the ALLOW policy was refused: {}", policy["status"]);
            }
        }
        let _ = run(cp.kubectl().arg("delete").arg("-f").arg(&file));
        Ok(())
    })
}

/// Someone with write access to Istio objects adds fields Palisade never sets, each of which
/// turns enforcement off while every field Palisade set stays as it was: the dry-run
/// annotation (DENY rules become shadow rules), a revision label no istiod serves, a selector
/// that matches nothing on a namespace-wide ALLOW policy (no ALLOW policy left: everything is
/// allowed), plain text on one port of one workload (`portLevelMtls`), and a source added inside
/// a deny rule (it then refuses one address only). Each is removed, and reported as drift.
fn added_fields_that_disable_a_policy_are_removed(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "foreign", "")?;
    cp.with_temp_ns("op-foreign", |ns| {
        apply_yaml(
            cp,
            ns,
            "apiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: wide}\nspec:\n  rules: [{from: [{serviceAccount: {name: frontend}}]}]\n  deny: [{to: [{paths: [/admin/*], ports: [8080]}]}]\n",
        )?;
        cp.eventually("AuthPolicy Ready", WAIT, || {
            let p = get(cp, ns, "authpolicy", "wide")?;
            (condition(&p, "Ready")?["status"] == "True").then_some(())
        })?;
        let edit = |args: &[&str]| -> Result<()> {
            run_ok(cp.kubectl().args(args).args(["-n", ns, "--field-manager=intruder"]))?;
            Ok(())
        };
        edit(&["annotate", "authorizationpolicy", "palisade-wide-deny", "istio.io/dry-run=true"])?;
        edit(&["label", "authorizationpolicy", "palisade-wide-allow", "istio.io/rev=nowhere"])?;
        edit(&[
            "patch", "authorizationpolicy", "palisade-wide-allow", "--type=merge", "-p",
            r#"{"spec":{"selector":{"matchLabels":{"none":"none"}}}}"#,
        ])?;
        edit(&[
            "patch", "peerauthentication", "palisade-wide-mtls", "--type=merge", "-p",
            r#"{"spec":{"selector":{"matchLabels":{"app":"orders"}},"portLevelMtls":{"8080":{"mode":"DISABLE"}}}}"#,
        ])?;
        // Nested in a rule Palisade wrote: the deny rule now applies to one address only.
        edit(&[
            "patch", "authorizationpolicy", "palisade-wide-deny", "--type=json", "-p",
            r#"[{"op":"add","path":"/spec/rules/0/from","value":[{"source":{"ipBlocks":["192.0.2.1/32"]}}]}]"#,
        ])?;
        cp.eventually("every added field removed", WAIT, || {
            let deny = get(cp, ns, "authorizationpolicy", "palisade-wide-deny")?;
            let allow = get(cp, ns, "authorizationpolicy", "palisade-wide-allow")?;
            let pa = get(cp, ns, "peerauthentication", "palisade-wide-mtls")?;
            (deny["metadata"]["annotations"].get("istio.io/dry-run").is_none()
                && deny["spec"]["rules"][0].get("from").is_none()
                && allow["metadata"]["labels"].get("istio.io/rev").is_none()
                && allow["spec"].get("selector").is_none()
                && pa["spec"].get("portLevelMtls").is_none()
                && pa["spec"].get("selector").is_none())
            .then_some(())
        })?;
        let notes = || {
            run_ok(cp.kubectl().args([
                "get", "events.events.k8s.io", "-n", ns, "-o", "jsonpath={.items[*].note}",
            ]))
            .unwrap_or_default()
        };
        cp.eventually("DriftReverted event naming an added field", WAIT, || {
            let out = notes();
            // The first revert's Event; later ones join its series.
            (out.contains("reverted hand edits") && out.contains("istio.io~1dry-run")).then_some(())
        })
        .with_context(notes)?;
        Ok(())
    })
}

/// `palisade render` runs the operator's translation offline: what it prints for a set of
/// resources is what the operator applies for them (every generated object, spec and labels),
/// and its notes are the reasons the operator reports in status.
fn cli_render_is_what_the_operator_applies(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let _op = OperatorProcess::start(cp, "cli-render", "")?;
    cp.with_temp_ns("op-cli", |ns| {
        let open = "apiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: open}\nspec:\n  rules: [{}]\n";
        let limits = rlp("orders", "    - {name: all, requests: 100, per: 1m}\n");
        let file = cp.work_dir.join(format!("{ns}-cli.yaml"));
        std::fs::write(&file, format!("{ORDERS}\n---\n{open}---\n{limits}"))?;
        run_ok(cp.kubectl().args(["apply", "-n", ns, "-f"]).arg(&file))?;
        let cli = palisade_e2e::operator::workspace_bin("palisade")?;
        let rendered: Value = serde_json::from_str(&run_ok(
            std::process::Command::new(cli)
                .args(["render", "-o", "json", "-n", ns, "-f"])
                .arg(&file),
        )?)?;
        let sections = rendered.as_array().context("sections")?;
        if sections.len() != 3 {
            bail!("palisade render gave {} sections: {rendered}", sections.len());
        }
        let (mut compared, mut notes) = (0, 0);
        for section in sections {
            let source = section["source"].as_str().unwrap_or_default();
            let (kind, name) = source
                .split_once(' ')
                .and_then(|(k, rest)| rest.split_once('/').map(|(_, n)| (k, n)))
                .context("source")?;
            // A policy reconciled before the others of the file reached the operator's cache
            // is reconciled again when they arrive: wait for the status that has its notes.
            let messages_of = |p: &Value| -> String {
                p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["message"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let all_notes = |p: &Value| {
                let messages = messages_of(p);
                section["notes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|n| n["message"].as_str().is_some_and(|m| messages.contains(m)))
            };
            let status = cp
                .eventually(&format!("{source} reconciled with its notes"), WAIT, || {
                    let p = get(cp, ns, &kind.to_lowercase(), name)?;
                    (p["status"]["observedGeneration"] == 1
                        && p["status"]["conditions"].as_array().is_some_and(|c| !c.is_empty())
                        && all_notes(&p))
                    .then_some(p)
                })
                .or_else(|e| {
                    get(cp, ns, &kind.to_lowercase(), name)
                        .filter(|p| p["status"]["observedGeneration"] == 1)
                        .ok_or(e)
                })?;
            for want in section["objects"].as_array().into_iter().flatten() {
                let (k, n) = (
                    want["kind"].as_str().unwrap_or_default(),
                    want["metadata"]["name"].as_str().unwrap_or_default(),
                );
                let have = cp.eventually(&format!("{k} {n}"), WAIT, || {
                    get(cp, want["metadata"]["namespace"].as_str().unwrap_or(ns), &k.to_lowercase(), n)
                })?;
                if have["spec"] != want["spec"] || have["metadata"]["labels"] != want["metadata"]["labels"] {
                    bail!("{source}: {k} {n} differs:\nrendered {}\napplied {}", want["spec"], have["spec"]);
                }
                compared += 1;
            }
            // Every note the CLI gives is in a status condition (notes of one severity share
            // a condition, the first one's reason naming it).
            let messages: String = status["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["message"].as_str())
                .collect::<Vec<_>>()
                .join("\n");
            for note in section["notes"].as_array().into_iter().flatten() {
                let message = note["message"].as_str().unwrap_or_default();
                if message.is_empty() || !messages.contains(message) {
                    bail!("{source}: note {} is not in its status: {messages}", note["reason"]);
                }
                notes += 1;
            }
        }
        eprintln!(
            "  {compared} generated objects, each as palisade render printed it; {notes} notes, each in status"
        );
        if compared < 4 {
            bail!("only {compared} objects compared");
        }
        Ok(())
    })
}
