//! Image checks folded into an admission response: every container image (init, regular,
//! ephemeral) of a pod or pod template, as the decision collected them, is checked against the
//! ImagePolicies covering it; an
//! `Enforce` failure refuses (naming the container, the image, the policy and, per authority,
//! why), `Warn` adds a warning, `Audit` only logs. A workload whose images all verify has
//! their digests remembered for the pods it will own.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse},
};
use palisade_api::image_policy::EnforcementMode;

use super::{
    check::{ImageVerifier, Scope},
    policy::CompiledImagePolicy,
};
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
    let scope = scope_of(req, std::mem::take(&mut verdict.pull_secrets));
    let mut denials = Vec::new();
    let mut warnings = Vec::new();
    // Image → verified digest, kept only while every covering policy is satisfied.
    let mut template_digests: Option<BTreeMap<String, String>> = Some(BTreeMap::new());
    for (image, users) in &seen {
        let verdicts = verifier
            .check(image, labels, policies, &scope, deadline)
            .await;
        if let Some(v) = verdicts.first().and_then(|v| v.digest.clone())
            && verdicts.iter().all(|v| v.outcome.is_ok())
            && let Some(m) = template_digests.as_mut()
        {
            m.insert(image.clone(), v);
        } else if !verdicts.is_empty() {
            template_digests = None;
        }
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
    // A workload's template (never a pod: pods own nothing) that verified in full.
    if req.kind.kind != "Pod"
        && let (Some(uid), Some(digests)) = (
            req.object.as_ref().and_then(|o| o.metadata.uid.as_deref()),
            template_digests,
        )
    {
        verifier.remember_template(uid, digests);
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

/// The scope of the admitted object: its namespace, pull secrets and controlling owner.
pub fn scope_of(req: &AdmissionRequest<DynamicObject>, pull_secrets: Vec<String>) -> Scope {
    let owner = req.object.as_ref().and_then(|o| {
        o.metadata
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true))
            .map(|r| r.uid.clone())
    });
    Scope::new(
        req.namespace.as_deref().unwrap_or_default(),
        pull_secrets,
        owner,
    )
}
