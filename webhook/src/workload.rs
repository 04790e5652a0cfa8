//! The pod an admission request is about: a Pod itself, or the pod template of a Deployment,
//! ReplicaSet, StatefulSet, DaemonSet, Job, CronJob or ReplicationController. Every check runs on the result, so no
//! workload kind is a way around them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use kube::core::DynamicObject;
use serde::Deserialize;
use serde_json::Value;

/// Kinds whose objects carry a pod (template), with the JSON path to it.
pub const KINDS: &[(&str, &str)] = &[
    ("Pod", ""),
    ("Deployment", "/spec/template"),
    ("ReplicaSet", "/spec/template"),
    ("StatefulSet", "/spec/template"),
    ("DaemonSet", "/spec/template"),
    ("Job", "/spec/template"),
    ("CronJob", "/spec/jobTemplate/spec/template"),
    ("ReplicationController", "/spec/template"),
];

/// The pod part of an admitted object.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    /// Kind of the admitted object.
    pub kind: String,
    /// Where the pod template sits in the object (`""` for a Pod), as a JSON pointer.
    pub template_path: &'static str,
    /// Labels of the pod (template).
    pub labels: BTreeMap<String, String>,
    /// Annotations of the pod (template).
    pub annotations: BTreeMap<String, String>,
    /// The pod spec.
    pub spec: PodSpec,
}

impl PodView {
    /// The ServiceAccount the pod runs as; `default` when none is named, as the API server
    /// would fill in.
    pub fn service_account(&self) -> &str {
        self.spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
    }
}

/// Why the pod could not be read from the object.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The object has no pod template where its kind puts one.
    #[error("{kind} has no pod template at {path}")]
    Missing {
        /// Kind.
        kind: String,
        /// JSON pointer.
        path: &'static str,
    },
    /// The pod template is not a valid pod template.
    #[error("{kind} pod template at {path} is invalid: {source}")]
    Invalid {
        /// Kind.
        kind: String,
        /// JSON pointer.
        path: &'static str,
        /// Cause.
        source: serde_json::Error,
    },
}

/// The pod of `object` (of `kind`), or `None` when the kind carries no pod.
pub fn pod_of(kind: &str, object: &Value) -> Result<Option<PodView>, ExtractError> {
    let Some((_, path)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        return Ok(None);
    };
    let template = object.pointer(path).ok_or_else(|| missing(kind, path))?;
    pod_of_template(kind, path, template)
}

/// [`pod_of`] for an object as an admission request carries it, read where it lies (a Pod's
/// labels and annotations from its parsed metadata, the spec from its data) rather than from a
/// copy of the whole object: the same view, without copying the object twice per request.
pub fn pod_of_object(kind: &str, object: &DynamicObject) -> Result<Option<PodView>, ExtractError> {
    let Some((_, path)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        return Ok(None);
    };
    if path.is_empty() {
        let meta = &object.metadata;
        return view(
            kind,
            path,
            meta.labels.clone().unwrap_or_default(),
            meta.annotations.clone().unwrap_or_default(),
            object.data.get("spec"),
        );
    }
    // Every other kind's template lies in the object's data (its metadata is the workload's).
    let template = object
        .data
        .pointer(path)
        .ok_or_else(|| missing(kind, path))?;
    pod_of_template(kind, path, template)
}

fn pod_of_template(
    kind: &str,
    path: &'static str,
    template: &Value,
) -> Result<Option<PodView>, ExtractError> {
    let string_map = |v: Option<&Value>| {
        v.map_or_else(
            || Ok(BTreeMap::new()),
            |v| BTreeMap::<String, String>::deserialize(v).map_err(|e| invalid(kind, path, e)),
        )
    };
    let labels = string_map(template.pointer("/metadata/labels"))?;
    let annotations = string_map(template.pointer("/metadata/annotations"))?;
    view(kind, path, labels, annotations, template.get("spec"))
}

fn missing(kind: &str, path: &'static str) -> ExtractError {
    ExtractError::Missing {
        kind: kind.to_owned(),
        path,
    }
}

fn invalid(kind: &str, path: &'static str, source: serde_json::Error) -> ExtractError {
    ExtractError::Invalid {
        kind: kind.to_owned(),
        path,
        source,
    }
}

fn view(
    kind: &str,
    path: &'static str,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    spec: Option<&Value>,
) -> Result<Option<PodView>, ExtractError> {
    let spec = spec.ok_or_else(|| missing(kind, path))?;
    let spec = PodSpec::deserialize(spec).map_err(|e| invalid(kind, path, e))?;
    Ok(Some(PodView {
        kind: kind.to_owned(),
        template_path: path,
        labels,
        annotations,
        spec,
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn template(sa: &str) -> Value {
        json!({"metadata": {"labels": {"app": "orders"}},
               "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "r/app:1"}]}})
    }

    #[test]
    fn every_workload_kind_yields_its_pod_template() {
        let t = template("orders");
        let objects = [
            ("Pod", t.clone()),
            ("Deployment", json!({"spec": {"template": t}})),
            ("ReplicaSet", json!({"spec": {"template": t}})),
            ("StatefulSet", json!({"spec": {"template": t}})),
            ("DaemonSet", json!({"spec": {"template": t}})),
            ("Job", json!({"spec": {"template": t}})),
            (
                "CronJob",
                json!({"spec": {"jobTemplate": {"spec": {"template": t}}}}),
            ),
            ("ReplicationController", json!({"spec": {"template": t}})),
        ];
        for (kind, obj) in objects {
            let pod = pod_of(kind, &obj).expect("valid").expect("has a pod");
            assert_eq!(pod.service_account(), "orders", "{kind}");
            assert_eq!(
                pod.labels.get("app").map(String::as_str),
                Some("orders"),
                "{kind}"
            );
            assert_eq!(pod.spec.containers[0].name, "app", "{kind}");
        }
        assert_eq!(KINDS.len(), 8);
    }

    #[test]
    fn other_kinds_carry_no_pod() {
        assert!(
            pod_of("ConfigMap", &json!({"data": {}}))
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn missing_or_invalid_templates_are_errors() {
        let err = pod_of("Deployment", &json!({"spec": {}})).expect_err("no template");
        assert!(
            err.to_string()
                .contains("no pod template at /spec/template"),
            "{err}"
        );
        let err = pod_of("Pod", &json!({"spec": {"containers": "nope"}})).expect_err("bad spec");
        assert!(err.to_string().contains("invalid"), "{err}");
    }

    #[test]
    fn unnamed_service_account_is_default() {
        let pod = pod_of("Pod", &json!({"spec": {"containers": []}}))
            .expect("ok")
            .expect("pod");
        assert_eq!(pod.service_account(), "default");
    }

    #[test]
    fn the_view_read_in_place_is_the_view_of_a_copy() {
        // The admission path reads the object in place; every other caller, and the path
        // before it, read a copy of the whole object. Both must see the same pod, fail alike,
        // and a workload's own labels must never stand in for its template's.
        let t = json!({"metadata": {"labels": {"app": "orders", "tier": "web"},
                                    "annotations": {"sidecar.istio.io/inject": "true"}},
                       "spec": {"serviceAccountName": "orders", "containers": [
                           {"name": "app", "image": "r/app:1",
                            "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}],
                           "initContainers": [{"name": "init", "image": "r/init:1"}]}});
        let workload_meta = json!({"name": "w", "labels": {"app": "other"},
                                   "annotations": {"sidecar.istio.io/inject": "false"}});
        let mut objects = vec![
            (
                "Pod",
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": t["metadata"], "spec": t["spec"]}),
            ),
            (
                "Pod",
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"},
                       "spec": {"containers": []}}),
            ),
            (
                "Pod",
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}}),
            ),
            (
                "Pod",
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"containers": "x"}}),
            ),
            (
                "CronJob",
                json!({"metadata": workload_meta, "spec": {"jobTemplate": {"spec": {"template": t}}}}),
            ),
            ("CronJob", json!({"metadata": workload_meta, "spec": {}})),
            (
                "Deployment",
                json!({"metadata": workload_meta, "spec": {"template": {"metadata": {"labels": {"a": 1}},
                                                                        "spec": {"containers": []}}}}),
            ),
            ("ConfigMap", json!({"metadata": workload_meta, "data": {}})),
        ];
        for pod in [
            json!({"metadata": {"name": "untyped"}, "spec": t["spec"]}),
            json!({"metadata": {"labels": null, "annotations": null}, "spec": t["spec"]}),
            json!({"spec": t["spec"]}),
            json!({"metadata": t["metadata"], "spec": null}),
        ] {
            objects.push(("Pod", pod));
        }
        for kind in [
            "Deployment",
            "ReplicaSet",
            "StatefulSet",
            "DaemonSet",
            "Job",
        ] {
            objects.push((
                kind,
                json!({"metadata": workload_meta, "spec": {"template": t}}),
            ));
            // A template without metadata has no labels: never the workload's own.
            objects.push((
                kind,
                json!({"metadata": workload_meta, "spec": {"template": {"spec": t["spec"]}}}),
            ));
            objects.push((kind, json!({"metadata": workload_meta, "spec": null})));
            objects.push((
                kind,
                json!({"metadata": workload_meta, "spec": {"template": null}}),
            ));
        }
        for (kind, json) in objects {
            let object: DynamicObject = serde_json::from_value(json.clone()).expect("an object");
            let copy = serde_json::to_value(&object).expect("a copy");
            let in_place = pod_of_object(kind, &object).map_err(|e| e.to_string());
            let of_copy = pod_of(kind, &copy).map_err(|e| e.to_string());
            assert_eq!(in_place, of_copy, "{kind}: {json}");
            if let Ok(Some(pod)) = in_place {
                assert_ne!(
                    pod.labels.get("app").map(String::as_str),
                    Some("other"),
                    "{kind}"
                );
                assert_ne!(
                    pod.annotations
                        .get("sidecar.istio.io/inject")
                        .map(String::as_str),
                    Some("false"),
                    "{kind}"
                );
            }
        }
    }
}
