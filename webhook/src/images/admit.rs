//! Image checks folded into an admission response: every container image (init, regular,
//! ephemeral) of a pod or pod template, as the decision collected them, is checked against the
//! ImagePolicies covering it; an
//! `Enforce` failure refuses (naming the container, the image, the policy and, per authority,
//! why), `Warn` adds a warning, `Audit` only logs.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse},
};
use oci_client::secrets::RegistryAuth;
use palisade_api::image_policy::EnforcementMode;

use super::{check::ImageVerifier, policy::CompiledImagePolicy};
use crate::decide::Verdict;

/// Checks the images of the admitted object and folds the outcome into `resp` and `verdict`.
pub async fn check_pod(
    verifier: &ImageVerifier,
    policies: &[Arc<CompiledImagePolicy>],
    req: &AdmissionRequest<DynamicObject>,
    labels: &BTreeMap<String, String>,
    deadline: Instant,
    mut resp: AdmissionResponse,
    mut verdict: Verdict,
) -> (AdmissionResponse, Verdict) {
    // The decision collects no images for exempt namespaces, deletions and objects without a
    // pod, so those need no check here.
    let seen = std::mem::take(&mut verdict.images);
    if policies.is_empty() || seen.is_empty() {
        return (resp, verdict);
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    let mut denials = Vec::new();
    let mut warnings = Vec::new();
    for (image, users) in &seen {
        let verdicts = verifier
            .check(image, labels, policies, &RegistryAuth::Anonymous, deadline)
            .await;
        for v in verdicts {
            let Err(why) = v.outcome else { continue };
            verdict.rules.push(format!("image-signature/{}", v.policy));
            let text = format!(
                "{}: image policy {} not satisfied: {why}",
                users.join(", "),
                v.policy
            );
            match v.mode {
                EnforcementMode::Enforce => denials.push(text),
                EnforcementMode::Warn => warnings.push(text),
                EnforcementMode::Audit => {
                    tracing::warn!(target: "palisade::security", uid = %req.uid, namespace = %namespace,
                        name = %req.name, audit = %text, "image policy failed (audit mode)");
                }
            }
        }
    }
    if !warnings.is_empty() {
        resp.warnings.get_or_insert_with(Vec::new).extend(warnings);
        if verdict.verdict == "allow" {
            verdict.verdict = "warn";
        }
    }
    if !denials.is_empty() {
        let what = format!("{} {}/{}", req.kind.kind, namespace, req.name);
        let message = if resp.allowed {
            format!("palisade denied {what}: {}", denials.join(" | "))
        } else {
            format!("{} | {}", resp.result.message, denials.join(" | "))
        };
        let warnings = resp.warnings.take();
        resp = AdmissionResponse::from(req).deny(message);
        resp.warnings = warnings;
        verdict.verdict = "deny";
    }
    (resp, verdict)
}
