//! The admission decision: an AdmissionRequest and the facts it needs (namespace labels, SPIRE
//! registrations) in, an AdmissionResponse out. Pure, so it is tested without a server.

use std::collections::BTreeMap;

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, Operation},
};

use crate::{
    config::{Config, Mode},
    identity::{self, SpireRegistration},
    secrets::{Finding, SecretsPolicy},
    workload::pod_of,
};

/// Cluster facts a decision needs.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Labels of the request's namespace.
    pub namespace_labels: BTreeMap<String, String>,
    /// SPIRE registrations (with identity source Spire).
    pub spire: Vec<SpireRegistration>,
}

/// What was decided, for the security event log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// `allow`, `deny` or `warn`.
    pub verdict: &'static str,
    /// The rules that fired.
    pub rules: Vec<String>,
    /// Every image of the pod (template), with the containers that run it
    /// (`containers "app"`), for the image checks that follow; empty when none apply.
    pub images: BTreeMap<String, Vec<String>>,
    /// The pod's `imagePullSecrets`, the credentials its images are read with.
    pub pull_secrets: Vec<String>,
}

/// Decides one request.
pub fn decide(
    req: &AdmissionRequest<DynamicObject>,
    facts: &Facts,
    config: &Config,
    secrets: &SecretsPolicy,
) -> (AdmissionResponse, Verdict) {
    let allow = |rules| {
        (
            AdmissionResponse::from(req),
            Verdict {
                verdict: "allow",
                rules,
                ..Verdict::default()
            },
        )
    };
    let namespace = req.namespace.clone().unwrap_or_default();
    if config.exempt_namespaces.contains(&namespace) || req.operation == Operation::Delete {
        return allow(vec![]);
    }
    let Some(object) = &req.object else {
        return allow(vec![]);
    };
    let value = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => {
            return deny(
                req,
                format!("cannot read the object: {e}"),
                vec!["malformed".into()],
            );
        }
    };
    let pod = match pod_of(&req.kind.kind, &value) {
        Ok(Some(p)) => p,
        Ok(None) => return allow(vec![]),
        Err(e) => return deny(req, e.to_string(), vec!["malformed".into()]),
    };
    let images = images_of(&pod);
    let pull_secrets = crate::pods::pull_secrets(&pod.spec);
    let what = format!("{} {}/{}", req.kind.kind, namespace, req.name.as_str());
    let mut denials = Vec::new();
    let mut warnings = Vec::new();
    let mut rules = Vec::new();

    if let Err(d) = identity::check(
        config.identity_source,
        &config.trust_domain,
        &namespace,
        &facts.namespace_labels,
        &pod,
        &facts.spire,
    ) {
        rules.push("workload-identity".to_owned());
        denials.push(d.to_string());
    }

    match secrets.evaluate(&SecretsPolicy::input(&pod)) {
        Ok(findings) => {
            let mode = config.secrets_in_env.mode_for(&namespace);
            for Finding {
                field,
                rule,
                message,
                ..
            } in findings
            {
                rules.push(format!("secrets-in-env/{rule}"));
                let text = format!(
                    "{message} ({}spec.{field})",
                    template_prefix(pod.template_path)
                );
                match mode {
                    Mode::Enforce => denials.push(text),
                    Mode::Warn => warnings.push(text),
                }
            }
        }
        // Fail closed: an evaluation error refuses, with the reason.
        Err(e) => {
            rules.push("secrets-in-env/error".to_owned());
            denials.push(e.to_string());
        }
    }

    if !denials.is_empty() {
        let msg = format!("palisade denied {what}: {}", denials.join(" | "));
        let (mut resp, mut verdict) = deny(req, msg, rules);
        if !warnings.is_empty() {
            resp.warnings = Some(warnings);
        }
        verdict.verdict = "deny";
        verdict.images = images;
        verdict.pull_secrets = pull_secrets;
        return (resp, verdict);
    }
    let mut resp = AdmissionResponse::from(req);
    let verdict = if warnings.is_empty() { "allow" } else { "warn" };
    if !warnings.is_empty() {
        resp.warnings = Some(warnings);
    }
    (
        resp,
        Verdict {
            verdict,
            rules,
            images,
            pull_secrets,
        },
    )
}

/// Every image of a pod (template), with the containers that run it.
fn images_of(pod: &crate::workload::PodView) -> BTreeMap<String, Vec<String>> {
    let mut images: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in crate::pods::containers(&pod.spec) {
        if let Some(image) = c.image {
            images.entry(image.to_owned()).or_default().push(format!(
                "{} {:?}",
                c.kind.field(),
                c.name
            ));
        }
    }
    images
}

fn template_prefix(path: &str) -> String {
    // "/spec/template" -> "spec.template."
    path.split('/')
        .filter(|s| !s.is_empty())
        .fold(String::new(), |mut out, s| {
            out.push_str(s);
            out.push('.');
            out
        })
}

fn deny(
    req: &AdmissionRequest<DynamicObject>,
    message: String,
    rules: Vec<String>,
) -> (AdmissionResponse, Verdict) {
    (
        AdmissionResponse::from(req).deny(message),
        Verdict {
            verdict: "deny",
            rules,
            ..Verdict::default()
        },
    )
}

#[cfg(test)]
#[allow(clippy::needless_pass_by_value)]
mod tests {
    use kube::core::admission::AdmissionReview;
    use serde_json::json;

    use super::*;

    fn config() -> Config {
        Config::parse(
            "listen: 127.0.0.1:0\ntls: {certFile: c, keyFile: k}\nsecretsInEnv: {mode: Enforce, namespaces: {legacy: Warn}}\n",
        )
        .expect("valid config")
    }

    fn request(
        kind: &str,
        namespace: &str,
        object: serde_json::Value,
    ) -> AdmissionRequest<DynamicObject> {
        let (group, version) = match kind {
            "Pod" => ("", "v1"),
            "CronJob" | "Job" => ("batch", "v1"),
            _ => ("apps", "v1"),
        };
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": group, "version": version, "kind": kind},
                "resource": {"group": group, "version": version, "resource": "x"},
                "name": "web",
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "alice"},
                "object": object,
            }
        }))
        .expect("review");
        review.try_into().expect("request")
    }

    fn pod(sa: &str, env: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
               "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "r/a:1", "env": env}]}})
    }

    fn facts(injected: bool) -> Facts {
        let mut f = Facts::default();
        if injected {
            f.namespace_labels
                .insert("istio-injection".into(), "enabled".into());
        }
        f
    }

    fn run(req: &AdmissionRequest<DynamicObject>, f: &Facts) -> (AdmissionResponse, Verdict) {
        decide(req, f, &config(), &SecretsPolicy::new().expect("policy"))
    }

    #[test]
    fn compliant_pod_is_allowed() {
        let (resp, v) = run(
            &request("Pod", "shop", pod("orders", json!([]))),
            &facts(true),
        );
        assert!(resp.allowed, "{:?}", resp.result);
        assert_eq!(v.verdict, "allow");
    }

    #[test]
    fn identity_and_secret_denials_are_combined_and_explained() {
        let env =
            json!([{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]);
        let (resp, v) = run(&request("Pod", "shop", pod("default", env)), &facts(false));
        assert!(!resp.allowed);
        let msg = resp.result.message.clone();
        assert!(
            msg.contains("spiffe://cluster.local/ns/shop/sa/default"),
            "{msg}"
        );
        assert!(msg.contains("istio-injection=enabled"), "{msg}");
        assert!(msg.contains(r#"container "app": env DB"#), "{msg}");
        assert!(msg.contains("spec.containers"), "{msg}");
        assert_eq!(
            v.rules,
            vec!["workload-identity", "secrets-in-env/env-from-secret"]
        );
    }

    #[test]
    fn deployment_templates_are_checked_with_their_path() {
        let dep = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"selector": {}, "template": {"metadata": {}, "spec": {"serviceAccountName": "orders",
              "containers": [{"name": "app", "env": [{"name": "K", "value": "AKIAIOSFODNN7EXAMPLE"}]}]}}}});
        let (resp, _) = run(&request("Deployment", "shop", dep), &facts(true));
        assert!(!resp.allowed);
        assert!(
            resp.result
                .message
                .contains("spec.template.spec.containers"),
            "{}",
            resp.result.message
        );
    }

    #[test]
    fn warn_mode_admits_with_warnings() {
        let env = json!([{"name": "K", "value": "AKIAIOSFODNN7EXAMPLE"}]);
        let (resp, v) = run(&request("Pod", "legacy", pod("orders", env)), &facts(true));
        assert!(resp.allowed);
        assert_eq!(v.verdict, "warn");
        assert_eq!(resp.warnings.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn exempt_namespaces_and_other_kinds_pass() {
        let (resp, _) = run(
            &request("Pod", "kube-system", pod("default", json!([]))),
            &facts(false),
        );
        assert!(resp.allowed);
        let (resp, _) = run(
            &request("ConfigMap", "shop", json!({"data": {}})),
            &facts(false),
        );
        assert!(resp.allowed);
    }
}
