//! Secrets in environment variables, decided by the Rego policy in
//! `policies/admission/secrets.rego`, evaluated in-process with regorus. The same file is
//! unit-tested with the real `opa test`, and a differential test checks both engines agree.

use regorus::{Engine, Value};
use serde::Serialize;
use serde_json::json;

use crate::pods::containers;
use crate::workload::PodView;

/// The policy source, compiled into the binary.
pub const SECRETS_REGO: &str = include_str!("../../policies/admission/secrets.rego");
/// The rule whose value is the set of findings.
pub const DENY_RULE: &str = "data.palisade.admission.secrets.deny";

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
        let compiled = engine
            .compile_with_entrypoint(&DENY_RULE.into())
            .map_err(|e| PolicyError(e.to_string()))?;
        Ok(SecretsPolicy { compiled })
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

    /// Evaluates the policy on an input; findings sorted.
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<Vec<Finding>, PolicyError> {
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
}
