//! `palisade admit`: the validating webhook's verdict on manifests, as a CREATE of each object by
//! its own decision function. Namespace labels (which decide Istio injection and the
//! `palisade.dev/enforcement` mode) come from the Namespace objects among the manifests. Image
//! signatures are not verified offline; the references must still parse.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionReview},
};
use palisade_webhook::{
    config::Config,
    decide::{Facts, decide},
    secrets::SecretsPolicy,
    workload::pod_of,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::input::Object;

/// The configuration the webhook is judged with when none is given: the chart's defaults.
pub const DEFAULT_CONFIG: &str = "listen: 127.0.0.1:0\ntls: {certFile: unused, keyFile: unused}\n";

/// The verdict on one object.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// `Deployment shop/web`.
    pub object: String,
    /// `allow`, `deny`, `warn` or `audit`.
    pub verdict: String,
    /// The refusal, as the API server would show it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Warnings the client would get.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Findings recorded only (Audit).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audited: Vec<String>,
    /// The rules that fired.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
}

/// Parses a webhook configuration; `listen` and `tls` may be left out.
pub fn config(text: Option<&str>) -> Result<Config> {
    let Some(text) = text else {
        return Ok(Config::parse(DEFAULT_CONFIG)?);
    };
    let mut map: serde_yaml::Mapping = serde_yaml::from_str(text)?;
    let defaults: serde_yaml::Mapping = serde_yaml::from_str(DEFAULT_CONFIG)?;
    for (k, v) in defaults {
        if !map.contains_key(&k) {
            map.insert(k, v);
        }
    }
    Ok(Config::parse(&serde_yaml::to_string(&map)?)?)
}

/// Judges every object with a pod (template) in `objects`; others are not the webhook's.
pub fn admit(objects: &[Object], config: &Config, default_ns: &str) -> Result<Vec<Outcome>> {
    let secrets = SecretsPolicy::new().context("the secrets policy")?;
    let labels: BTreeMap<&str, BTreeMap<String, String>> = objects
        .iter()
        .filter(|o| o.group().is_empty() && o.kind() == "Namespace")
        .map(|o| {
            let labels =
                serde_json::from_value(o.value["metadata"]["labels"].clone()).unwrap_or_default();
            (o.name(), labels)
        })
        .collect();
    let mut out = Vec::new();
    for o in objects {
        if !matches!(pod_of(o.kind(), &o.value), Ok(Some(_)) | Err(_)) {
            continue;
        }
        let ns = o.namespace(default_ns);
        let mut namespace_labels = labels.get(ns).cloned().unwrap_or_default();
        namespace_labels
            .entry("kubernetes.io/metadata.name".to_owned())
            .or_insert_with(|| ns.to_owned());
        let facts = Facts {
            namespace_labels,
            spire: Vec::new(),
        };
        let req = request(o, ns)?;
        let (resp, verdict) = decide(&req, &facts, config, &secrets);
        out.push(Outcome {
            object: format!("{} {ns}/{}", o.kind(), o.name()),
            verdict: verdict.verdict.to_owned(),
            message: if resp.allowed {
                String::new()
            } else {
                resp.result.message.clone()
            },
            warnings: resp.warnings.unwrap_or_default(),
            audited: verdict.audited,
            rules: verdict.rules,
        });
    }
    Ok(out)
}

/// A CREATE of `o` in `ns`, as the API server would send it.
fn request(o: &Object, ns: &str) -> Result<AdmissionRequest<DynamicObject>> {
    let (group, version) = o.value["apiVersion"]
        .as_str()
        .map_or(("", "v1"), |v| v.rsplit_once('/').unwrap_or(("", v)));
    let mut object = o.value.clone();
    object["metadata"]["namespace"] = Value::String(ns.to_owned());
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "palisade-admit",
            "kind": {"group": group, "version": version, "kind": o.kind()},
            "resource": {"group": group, "version": version,
                         "resource": format!("{}s", o.kind().to_lowercase())},
            "name": o.name(),
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": {"username": "palisade-admit"},
            "object": object,
        }
    }))
    .with_context(|| format!("{}: {} {}", o.file.display(), o.kind(), o.name()))?;
    Ok(review.try_into()?)
}
