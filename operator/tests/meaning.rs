//! The generated Istio configuration means what the AuthPolicy says: for generated policies and
//! requests (callers with and without mutual TLS, HTTP and plain TCP ports, methods and paths,
//! tokens of the policy's issuer and of another issuer the mesh also validates, scopes and
//! claims), [`model::meaning`] of the policy equals [`model::istio_allows`] of what the
//! translator produced. Where a translation warns that Istio will decide otherwise
//! (`DenyHttpFieldsWithoutPorts`: a DENY rule that refuses all TCP), TCP requests are left out
//! of the comparison: the warning is the divergence, reported. CI runs 256 policies with 64
//! requests each; `PROPTEST_CASES` raises the count. The end-to-end mesh test holds the same
//! meaning equal to the Envoy configuration the real istiod generates.

#![allow(clippy::expect_used, missing_docs)]

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use palisade_operator::{
    model,
    strategies::{self, compared},
    translate::{self, Context},
};
use proptest::prelude::*;

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
        policy in strategies::policy("shop", "p", Some("orders"), None),
        requests in prop::collection::vec(strategies::request("shop"), 64),
    ) {
        let ctx = Context::default();
        let out = translate::auth::translate(&policy, &ctx);
        CASES.fetch_add(1, Ordering::Relaxed);
        for req in requests.iter().filter(|r| compared(&policy, &out.notes, r)) {
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

    /// Several AuthPolicies on one workload: where none reports that another widens it
    /// (`WidenedBy`/`Widens`), what they promise together is what each one says.
    #[test]
    fn unreported_overlaps_widen_nothing(
        policies in strategies::several("shop", "orders", None),
        requests in prop::collection::vec(strategies::request("shop"), 64),
    ) {
        let siblings: Vec<Arc<_>> = policies.iter().cloned().map(Arc::new).collect();
        let reported = policies.iter().any(|p| {
            translate::auth::widenings(p, &siblings, "istio-system")
                .iter()
                .any(|n| n.reason == "WidenedBy" || n.reason == "Widens")
        });
        if !reported {
            let td = Context::default().trust_domain;
            for req in &requests {
                let each = policies.iter().all(|p| model::meaning(p, &td, req));
                prop_assert_eq!(
                    model::combined(&policies, &td, req), each,
                    "{:?}: no widening reported, yet together they decide otherwise than each: {}",
                    req, serde_json::to_string(&policies.iter().map(|p| &p.spec).collect::<Vec<_>>()).unwrap_or_default()
                );
            }
        }
    }
}
