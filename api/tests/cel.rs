//! Every CEL rule of the four CRDs, checked both ways on the fixtures in `tests/cel/` with
//! kube's client-side CEL evaluator against the generated schemas. The e2e suite applies the same
//! fixtures to the real API server with `kubectl apply`.
//!
//! Each fixture starts with `# expect: accepted` or `# expect: rejected` plus `# field:` and
//! `# message:` lines that the rejection must carry.

#![allow(clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;

use kube::core::cel::Validator;
use palisade_api::{
    crdgen,
    fixtures::{CelFixture, cel_fixture_dir, cel_fixtures},
};
use serde_json::Value;

fn fixtures() -> Vec<CelFixture> {
    cel_fixtures(&cel_fixture_dir()).expect("fixtures are valid")
}

fn schema_for(kind: &str) -> Value {
    let crd = crdgen::all()
        .into_iter()
        .map(|(_, crd)| crd)
        .find(|crd| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"));
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("schema to JSON")
}

/// Deserializes an accepted object into its Rust type, so the types and the schema agree.
fn typed_roundtrip(object: &Value) -> Result<(), String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let r = match kind {
        "AuthPolicy" => {
            serde_json::from_value::<palisade_api::AuthPolicy>(object.clone()).map(drop)
        }
        "RateLimitPolicy" => {
            serde_json::from_value::<palisade_api::RateLimitPolicy>(object.clone()).map(drop)
        }
        "SecretBinding" => {
            serde_json::from_value::<palisade_api::SecretBinding>(object.clone()).map(drop)
        }
        "ImagePolicy" => {
            serde_json::from_value::<palisade_api::ImagePolicy>(object.clone()).map(drop)
        }
        _ => return Ok(()),
    };
    r.map_err(|e| e.to_string())
}

#[test]
fn every_rule_accepts_and_rejects_as_documented() {
    let fixtures = fixtures();
    assert!(fixtures.len() >= 40, "expected the full fixture set");
    let mut failures = Vec::new();
    for f in &fixtures {
        let kind = f.object["kind"].as_str().expect("kind");
        let result = Validator::new().validate(&schema_for(kind), &f.object, None);
        let name = f.path.file_name().unwrap_or_default().to_string_lossy();
        match (f.expect_ok, result) {
            (true, Ok(())) => {
                if let Err(e) = typed_roundtrip(&f.object) {
                    failures.push(format!(
                        "{name}: accepted by CEL but not by the Rust types: {e}"
                    ));
                }
            }
            (true, Err(errs)) => failures.push(format!("{name}: expected accepted, got {errs:?}")),
            (false, Ok(())) => failures.push(format!("{name}: expected a rejection, got none")),
            (false, Err(errs)) => {
                let hit = errs
                    .iter()
                    .any(|e| e.message.contains(&f.message) && e.field_path.starts_with(&f.field));
                if !hit {
                    failures.push(format!(
                        "{name}: expected {:?} at {:?}, got {:?}",
                        f.message,
                        f.field,
                        errs.iter()
                            .map(|e| format!("{}: {}", e.field_path, e.message))
                            .collect::<Vec<_>>()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn every_rejection_names_its_field_and_message() {
    for f in fixtures().iter().filter(|f| !f.expect_ok) {
        assert!(
            !f.field.is_empty() && !f.message.is_empty(),
            "{}: rejected fixtures need # field: and # message:",
            f.path.display()
        );
    }
}

#[test]
fn examples_pass_every_rule_and_deserialize() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("examples/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let object: Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if object["apiVersion"] != "palisade.dev/v1alpha1" {
                continue;
            }
            let kind = object["kind"].as_str().expect("kind").to_owned();
            if let Err(e) = Validator::new().validate(&schema_for(&kind), &object, None) {
                panic!("{}: {e:?}", path.display());
            }
            typed_roundtrip(&object).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen.insert(kind);
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [
            "AuthPolicy",
            "ImagePolicy",
            "RateLimitPolicy",
            "SecretBinding"
        ],
        "examples/ holds every kind"
    );
}
