//! Generated AuthPolicies and requests for the property tests that hold [`crate::model::meaning`]
//! equal to what Istio decides: with the operator's own model of Istio
//! (`operator/tests/meaning.rs`) and with the Envoy configuration the real istiod generates (the
//! end-to-end mesh tests). Built with the `strategies` feature.

use std::collections::{BTreeMap, BTreeSet};

use palisade_api::AuthPolicy;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::{
    model::{Request, Token},
    translate::Note,
};

/// The issuer a generated policy's `jwt` names.
pub const ISSUER: &str = "https://auth.shop.example";
/// Another issuer the mesh also validates tokens of.
pub const OTHER_ISSUER: &str = "https://other.example";
/// The audience a generated policy's `jwt` may require (tokens carry it, another one, both or
/// none).
pub const AUDIENCE: &str = "orders-api";
/// A port that speaks HTTP.
pub const HTTP_PORT: u16 = 8080;
/// A port that speaks plain TCP.
pub const TCP_PORT: u16 = 5432;
/// The namespace of callers from elsewhere.
pub const OTHER_NAMESPACE: &str = "other";

fn source(ns: &str) -> impl Strategy<Value = Value> + use<> {
    let ns = ns.to_owned();
    prop_oneof![
        prop::sample::select(vec!["frontend", "orders", "evil"])
            .prop_map(|sa| json!({"serviceAccount": {"name": sa}})),
        prop::sample::select(vec![ns.clone(), OTHER_NAMESPACE.to_owned()])
            .prop_map(|ns| json!({"serviceAccount": {"name": "frontend", "namespace": ns}})),
        prop::sample::select(vec![ns.clone(), OTHER_NAMESPACE.to_owned()])
            .prop_map(|ns| json!({"namespace": ns})),
        Just(json!({"spiffeId": format!("spiffe://cluster.local/ns/{ns}/sa/orders")})),
    ]
}

fn operation() -> impl Strategy<Value = Value> {
    (
        prop::sample::subsequence(vec!["GET", "POST"], 0..=2),
        prop::sample::subsequence(vec!["/api/orders", "/api/*", "/admin/*", "*.json"], 0..=2),
        prop::sample::subsequence(vec![HTTP_PORT, TCP_PORT], 0..=2),
    )
        .prop_map(|(methods, paths, ports)| {
            let mut op = serde_json::Map::new();
            if !methods.is_empty() {
                op.insert("methods".into(), json!(methods));
            }
            if !paths.is_empty() {
                op.insert("paths".into(), json!(paths));
            }
            if !ports.is_empty() {
                op.insert("ports".into(), json!(ports));
            }
            Value::Object(op)
        })
}

fn condition() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::subsequence(vec!["orders:read", "orders:write"], 1..=2)
            .prop_map(|s| json!({"jwtScopes": s})),
        prop::sample::subsequence(vec!["staff", "banned"], 1..=2)
            .prop_map(|v| json!({"claim": {"name": "groups", "values": v}})),
    ]
}

fn rule(ns: &str, with_jwt: bool) -> impl Strategy<Value = Value> + use<> {
    (
        prop::collection::vec(source(ns), 0..=2),
        prop::collection::vec(operation(), 0..=2),
        prop::collection::vec(condition(), 0..=usize::from(with_jwt)),
    )
        .prop_map(|(from, to, when)| {
            // Empty lists are left out, as a user writes them (the schema refuses some).
            let mut rule = serde_json::Map::new();
            for (key, list) in [("from", from), ("to", to), ("when", when)] {
                if !list.is_empty() {
                    rule.insert(key.into(), Value::Array(list));
                }
            }
            Value::Object(rule)
        })
}

/// AuthPolicies named `name` in `ns` selecting `app: <app>` (the whole namespace without `app`):
/// rules and deny rules over the sources, operations and conditions above, every mTLS mode, with
/// and without `jwt` (issuer [`ISSUER`], keys at `jwks_uri` when given) and `requireToken`.
pub fn policy(
    ns: &str,
    name: &str,
    app: Option<&str>,
    jwks_uri: Option<&str>,
) -> impl Strategy<Value = AuthPolicy> + use<> {
    let (ns, name, app) = (ns.to_owned(), name.to_owned(), app.map(str::to_owned));
    let jwks_uri = jwks_uri.map(str::to_owned);
    let rule_ns = ns.clone();
    (any::<bool>(), any::<bool>(), 0..3usize, any::<bool>())
        .prop_flat_map(move |(with_jwt, require, mtls, audience)| {
            (
                Just((with_jwt, require, mtls, audience)),
                prop::option::of(prop::collection::vec(rule(&rule_ns, with_jwt), 0..=3)),
                prop::collection::vec(rule(&rule_ns, with_jwt), 0..=2),
            )
        })
        .prop_filter_map(
            "a valid AuthPolicy",
            move |((with_jwt, require, mtls, audience), rules, deny)| {
                let mode = ["Strict", "Permissive", "Inherit"][mtls];
                let mut spec = json!({"mtls": mode});
                if let Some(app) = &app {
                    spec["selector"] = json!({"matchLabels": {"app": app}});
                }
                if !deny.is_empty() {
                    spec["deny"] = json!(deny);
                }
                if let Some(rules) = rules {
                    spec["rules"] = json!(rules);
                }
                if with_jwt {
                    spec["jwt"] = json!({"issuer": ISSUER, "requireToken": require});
                    if audience {
                        spec["jwt"]["audiences"] = json!([AUDIENCE]);
                    }
                    if let Some(uri) = &jwks_uri {
                        spec["jwt"]["jwksUri"] = json!(uri);
                    }
                }
                serde_json::from_value(json!({
                    "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
                    "metadata": {"name": name, "namespace": ns, "uid": "u"},
                    "spec": spec,
                }))
                .ok()
            },
        )
}

fn token() -> impl Strategy<Value = Option<Token>> {
    prop::option::of((
        prop::sample::select(vec![ISSUER, OTHER_ISSUER]),
        prop::sample::subsequence(vec!["orders:read", "orders:write"], 0..=2),
        prop::sample::subsequence(vec!["staff", "banned"], 0..=2),
        prop::sample::subsequence(vec![AUDIENCE, "payments-api"], 0..=2),
    ))
    .prop_map(|t| {
        t.map(|(issuer, scopes, groups, audiences)| Token {
            issuer: issuer.into(),
            subject: "alice".into(),
            audiences: audiences.into_iter().map(str::to_owned).collect(),
            claims: BTreeMap::from([
                ("iss".to_owned(), vec![issuer.to_owned()]),
                ("sub".to_owned(), vec!["alice".to_owned()]),
                (
                    "scope".to_owned(),
                    scopes.into_iter().map(str::to_owned).collect(),
                ),
                (
                    "groups".to_owned(),
                    groups.into_iter().map(str::to_owned).collect(),
                ),
            ]),
        })
    })
}

/// Two or three AuthPolicies (`p0`, `p1`, ...) in `ns` that all apply to the workload labelled
/// `app: <app>`, each selecting it or the whole namespace.
pub fn several(
    ns: &str,
    app: &str,
    jwks_uri: Option<&str>,
) -> impl Strategy<Value = Vec<AuthPolicy>> + use<> {
    let (ns, app, jwks_uri) = (ns.to_owned(), app.to_owned(), jwks_uri.map(str::to_owned));
    prop::collection::vec(any::<bool>(), 2..=3).prop_flat_map(move |wide| {
        wide.iter()
            .enumerate()
            .map(|(i, w)| {
                let app = (!w).then_some(app.as_str());
                policy(&ns, &format!("p{i}"), app, jwks_uri.as_deref())
            })
            .collect::<Vec<_>>()
    })
}

/// Requests to a workload in `ns`: callers with and without mutual TLS from `ns` and
/// [`OTHER_NAMESPACE`], HTTP on [`HTTP_PORT`] and plain TCP on [`TCP_PORT`], methods, paths and
/// tokens of both issuers.
pub fn request(ns: &str) -> impl Strategy<Value = Request> + use<> {
    (
        prop::option::of((
            prop::sample::select(vec![ns.to_owned(), OTHER_NAMESPACE.to_owned()]),
            prop::sample::select(vec!["frontend", "orders", "evil"]),
        )),
        any::<bool>(),
        prop::sample::select(vec!["GET", "POST", "DELETE"]),
        prop::sample::select(vec![
            "/api/orders",
            "/api/orders/1",
            "/admin/x",
            "/x.json",
            "/",
            "/api/orders?page=2",
            "/admin/x?f=.json",
        ]),
        token(),
    )
        .prop_map(|(peer, http, method, path, token)| Request {
            peer: peer.map(|(ns, sa)| (ns, sa.to_owned())),
            port: if http { HTTP_PORT } else { TCP_PORT },
            http: http.then(|| (method.to_owned(), path.to_owned())),
            // Plain TCP carries no token.
            token: token.filter(|_| http),
        })
}

/// Whether a request is compared at all. Palisade cannot tell which ports speak plain TCP: a
/// DENY entry with methods, paths or token conditions on such a port refuses every connection to
/// it, and a translation that warns of it (`DenyHttpFieldsWithoutPorts`) has reported the
/// divergence. Plain-TCP requests to such ports are left out.
pub fn compared(policy: &AuthPolicy, notes: &[Note], req: &Request) -> bool {
    if req.http.is_some() {
        return true;
    }
    let tcp_diverges = notes
        .iter()
        .any(|n| n.reason == "DenyHttpFieldsWithoutPorts");
    let http_fields_on: BTreeSet<i32> = policy
        .spec
        .deny
        .iter()
        .flatten()
        .flat_map(|r| r.to.iter().map(move |op| (op, !r.when.is_empty())))
        .filter(|(op, when)| *when || !op.methods.is_empty() || !op.paths.is_empty())
        .flat_map(|(op, _)| op.ports.iter().map(|p| p.0))
        .collect();
    !tcp_diverges && !http_fields_on.contains(&i32::from(req.port))
}
