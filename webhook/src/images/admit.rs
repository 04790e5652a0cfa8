//! Image checks folded into an admission response: every image the decision collected (init,
//! regular and ephemeral containers, image volumes; on an UPDATE only those it adds) is checked
//! against the ImagePolicies covering it; an `Enforce` failure refuses (naming the container,
//! the image, the policy and, per authority, why), `Warn` adds a warning, `Audit` only records.
//! A namespace's `palisade.dev/enforcement` label lowers (never raises) the policies' modes
//! there.
//! Where a covering policy says `pinDigest`, a Pod's image must name the digest that verified
//! (the mutating hook pins it; this hook checks that it did). A workload whose images all verify
//! at creation has their digests remembered for the pods it will own.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, Operation},
};
use palisade_api::image_policy::EnforcementMode;

use super::{
    check::{ImageVerifier, OwnerKey, Scope},
    policy::CompiledImagePolicy,
    reference,
};
use crate::{
    config::Mode,
    decide::{CheckFinding, Verdict},
};

/// Checks the images of the admitted object and folds the outcome into `resp` and `verdict`.
pub async fn check_pod(
    verifier: &ImageVerifier,
    policies: &[Arc<CompiledImagePolicy>],
    req: &AdmissionRequest<DynamicObject>,
    labels: &BTreeMap<String, String>,
    deadline: Instant,
    resp: AdmissionResponse,
    mut verdict: Verdict,
) -> (AdmissionResponse, Verdict) {
    // The decision collects no images for exempt namespaces, deletions and objects without a
    // pod, so those need no check here.
    let seen = std::mem::take(&mut verdict.images);
    if policies.is_empty() || seen.is_empty() {
        return (resp, verdict);
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    let is_pod = req.kind.kind == "Pod";
    let secrets = std::mem::take(&mut verdict.pull_secrets);
    let secrets = with_template_secrets(
        verifier,
        &namespace,
        is_pod,
        secrets,
        &verdict.service_account,
    );
    let mut scope = scope_of(req, secrets.await);
    scope.images = std::mem::take(&mut verdict.all_images);
    let (found, template_digests) =
        image_findings(verifier, policies, &seen, labels, &scope, deadline, is_pod).await;
    let mut denials = Vec::new();
    let mut warnings = Vec::new();
    for f in found {
        verdict.rules.push(f.rule.clone());
        verdict.modes.push((f.rule, f.mode));
        match f.mode {
            Mode::Enforce => denials.push(f.text),
            Mode::Warn => warnings.push(f.text),
            Mode::Audit => verdict.audited.push(f.text),
        }
    }
    // A workload's template (never a pod: pods own nothing) that verified in full when it was
    // created for real (a dry run leaves no object behind to own anything).
    if !is_pod
        && req.operation == Operation::Create
        && !req.dry_run
        && let (Some(object), Some(digests)) = (req.object.as_ref(), template_digests)
        && let (Some(uid), Some(name)) = (
            object.metadata.uid.as_deref(),
            object.metadata.name.as_deref(),
        )
    {
        verifier.remember_template(
            OwnerKey {
                namespace: namespace.clone(),
                kind: req.kind.kind.clone(),
                name: name.to_owned(),
                uid: uid.to_owned(),
            },
            digests,
        );
    }
    conclude(req, &namespace, (resp, verdict), &denials, warnings)
}

/// What the ImagePolicies find in the images `seen` (each with who uses it) of an object in a
/// namespace with `labels`: one finding per image and policy not satisfied (rule
/// `image-signature/<policy>`, the policy's mode lowered by the namespace's label, the text a
/// denial gives), and the digest each image verified at while every covering policy is satisfied
/// (`None` once one is not). `is_pod`: a Pod runs what its reference names, so a covering
/// `pinDigest` policy needs the reference to name the digest.
pub async fn image_findings(
    verifier: &ImageVerifier,
    policies: &[Arc<CompiledImagePolicy>],
    seen: &BTreeMap<String, Vec<String>>,
    labels: &BTreeMap<String, String>,
    scope: &Scope,
    deadline: Instant,
    is_pod: bool,
) -> (Vec<CheckFinding>, Option<BTreeMap<String, String>>) {
    let ceiling = Mode::of_namespace(labels);
    let mut found = Vec::new();
    // Image → verified digest, kept only while every covering policy is satisfied.
    let mut template_digests: Option<BTreeMap<String, String>> = Some(BTreeMap::new());
    for (image, users) in seen {
        // The decision refused references that do not parse before this point.
        let Ok(parsed) = reference::parse(image) else {
            continue;
        };
        let verdicts = verifier
            .check(&parsed, image, labels, policies, scope, deadline)
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
            let outcome = match v.outcome {
                // A Pod runs what its reference names: a tag verified now may move before the
                // kubelet pulls it.
                Ok(()) if is_pod && v.pin_digest && parsed.digest.is_none() => Err(format!(
                    "{image} is not pinned to the digest that verified{}: the mutating webhook \
                     pins a tag it verifies (is it registered for pods and \
                     pods/ephemeralcontainers?); if it is, the tag resolved differently when it \
                     was called (moved, or not signed then). Write the image by digest",
                    v.digest
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                )),
                other => other,
            };
            let Err(why) = outcome else { continue };
            found.push(CheckFinding {
                rule: format!("image-signature/{}", v.policy),
                mode: lowered(v.mode, ceiling),
                text: format!(
                    "{}: image policy {} not satisfied: {why}",
                    users.join(", "),
                    v.policy
                ),
            });
        }
    }
    (found, template_digests)
}

/// Folds the image findings into the response and the verdict: denials refuse (after any
/// refusal already there), warnings are added, audited findings mark an admitted verdict.
fn conclude(
    req: &AdmissionRequest<DynamicObject>,
    namespace: &str,
    (mut resp, mut verdict): (AdmissionResponse, Verdict),
    denials: &[String],
    warnings: Vec<String>,
) -> (AdmissionResponse, Verdict) {
    if !verdict.audited.is_empty() && verdict.verdict == "allow" {
        verdict.verdict = "audit";
    }
    if !warnings.is_empty() {
        resp.warnings.get_or_insert_with(Vec::new).extend(warnings);
        if matches!(verdict.verdict, "allow" | "audit") {
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

/// `secrets`, the object's pull secrets, or for a template that names none its ServiceAccount's:
/// its pods will get those (a Pod has them already, from the admission plugin), and the images
/// are read as they will be. Unreadable: none, so a private image is refused.
async fn with_template_secrets(
    verifier: &ImageVerifier,
    namespace: &str,
    is_pod: bool,
    secrets: Vec<String>,
    service_account: &str,
) -> Vec<String> {
    if is_pod || !secrets.is_empty() {
        return secrets;
    }
    match verifier
        .service_account_pull_secrets(namespace, service_account)
        .await
    {
        Ok(names) => names,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the ServiceAccount's imagePullSecrets");
            Vec::new()
        }
    }
}

/// A policy's mode, lowered to `ceiling` (a namespace's enforcement label) when that is lower.
fn lowered(mode: EnforcementMode, ceiling: Option<Mode>) -> Mode {
    let mode = match mode {
        EnforcementMode::Enforce => Mode::Enforce,
        EnforcementMode::Warn => Mode::Warn,
        EnforcementMode::Audit => Mode::Audit,
    };
    ceiling.map_or(mode, |c| c.min(mode))
}

/// The scope of the admitted object: its namespace, pull secrets and controlling owner.
pub fn scope_of(req: &AdmissionRequest<DynamicObject>, pull_secrets: Vec<String>) -> Scope {
    let namespace = req.namespace.as_deref().unwrap_or_default();
    let owner = req
        .object
        .as_ref()
        .and_then(|o| controller_of(namespace, &o.metadata));
    let mut scope = Scope::new(namespace, pull_secrets, owner);
    scope.own_uid = req.object.as_ref().and_then(|o| o.metadata.uid.clone());
    scope
}

/// The workload that controls an object in `namespace` with `metadata` (in the same namespace,
/// as ownerReferences always are): its template's verified digests apply to the object.
pub fn controller_of(
    namespace: &str,
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<OwnerKey> {
    metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .map(|r| OwnerKey {
            namespace: namespace.to_owned(),
            kind: r.kind.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_label_lowers_image_policies_and_never_raises_them() {
        use EnforcementMode as P;
        for (policy, ceiling, want) in [
            (P::Enforce, None, Mode::Enforce),
            (P::Enforce, Some(Mode::Warn), Mode::Warn),
            (P::Enforce, Some(Mode::Audit), Mode::Audit),
            (P::Warn, Some(Mode::Enforce), Mode::Warn),
            (P::Audit, Some(Mode::Enforce), Mode::Audit),
            (P::Warn, Some(Mode::Audit), Mode::Audit),
        ] {
            assert_eq!(
                lowered(policy, ceiling),
                want,
                "{policy:?} under {ceiling:?}"
            );
        }
    }
}
