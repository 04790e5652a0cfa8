//! `pinDigest`: the mutating hook rewrites a Pod's images to the digests that were verified
//! (`repo:tag@sha256:…`) and records them in the annotation `palisade.dev/verified-digests`:
//! on CREATE every image, on UPDATE (an image swap, or a new ephemeral container through
//! `pods/ephemeralcontainers`) the images the update adds. Only Pods are rewritten, so
//! Deployments and other workloads stay as written in Git and a GitOps tool sees no drift; the
//! validating hook refuses a covered image that is not pinned, so a pin that could not be made
//! never runs a moving tag.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, Operation},
};
use serde_json::{Value, json};

use super::{admit::scope_of, check::ImageVerifier, policy::CompiledImagePolicy, reference};
use crate::{
    config::Config,
    pods::{image_uses, new_image_uses, pull_secrets},
    workload::pod_of_object,
};

/// Annotation holding the verified digests, `{"image as written": "sha256:…"}`.
pub const ANNOTATION: &str = "palisade.dev/verified-digests";

/// JSON Patch operations pinning the verified images of a Pod; empty when nothing is to be
/// pinned (no policy asks, or verification failed: the validating hook refuses those).
pub async fn pin_ops(
    verifier: &ImageVerifier,
    policies: &[Arc<CompiledImagePolicy>],
    config: &Config,
    req: &AdmissionRequest<DynamicObject>,
    labels: &BTreeMap<String, String>,
    deadline: Instant,
) -> Vec<Value> {
    let namespace = req.namespace.clone().unwrap_or_default();
    if req.kind.kind != "Pod"
        || !matches!(req.operation, Operation::Create | Operation::Update)
        || matches!(req.sub_resource.as_deref(), Some("status" | "scale"))
        || config.exempt_namespaces.contains(&namespace)
        || !policies.iter().any(|p| p.policy.spec.pin_digest)
    {
        return Vec::new();
    }
    let view = |o: &DynamicObject| pod_of_object("Pod", o).ok().flatten();
    let Some(pod) = req.object.as_ref().and_then(view) else {
        return Vec::new();
    };
    let old = req.old_object.as_ref().and_then(view);
    let mut scope = scope_of(req, pull_secrets(&pod.spec));
    scope.images = image_uses(&pod.spec)
        .into_iter()
        .map(|u| u.image.to_owned())
        .collect();
    let mut ops = Vec::new();
    let mut pinned: BTreeMap<String, String> = BTreeMap::new();
    // Images the old pod already ran in the same field keep their reference.
    for u in new_image_uses(&pod.spec, old.as_ref().map(|o| &o.spec)) {
        let Ok(parsed) = reference::parse(u.image) else {
            continue;
        };
        if parsed.digest.is_some() {
            continue;
        }
        let digest = if let Some(d) = pinned.get(u.image) {
            Some(d.clone())
        } else {
            let verdicts = verifier
                .check(&parsed, u.image, labels, policies, &scope, deadline)
                .await;
            // Audit and Warn policies never block a pin (they never refuse either).
            let enforced: Vec<&super::check::PolicyVerdict> = verdicts
                .iter()
                .filter(|v| v.mode == palisade_api::image_policy::EnforcementMode::Enforce)
                .collect();
            let all_ok = !enforced.is_empty() && enforced.iter().all(|v| v.outcome.is_ok());
            let wanted = enforced.iter().any(|v| v.pin_digest);
            verdicts
                .into_iter()
                .find_map(|v| v.digest)
                .filter(|_| all_ok && wanted)
        };
        if let Some(digest) = digest {
            ops.push(json!({"op": "replace",
                            "path": format!("/spec{}", u.pointer),
                            "value": format!("{}@{digest}", u.image)}));
            pinned.insert(u.image.to_owned(), digest);
        }
    }
    if pinned.is_empty() {
        return ops;
    }
    // Digests pinned earlier (an update) stay recorded beside the new ones.
    let mut record: BTreeMap<String, String> = pod
        .annotations
        .get(ANNOTATION)
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default();
    record.extend(pinned);
    let record = serde_json::to_string(&record).unwrap_or_default();
    // A Pod without annotations gets the map; otherwise the key is set in it.
    if pod.annotations.is_empty() {
        ops.push(
            json!({"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION: record}}),
        );
    } else {
        ops.push(json!({"op": "add",
                        "path": format!("/metadata/annotations/{}", ANNOTATION.replace('/', "~1")),
                        "value": record}));
    }
    ops
}
