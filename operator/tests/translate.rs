//! Snapshot tests of the pure translators over the input files in `tests/fixtures/`: each file
//! holds a `policy` and an optional `context`; the snapshot holds every generated object and note.

#![allow(clippy::expect_used, missing_docs)]

use palisade_api::{AuthPolicy, RateLimitPolicy, SecretBinding};
use palisade_operator::translate::{self, Context};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture<P> {
    #[serde(default)]
    context: Option<Context>,
    policy: P,
}

fn load<P: for<'de> Deserialize<'de>>(path: &std::path::Path) -> (Context, P) {
    let text = std::fs::read_to_string(path).expect("readable fixture");
    // Through JSON: serde_yaml reads enums from YAML tags, the API server (and kubectl) from
    // single-key maps, which is what the fixtures hold.
    let value: serde_json::Value = serde_yaml::from_str(&text).expect("fixture is YAML");
    let f: Fixture<P> = serde_json::from_value(value).expect("fixture parses");
    (f.context.unwrap_or_default(), f.policy)
}

#[test]
fn auth_policies() {
    insta::glob!("fixtures/auth/*.yaml", |path| {
        let (ctx, policy) = load::<AuthPolicy>(path);
        let out = translate::auth::translate(&policy, &ctx);
        assert_eq!(
            out,
            translate::auth::translate(&policy, &ctx),
            "deterministic"
        );
        insta::assert_yaml_snapshot!(out);
    });
}

#[test]
fn rate_limit_policies() {
    insta::glob!("fixtures/ratelimit/*.yaml", |path| {
        let (ctx, policy) = load::<RateLimitPolicy>(path);
        let out = translate::ratelimit::translate(&policy, &ctx);
        insta::assert_yaml_snapshot!(out);
    });
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VaultFixture {
    tenancy: translate::vault::Tenancy,
    #[serde(default)]
    workloads: translate::vault::VaultDefaults,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    allow_retain: bool,
    binding: SecretBinding,
}

/// Granted bindings snapshot their policy (also as HCL), role and database roles; every
/// `attack-` fixture must be refused by the tenancy guard.
#[test]
fn secret_bindings() {
    insta::glob!("fixtures/vault/*.yaml", |path| {
        let text = std::fs::read_to_string(path).expect("readable fixture");
        let value: serde_json::Value = serde_yaml::from_str(&text).expect("fixture is YAML");
        let f: VaultFixture = serde_json::from_value(value).expect("fixture parses");
        f.tenancy.validate().unwrap_or_else(|e| {
            panic!("{}: the fixture's tenancy is refused: {e}", path.display())
        });
        let naming = translate::vault::Naming { cluster: f.cluster };
        let grants = translate::vault::Grants {
            tenancy: &f.tenancy,
            workloads: &f.workloads,
            naming: &naming,
            allow_retain: f.allow_retain,
        };
        let out = translate::vault::translate(&f.binding, &grants);
        let attack = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains("attack"));
        assert_eq!(attack, out.is_err(), "{}: {out:?}", path.display());
        let hcl = out.as_ref().map(|d| d.policy.hcl()).unwrap_or_default();
        insta::assert_yaml_snapshot!((out, hcl));
    });
}

/// Pruning only looks at `candidates`: every object a translator can produce must be among them,
/// or a stale one would never be removed.
#[test]
fn every_generated_object_is_a_prune_candidate() {
    let key = |o: &serde_json::Value| {
        (
            o["apiVersion"].as_str().unwrap_or_default().to_owned(),
            o["kind"].as_str().unwrap_or_default().to_owned(),
            o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    let own = |c: Vec<(&str, &str, String)>| -> Vec<(String, String, String)> {
        c.into_iter()
            .map(|(a, k, n)| (a.to_owned(), k.to_owned(), n))
            .collect()
    };
    let mut checked = 0;
    insta::glob!("fixtures/auth/*.yaml", |path| {
        let (ctx, policy) = load::<AuthPolicy>(path);
        let ns = policy.metadata.namespace.clone().unwrap_or_default();
        let name = policy.metadata.name.clone().unwrap_or_default();
        let candidates = own(translate::auth::candidates(&ns, &name));
        for ctx in [
            ctx.clone(),
            Context {
                identity_source: translate::IdentitySource::Spire,
                ..ctx
            },
        ] {
            for o in translate::auth::translate(&policy, &ctx).objects {
                assert!(
                    candidates.contains(&key(&o)),
                    "{:?} is not a prune candidate",
                    key(&o)
                );
                checked += 1;
            }
        }
    });
    insta::glob!("fixtures/ratelimit/*.yaml", |path| {
        let (ctx, policy) = load::<RateLimitPolicy>(path);
        let name = policy.metadata.name.clone().unwrap_or_default();
        let candidates = own(translate::ratelimit::candidates(&name));
        for o in translate::ratelimit::translate(&policy, &ctx).objects {
            assert!(
                candidates.contains(&key(&o)),
                "{:?} is not a prune candidate",
                key(&o)
            );
            checked += 1;
        }
    });
    assert!(checked > 20, "the fixtures produce objects ({checked})");
}
