//! Two readings of one AuthPolicy, for the tests that hold them equal:
//!
//! - [`meaning`]: what the AuthPolicy says, as docs/reference/authpolicy.md defines it;
//! - [`istio_allows`]: what Istio decides for a request, given the objects the translator
//!   generated (PeerAuthentication, RequestAuthentication, DENY and ALLOW AuthorizationPolicies),
//!   following Istio's evaluation: mutual TLS, then DENY, then ALLOW; HTTP-only attributes
//!   (methods, paths, request principals, token claims) dropped from DENY rules and disabling
//!   ALLOW rules on TCP ports; principal, path and value matches with Istio's `*` forms.
//!
//! A request is one connection or HTTP request to one workload selected by the policy.
//! External authorization (CUSTOM) is outside the model.

use std::collections::BTreeMap;

use palisade_api::{
    AuthPolicy, SpiffeId,
    auth_policy::{AuthRule, MtlsMode, Operation, Source, When},
};
use serde_json::Value;

/// A validated token: its issuer and claims (string or list values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `aud`.
    pub audiences: Vec<String>,
    /// Claims by name; nested claims by their dotted path.
    pub claims: BTreeMap<String, Vec<String>>,
}

/// One request to a workload the policy selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The caller's mesh identity `(namespace, service account)`, when it speaks mutual TLS.
    pub peer: Option<(String, String)>,
    /// The destination port.
    pub port: u16,
    /// HTTP method and path, when the port speaks HTTP (plain TCP otherwise).
    pub http: Option<(String, String)>,
    /// A token some RequestAuthentication on the workload validated.
    pub token: Option<Token>,
}

/// What the AuthPolicy says about `req`, as docs/reference/authpolicy.md defines it: with `mtls: Strict` a caller
/// without mutual TLS is refused; with `jwt.requireToken` a request without a token of the
/// policy's issuer is refused; a request matching a `deny` rule is refused; when `rules` is set,
/// a request matching none of them is refused. A rule matches when the request matches one
/// `from`, one `to` and every `when` (claims of the policy's issuer for `rules`, of any
/// validated token for `deny`). Methods and paths are HTTP attributes: plain TCP has none; a
/// path matches without its query string.
pub fn meaning(policy: &AuthPolicy, trust_domain: &str, req: &Request) -> bool {
    passes_gates(policy, trust_domain, req)
        && allowed_by_rules(policy, trust_domain, req).unwrap_or(true)
}

/// What several AuthPolicies that all apply to one workload promise together: each one's mTLS,
/// token and `deny` requirements hold, and where any of them has `rules`, a request must match a
/// rule of one of them (Istio allows what any ALLOW policy on the workload allows; Palisade
/// reports such widening as `WidenedBy`/`Widens`).
pub fn combined(policies: &[AuthPolicy], trust_domain: &str, req: &Request) -> bool {
    if !policies.iter().all(|p| passes_gates(p, trust_domain, req)) {
        return false;
    }
    let mut with_rules = policies
        .iter()
        .filter_map(|p| allowed_by_rules(p, trust_domain, req))
        .peekable();
    with_rules.peek().is_none() || with_rules.any(|allowed| allowed)
}

/// The token of the policy's own issuer and (when it names any) one of its audiences, if the
/// request carries one.
fn own_token<'a>(policy: &AuthPolicy, req: &'a Request) -> Option<&'a Token> {
    let jwt = policy.spec.jwt.as_ref()?;
    req.token.as_ref().filter(|t| {
        t.issuer == jwt.issuer
            && (jwt.audiences.is_empty() || t.audiences.iter().any(|a| jwt.audiences.contains(a)))
    })
}

/// mTLS, `requireToken` and `deny`: what refuses a request whatever the rules allow.
fn passes_gates(policy: &AuthPolicy, trust_domain: &str, req: &Request) -> bool {
    let spec = &policy.spec;
    let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
    if spec.mtls == MtlsMode::Strict && req.peer.is_none() {
        return false;
    }
    if spec.jwt.as_ref().is_some_and(|j| j.require_token) && own_token(policy, req).is_none() {
        return false;
    }
    let any_token = req.token.as_ref();
    !spec
        .deny
        .iter()
        .flatten()
        .any(|r| rule_means(r, ns, trust_domain, req, any_token))
}

/// Whether a rule allows the request; `None` when the policy has no `rules`.
fn allowed_by_rules(policy: &AuthPolicy, trust_domain: &str, req: &Request) -> Option<bool> {
    let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
    let own = own_token(policy, req);
    let rules = policy.spec.rules.as_ref()?;
    Some(
        rules
            .iter()
            .any(|r| rule_means(r, ns, trust_domain, req, own)),
    )
}

fn rule_means(
    rule: &AuthRule,
    ns: &str,
    trust_domain: &str,
    req: &Request,
    token: Option<&Token>,
) -> bool {
    let from = rule.from.is_empty()
        || rule.from.iter().any(|s| {
            let Some((peer_ns, peer_sa)) = &req.peer else {
                return false;
            };
            match s {
                Source::ServiceAccount(sa) => {
                    sa.name == *peer_sa && sa.namespace.as_deref().unwrap_or(ns) == peer_ns
                }
                Source::SpiffeId(id) => {
                    SpiffeId::for_service_account(trust_domain, peer_ns, peer_sa)
                        .is_ok_and(|p| p == *id)
                }
                Source::Namespace(n) => n == peer_ns,
            }
        });
    let to = rule.to.is_empty() || rule.to.iter().any(|op| operation_means(op, req));
    let when = rule.when.iter().all(|w| {
        let Some(t) = token else { return false };
        match w {
            When::JwtScopes(scopes) => scopes
                .iter()
                .all(|s| t.claims.get("scope").is_some_and(|v| v.contains(s))),
            When::Claim(c) => t
                .claims
                .get(&c.name)
                .is_some_and(|v| v.iter().any(|x| c.values.contains(x))),
        }
    });
    from && to && when
}

fn operation_means(op: &Operation, req: &Request) -> bool {
    let ports = op.ports.is_empty() || op.ports.iter().any(|p| p.0 == i32::from(req.port));
    let http = match &req.http {
        None => op.methods.is_empty() && op.paths.is_empty(),
        Some((method, path)) => {
            (op.methods.is_empty() || op.methods.iter().any(|m| m.as_str() == method))
                && (op.paths.is_empty()
                    || op
                        .paths
                        .iter()
                        .any(|p| istio_string_match(p, without_query(path))))
        }
    };
    ports && http
}

/// The path of a request target: paths match without the query string (Istio matches the
/// `url_path`, which leaves it out).
pub fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// Istio's string match: `*` alone, `prefix*`, `*suffix`, or exact.
pub fn istio_string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// What Istio decides for `req` given the `objects` an AuthPolicy was translated into.
pub fn istio_allows(objects: &[Value], trust_domain: &str, req: &Request) -> bool {
    let strict = objects
        .iter()
        .any(|o| o["kind"] == "PeerAuthentication" && o["spec"]["mtls"]["mode"] == "STRICT");
    if strict && req.peer.is_none() {
        return false;
    }
    let policies: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "AuthorizationPolicy")
        .collect();
    let rules_of = |action: &str| -> Vec<&Value> {
        policies
            .iter()
            .filter(|p| p["spec"]["action"] == action)
            .flat_map(|p| p["spec"]["rules"].as_array().into_iter().flatten())
            .collect()
    };
    let attrs = Attributes::of(req, trust_domain);
    if rules_of("DENY")
        .iter()
        .any(|r| istio_rule_matches(r, &attrs, Action::Deny))
    {
        return false;
    }
    let allow_policies = policies.iter().any(|p| p["spec"]["action"] == "ALLOW");
    !allow_policies
        || rules_of("ALLOW")
            .iter()
            .any(|r| istio_rule_matches(r, &attrs, Action::Allow))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Deny,
    Allow,
}

/// The attributes Istio's RBAC filter sees.
struct Attributes<'a> {
    principal: Option<String>,
    namespace: Option<&'a str>,
    request_principal: Option<String>,
    claims: Option<&'a BTreeMap<String, Vec<String>>>,
    audiences: Option<&'a [String]>,
    port: u16,
    http: Option<&'a (String, String)>,
}

impl<'a> Attributes<'a> {
    fn of(req: &'a Request, trust_domain: &str) -> Self {
        Attributes {
            principal: req
                .peer
                .as_ref()
                .map(|(ns, sa)| format!("{trust_domain}/ns/{ns}/sa/{sa}")),
            namespace: req.peer.as_ref().map(|(ns, _)| ns.as_str()),
            request_principal: req
                .token
                .as_ref()
                .map(|t| format!("{}/{}", t.issuer, t.subject)),
            claims: req.token.as_ref().map(|t| &t.claims),
            audiences: req.token.as_ref().map(|t| t.audiences.as_slice()),
            port: req.port,
            http: req.http.as_ref(),
        }
    }
}

/// One `when` condition: a claim or the audiences, with `values` and `notValues`.
fn condition_matches(c: &Value, a: &Attributes<'_>) -> bool {
    let key = c["key"].as_str().unwrap_or_default();
    let claim = key
        .strip_prefix("request.auth.claims[")
        .and_then(|k| k.strip_suffix(']'))
        .map(|k| k.replace("][", "."));
    let present: Option<&[String]> = match (claim, a.claims) {
        _ if key == "request.auth.audiences" => a.audiences,
        (Some(name), Some(claims)) => claims.get(&name).map(Vec::as_slice),
        _ => None,
    };
    let any_of = |patterns: &[&str]| {
        present.is_some_and(|v| v.iter().any(|x| matches_any(patterns, Some(x))))
    };
    let (values, not_values) = (strings(&c["values"]), strings(&c["notValues"]));
    (values.is_empty() || any_of(&values)) && (not_values.is_empty() || !any_of(&not_values))
}

/// Whether `value` is present and one of Istio's `patterns` matches it.
fn matches_any(patterns: &[&str], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| istio_string_match(p, v)))
}

fn has_http_field(rule: &Value) -> bool {
    let ops = rule["to"].as_array().into_iter().flatten();
    let sources = rule["from"].as_array().into_iter().flatten();
    ops.into_iter().any(|o| {
        !strings(&o["operation"]["methods"]).is_empty()
            || !strings(&o["operation"]["paths"]).is_empty()
    }) || sources.into_iter().any(|s| {
        !strings(&s["source"]["requestPrincipals"]).is_empty()
            || !strings(&s["source"]["notRequestPrincipals"]).is_empty()
    }) || rule["when"].as_array().is_some_and(|w| !w.is_empty())
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// Whether one Istio rule matches. On plain TCP, HTTP-only fields are dropped from a DENY rule
/// (it matches as if they were absent), and an ALLOW rule with an HTTP-only field anywhere (an
/// operation's methods or paths, a request principal, a claim) is skipped whole: istiod
/// generates nothing for it on TCP filter chains, its other operations included.
fn istio_rule_matches(rule: &Value, a: &Attributes<'_>, action: Action) -> bool {
    let tcp = a.http.is_none();
    if tcp && action == Action::Allow && has_http_field(rule) {
        return false;
    }
    // Some(true/false) for a field that constrains; None for a dropped one.
    let http_only = |matched: bool| -> Option<bool> {
        match (tcp, action) {
            (false, _) => Some(matched),
            (true, Action::Deny) => None,
            (true, Action::Allow) => Some(false),
        }
    };
    let from = rule["from"].as_array().is_none_or(|entries| {
        entries.iter().any(|e| {
            let s = &e["source"];
            let mut ok = true;
            let peer = a.principal.as_deref();
            let principals = strings(&s["principals"]);
            if !principals.is_empty() {
                ok &= matches_any(&principals, peer);
            }
            let namespaces = strings(&s["namespaces"]);
            if !namespaces.is_empty() {
                ok &= matches_any(&namespaces, a.namespace);
            }
            let not_principals = strings(&s["notPrincipals"]);
            if !not_principals.is_empty() {
                ok &= !matches_any(&not_principals, peer);
            }
            let token = a.request_principal.as_deref();
            let request = strings(&s["requestPrincipals"]);
            if !request.is_empty() {
                ok &= http_only(matches_any(&request, token)).unwrap_or(true);
            }
            let not_request = strings(&s["notRequestPrincipals"]);
            if !not_request.is_empty() {
                ok &= http_only(!matches_any(&not_request, token)).unwrap_or(true);
            }
            ok
        })
    });
    let to = rule["to"].as_array().is_none_or(|ops| {
        ops.iter().any(|o| {
            let op = &o["operation"];
            let mut ok = true;
            let ports = strings(&op["ports"]);
            if !ports.is_empty() {
                ok &= ports.iter().any(|p| p.parse() == Ok(a.port));
            }
            let methods = strings(&op["methods"]);
            if !methods.is_empty() {
                let m = a.http.is_some_and(|(m, _)| methods.contains(&m.as_str()));
                ok &= http_only(m).unwrap_or(true);
            }
            let paths = strings(&op["paths"]);
            if !paths.is_empty() {
                let m = a.http.is_some_and(|(_, p)| {
                    paths
                        .iter()
                        .any(|x| istio_string_match(x, without_query(p)))
                });
                ok &= http_only(m).unwrap_or(true);
            }
            ok
        })
    });
    let when = rule["when"].as_array().is_none_or(|conds| {
        conds
            .iter()
            .all(|c| http_only(condition_matches(c, a)).unwrap_or(true))
    });
    from && to && when
}
