//! Secrets in environment variables, decided by the Rego policy in
//! `policies/admission/secrets.rego`, evaluated in-process with regorus. The same file is
//! unit-tested with the real `opa test`, and a differential test checks both engines agree.
//!
//! Most pods carry no secret, and for them the evaluation finds nothing at several times the
//! cost of the rest of the decision. So a pod is first screened ([`SecretsPolicy::may_find`]):
//! the policy can only find something in an env entry that refers to a Secret, an `envFrom`
//! source that does, or a literal value its combined pattern (`any_pattern`, read from the policy
//! itself and compiled as regorus compiles it) matches. A pod with none of these has no finding,
//! and the policy is evaluated for every other pod.

use regorus::{Engine, Value};
use serde::Serialize;
use serde_json::json;

use crate::pods::containers;
use crate::workload::PodView;

/// The policy source, compiled into the binary.
pub const SECRETS_REGO: &str = include_str!("../../policies/admission/secrets.rego");
/// The rule whose value is the set of findings.
pub const DENY_RULE: &str = "data.palisade.admission.secrets.deny";
/// The rule whose value is every secret pattern in one regular expression.
pub const ANY_PATTERN_RULE: &str = "data.palisade.admission.secrets.any_pattern";

/// regorus's size limit for the regular expressions of `regex.match`.
const REGEX_SIZE_LIMIT: usize = 100 * 1024;

/// One secret found in a container's environment.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct Finding {
    /// Container name.
    pub container: String,
    /// Pod spec field holding the container.
    pub field: String,
    /// Rule that matched.
    pub rule: String,
    /// What was found and what to change (never the secret itself).
    pub message: String,
}

/// Why evaluation failed (the webhook then refuses, it never allows on error).
#[derive(Debug, thiserror::Error)]
#[error("secrets policy evaluation failed: {0}")]
pub struct PolicyError(String);

/// The compiled policy.
#[derive(Clone)]
pub struct SecretsPolicy {
    compiled: regorus::CompiledPolicy,
    any_pattern: regex::Regex,
}

impl SecretsPolicy {
    /// Compiles the built-in policy.
    pub fn new() -> Result<Self, PolicyError> {
        let mut engine = Engine::new();
        engine
            .add_policy("secrets.rego".into(), SECRETS_REGO.into())
            .map_err(|e| PolicyError(e.to_string()))?;
        // Compiled once for its entry point; each evaluation starts from the compiled form
        // instead of re-preparing a whole engine.
        let any_pattern = engine
            .eval_rule(ANY_PATTERN_RULE.into())
            .map_err(|e| PolicyError(e.to_string()))?;
        let any_pattern = any_pattern
            .as_string()
            .map_err(|e| PolicyError(format!("{ANY_PATTERN_RULE}: {e}")))?;
        // As regorus's `regex.match` compiles it (same crate, same build), so a value this
        // expression does not match is one the policy's `regex.match(any_pattern, ...)` refuses
        // to look further at.
        let any_pattern = regex::RegexBuilder::new(any_pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| PolicyError(format!("{ANY_PATTERN_RULE}: {e}")))?;
        let compiled = engine
            .compile_with_entrypoint(&DENY_RULE.into())
            .map_err(|e| PolicyError(e.to_string()))?;
        let policy = SecretsPolicy {
            compiled,
            any_pattern,
        };
        // The policy itself must find a literal secret: a regular expression regorus could not
        // compile would make every evaluation fail (and refuse), while the screen alone would
        // pass clean pods.
        let probe = json!({"containers": [{"field": "containers", "index": 0, "name": "probe",
            "env": [{"name": "K", "value": "-----BEGIN PRIVATE KEY-----"}], "envFrom": []}]});
        if !policy.may_find(&probe) || policy.eval(&probe)?.is_empty() {
            return Err(PolicyError(
                "the policy finds no literal private key in a probe".into(),
            ));
        }
        Ok(policy)
    }

    /// Whether the policy could find anything in `input` (see the module's text): `false` only
    /// when no env entry refers to a Secret, no `envFrom` source does, and no string value
    /// matches the combined pattern. Any shape other than the one [`Self::input`] builds (lists of
    /// objects) counts as "could".
    pub fn may_find(&self, input: &serde_json::Value) -> bool {
        let Some(containers) = input["containers"].as_array() else {
            return true;
        };
        containers.iter().any(|c| {
            let (Some(env), Some(env_from)) = (c["env"].as_array(), c["envFrom"].as_array()) else {
                return true;
            };
            env.iter().any(|e| {
                !e.is_object()
                    || e.get("valueFrom")
                        .is_some_and(|v| !v.is_object() || v.get("secretKeyRef").is_some())
                    || e["value"]
                        .as_str()
                        .is_some_and(|v| self.any_pattern.is_match(v))
            }) || env_from
                .iter()
                .any(|s| !s.is_object() || s.get("secretRef").is_some())
        })
    }

    /// [`Self::may_find`] on the pod itself, without building the policy's input: the same
    /// answer (`screen::the_typed_screen_is_the_screen` checks it) for what every pod pays.
    pub fn may_find_in(&self, pod: &PodView) -> bool {
        containers(&pod.spec).any(|c| {
            c.env.iter().any(|e| {
                e.value_from
                    .as_ref()
                    .is_some_and(|v| v.secret_key_ref.is_some())
                    || e.value
                        .as_deref()
                        .is_some_and(|v| self.any_pattern.is_match(v))
            }) || c.env_from.iter().any(|s| s.secret_ref.is_some())
        })
    }

    /// The findings of the policy in a pod, sorted: none, and no input built, when
    /// [`Self::may_find_in`] says there can be none.
    pub fn evaluate_pod(&self, pod: &PodView) -> Result<Vec<Finding>, PolicyError> {
        if !self.may_find_in(pod) {
            return Ok(Vec::new());
        }
        self.eval(&Self::input(pod))
    }

    /// The policy input for a pod: every container with its env and envFrom.
    pub fn input(pod: &PodView) -> serde_json::Value {
        let list: Vec<serde_json::Value> = containers(&pod.spec)
            .map(|c| {
                json!({
                    "field": c.kind.field(),
                    "index": c.index,
                    "name": c.name,
                    "env": c.env,
                    "envFrom": c.env_from,
                })
            })
            .collect();
        json!({"containers": list})
    }

    /// The findings of the policy for an input, sorted: none without evaluating it when
    /// [`Self::may_find`] says there can be none.
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<Vec<Finding>, PolicyError> {
        if !self.may_find(input) {
            return Ok(Vec::new());
        }
        self.eval(input)
    }

    /// Evaluates the policy on an input; findings sorted.
    pub fn eval(&self, input: &serde_json::Value) -> Result<Vec<Finding>, PolicyError> {
        let result = self
            .compiled
            .eval_with_input(Value::from(input.clone()))
            .map_err(|e| PolicyError(e.to_string()))?;
        let json = result
            .to_json_str()
            .map_err(|e| PolicyError(e.to_string()))?;
        let mut findings: Vec<Finding> =
            serde_json::from_str(&json).map_err(|e| PolicyError(e.to_string()))?;
        findings.sort();
        Ok(findings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::pod_of;

    #[test]
    fn finds_secrets_in_every_container_list() {
        let pod = pod_of(
            "Pod",
            &json!({"spec": {
                "initContainers": [{"name": "init", "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}],
                "containers": [{"name": "app", "env": [{"name": "LOG", "value": "info"}]}],
                "ephemeralContainers": [{"name": "debug", "env": [{"name": "T", "value": "AKIAIOSFODNN7EXAMPLE"}]}],
            }}),
        )
        .expect("valid")
        .expect("pod");
        let findings = SecretsPolicy::new()
            .expect("compiles")
            .evaluate(&SecretsPolicy::input(&pod))
            .expect("evaluates");
        let got: Vec<(&str, &str, &str)> = findings
            .iter()
            .map(|f| (f.container.as_str(), f.field.as_str(), f.rule.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("debug", "ephemeralContainers", "aws-access-key"),
                ("init", "initContainers", "env-from-secret"),
            ]
        );
    }

    /// The screen never hides a finding: for generated containers (env values that are secrets,
    /// near misses, secrets inside other text and next to non-ASCII letters, Secret references,
    /// odd shapes), whenever the policy finds something, `may_find` says it could, and when
    /// `may_find` says it could not, `evaluate` (which then skips the policy) agrees with it.
    mod screen {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = serde_json::Value> {
            let secret = prop_oneof![
                Just("AKIAIOSFODNN7EXAMPLE".to_owned()),
                Just("-----BEGIN RSA PRIVATE KEY-----".to_owned()),
                Just(format!("ghp_{}", "a".repeat(36))),
                Just(format!("glpat-{}", "x".repeat(20))),
                Just("xoxb-1234567890-abc".to_owned()),
                Just(format!("sk_live_{}", "9".repeat(16))),
                Just(format!("AIza{}", "B".repeat(35))),
                Just("eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJlMTIz".to_owned()),
                Just("AKIAIOSFODNN7EXAMPL".to_owned()),
                Just(format!("ghp_{}", "a".repeat(35))),
            ];
            let text = prop_oneof![
                Just(String::new()),
                "[a-zA-Z0-9 _.:/=-]{0,24}",
                Just("é".to_owned()),
                Just("日本".to_owned()),
                Just("_".to_owned()),
            ];
            prop_oneof![
                3 => (text.clone(), secret, text).prop_map(|(a, s, b)| json!(format!("{a}{s}{b}"))),
                2 => "[ -~]{0,40}".prop_map(serde_json::Value::from),
                1 => Just(json!(12_345_678_901_234_567_u64)),
                1 => Just(serde_json::Value::Null),
            ]
        }

        fn env() -> impl Strategy<Value = serde_json::Value> {
            prop_oneof![
                4 => value().prop_map(|v| json!({"name": "V", "value": v})),
                1 => Just(json!({"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})),
                1 => Just(json!({"name": "C", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}})),
                1 => Just(json!({"name": "N", "valueFrom": {"secretKeyRef": null}})),
                1 => Just(json!({"name": "E", "valueFrom": {}})),
                1 => Just(json!({"name": "E", "valueFrom": null})),
                1 => Just(json!({"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})),
                1 => Just(json!({"name": "B", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})),
                1 => Just(json!({"name": "O", "valueFrom": {"secretKeyRef": {"key": "k", "optional": true}}})),
            ]
        }

        fn env_from() -> impl Strategy<Value = serde_json::Value> {
            prop_oneof![
                Just(json!({"secretRef": {"name": "s"}})),
                Just(json!({"configMapRef": {"name": "c"}})),
                Just(json!({"prefix": "P_", "configMapRef": {"name": "c"}})),
                Just(json!({})),
                Just(json!({"secretRef": null})),
                Just(json!({"secretRef": {}})),
                Just(json!({"prefix": "P_", "secretRef": {"name": "s"}})),
                Just(json!({"configMapRef": {"name": "c"}, "secretRef": {"name": "s"}})),
            ]
        }

        fn input() -> impl Strategy<Value = serde_json::Value> {
            let container = (
                proptest::collection::vec(env(), 0..4),
                proptest::collection::vec(env_from(), 0..2),
            )
                .prop_map(|(env, env_from)| {
                    json!({"field": "containers", "index": 0, "name": "c", "env": env, "envFrom": env_from})
                });
            proptest::collection::vec(container, 0..3).prop_map(|c| json!({"containers": c}))
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
                ..ProptestConfig::default()
            })]
            #[test]
            fn never_hides_a_finding(input in input()) {
                let policy = SecretsPolicy::new().expect("policy");
                let found = policy.eval(&input).expect("evaluates");
                if !found.is_empty() {
                    prop_assert!(policy.may_find(&input), "screened out: {input}, found {found:?}");
                }
                prop_assert_eq!(policy.evaluate(&input).expect("evaluates"), found);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
                ..ProptestConfig::default()
            })]
            /// The screen on the pod answers as the screen on the policy's input, and so do the
            /// findings, for pods with every container list.
            #[test]
            fn the_typed_screen_is_the_screen(
                lists in proptest::collection::vec(input(), 3),
            ) {
                let policy = SecretsPolicy::new().expect("policy");
                let list = |i: usize| lists[i]["containers"].clone();
                let spec = json!({"initContainers": list(0), "containers": list(1),
                                  "ephemeralContainers": list(2)});
                // Inputs with values no pod can hold (numbers, null values) are not pods.
                let pod = crate::workload::pod_of("Pod", &json!({"spec": spec}));
                prop_assume!(pod.is_ok());
                let pod = pod.expect("a pod").expect("a pod");
                let input = SecretsPolicy::input(&pod);
                prop_assert_eq!(policy.may_find_in(&pod), policy.may_find(&input), "{}", input);
                prop_assert_eq!(
                    policy.evaluate_pod(&pod).expect("evaluates"),
                    policy.eval(&input).expect("evaluates")
                );
            }
        }

        #[test]
        fn clean_pods_and_odd_shapes() {
            let policy = SecretsPolicy::new().expect("policy");
            let clean = json!({"containers": [{"name": "a", "env": [{"name": "LOG", "value": "info"},
                {"name": "URL", "value": "https://orders.shop.svc:8080/api/v1"}], "envFrom": []}]});
            assert!(!policy.may_find(&clean));
            for odd in [
                json!({"containers": {"a": {}}}),
                json!({"containers": [{"env": {"a": {"value": "AKIAIOSFODNN7EXAMPLE"}}}]}),
                json!({"containers": [{"env": ["AKIAIOSFODNN7EXAMPLE"]}]}),
                json!({"containers": [{"env": [], "envFrom": [null]}]}),
                json!({"containers": [{"env": [], "envFrom": null}]}),
                json!({"containers": [{"env": [{"valueFrom": "x"}]}]}),
            ] {
                assert!(policy.may_find(&odd), "{odd}");
            }
        }
    }
}
