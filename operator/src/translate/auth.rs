//! AuthPolicy → Istio `security.istio.io/v1` objects (and SPIRE `ClusterSPIFFEID`s).
//!
//! | AuthPolicy | generated |
//! |---|---|
//! | `rules` | `AuthorizationPolicy` `<p>-allow`, action ALLOW (an empty list refuses everything) |
//! | `deny`, `jwt.requireToken` | `AuthorizationPolicy` `<p>-deny`, action DENY |
//! | `external` | `AuthorizationPolicy` `<p>-ext`, action CUSTOM, and the OPA data ConfigMap |
//! | `jwt` | `RequestAuthentication` `<p>-jwt` |
//! | `mtls: Strict/Permissive` | `PeerAuthentication` `<p>-mtls` |
//! | identity source SPIRE | `ClusterSPIFFEID` `<ns>.<p>-id` (cluster-scoped, with `spireClassName` as its class) |
//!
//! Istio evaluates CUSTOM, then DENY, then ALLOW; these are separate objects so each action keeps
//! its own semantics.

use std::collections::BTreeMap;

use palisade_api::{
    AuthPolicy, SpiffeId,
    auth_policy::{AuthRule, JwtSpec, MtlsMode, Operation, Source, When},
};
use serde_json::{Map, Value, json};

use super::{Context, Desired, IdentitySource, Owner, put};
use crate::names;

const SECURITY_V1: &str = "security.istio.io/v1";
const SPIRE_V1ALPHA1: &str = "spire.spiffe.io/v1alpha1";
/// Default longest access-token lifetime enforced by the OPA policy.
pub const DEFAULT_MAX_TOKEN_LIFETIME_SECS: u64 = 15 * 60;
/// The Rego policy the CUSTOM action's OPA evaluates, shipped in the data ConfigMap.
pub const AUTHZ_REGO: &str = include_str!("../../../policies/authz/authz.rego");

/// Translates one AuthPolicy. Never fails: what cannot be expressed is reported in notes.
pub fn translate(policy: &AuthPolicy, ctx: &Context) -> Desired {
    let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let owner = Owner {
        api_version: "palisade.dev/v1alpha1",
        kind: "AuthPolicy",
        name,
        namespace: ns,
        uid: policy.metadata.uid.as_deref().unwrap_or_default(),
    };
    let spec = &policy.spec;
    let mut out = Desired::default();
    if let Some(refusal) = unenforceable_scope(policy, ctx) {
        out.unsupported(refusal.0, refusal.1);
        return out;
    }
    scope_warnings(policy, ctx, &mut out);

    // Where the Istio objects attach: a pod selector, Gateway API/Service targets, or the whole
    // namespace.
    let mut attach = Map::new();
    if let Some(sel) = &spec.selector {
        attach.insert("selector".into(), json!({"matchLabels": sel.match_labels}));
    }
    if let Some(refs) = &spec.target_refs {
        let refs: Vec<Value> = refs
            .iter()
            .map(|r| json!({"group": r.group, "kind": r.kind, "name": r.name}))
            .collect();
        attach.insert("targetRefs".into(), Value::Array(refs));
    }
    let authz = |action: &str, rules: Option<Vec<Value>>, extra: Option<(&str, Value)>| {
        let mut s = attach.clone();
        s.insert("action".into(), json!(action));
        if let Some((k, v)) = extra {
            s.insert(k.into(), v);
        }
        if let Some(rules) = rules {
            put(&mut s, "rules", Value::Array(rules));
        }
        Value::Object(s)
    };

    if let Some(rules) = &spec.rules {
        // Claims in an ALLOW rule are read from a token of this policy's issuer only: Istio
        // validates every RequestAuthentication on the workload and ORs them.
        let jwt = spec.jwt.as_ref();
        let mut allow = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            // An ALLOW rule that is not literal is left out: the workload then refuses what it
            // would have allowed (never more than the policy says).
            match wildcard_literal(r, ns, ctx) {
                Some(field) => out.unsupported(
                    "WildcardLiteral",
                    format!(
                        "rules[{i}] is left out: {field} is not a literal Istio would match as \
                         written (a `*` becomes a wildcard); fix it (the API server refuses such \
                         values in new and updated policies)"
                    ),
                ),
                None => allow.extend(istio_rules(r, ns, ctx, jwt)),
            }
        }
        let rules = allow;
        let s = authz("ALLOW", Some(rules), None);
        out.objects.push(owner.object(
            SECURITY_V1,
            "AuthorizationPolicy",
            &names::generated(name, "allow"),
            s,
        ));
    }
    let deny_rules = deny_rules(policy, ctx, &mut out);
    if !deny_rules.is_empty() {
        let s = authz("DENY", Some(deny_rules), None);
        out.objects.push(owner.object(
            SECURITY_V1,
            "AuthorizationPolicy",
            &names::generated(name, "deny"),
            s,
        ));
    }
    if let Some(ext) = &spec.external {
        let mut rule = Map::new();
        put(&mut rule, "to", operations(&ext.to));
        let s = authz(
            "CUSTOM",
            Some(vec![Value::Object(rule)]),
            Some(("provider", json!({"name": ext.provider}))),
        );
        out.objects.push(owner.object(
            SECURITY_V1,
            "AuthorizationPolicy",
            &names::generated(name, "ext"),
            s,
        ));
        out.objects.push(opa_config_map(policy, &owner, name));
    }
    request_authentication(policy, &attach, &owner, &mut out);
    peer_authentication(policy, &owner, &mut out);
    if ctx.identity_source == IdentitySource::Spire && spec.target_refs.is_none() {
        out.objects.push(cluster_spiffe_id(policy, &owner, ctx));
    }
    out
}

/// The RequestAuthentication for `jwt`, attached as the policy's other objects are; and the
/// report of what only the external authorizer enforces, when there is none.
fn request_authentication(
    policy: &AuthPolicy,
    attach: &Map<String, Value>,
    owner: &Owner<'_>,
    out: &mut Desired,
) {
    if let Some(jwt) = &policy.spec.jwt
        && jwt.max_token_lifetime.is_some()
        && policy.spec.external.is_none()
    {
        out.unsupported(
            "NotEnforcedWithoutExternal",
            "jwt.maxTokenLifetime is enforced by the external authorizer (Palisade's OPA policy), \
             and this policy has no external: Istio checks expiry, not lifetime; add external \
             (provider: your OPA ext_authz provider) or remove maxTokenLifetime"
                .into(),
        );
    }
    if let Some(jwt) = &policy.spec.jwt
        && let Some(a) = jwt
            .audiences
            .iter()
            .find(|a| a.is_empty() || a.contains('*'))
    {
        out.unsupported(
            "WildcardLiteral",
            format!(
                "jwt.audiences {a:?} is not a literal, and Istio reads `*` as a wildcard in the \
                 authorization rules: it is left out of them, so tokens for it are refused; fix \
                 it (the API server refuses such values in new and updated policies)"
            ),
        );
    }
    if let Some(jwt) = &policy.spec.jwt {
        let mut rule = Map::new();
        rule.insert("issuer".into(), json!(jwt.issuer));
        if let Some(uri) = &jwt.jwks_uri {
            rule.insert("jwksUri".into(), json!(uri));
        }
        put(&mut rule, "audiences", json!(jwt.audiences));
        rule.insert("forwardOriginalToken".into(), json!(true));
        let mut s = attach.clone();
        s.insert("jwtRules".into(), json!([rule]));
        out.objects.push(owner.object(
            SECURITY_V1,
            "RequestAuthentication",
            &names::generated(owner.name, "jwt"),
            Value::Object(s),
        ));
    }
}

/// Why nothing of this policy can be generated as written: a policy in the mesh's root namespace
/// (Istio applies it to every workload of the mesh), or a target naming a section (Istio's
/// targetRefs have none: the policy would cover the whole Gateway).
fn unenforceable_scope(policy: &AuthPolicy, ctx: &Context) -> Option<(&'static str, String)> {
    let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
    if ns == ctx.mesh_root_namespace && !ctx.allow_root_namespace_policies {
        return Some((
            "RootNamespacePolicy",
            format!(
                "{ns} is the mesh's root namespace: Istio applies its policies to every workload \
                 of the mesh, so an ALLOW rule here opens every workload another policy \
                 restricts; move the policy to the namespace it protects (or set \
                 allowRootNamespacePolicies in the operator configuration)"
            ),
        ));
    }
    let sections: Vec<&str> = policy
        .spec
        .target_refs
        .iter()
        .flatten()
        .filter_map(|t| t.section_name.as_deref())
        .collect();
    if !sections.is_empty() {
        return Some((
            "SectionNameUnsupported",
            format!(
                "targetRefs name sections ({}): Istio's AuthorizationPolicy attaches to a whole \
                 Gateway or Service, so the policy would cover more than written; drop \
                 sectionName or attach a separate Gateway",
                sections.join(", ")
            ),
        ));
    }
    None
}

/// The first name, scope or claim of `rule` that Istio would not read literally (a `*` becomes
/// a wildcard). The CRD's rules refuse them, but a policy stored before those rules existed keeps
/// its values until it is next updated.
fn wildcard_literal(rule: &AuthRule, ns: &str, ctx: &Context) -> Option<String> {
    let bad = |v: &str| v.is_empty() || v.contains('*');
    for source in &rule.from {
        match source {
            Source::ServiceAccount(sa) => {
                let sa_ns = sa.namespace.as_deref().unwrap_or(ns);
                if bad(&sa.name)
                    || bad(sa_ns)
                    || SpiffeId::for_service_account(&ctx.trust_domain, sa_ns, &sa.name).is_err()
                {
                    return Some(format!("serviceAccount {sa_ns}/{}", sa.name));
                }
            }
            Source::Namespace(n) if bad(n) => return Some(format!("namespace {n:?}")),
            Source::Namespace(_) | Source::SpiffeId(_) => {}
        }
    }
    for w in &rule.when {
        let (what, values, name_ok) = match w {
            When::JwtScopes(s) => ("jwtScopes", s, true),
            When::Claim(c) => (
                "claim values",
                &c.values,
                c.name.split('.').all(|p| {
                    !p.is_empty()
                        && p.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_:-".contains(&b))
                }),
            ),
        };
        if !name_ok || values.iter().any(|v| bad(v)) {
            return Some(format!("{what} {values:?}"));
        }
    }
    None
}

/// What the mesh enforces only under conditions Palisade cannot see from the policy: targets
/// (only a waypoint enforces a Service target, only an Istio-managed gateway a Gateway target;
/// sidecars and ztunnel ignore both), and DENY paths under a path normalisation that lets
/// `//admin` or `/admin%2Fx` past `/admin/*`.
fn scope_warnings(policy: &AuthPolicy, ctx: &Context, out: &mut Desired) {
    for t in policy.spec.target_refs.iter().flatten() {
        let (reason, how) = if t.kind == "Service" {
            (
                "WaypointRequired",
                "only the waypoint proxy the Service uses (label istio.io/use-waypoint) enforces \
                 it; sidecars and ztunnel ignore policies with targetRefs",
            )
        } else {
            (
                "IstioGatewayRequired",
                "only a gateway Istio deploys (gatewayClassName istio) enforces it; another \
                 controller's Gateway (Envoy Gateway's, say) ignores Istio policies: use that \
                 controller's own policy there",
            )
        };
        out.warn(reason, format!("target {} {}: {how}", t.kind, t.name));
    }
    let deny_paths: Vec<&str> = policy
        .spec
        .deny
        .iter()
        .flatten()
        .flat_map(|r| &r.to)
        .flat_map(|op| &op.paths)
        .map(String::as_str)
        .filter(|p| p.starts_with('/'))
        .collect();
    let lets_through = match ctx.mesh_path_normalization {
        super::PathNormalization::Base => Some("`//` or `%2F`"),
        super::PathNormalization::MergeSlashes => Some("`%2F`"),
        super::PathNormalization::DecodeAndMergeSlashes => None,
    };
    if let (Some(spelling), false) = (lets_through, deny_paths.is_empty()) {
        out.warn(
            "PathNormalization",
            format!(
                "deny paths ({}) are matched after the mesh's path normalisation, which keeps \
                 {spelling} as written: a request spelling the path that way is not refused; set \
                 meshConfig.pathNormalization to DECODE_AND_MERGE_SLASHES and \
                 meshPathNormalization in the operator configuration",
                deny_paths.join(", ")
            ),
        );
    }
}

/// The DENY rules: `deny`, plus "no valid token" when the JWT is required and "no peer
/// identity" with `mtls: Strict`.
fn deny_rules(policy: &AuthPolicy, ctx: &Context, out: &mut Desired) -> Vec<Value> {
    let spec = &policy.spec;
    let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
    let mut rules = Vec::new();
    for (i, rule) in spec.deny.iter().flatten().enumerate() {
        if let Some(field) = http_only_on_tcp(rule) {
            out.warn(
                "DenyHttpFieldsWithoutPorts",
                format!(
                    "deny[{i}] matches {field}, which only HTTP requests carry, and names no ports \
                     for it: on plain TCP traffic Istio drops HTTP fields from a DENY rule, so this \
                     rule refuses every TCP connection; name the HTTP ports in the same `to` entry"
                ),
            );
        }
        if let Some(field) = wildcard_literal(rule, ns, ctx) {
            // Kept: a wildcard in a DENY rule refuses more, never less.
            out.warn(
                "WildcardLiteral",
                format!(
                    "deny[{i}]: {field} is not a literal, and Istio reads `*` as a wildcard, so \
                     the rule refuses more than written; fix it"
                ),
            );
        }
        rules.push(istio_rule(rule, ns, ctx, None));
    }
    if spec.jwt.as_ref().is_some_and(|j| j.require_token) {
        out.warn(
            "TokenRequiredOnTcp",
            "jwt.requireToken refuses requests without a token of this issuer; TCP connections \
             carry no token, so every TCP port of the selected workloads is refused too: set \
             requireToken: false (and require the token with rules) where a workload serves TCP"
                .into(),
        );
    }
    if let Some(jwt) = spec.jwt.as_ref().filter(|j| j.require_token) {
        // Requests without a valid token of this issuer have no request principal `<iss>/...`:
        // refuse them (a token another RequestAuthentication on the workload validated does not
        // count).
        rules.push(
            json!({"from": [{"source": {"notRequestPrincipals": [format!("{}/*", jwt.issuer)]}}]}),
        );
        if !jwt.audiences.is_empty() {
            // A token of this issuer for another audience, which another RequestAuthentication
            // on the workload may have accepted, does not count either.
            rules.push(json!({
                "from": [{"source": {"requestPrincipals": [format!("{}/*", jwt.issuer)]}}],
                "when": [{"key": "request.auth.audiences", "notValues": audience_values(jwt)}],
            }));
        }
    }
    if spec.mtls == MtlsMode::Strict && spec.target_refs.is_none() {
        // (Policies attached by targetRefs get no PeerAuthentication: `MtlsNotAppliedToTargets`.)
        // The PeerAuthentication alone does not hold when another one wins for the workload (a
        // workload-level PERMISSIVE one beats a namespace-level STRICT one; of two
        // workload-level ones the oldest wins). DENY policies all apply: refuse connections
        // without a peer identity here too.
        rules.push(json!({"from": [{"source": {"notPrincipals": ["*"]}}]}));
    }
    rules
}

/// The HTTP-only field of a DENY rule that would make it refuse all TCP traffic: a `to` entry
/// with methods or paths but no ports (on TCP, Istio drops what it cannot match, and what is
/// left of the entry matches everything), or `when` conditions (tokens) on a rule one of whose
/// entries names no port.
fn http_only_on_tcp(rule: &AuthRule) -> Option<&'static str> {
    if rule
        .to
        .iter()
        .any(|op| (!op.methods.is_empty() || !op.paths.is_empty()) && op.ports.is_empty())
    {
        return Some("HTTP methods or paths");
    }
    // An entry without ports lets the rule apply to every port (an empty `to` too).
    if !rule.when.is_empty() && (rule.to.is_empty() || rule.to.iter().any(|op| op.ports.is_empty()))
    {
        return Some("token claims or scopes (when)");
    }
    None
}

fn peer_authentication(policy: &AuthPolicy, owner: &Owner<'_>, out: &mut Desired) {
    let spec = &policy.spec;
    let uses_identity = spec
        .rules
        .iter()
        .flatten()
        .chain(spec.deny.iter().flatten())
        .any(|r| !r.from.is_empty());
    let mode = match spec.mtls {
        MtlsMode::Strict => "STRICT",
        MtlsMode::Permissive | MtlsMode::Inherit => {
            if uses_identity {
                out.warn(
                    "IdentityWithoutStrictMtls",
                    format!(
                        "rules name callers by identity, but mtls is {:?}: plain-text callers carry \
                         no identity, so identity rules cannot match them; set mtls: Strict",
                        spec.mtls
                    ),
                );
            }
            if spec.mtls == MtlsMode::Inherit {
                return;
            }
            "PERMISSIVE"
        }
    };
    if spec.target_refs.is_some() {
        out.warn(
            "MtlsNotAppliedToTargets",
            "PeerAuthentication selects pods, not Gateways or Services: mtls is not applied for \
             targetRefs; set it on an AuthPolicy with a selector"
                .into(),
        );
        return;
    }
    let mut s = Map::new();
    if let Some(sel) = &spec.selector {
        s.insert("selector".into(), json!({"matchLabels": sel.match_labels}));
    }
    s.insert("mtls".into(), json!({"mode": mode}));
    out.objects.push(owner.object(
        SECURITY_V1,
        "PeerAuthentication",
        &names::generated(owner.name, "mtls"),
        Value::Object(s),
    ));
}

/// The SPIRE registration that gives the selected pods the same SPIFFE IDs the rules name.
fn cluster_spiffe_id(policy: &AuthPolicy, owner: &Owner<'_>, ctx: &Context) -> Value {
    let mut s = Map::new();
    if !ctx.spire_class_name.is_empty() {
        s.insert("className".into(), json!(ctx.spire_class_name));
    }
    s.insert(
        "spiffeIDTemplate".into(),
        json!("spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"),
    );
    s.insert(
        "namespaceSelector".into(),
        json!({"matchLabels": {"kubernetes.io/metadata.name": owner.namespace}}),
    );
    if let Some(sel) = &policy.spec.selector {
        s.insert(
            "podSelector".into(),
            json!({"matchLabels": sel.match_labels}),
        );
    }
    owner.cluster_object(
        SPIRE_V1ALPHA1,
        "ClusterSPIFFEID",
        &cluster_spiffe_id_name(owner.namespace, owner.name),
        Value::Object(s),
    )
}

/// Every object an AuthPolicy `namespace/name` can produce, as `(apiVersion, kind, name)`: what
/// pruning looks at.
pub fn candidates(namespace: &str, name: &str) -> Vec<(&'static str, &'static str, String)> {
    vec![
        (
            SECURITY_V1,
            "AuthorizationPolicy",
            names::generated(name, "allow"),
        ),
        (
            SECURITY_V1,
            "AuthorizationPolicy",
            names::generated(name, "deny"),
        ),
        (
            SECURITY_V1,
            "AuthorizationPolicy",
            names::generated(name, "ext"),
        ),
        ("v1", "ConfigMap", names::generated(name, "opa")),
        (
            SECURITY_V1,
            "RequestAuthentication",
            names::generated(name, "jwt"),
        ),
        (
            SECURITY_V1,
            "PeerAuthentication",
            names::generated(name, "mtls"),
        ),
        (
            SPIRE_V1ALPHA1,
            "ClusterSPIFFEID",
            cluster_spiffe_id_name(namespace, name),
        ),
        // The name earlier releases gave it (`<ns>-<name>`, which two policies could share):
        // pruned when found.
        (
            SPIRE_V1ALPHA1,
            "ClusterSPIFFEID",
            names::generated(&format!("{namespace}-{name}"), "id"),
        ),
    ]
}

/// Name of the ClusterSPIFFEID generated for the AuthPolicy `namespace/name`: `.` joins the
/// two, and a namespace cannot contain one, so no two policies share it (`shop-a/orders` and
/// `shop/a-orders` would both have been `shop-a-orders` with a dash).
pub fn cluster_spiffe_id_name(namespace: &str, name: &str) -> String {
    names::generated(&format!("{namespace}.{name}"), "id")
}

/// One Palisade ALLOW rule as Istio rules. A `to` list that mixes operations with HTTP fields
/// (methods, paths) and operations with ports only becomes two rules with the same `from`, one
/// per kind: on a plain TCP port istiod skips a whole ALLOW rule when any of its operations has
/// an HTTP field, which would take the port-only operations with it. (A rule with `when` is
/// HTTP-only as a whole and stays one rule.)
fn istio_rules(rule: &AuthRule, ns: &str, ctx: &Context, jwt: Option<&JwtSpec>) -> Vec<Value> {
    let http = |op: &&Operation| !op.methods.is_empty() || !op.paths.is_empty();
    let (with_http, port_only): (Vec<&Operation>, Vec<&Operation>) = rule.to.iter().partition(http);
    if !rule.when.is_empty()
        || with_http.is_empty()
        || port_only.is_empty()
        || port_only.iter().any(|op| op.ports.is_empty())
    {
        return vec![istio_rule(rule, ns, ctx, jwt)];
    }
    [with_http, port_only]
        .into_iter()
        .map(|ops| {
            let part = AuthRule {
                to: ops.into_iter().cloned().collect(),
                ..rule.clone()
            };
            istio_rule(&part, ns, ctx, jwt)
        })
        .collect()
}

/// A value no token's `aud` holds: it stands in when no audience is a literal.
const NO_AUDIENCE: &str = "palisade.dev/no-literal-audience";

/// The policy's audiences as Istio authorization values: literals only. There a `*` is a
/// wildcard (the RequestAuthentication compares audiences exactly), so a non-literal audience
/// is left out (reported as `WildcardLiteral`), and when none is left a value no token carries
/// stands in: rules bound to the audience match nothing, and every token of the issuer counts
/// as one for another audience.
fn audience_values(jwt: &JwtSpec) -> Vec<&str> {
    let literal: Vec<&str> = jwt
        .audiences
        .iter()
        .map(String::as_str)
        .filter(|a| !a.is_empty() && !a.contains('*'))
        .collect();
    if literal.is_empty() {
        vec![NO_AUDIENCE]
    } else {
        literal
    }
}

/// One Palisade rule as one Istio rule. Every source becomes a principal of one `source` (values
/// in a list OR).
fn istio_rule(rule: &AuthRule, ns: &str, ctx: &Context, jwt: Option<&JwtSpec>) -> Value {
    let mut principals = Vec::new();
    for source in &rule.from {
        match source {
            Source::ServiceAccount(sa) => {
                let sa_ns = sa.namespace.as_deref().unwrap_or(ns);
                // A name that does not form a SPIFFE ID never gets here (`wildcard_literal`);
                // the fallback writes what Istio would derive.
                principals.push(
                    SpiffeId::for_service_account(&ctx.trust_domain, sa_ns, &sa.name).map_or_else(
                        |_| format!("{}/ns/{sa_ns}/sa/{}", ctx.trust_domain, sa.name),
                        |id| id.istio_principal().to_owned(),
                    ),
                );
            }
            Source::SpiffeId(id) => principals.push(id.istio_principal().to_owned()),
            // Istio's `namespaces` matches `*/ns/<n>/*` in any trust domain: a principal
            // prefix binds the namespace to this mesh's trust domain.
            Source::Namespace(n) => principals.push(format!("{}/ns/{n}/sa/*", ctx.trust_domain)),
        }
    }
    let mut from = Vec::new();
    if !principals.is_empty() {
        from.push(json!({"source": {"principals": principals}}));
    }
    let mut when = Vec::new();
    for w in &rule.when {
        match w {
            When::JwtScopes(scopes) => {
                // Each scope is its own condition: conditions AND, values within one OR.
                for scope in scopes {
                    when.push(json!({"key": "request.auth.claims[scope]", "values": [scope]}));
                }
            }
            When::Claim(c) => {
                let path: Vec<&str> = c.name.split('.').collect();
                when.push(json!({
                    "key": format!("request.auth.claims[{}]", path.join("][")),
                    "values": c.values,
                }));
            }
        }
    }
    if let (Some(jwt), false) = (jwt, when.is_empty()) {
        // Every RequestAuthentication on the workload validates tokens, and they all write the
        // same claims: bind the conditions to this policy's issuer and audiences here, since a
        // token another one accepted (say, a mesh-wide one without audiences) would pass.
        when.push(json!({"key": "request.auth.claims[iss]", "values": [jwt.issuer]}));
        if !jwt.audiences.is_empty() {
            when.push(json!({"key": "request.auth.audiences", "values": audience_values(jwt)}));
        }
    }
    let mut r = Map::new();
    put(&mut r, "from", Value::Array(from));
    put(&mut r, "to", operations(&rule.to));
    put(&mut r, "when", Value::Array(when));
    Value::Object(r)
}

/// Operations as Istio `to` entries. An operation with no constraint matches everything, which
/// makes the whole list match everything: then no `to` is written.
fn operations(ops: &[Operation]) -> Value {
    let mut to = Vec::new();
    for op in ops {
        let mut o = Map::new();
        put(
            &mut o,
            "methods",
            json!(op.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>()),
        );
        put(&mut o, "paths", json!(op.paths));
        put(
            &mut o,
            "ports",
            json!(op.ports.iter().map(|p| p.0.to_string()).collect::<Vec<_>>()),
        );
        if o.is_empty() {
            return Value::Array(Vec::new());
        }
        to.push(json!({"operation": o}));
    }
    Value::Array(to)
}

/// The data the OPA sidecar's Rego policy reads: token rules derived from the AuthPolicy.
fn opa_config_map(policy: &AuthPolicy, owner: &Owner<'_>, name: &str) -> Value {
    let spec = &policy.spec;
    let max_lifetime = spec
        .jwt
        .as_ref()
        .and_then(|j| j.max_token_lifetime.as_ref())
        .map_or(
            DEFAULT_MAX_TOKEN_LIFETIME_SECS,
            palisade_api::Duration::as_secs,
        );
    let mut required = Vec::new();
    for rule in spec.rules.iter().flatten() {
        let scopes: Vec<&String> = rule
            .when
            .iter()
            .filter_map(|w| match w {
                When::JwtScopes(s) => Some(s),
                When::Claim(_) => None,
            })
            .flatten()
            .collect();
        if scopes.is_empty() {
            continue;
        }
        for op in &rule.to {
            let methods: Vec<&str> = op.methods.iter().map(|m| m.as_str()).collect();
            for path in &op.paths {
                required.push(json!({"path": path, "methods": methods, "scopes": scopes}));
            }
        }
    }
    // Access tokens carry only sub, scope, exp and iat — plus iss and aud where this policy's
    // JWT validation needs them.
    let mut allowed = vec!["sub", "scope", "exp", "iat"];
    if let Some(jwt) = &spec.jwt {
        allowed.push("iss");
        if !jwt.audiences.is_empty() {
            allowed.push("aud");
        }
    }
    let mut token = Map::new();
    if let Some(jwt) = &spec.jwt {
        token.insert("issuer".into(), json!(jwt.issuer));
        token.insert("audiences".into(), json!(jwt.audiences));
        if let Some(uri) = &jwt.jwks_uri {
            token.insert("jwksUri".into(), json!(uri));
        }
    }
    token.insert("maxTokenLifetimeSeconds".into(), json!(max_lifetime));
    token.insert("allowedClaims".into(), json!(allowed));
    token.insert("requiredScopes".into(), json!(required));
    let data = json!({"palisade": {"config": {"authz": token}}});
    owner.object(
        "v1",
        "ConfigMap",
        &names::generated(name, "opa"),
        json!({"data": {
            "authz.rego": AUTHZ_REGO,
            "data.json": serde_json::to_string_pretty(&data).unwrap_or_default(),
        }}),
    )
}

/// Whether two AuthPolicies can apply to the same workload or target.
///
/// - A policy without `selector` and `targetRefs` covers its whole namespace, Istio-deployed
///   gateway pods included, and in the mesh root namespace `root` every namespace.
/// - Two policies with `targetRefs` overlap when they name a common target.
/// - Two selectors overlap unless a label both select takes different values in them.
pub fn overlap(a: &AuthPolicy, b: &AuthPolicy, root: &str) -> bool {
    let wide = |p: &AuthPolicy| p.spec.selector.is_none() && p.spec.target_refs.is_none();
    let in_root = |p: &AuthPolicy| p.metadata.namespace.as_deref() == Some(root);
    if a.metadata.namespace != b.metadata.namespace {
        // Only a root-namespace policy reaches another namespace (selectors still apply).
        let (r, other) = match (in_root(a), in_root(b)) {
            (true, false) => (a, b),
            (false, true) => (b, a),
            _ => return false,
        };
        return wide(r) || (other.spec.target_refs.is_none() && selectors_meet(r, other));
    }
    if wide(a) || wide(b) {
        return true;
    }
    match (&a.spec.target_refs, &b.spec.target_refs) {
        (Some(x), Some(y)) => x.iter().any(|t| {
            y.iter()
                .any(|u| (&t.group, &t.kind, &t.name) == (&u.group, &u.kind, &u.name))
        }),
        (Some(_), None) | (None, Some(_)) => false,
        (None, None) => selectors_meet(a, b),
    }
}

/// Whether two selectors can select one pod (a missing selector selects every pod).
fn selectors_meet(a: &AuthPolicy, b: &AuthPolicy) -> bool {
    let (Some(sa), Some(sb)) = (&a.spec.selector, &b.spec.selector) else {
        return true;
    };
    sa.match_labels
        .iter()
        .all(|(k, v)| sb.match_labels.get(k).is_none_or(|w| w == v))
}

/// The AuthPolicies that may [`overlap`] a given one, found without comparing it with every
/// policy: per namespace, policies with `targetRefs` by target, policies with a selector grouped
/// by the set of label keys they select on and, in each group, by each key's value, and the
/// policies that cover their whole namespace. For a selector-based policy only the groups'
/// entries that agree with it on a shared key are candidates (or a whole group that shares no
/// key with it); for a policy of the mesh root namespace or one that covers its namespace, every
/// policy it can reach is. [`OverlapIndex::candidates`] always includes every policy that
/// overlaps, each once (`overlap_index_finds_every_overlap`); [`widenings`] tells which of them
/// do. It is kept current one policy at a time ([`OverlapIndex::insert`],
/// [`OverlapIndex::remove`]).
#[derive(Default)]
pub struct OverlapIndex {
    namespaces: std::collections::HashMap<String, NamespaceIndex>,
}

type Shared = std::sync::Arc<AuthPolicy>;
/// Policies by name.
type ByName = BTreeMap<String, Shared>;

#[derive(Default)]
struct NamespaceIndex {
    all: ByName,
    whole_namespace: ByName,
    by_target: std::collections::HashMap<(String, String, String), ByName>,
    /// Key set → key → value → policies.
    by_selector: BTreeMap<
        Vec<String>,
        std::collections::HashMap<String, std::collections::HashMap<String, ByName>>,
    >,
    /// Key set → policies (those whose selector has none of a policy's keys all meet it).
    by_key_set: BTreeMap<Vec<String>, ByName>,
}

fn name_of(p: &AuthPolicy) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

impl OverlapIndex {
    /// The index of `policies`.
    pub fn new(policies: impl IntoIterator<Item = Shared>) -> Self {
        let mut index = OverlapIndex::default();
        for p in policies {
            index.insert(&p);
        }
        index
    }

    /// The indexed policy `namespace`/`name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Shared> {
        self.namespaces.get(namespace)?.all.get(name)
    }

    /// Indexes `p`, in place of the policy of its name if there was one.
    pub fn insert(&mut self, p: &Shared) {
        let ns_name = p.metadata.namespace.clone().unwrap_or_default();
        self.remove(&ns_name, &name_of(p));
        let name = name_of(p);
        let ns = self.namespaces.entry(ns_name).or_default();
        ns.all.insert(name.clone(), p.clone());
        match (&p.spec.target_refs, &p.spec.selector) {
            (Some(targets), _) => {
                for t in targets {
                    let key = (t.group.clone(), t.kind.clone(), t.name.clone());
                    ns.by_target
                        .entry(key)
                        .or_default()
                        .insert(name.clone(), p.clone());
                }
            }
            (None, Some(selector)) => {
                let keys: Vec<String> = selector.match_labels.keys().cloned().collect();
                let group = ns.by_selector.entry(keys.clone()).or_default();
                for (k, v) in &selector.match_labels {
                    group
                        .entry(k.clone())
                        .or_default()
                        .entry(v.clone())
                        .or_default()
                        .insert(name.clone(), p.clone());
                }
                ns.by_key_set
                    .entry(keys)
                    .or_default()
                    .insert(name, p.clone());
            }
            (None, None) => {
                ns.whole_namespace.insert(name, p.clone());
            }
        }
    }

    /// Removes the policy `namespace`/`name`, if indexed.
    pub fn remove(&mut self, namespace: &str, name: &str) {
        let Some(ns) = self.namespaces.get_mut(namespace) else {
            return;
        };
        let Some(p) = ns.all.remove(name) else {
            return;
        };
        match (&p.spec.target_refs, &p.spec.selector) {
            (Some(targets), _) => {
                for t in targets {
                    let key = (t.group.clone(), t.kind.clone(), t.name.clone());
                    if let Some(bucket) = ns.by_target.get_mut(&key) {
                        bucket.remove(name);
                        if bucket.is_empty() {
                            ns.by_target.remove(&key);
                        }
                    }
                }
            }
            (None, Some(selector)) => {
                let keys: Vec<String> = selector.match_labels.keys().cloned().collect();
                if let Some(group) = ns.by_selector.get_mut(&keys) {
                    for (k, v) in &selector.match_labels {
                        if let Some(values) = group.get_mut(k) {
                            if let Some(bucket) = values.get_mut(v) {
                                bucket.remove(name);
                                if bucket.is_empty() {
                                    values.remove(v);
                                }
                            }
                            if values.is_empty() {
                                group.remove(k);
                            }
                        }
                    }
                    if group.is_empty() {
                        ns.by_selector.remove(&keys);
                    }
                }
                if let Some(bucket) = ns.by_key_set.get_mut(&keys) {
                    bucket.remove(name);
                    if bucket.is_empty() {
                        ns.by_key_set.remove(&keys);
                    }
                }
            }
            (None, None) => {
                ns.whole_namespace.remove(name);
            }
        }
        if ns.all.is_empty() {
            self.namespaces.remove(namespace);
        }
    }

    /// Every indexed policy that may overlap `policy` (the mesh root namespace being `root`),
    /// each once, possibly `policy` itself and possibly some that do not.
    pub fn candidates(&self, policy: &AuthPolicy, root: &str) -> Vec<Shared> {
        let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
        let root_policies = || {
            self.namespaces
                .get(root)
                .into_iter()
                .flat_map(|n| n.all.values().cloned())
        };
        if ns == root {
            // A root-namespace policy reaches every namespace.
            return self
                .namespaces
                .values()
                .flat_map(|n| n.all.values().cloned())
                .collect();
        }
        let mut out: Vec<Shared> = root_policies().collect();
        let Some(index) = self.namespaces.get(ns) else {
            return out;
        };
        match (&policy.spec.target_refs, &policy.spec.selector) {
            (Some(targets), _) => {
                out.extend(index.whole_namespace.values().cloned());
                let mut found = ByName::new();
                for t in targets {
                    let key = (t.group.clone(), t.kind.clone(), t.name.clone());
                    if let Some(bucket) = index.by_target.get(&key) {
                        found.extend(bucket.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
                out.extend(found.into_values());
            }
            (None, Some(selector)) => {
                out.extend(index.whole_namespace.values().cloned());
                for (keys, members) in &index.by_key_set {
                    let shared = keys
                        .iter()
                        .find_map(|k| selector.match_labels.get(k).map(|v| (k, v)));
                    let bucket = match shared {
                        Some((k, v)) => index
                            .by_selector
                            .get(keys)
                            .and_then(|group| group.get(k))
                            .and_then(|values| values.get(v)),
                        None => Some(members),
                    };
                    out.extend(bucket.into_iter().flat_map(|b| b.values().cloned()));
                }
            }
            // Covers the whole namespace: every policy of it.
            (None, None) => out.extend(index.all.values().cloned()),
        }
        out
    }
}

/// How other AuthPolicies change what `policy` promises. Istio allows a request when any ALLOW
/// policy on the workload matches it, so a policy with `rules` ("everything else is refused")
/// is widened by another policy that applies to the same workloads and allows a rule it does not
/// have, and widens such a policy in turn. Both sides are reported (Warnings naming the other).
pub fn widenings(
    policy: &AuthPolicy,
    others: &[std::sync::Arc<AuthPolicy>],
    root: &str,
) -> Vec<super::Note> {
    let mut notes = Vec::new();
    let Some(mine) = &policy.spec.rules else {
        return notes;
    };
    let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let mut widened_by = Vec::new();
    let mut widens = Vec::new();
    for other in others {
        let other_ns = other.metadata.namespace.as_deref().unwrap_or_default();
        let other_name = other.metadata.name.as_deref().unwrap_or_default();
        // A policy being deleted still counts: its objects stay in force until it is gone (a
        // finalizer can hold it for as long as its owner likes), and its deletion wakes us.
        if (other_ns, other_name) == (ns, name) || !overlap(policy, other, root) {
            continue;
        }
        let Some(theirs) = &other.spec.rules else {
            continue;
        };
        // Whether rules `a` allow a request rules `b` do not: read syntactically (a rule `b`
        // lacks), except that a rule with no condition allows everything. Across namespaces the
        // same text names other callers (a service account's namespace defaults to the
        // policy's), so every rule counts.
        let beyond = |a: &[AuthRule], b: &[AuthRule]| {
            !b.contains(&AuthRule::default()) && a.iter().any(|r| other_ns != ns || !b.contains(r))
        };
        let shown = if other_ns == ns {
            other_name.to_owned()
        } else {
            format!("{other_ns}/{other_name}")
        };
        if beyond(theirs, mine) {
            widened_by.push(shown.clone());
        }
        if beyond(mine, theirs) {
            widens.push(shown);
        }
    }
    widened_by.sort();
    widens.sort();
    if !widened_by.is_empty() {
        notes.push(super::Note {
            reason: "WidenedBy",
            message: format!(
                "AuthPolicies {} also apply to workloads this policy selects and allow requests \
                 its rules do not: Istio allows a request any ALLOW policy on the workload \
                 matches, so there this policy does not refuse everything else; narrow their \
                 selectors or merge the rules",
                widened_by.join(", ")
            ),
            severity: super::Severity::Warning,
        });
    }
    if !widens.is_empty() {
        notes.push(super::Note {
            reason: "Widens",
            message: format!(
                "this policy also applies to workloads AuthPolicies {} select and allows \
                 requests their rules do not, so there they do not refuse everything else",
                widens.join(", ")
            ),
            severity: super::Severity::Warning,
        });
    }
    notes
}

/// Istio's label that enrols a namespace or a pod in the ambient mesh (value `ambient`; a pod
/// opts out with `none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The annotation Istio's sidecar injector writes on every pod it injected.
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// Istio's label that sends a namespace's, a Service's or a pod's traffic through a waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";

/// What the cluster says about ambient enrolment around one policy: the namespaces it reaches
/// that are labelled `istio.io/dataplane-mode=ambient`, and the pods so labelled in the
/// namespaces it reaches. The controller reads them from its caches; the check is pure.
#[derive(Debug, Default)]
pub struct AmbientFacts<'a> {
    /// False until the operator has listed namespaces and ambient pods: then nothing can be said
    /// of where the policy is enforced.
    pub known: bool,
    /// Namespaces the policy reaches that are labelled for ambient, with their waypoint (label
    /// `istio.io/use-waypoint`, unless `none`).
    pub ambient_namespaces: Vec<(&'a str, Option<&'a str>)>,
    /// Pods labelled for ambient: (namespace, labels, annotations).
    pub ambient_pods: Vec<AmbientPod<'a>>,
}

/// A pod labelled `istio.io/dataplane-mode=ambient`.
#[derive(Debug)]
pub struct AmbientPod<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its labels.
    pub labels: &'a std::collections::BTreeMap<String, String>,
    /// Its annotations.
    pub annotations: &'a std::collections::BTreeMap<String, String>,
}

/// The parts of a policy only an Envoy (a sidecar or a waypoint) enforces: ztunnel, which
/// enforces policies on ambient workloads, understands identities, namespaces and ports only.
/// Istio's own translation for ztunnel omits an ALLOW rule with HTTP attributes (it never
/// matches), applies a DENY rule without them (it matches more), validates no JWT and ignores
/// the CUSTOM action (external authorization) altogether.
pub fn l7_parts(policy: &AuthPolicy) -> Vec<&'static str> {
    let spec = &policy.spec;
    let mut parts = Vec::new();
    let mut rule_parts =
        |rules: Option<&Vec<AuthRule>>, paths: &'static str, when: &'static str| {
            let rules = rules.map(Vec::as_slice).unwrap_or_default();
            if rules
                .iter()
                .flat_map(|r| &r.to)
                .any(|op| !op.methods.is_empty() || !op.paths.is_empty())
            {
                parts.push(paths);
            }
            if rules.iter().any(|r| !r.when.is_empty()) {
                parts.push(when);
            }
        };
    rule_parts(
        spec.rules.as_ref(),
        "HTTP methods or paths in rules (those rules never match: their callers are refused)",
        "token conditions (when) in rules (those rules never match)",
    );
    rule_parts(
        spec.deny.as_ref(),
        "HTTP methods or paths in deny (the deny applies without them, to every request of its callers and ports)",
        "token conditions (when) in deny (the deny applies without them)",
    );
    if let Some(jwt) = &spec.jwt {
        parts.push(if jwt.require_token {
            "jwt with requireToken (no token is validated, and the rule refusing requests without one refuses every request)"
        } else {
            "jwt (no token is validated)"
        });
    }
    if spec.external.is_some() {
        parts.push(
            "external authorization (ztunnel ignores it: nothing is asked of the authorizer)",
        );
    }
    parts
}

/// What `policy` would not hold as written because its workloads are in Istio's ambient mesh
/// (by namespace label or by pod label), where ztunnel enforces it: its HTTP-level parts
/// (`AmbientNeedsWaypoint`), and, where the workloads' traffic passes through a waypoint, its
/// caller identities, which ztunnel then reads as the waypoint's (`AmbientWaypointIdentity`).
/// Nothing for a policy with targets (a waypoint or a gateway enforces those; [`translate`]
/// reports them) or one that selects no ambient workload; `AmbientStateUnknown` while the
/// operator has not listed namespaces and pods and the policy has anything ztunnel would change.
pub fn ambient_notes(policy: &AuthPolicy, facts: &AmbientFacts<'_>) -> Vec<super::Note> {
    let mut notes = Vec::new();
    if policy.spec.target_refs.is_some() {
        return notes;
    }
    let parts = l7_parts(policy);
    let identities = policy
        .spec
        .rules
        .iter()
        .flatten()
        .chain(policy.spec.deny.iter().flatten())
        .any(|r| !r.from.is_empty());
    if parts.is_empty() && !identities {
        return notes;
    }
    let unsupported = |reason, message| super::Note {
        reason,
        message,
        severity: super::Severity::Unsupported,
    };
    if !facts.known {
        notes.push(unsupported(
            "AmbientStateUnknown",
            "the operator has not listed namespaces and the pods labelled for Istio's ambient mesh \
             (it needs list and watch on namespaces and pods), so it cannot tell whether ztunnel, \
             which enforces no HTTP rule, enforces this policy"
                .to_owned(),
        ));
        return notes;
    }
    let waypoint_of = |labels: &std::collections::BTreeMap<String, String>| {
        labels
            .get(USE_WAYPOINT)
            .filter(|w| w.as_str() != "none")
            .cloned()
    };
    let selects = |labels: &std::collections::BTreeMap<String, String>| {
        policy
            .spec
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    let (why, waypoint) = if let Some((n, w)) = facts.ambient_namespaces.first() {
        (
            format!("namespace {n} is labelled {DATAPLANE_MODE}=ambient"),
            w.map(str::to_owned),
        )
    } else {
        let pods: Vec<&AmbientPod<'_>> = facts
            .ambient_pods
            .iter()
            .filter(|p| !p.annotations.contains_key(SIDECAR_STATUS) && selects(p.labels))
            .collect();
        if pods.is_empty() {
            return notes;
        }
        let names: Vec<String> = pods
            .iter()
            .take(3)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        let more = if pods.len() > 3 {
            format!(" and {} more", pods.len() - 3)
        } else {
            String::new()
        };
        (
            format!(
                "pods {}{more} it selects are labelled {DATAPLANE_MODE}=ambient",
                names.join(", ")
            ),
            pods.iter().find_map(|p| waypoint_of(p.labels)),
        )
    };
    if !parts.is_empty() {
        notes.push(unsupported(
            "AmbientNeedsWaypoint",
            format!(
                "{why}: there ztunnel enforces this policy, and ztunnel enforces only identities, \
                 namespaces and ports, so these parts would not hold as written: {}. Keep this \
                 policy to from/ports, give these workloads a sidecar, or attach the policy to a \
                 waypoint's Service with targetRefs (label istio.io/use-waypoint)",
                parts.join("; ")
            ),
        ));
    }
    if let (Some(w), true) = (waypoint, identities) {
        notes.push(unsupported(
            "AmbientWaypointIdentity",
            format!(
                "{why} and traffic to them passes through waypoint {w} ({USE_WAYPOINT}): ztunnel \
                 then sees the waypoint's identity, not the caller's, so the from entries \
                 (serviceAccount, spiffeId, namespace) would be checked against the waypoint — an \
                 allow refuses every caller coming through it, a deny lets them all through. \
                 Attach the policy to the waypoint's Service with targetRefs instead"
            ),
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, selector: Option<&str>, rules: &serde_json::Value) -> AuthPolicy {
        let mut spec = json!({"rules": rules});
        if let Some(app) = selector {
            spec["selector"] = json!({"matchLabels": {"app": app}});
        }
        serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec,
        }))
        .expect("policy")
    }

    /// A namespace-wide `rules: [{}]` reopens every workload another policy restricts: both
    /// are told; policies on other workloads, or with the same rules, are not.
    #[test]
    fn allow_policies_that_add_up_are_reported_on_both_sides() {
        let orders = policy(
            "orders",
            Some("orders"),
            &json!([{"from": [{"serviceAccount": {"name": "frontend"}}]}]),
        );
        let open = policy("open", None, &json!([{}]));
        let payments = policy("payments", Some("payments"), &json!([{}]));
        let twin = policy(
            "twin",
            Some("orders"),
            &json!([{"from": [{"serviceAccount": {"name": "frontend"}}]}]),
        );
        let all: Vec<std::sync::Arc<AuthPolicy>> = [&orders, &open, &payments, &twin]
            .into_iter()
            .cloned()
            .map(std::sync::Arc::new)
            .collect();
        let reasons = |p: &AuthPolicy| -> Vec<(&'static str, String)> {
            widenings(p, &all, "istio-system")
                .into_iter()
                .map(|n| (n.reason, n.message))
                .collect()
        };
        let on_orders = reasons(&orders);
        assert_eq!(on_orders.len(), 1, "{on_orders:?}");
        assert_eq!(on_orders[0].0, "WidenedBy");
        assert!(on_orders[0].1.contains("open"), "{on_orders:?}");
        assert!(!on_orders[0].1.contains("twin") && !on_orders[0].1.contains("payments"));
        let on_open = reasons(&open);
        // payments allows everything already: open adds nothing there.
        assert!(on_open.iter().any(|(r, m)| *r == "Widens"
            && m.contains("orders")
            && m.contains("twin")
            && !m.contains("payments")));
        assert!(
            overlap(&open, &payments, "istio-system")
                && !overlap(&orders, &payments, "istio-system")
        );
    }

    /// A policy held in deletion by a finalizer keeps its ALLOW policy in force (the garbage
    /// collector removes its objects only once it is gone): it still widens, and is reported.
    #[test]
    fn a_policy_being_deleted_still_widens() {
        let orders = policy(
            "orders",
            Some("orders"),
            &json!([{"from": [{"serviceAccount": {"name": "frontend"}}]}]),
        );
        let mut held = policy("held", Some("orders"), &json!([{}]));
        held.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
        let all = vec![
            std::sync::Arc::new(orders.clone()),
            std::sync::Arc::new(held),
        ];
        let notes = widenings(&orders, &all, "istio-system");
        assert!(
            notes
                .iter()
                .any(|n| n.reason == "WidenedBy" && n.message.contains("held")),
            "{:?}",
            notes.iter().map(|n| &n.message).collect::<Vec<_>>()
        );
    }

    /// A namespace-wide policy also reaches a Gateway target (Istio applies it to gateway pods
    /// of the namespace), and a namespace-wide policy of the mesh root namespace reaches every
    /// namespace, where the same rule text names other callers: both widenings are reported.
    #[test]
    fn gateway_targets_and_root_namespace_policies_overlap() {
        let root = "istio-system";
        let with = |mut p: AuthPolicy, ns: &str, spec: serde_json::Value| {
            p.metadata.namespace = Some(ns.into());
            if let Some(refs) = spec.get("targetRefs") {
                p.spec.target_refs = serde_json::from_value(refs.clone()).ok();
            }
            p
        };
        let gateway = json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"}]});
        let public = with(
            policy("public", None, &json!([{"to": [{"paths": ["/public/*"]}]}])),
            "shop",
            gateway.clone(),
        );
        let admin = policy("admin", None, &json!([{"to": [{"paths": ["/admin/*"]}]}]));
        let other_gateway = with(
            policy("other", None, &json!([{}])),
            "shop",
            json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "private"}]}),
        );
        let orders = policy(
            "orders",
            Some("orders"),
            &json!([{"from": [{"serviceAccount": {"name": "frontend"}}]}]),
        );
        let mesh = with(
            policy(
                "mesh",
                None,
                &json!([{"from": [{"serviceAccount": {"name": "frontend"}}]}]),
            ),
            root,
            json!({}),
        );
        let elsewhere = with(
            policy("elsewhere", None, &json!([{}])),
            "billing",
            json!({}),
        );
        assert!(overlap(&public, &admin, root) && overlap(&admin, &public, root));
        assert!(!overlap(&public, &other_gateway, root) && !overlap(&public, &orders, root));
        assert!(overlap(&mesh, &orders, root) && overlap(&orders, &mesh, root));
        assert!(!overlap(&elsewhere, &orders, root));
        let all: Vec<std::sync::Arc<AuthPolicy>> = [&public, &admin, &orders, &mesh]
            .into_iter()
            .cloned()
            .map(std::sync::Arc::new)
            .collect();
        let widened = |p: &AuthPolicy| -> String {
            widenings(p, &all, root)
                .into_iter()
                .filter(|n| n.reason == "WidenedBy")
                .map(|n| n.message)
                .collect()
        };
        assert!(widened(&public).contains("admin"), "{}", widened(&public));
        // The root policy's `frontend` is istio-system/frontend, not shop/frontend.
        assert!(
            widened(&orders).contains("istio-system/mesh"),
            "{}",
            widened(&orders)
        );
    }

    /// Two policies never share a ClusterSPIFFEID: namespaces cannot contain the `.` that
    /// joins namespace and name.
    #[test]
    fn cluster_spiffe_id_names_do_not_collide_across_namespaces() {
        assert_ne!(
            cluster_spiffe_id_name("shop-a", "orders"),
            cluster_spiffe_id_name("shop", "a-orders")
        );
        assert_ne!(
            cluster_spiffe_id_name("shop", "a.orders"),
            cluster_spiffe_id_name("shop-a", "orders")
        );
        assert_eq!(
            cluster_spiffe_id_name("shop", "orders"),
            "palisade-shop.orders-id"
        );
    }

    fn spec_policy(spec: &serde_json::Value) -> AuthPolicy {
        serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
            "metadata": {"name": "p", "namespace": "shop"}, "spec": spec,
        }))
        .expect("policy")
    }

    /// The reasons of the notes, in order.
    fn reasons(notes: &[super::super::Note]) -> Vec<&'static str> {
        notes.iter().map(|n| n.reason).collect()
    }

    fn ambient_shop(waypoint: Option<&'static str>) -> AmbientFacts<'static> {
        AmbientFacts {
            known: true,
            ambient_namespaces: vec![("shop", waypoint)],
            ambient_pods: Vec::new(),
        }
    }

    /// What ztunnel would make of each kind of rule: L4-only policies hold; HTTP fields, token
    /// conditions, JWT and external authorization are each named, with what becomes of them.
    #[test]
    fn ambient_namespaces_refuse_http_level_parts_and_name_each() {
        let ambient_ns = ambient_shop(None);
        let l4 = spec_policy(&json!({
            "selector": {"matchLabels": {"app": "orders"}},
            "rules": [{"from": [{"serviceAccount": {"name": "frontend"}}], "to": [{"ports": [8080]}]}],
            "deny": [{"from": [{"namespace": "legacy"}]}],
        }));
        assert!(ambient_notes(&l4, &ambient_ns).is_empty());
        let cases = [
            (
                json!({"rules": [{"to": [{"methods": ["GET"]}]}]}),
                "never match",
            ),
            (
                json!({"deny": [{"to": [{"paths": ["/admin/*"]}]}]}),
                "applies without them",
            ),
            (
                json!({"rules": [{"when": [{"jwtScopes": ["read"]}]}]}),
                "token conditions",
            ),
            (
                json!({"jwt": {"issuer": "https://idp.example.com", "jwksUri": "https://idp.example.com/jwks", "requireToken": true}}),
                "refuses every request",
            ),
            (
                json!({"external": {"provider": "opa"}}),
                "nothing is asked of the authorizer",
            ),
        ];
        for (spec, says) in cases {
            let p = spec_policy(&spec);
            let notes = ambient_notes(&p, &ambient_ns);
            assert_eq!(reasons(&notes), ["AmbientNeedsWaypoint"], "{spec}");
            assert_eq!(notes[0].severity, super::super::Severity::Unsupported);
            assert!(
                notes[0].message.contains(says),
                "{spec}: {}",
                notes[0].message
            );
            assert!(
                notes[0]
                    .message
                    .contains("namespace shop is labelled istio.io/dataplane-mode=ambient")
            );
        }
        // Not in the ambient mesh: nothing to say.
        let http = spec_policy(&json!({"rules": [{"to": [{"methods": ["GET"]}]}]}));
        let known = AmbientFacts {
            known: true,
            ..AmbientFacts::default()
        };
        assert!(ambient_notes(&http, &known).is_empty());
        // A Service target is the waypoint's to enforce (reported elsewhere).
        let targeted = spec_policy(&json!({
            "targetRefs": [{"kind": "Service", "name": "orders"}],
            "rules": [{"to": [{"methods": ["GET"]}]}],
        }));
        assert!(ambient_notes(&targeted, &ambient_ns).is_empty());
    }

    /// Pods enrolled one by one: only those the selector picks and that have no sidecar count.
    #[test]
    fn ambient_pods_count_when_selected_and_without_a_sidecar() {
        let orders: std::collections::BTreeMap<String, String> =
            [("app".to_owned(), "orders".to_owned())].into();
        let other: std::collections::BTreeMap<String, String> =
            [("app".to_owned(), "payments".to_owned())].into();
        let bare = std::collections::BTreeMap::new();
        let injected: std::collections::BTreeMap<String, String> =
            [(SIDECAR_STATUS.to_owned(), "{}".to_owned())].into();
        let pod = |name, labels, annotations| AmbientPod {
            namespace: "shop",
            name,
            labels,
            annotations,
        };
        let p = spec_policy(&json!({
            "selector": {"matchLabels": {"app": "orders"}},
            "rules": [{"to": [{"paths": ["/api/orders"]}]}],
        }));
        let facts = |pods| AmbientFacts {
            known: true,
            ambient_namespaces: Vec::new(),
            ambient_pods: pods,
        };
        assert!(ambient_notes(&p, &facts(vec![pod("payments-1", &other, &bare)])).is_empty());
        assert!(ambient_notes(&p, &facts(vec![pod("orders-1", &orders, &injected)])).is_empty());
        let notes = ambient_notes(&p, &facts(vec![pod("orders-2", &orders, &bare)]));
        assert_eq!(reasons(&notes), ["AmbientNeedsWaypoint"]);
        assert!(
            notes[0].message.contains("pods shop/orders-2 it selects"),
            "{}",
            notes[0].message
        );
        // A pod sending its traffic through a waypoint: its identity rules are the waypoint's.
        let mut behind = orders.clone();
        behind.insert(USE_WAYPOINT.to_owned(), "wp".to_owned());
        let l4 = spec_policy(&json!({
            "selector": {"matchLabels": {"app": "orders"}},
            "rules": [{"from": [{"serviceAccount": {"name": "frontend"}}]}],
        }));
        let notes = ambient_notes(&l4, &facts(vec![pod("orders-3", &behind, &bare)]));
        assert_eq!(reasons(&notes), ["AmbientWaypointIdentity"]);
    }

    /// Behind a waypoint, ztunnel sees the waypoint's identity: an L4 deny by namespace or an
    /// allow by ServiceAccount would not mean what it says. Without `from`, nothing to say;
    /// `istio.io/use-waypoint=none` is no waypoint.
    #[test]
    fn identity_rules_behind_a_waypoint_are_reported() {
        let deny_legacy = spec_policy(&json!({
            "selector": {"matchLabels": {"app": "orders"}},
            "deny": [{"from": [{"namespace": "legacy"}]}],
        }));
        let notes = ambient_notes(&deny_legacy, &ambient_shop(Some("waypoint")));
        assert_eq!(reasons(&notes), ["AmbientWaypointIdentity"]);
        assert!(
            notes[0].message.contains("waypoint waypoint"),
            "{}",
            notes[0].message
        );
        assert!(notes[0].message.contains("a deny lets them all through"));
        assert!(ambient_notes(&deny_legacy, &ambient_shop(None)).is_empty());
        let both = spec_policy(&json!({
            "rules": [{"from": [{"serviceAccount": {"name": "frontend"}}], "to": [{"paths": ["/x"]}]}],
        }));
        assert_eq!(
            reasons(&ambient_notes(&both, &ambient_shop(Some("waypoint")))),
            ["AmbientNeedsWaypoint", "AmbientWaypointIdentity"]
        );
        let ports = spec_policy(&json!({"rules": [{"to": [{"ports": [8080]}]}]}));
        assert!(ambient_notes(&ports, &ambient_shop(Some("waypoint"))).is_empty());
    }

    /// Before the operator has listed namespaces and pods (or when it may not), a policy with
    /// anything ztunnel would change is not reported as enforced; an L4 policy without
    /// identities is.
    #[test]
    fn unknown_ambient_state_is_not_enforced() {
        let unknown = AmbientFacts::default();
        let http = spec_policy(&json!({"rules": [{"to": [{"methods": ["GET"]}]}]}));
        assert_eq!(
            reasons(&ambient_notes(&http, &unknown)),
            ["AmbientStateUnknown"]
        );
        let ports = spec_policy(&json!({"rules": [{"to": [{"ports": [8080]}]}]}));
        assert!(ambient_notes(&ports, &unknown).is_empty());
    }

    mod overlap_index {
        use std::sync::Arc;

        use proptest::prelude::*;

        use super::*;

        /// A policy from a small domain, so that overlaps, shared keys, shared targets and
        /// root-namespace policies are common.
        fn arb_policy() -> impl Strategy<Value = AuthPolicy> {
            let labels = proptest::collection::btree_map(
                prop::sample::select(vec!["app", "tier", "version"]),
                prop::sample::select(vec!["a", "b"]),
                0..3,
            );
            let targets = proptest::collection::vec(
                (
                    prop::sample::select(vec!["", "gateway.networking.k8s.io"]),
                    prop::sample::select(vec!["Gateway", "Service"]),
                    prop::sample::select(vec!["x", "y"]),
                ),
                0..3,
            );
            (
                0u8..6,
                prop::sample::select(vec!["istio-system", "shop", "pay"]),
                prop::option::of(labels),
                prop::option::of(targets),
            )
                .prop_map(|(n, ns, selector, targets)| {
                    let mut spec = json!({"rules": [{"from": [{"namespace": "x"}]}]});
                    if let Some(l) = selector {
                        spec["selector"] = json!({"matchLabels": l});
                    }
                    if let Some(t) = targets {
                        let t: Vec<serde_json::Value> = t
                            .into_iter()
                            .map(|(g, k, n)| json!({"group": g, "kind": k, "name": n}))
                            .collect();
                        spec["targetRefs"] = json!(t);
                    }
                    serde_json::from_value(json!({
                        "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
                        "metadata": {"name": format!("p{n}"), "namespace": ns},
                        "spec": spec,
                    }))
                    .expect("policy")
                })
        }

        fn key(p: &AuthPolicy) -> (String, String) {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        }

        proptest! {
            /// Whatever was inserted, replaced and removed, the candidates of any policy hold
            /// every indexed policy it overlaps, each once, and only indexed policies.
            #[test]
            fn overlap_index_finds_every_overlap(
                policies in proptest::collection::vec(arb_policy(), 0..24),
                removed in proptest::collection::vec((0u8..6, prop::sample::select(vec!["istio-system", "shop", "pay"])), 0..4),
                probe in arb_policy(),
            ) {
                let root = "istio-system";
                let mut index = OverlapIndex::default();
                let mut live = std::collections::BTreeMap::new();
                for p in policies {
                    live.insert(key(&p), p.clone());
                    index.insert(&Arc::new(p));
                }
                for (n, ns) in removed {
                    live.remove(&(ns.to_owned(), format!("p{n}")));
                    index.remove(ns, &format!("p{n}"));
                }
                for p in live.values().chain(std::iter::once(&probe)) {
                    let found: Vec<(String, String)> =
                        index.candidates(p, root).iter().map(|c| key(c)).collect();
                    let mut unique = found.clone();
                    unique.sort();
                    unique.dedup();
                    prop_assert_eq!(unique.len(), found.len(), "a candidate twice: {:?}", found);
                    for c in &found {
                        prop_assert!(live.contains_key(c), "{:?} is not indexed", c);
                    }
                    for (k, q) in &live {
                        if overlap(p, q, root) {
                            prop_assert!(found.contains(k), "{:?} overlaps {:?} but is no candidate", k, key(p));
                        }
                    }
                    // And the index holds exactly what is live.
                    prop_assert!(live.keys().all(|(ns, n)| index.get(ns, n).is_some()));
                }
            }
        }
    }
}
