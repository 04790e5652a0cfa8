//! `pinDigest`: the mutating hook rewrites a new Pod's images to the digests that were verified
//! (`repo:tag@sha256:…`) and records them in the annotation `palisade.dev/verified-digests`.
//! Only Pods are rewritten, so Deployments and other workloads stay as written in Git and a
//! GitOps tool sees no drift; the validating hook then finds the pinned digests in its cache.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, Operation},
};
use serde_json::{Value, json};

use super::{admit::scope_of, check::ImageVerifier, policy::CompiledImagePolicy};
use crate::{
    config::Config,
    pods::{ContainerKind, containers, pull_secrets},
    workload::pod_of,
};

/// Annotation holding the verified digests, `{"image as written": "sha256:…"}`.
pub const ANNOTATION: &str = "palisade.dev/verified-digests";

/// JSON Patch operations pinning the verified images of a new Pod; empty when nothing is to be
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
        || req.operation != Operation::Create
        || config.exempt_namespaces.contains(&namespace)
        || !policies.iter().any(|p| p.policy.spec.pin_digest)
    {
        return Vec::new();
    }
    let Some(object) = &req.object else {
        return Vec::new();
    };
    let Some(pod) = serde_json::to_value(object)
        .ok()
        .and_then(|v| pod_of("Pod", &v).ok().flatten())
    else {
        return Vec::new();
    };
    let scope = scope_of(req, pull_secrets(&pod.spec));
    let mut ops = Vec::new();
    let mut pinned: BTreeMap<String, String> = BTreeMap::new();
    // Ephemeral containers arrive through their own subresource, never in a Pod create.
    for c in containers(&pod.spec).filter(|c| c.kind != ContainerKind::Ephemeral) {
        let Some(image) = c.image.filter(|i| !i.contains('@')) else {
            continue;
        };
        let digest = if let Some(d) = pinned.get(image) {
            Some(d.clone())
        } else {
            let verdicts = verifier
                .check(image, labels, policies, &scope, deadline)
                .await;
            let all_ok = !verdicts.is_empty() && verdicts.iter().all(|v| v.outcome.is_ok());
            let wanted = verdicts.iter().any(|v| v.pin_digest);
            verdicts
                .into_iter()
                .find_map(|v| v.digest)
                .filter(|_| all_ok && wanted)
        };
        if let Some(digest) = digest {
            ops.push(json!({"op": "replace",
                            "path": format!("/spec/{}/{}/image", c.kind.field(), c.index),
                            "value": format!("{image}@{digest}")}));
            pinned.insert(image.to_owned(), digest);
        }
    }
    if pinned.is_empty() {
        return ops;
    }
    let record = serde_json::to_string(&pinned).unwrap_or_default();
    // A Pod without annotations gets the map; otherwise the key is added to it.
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
