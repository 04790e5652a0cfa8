//! The generated Istio configuration means what the AuthPolicy says: for generated policies and
//! requests (callers with and without mutual TLS, HTTP and plain TCP ports, methods and paths,
//! tokens of the policy's issuer and of another issuer the mesh also validates, scopes and
//! claims), [`model::meaning`] of the policy equals [`model::istio_allows`] of what the
//! translator produced. Where a translation warns that Istio will decide otherwise
//! (`DenyHttpFieldsWithoutPorts`: a DENY rule that refuses all TCP), TCP requests are left out
//! of the comparison: the warning is the divergence, reported. CI runs 256 policies with 64
//! requests each; `PROPTEST_CASES` raises the count.

#![allow(clippy::expect_used, missing_docs)]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::{AtomicU64, Ordering},
};

use palisade_api::AuthPolicy;
use palisade_operator::{
    model::{self, Request, Token},
    translate::{self, Context},
};
use proptest::prelude::*;
use serde_json::{Value, json};

const ISSUER: &str = "https://auth.shop.example";
const OTHER_ISSUER: &str = "https://other.example";
/// Port 8080 speaks HTTP, 5432 plain TCP.
const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 5432;

fn source() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec!["frontend", "orders", "evil"])
            .prop_map(|sa| json!({"serviceAccount": {"name": sa}})),
        prop::sample::select(vec!["shop", "other"])
            .prop_map(|ns| json!({"serviceAccount": {"name": "frontend", "namespace": ns}})),
        prop::sample::select(vec!["shop", "other"]).prop_map(|ns| json!({"namespace": ns})),
        Just(json!({"spiffeId": "spiffe://cluster.local/ns/shop/sa/orders"})),
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

fn rule(with_jwt: bool) -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(source(), 0..=2),
        prop::collection::vec(operation(), 0..=2),
        prop::collection::vec(condition(), 0..=usize::from(with_jwt)),
    )
        .prop_map(|(from, to, when)| json!({"from": from, "to": to, "when": when}))
}

fn policy() -> impl Strategy<Value = AuthPolicy> {
    (any::<bool>(), any::<bool>(), 0..3usize)
        .prop_flat_map(|(with_jwt, require, mtls)| {
            (
                Just((with_jwt, require, mtls)),
                prop::option::of(prop::collection::vec(rule(with_jwt), 0..=3)),
                prop::collection::vec(rule(with_jwt), 0..=2),
            )
        })
        .prop_map(|((with_jwt, require, mtls), rules, deny)| {
            let mode = ["Strict", "Permissive", "Inherit"][mtls];
            let mut spec = json!({
                "selector": {"matchLabels": {"app": "orders"}},
                "mtls": mode,
                "deny": deny,
            });
            if let Some(rules) = rules {
                spec["rules"] = json!(rules);
            }
            if with_jwt {
                spec["jwt"] = json!({"issuer": ISSUER, "requireToken": require});
            }
            serde_json::from_value(json!({
                "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
                "metadata": {"name": "p", "namespace": "shop", "uid": "u"},
                "spec": spec,
            }))
            .expect("a valid AuthPolicy")
        })
}

fn token() -> impl Strategy<Value = Option<Token>> {
    prop::option::of((
        prop::sample::select(vec![ISSUER, OTHER_ISSUER]),
        prop::sample::subsequence(vec!["orders:read", "orders:write"], 0..=2),
        prop::sample::subsequence(vec!["staff", "banned"], 0..=2),
    ))
    .prop_map(|t| {
        t.map(|(issuer, scopes, groups)| Token {
            issuer: issuer.into(),
            subject: "alice".into(),
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

fn request() -> impl Strategy<Value = Request> {
    (
        prop::option::of((
            prop::sample::select(vec!["shop", "other"]),
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
        ]),
        token(),
    )
        .prop_map(|(peer, http, method, path, token)| Request {
            peer: peer.map(|(ns, sa)| (ns.to_owned(), sa.to_owned())),
            port: if http { HTTP_PORT } else { TCP_PORT },
            http: http.then(|| (method.to_owned(), path.to_owned())),
            // Plain TCP carries no token.
            token: token.filter(|_| http),
        })
}

static CASES: AtomicU64 = AtomicU64::new(0);
static COMPARED: AtomicU64 = AtomicU64::new(0);
static ALLOWED: AtomicU64 = AtomicU64::new(0);

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn generated_istio_policy_means_what_the_auth_policy_says(
        policy in policy(),
        requests in prop::collection::vec(request(), 64),
    ) {
        let ctx = Context::default();
        let out = translate::auth::translate(&policy, &ctx);
        let tcp_diverges = out.notes.iter().any(|n| n.reason == "DenyHttpFieldsWithoutPorts");
        // Palisade cannot tell which ports speak plain TCP: a DENY entry with methods, paths or
        // token conditions on such a port refuses every connection to it (documented; not
        // compared here).
        let http_fields_on: BTreeSet<i32> = policy.spec.deny.iter().flatten()
            .flat_map(|r| r.to.iter().map(move |op| (op, !r.when.is_empty())))
            .filter(|(op, when)| *when || !op.methods.is_empty() || !op.paths.is_empty())
            .flat_map(|(op, _)| op.ports.iter().map(|p| p.0))
            .collect();
        CASES.fetch_add(1, Ordering::Relaxed);
        for req in &requests {
            if req.http.is_none()
                && (tcp_diverges || http_fields_on.contains(&i32::from(req.port)))
            {
                continue;
            }
            let said = model::meaning(&policy, &ctx.trust_domain, req);
            let done = model::istio_allows(&out.objects, &ctx.trust_domain, req);
            COMPARED.fetch_add(1, Ordering::Relaxed);
            if said {
                ALLOWED.fetch_add(1, Ordering::Relaxed);
            }
            prop_assert_eq!(
                said, done,
                "policy {} request {:?}: the AuthPolicy says {}, the generated Istio objects decide {}\n{}",
                serde_json::to_string(&policy.spec).unwrap_or_default(), req, said, done,
                serde_json::to_string_pretty(&out.objects).unwrap_or_default()
            );
        }
        if CASES.load(Ordering::Relaxed) == u64::from(cases()) {
            eprintln!(
                "  {} policies, {} requests compared: {} allowed, {} refused by both readings",
                cases(),
                COMPARED.load(Ordering::Relaxed),
                ALLOWED.load(Ordering::Relaxed),
                COMPARED.load(Ordering::Relaxed) - ALLOWED.load(Ordering::Relaxed)
            );
        }
    }
}
