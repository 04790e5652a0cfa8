//! The admission decision: an AdmissionRequest and the facts it needs (namespace labels, SPIRE
//! registrations) in, an AdmissionResponse out. Pure, so it is tested without a server.
//!
//! A verdict depends only on what will run. A CREATE is judged whole. An UPDATE is judged on
//! what it changes against `oldObject`: a finding the old object already had (a policy that came
//! later) does not block the controllers that scale, relabel or finish it, and an image already
//! there keeps its verdict, while a changed image (the Pod `image` field is mutable), a new
//! ephemeral container or a new finding is judged like a new pod. Objects being deleted and
//! `status` / `scale` changes are admitted: they change nothing that runs.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, Operation},
};

use crate::{
    config::{Config, ENFORCEMENT_LABEL, Mode},
    identity::{self, SpireRegistration},
    images::reference,
    pods::{image_uses, new_image_uses},
    secrets::{Finding, SecretsPolicy},
    workload::{PodView, pod_of, pod_of_object},
};

/// Cluster facts a decision needs.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Labels of the request's namespace.
    pub namespace_labels: BTreeMap<String, String>,
    /// SPIRE registrations (with identity source Spire).
    pub spire: Vec<SpireRegistration>,
}

/// What was decided, for the security event log and the image checks that follow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// `allow`, `deny`, `warn` or `audit` (admitted, findings recorded only).
    pub verdict: &'static str,
    /// The rules that fired.
    pub rules: Vec<String>,
    /// Findings admitted because their check audits in this namespace: recorded, not told.
    pub audited: Vec<String>,
    /// Each finding's rule and the mode it was handled in (for the metrics).
    pub modes: Vec<(String, Mode)>,
    /// The images to check (new, or changed by this request), with who uses them
    /// (`containers "app"`); empty when none apply.
    pub images: BTreeMap<String, Vec<String>>,
    /// Every image of the pod (template) as written.
    pub all_images: BTreeSet<String>,
    /// The pod's `imagePullSecrets`, the credentials its images are read with.
    pub pull_secrets: Vec<String>,
    /// The pod's ServiceAccount (`default` when it names none).
    pub service_account: String,
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
    if req.operation == Operation::Delete {
        return allow(vec![]);
    }
    // Who may turn the checks of a namespace down is judged for every namespace.
    if req.kind.group.is_empty() && req.kind.kind == "Namespace" {
        return enforcement_label_change(req, config);
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    if config.exempt_namespaces.contains(&namespace) {
        return allow(vec![]);
    }
    // Scale changes start or stop nothing new; status changes neither, unless they relabel a
    // pod (a status update may change its labels and annotations, which select identities).
    if req.sub_resource.as_deref() == Some("scale") {
        return allow(vec![]);
    }
    let status = req.sub_resource.as_deref() == Some("status");
    let Some(object) = &req.object else {
        // The API server always sends the object of a CREATE or UPDATE: without one there is
        // nothing to judge, and nothing is admitted unjudged.
        return deny(
            req,
            format!(
                "palisade denied {} {namespace}/{}: the request has no object",
                req.kind.kind, req.name
            ),
            vec!["malformed".into()],
        );
    };
    let pod = match view_of(req, object) {
        Ok(Some(p)) => p,
        Ok(None) => return allow(vec![]),
        Err(e) => return deny(req, e, vec!["malformed".into()]),
    };
    let old = match (&req.operation, &req.old_object) {
        (Operation::Update, Some(old)) => match view_of(req, old) {
            Ok(p) => p,
            Err(e) => return deny(req, e, vec!["malformed".into()]),
        },
        _ => None,
    };
    if old
        .as_ref()
        .is_some_and(|o| changes_nothing_judged(object, o, &pod))
        || (status && old.as_ref().is_none_or(|o| same_identity_metadata(o, &pod)))
    {
        return allow(vec![]);
    }
    let what = format!("{} {}/{}", req.kind.kind, namespace, req.name.as_str());
    let (images, all_images, unparsed) = images_to_check(&pod, old.as_ref());
    let Findings {
        denials,
        warnings,
        audited,
        rules,
        modes,
        ..
    } = findings(
        config,
        facts,
        secrets,
        &namespace,
        (&pod, old.as_ref()),
        unparsed,
    );

    let verdict = Verdict {
        verdict: if !denials.is_empty() {
            "deny"
        } else if !warnings.is_empty() {
            "warn"
        } else if !audited.is_empty() {
            "audit"
        } else {
            "allow"
        },
        rules,
        audited,
        modes,
        images,
        all_images,
        pull_secrets: crate::pods::pull_secrets(&pod.spec),
        service_account: crate::pods::service_account(&pod.spec),
    };
    let mut resp = if denials.is_empty() {
        AdmissionResponse::from(req)
    } else {
        AdmissionResponse::from(req)
            .deny(format!("palisade denied {what}: {}", denials.join(" | ")))
    };
    if !warnings.is_empty() {
        resp.warnings = Some(warnings);
    }
    (resp, verdict)
}

/// What the identity and secrets checks find in a Pod that exists already, as a CREATE of it
/// would be judged now (the background scan's question), with what its image check needs;
/// `Err` when the object is not a readable Pod. Image signatures are checked by the caller
/// ([`crate::images::admit::image_findings`]); here only that references parse.
pub fn findings_in_pod(
    pod: &serde_json::Value,
    namespace: &str,
    facts: &Facts,
    config: &Config,
    secrets: &SecretsPolicy,
) -> Result<PodJudgement, String> {
    let view = match pod_of("Pod", pod) {
        Ok(Some(v)) => v,
        Ok(None) => return Err("not a pod".to_owned()),
        Err(e) => return Err(e.to_string()),
    };
    let (images, all_images, unparsed) = images_to_check(&view, None);
    Ok(PodJudgement {
        findings: findings(config, facts, secrets, namespace, (&view, None), unparsed).details,
        images,
        all_images,
        pull_secrets: crate::pods::pull_secrets(&view.spec),
    })
}

/// [`findings_in_pod`]'s answer.
#[derive(Debug, Default)]
pub struct PodJudgement {
    /// The identity, secrets and image-reference findings.
    pub findings: Vec<CheckFinding>,
    /// The images whose references parse, with who uses them (`containers "app"`).
    pub images: BTreeMap<String, Vec<String>>,
    /// Every image of the pod as written.
    pub all_images: BTreeSet<String>,
    /// Its `imagePullSecrets`.
    pub pull_secrets: Vec<String>,
}

/// What the checks find in `pod` (and `old` did not have), each sorted by its mode.
#[derive(Default)]
struct Findings {
    denials: Vec<String>,
    warnings: Vec<String>,
    audited: Vec<String>,
    rules: Vec<String>,
    modes: Vec<(String, Mode)>,
    /// Each finding with its rule and mode, in the order found.
    details: Vec<CheckFinding>,
}

/// One finding of a check on a pod: its rule (`workload-identity`, `secrets-in-env/<rule>`,
/// `image-reference`), the mode it is handled in, and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckFinding {
    /// The rule.
    pub rule: String,
    /// The mode of its check in the pod's namespace (always `Enforce` for what is refused in
    /// every mode).
    pub mode: Mode,
    /// The explanation, as a denial would give it.
    pub text: String,
}

impl Findings {
    /// Records a finding of the rule pushed last.
    fn record(&mut self, mode: Mode, text: String) {
        if let Some(rule) = self.rules.last() {
            self.modes.push((rule.clone(), mode));
            self.details.push(CheckFinding {
                rule: rule.clone(),
                mode,
                text: text.clone(),
            });
        }
        match mode {
            Mode::Enforce => self.denials.push(text),
            Mode::Warn => self.warnings.push(text),
            Mode::Audit => self.audited.push(text),
        }
    }
}

fn findings(
    config: &Config,
    facts: &Facts,
    secrets: &SecretsPolicy,
    namespace: &str,
    (pod, old): (&PodView, Option<&PodView>),
    unparsed: Vec<String>,
) -> Findings {
    let mut out = Findings::default();
    // A reference that does not parse names no image anyone could check: refused in every mode.
    if !unparsed.is_empty() {
        out.rules.push("image-reference".to_owned());
        for text in unparsed {
            out.record(Mode::Enforce, text);
        }
    }
    if let Some(d) = new_identity_denial(config, facts, namespace, pod, old) {
        out.rules.push("workload-identity".to_owned());
        out.record(
            config.identity.mode_for(namespace, &facts.namespace_labels),
            d,
        );
    }
    match new_secret_findings(secrets, pod, old) {
        Ok(found) => {
            let mode = config
                .secrets_in_env
                .mode_for(namespace, &facts.namespace_labels);
            for (rule, text) in found {
                out.rules.push(format!("secrets-in-env/{rule}"));
                out.record(mode, text);
            }
        }
        // Fail closed: an evaluation error refuses, with the reason, in every mode.
        Err(e) => {
            out.rules.push("secrets-in-env/error".to_owned());
            out.record(Mode::Enforce, e);
        }
    }
    out
}

/// A change to a namespace: admitted unless it sets, changes or removes the
/// [`ENFORCEMENT_LABEL`] and the requester is not one of the configured editors, or sets it to
/// a value that names no mode, or creates an exempt namespace and the requester is not an
/// editor. Every change of the label is a security event.
fn enforcement_label_change(
    req: &AdmissionRequest<DynamicObject>,
    config: &Config,
) -> (AdmissionResponse, Verdict) {
    let label = |o: &Option<DynamicObject>| {
        o.as_ref()
            .and_then(|o| o.metadata.labels.as_ref())
            .and_then(|l| l.get(ENFORCEMENT_LABEL).cloned())
    };
    let (before, after) = (label(&req.old_object), label(&req.object));
    let user = req.user_info.username.clone().unwrap_or_default();
    let groups = req.user_info.groups.clone().unwrap_or_default();
    let editor = config.enforcement_label_editors.admits(&user, &groups);
    // An exempt namespace is never judged: whoever creates one under a listed name (one the
    // cluster does not have yet) would run anything in it.
    if req.operation == Operation::Create && config.exempt_namespaces.contains(&req.name) && !editor
    {
        return deny(
            req,
            format!(
                "palisade denied creating Namespace {}: it is exempt from Palisade's checks \
                 (exemptNamespaces), so only the users and groups in the webhook's \
                 enforcementLabelEditors may create it; {user:?} is not one of them",
                req.name
            ),
            vec!["exempt-namespace".to_owned()],
        );
    }
    if before == after {
        return (
            AdmissionResponse::from(req),
            Verdict {
                verdict: "allow",
                ..Verdict::default()
            },
        );
    }
    let show = |v: &Option<String>| {
        v.as_deref()
            .map_or_else(|| "(none)".to_owned(), |v| format!("{v:?}"))
    };
    let change = format!(
        "label {ENFORCEMENT_LABEL} of Namespace {} from {} to {}",
        req.name,
        show(&before),
        show(&after)
    );
    let refusal = if editor {
        after
            .as_deref()
            .filter(|v| Mode::parse(v).is_none())
            .map(|v| {
                format!(
                    "palisade denied the change of {change}: {v:?} is not a mode (Enforce, \
                     Warn or Audit)"
                )
            })
    } else {
        Some(format!(
            "palisade denied the change of {change}: {user:?} is not allowed to change \
             enforcement (allowed: the users and groups in the webhook's \
             enforcementLabelEditors)"
        ))
    };
    let rules = vec!["enforcement-label".to_owned()];
    if let Some(message) = refusal {
        return deny(req, message, rules);
    }
    tracing::warn!(target: "palisade::security", uid = %req.uid, user = %user,
        namespace = %req.name, before = %show(&before), after = %show(&after),
        dry_run = req.dry_run, "namespace enforcement changed");
    (
        AdmissionResponse::from(req),
        Verdict {
            verdict: "allow",
            rules,
            ..Verdict::default()
        },
    )
}

/// The images of `pod` to check (those `old` did not run, with who uses them), every image of
/// it, and a denial for each reference that does not parse.
fn images_to_check(
    pod: &PodView,
    old: Option<&PodView>,
) -> (BTreeMap<String, Vec<String>>, BTreeSet<String>, Vec<String>) {
    let mut images: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let all_images = image_uses(&pod.spec)
        .into_iter()
        .map(|u| u.image.to_owned())
        .collect();
    let mut unparsed = Vec::new();
    for u in new_image_uses(&pod.spec, old.map(|o| &o.spec)) {
        if let Err(e) = reference::parse(u.image) {
            unparsed.push(format!("{}: {e}", u.user));
            continue;
        }
        images.entry(u.image.to_owned()).or_default().push(u.user);
    }
    (images, all_images, unparsed)
}

/// Why `pod` has no workload identity, unless `old` (the object an update replaces) lacked it
/// for the same reasons.
fn new_identity_denial(
    config: &Config,
    facts: &Facts,
    namespace: &str,
    pod: &PodView,
    old: Option<&PodView>,
) -> Option<String> {
    let identity = |p: &PodView| {
        identity::check(
            config.identity_source,
            &config.trust_domain,
            namespace,
            &facts.namespace_labels,
            p,
            &facts.spire,
            (&config.istio, &config.spire),
        )
        .err()
        .map(|d| d.to_string())
    };
    let denial = identity(pod)?;
    (old.and_then(identity).as_ref() != Some(&denial)).then_some(denial)
}

/// (rule, message) of each secret in the environment of `pod` that `old` (the object an update
/// replaces) did not already have.
fn new_secret_findings(
    secrets: &SecretsPolicy,
    pod: &PodView,
    old: Option<&PodView>,
) -> Result<Vec<(String, String)>, String> {
    let findings = |p: &PodView| -> Result<Vec<(String, String)>, String> {
        let found = secrets.evaluate_pod(p).map_err(|e| e.to_string())?;
        Ok(found
            .into_iter()
            .map(|f: Finding| {
                let text = format!(
                    "{} ({}spec.{})",
                    f.message,
                    template_prefix(p.template_path),
                    f.field
                );
                (f.rule, text)
            })
            .collect())
    };
    let found = findings(pod)?;
    let before: BTreeSet<(String, String)> = match old.map(findings) {
        Some(Ok(f)) => f.into_iter().collect(),
        _ => BTreeSet::new(),
    };
    Ok(found.into_iter().filter(|f| !before.contains(f)).collect())
}

/// The pod (template) of `object`, read as the request's kind; `None` for kinds without one.
fn view_of(
    req: &AdmissionRequest<DynamicObject>,
    object: &DynamicObject,
) -> Result<Option<PodView>, String> {
    pod_of_object(&req.kind.kind, object).map_err(|e| e.to_string())
}

/// Whether an UPDATE from `old` to `object` (whose pod is `pod`) changes nothing a check judges:
/// nothing a check reads changed (finalizers, owner references, other metadata, replicas), or
/// the object is being deleted and loses fields on its way out without starting a new image
/// or changing what selects its identity (a terminating pod may run for its whole grace
/// period, so a relabel still counts).
fn changes_nothing_judged(object: &DynamicObject, old: &PodView, pod: &PodView) -> bool {
    let terminating = object.metadata.deletion_timestamp.is_some()
        && new_image_uses(&pod.spec, Some(&old.spec)).is_empty()
        && same_identity_metadata(old, pod);
    terminating || (old.spec == pod.spec && same_identity_metadata(old, pod))
}

/// Whether what selects the pod's identity is the same: its labels, and the annotations the
/// identity check reads (Istio's injection switch and the injector's status). Other
/// annotations — such as the one Istio's CNI agent writes through `pods/status` — change
/// nothing here.
fn same_identity_metadata(old: &PodView, new: &PodView) -> bool {
    let read = |p: &PodView| -> Vec<(String, String)> {
        p.annotations
            .iter()
            .filter(|(k, _)| crate::identity::IDENTITY_ANNOTATIONS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    old.labels == new.labels && read(old) == read(new)
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
    let modes = rules.iter().map(|r| (r.clone(), Mode::Enforce)).collect();
    (
        AdmissionResponse::from(req).deny(message),
        Verdict {
            verdict: "deny",
            rules,
            modes,
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
            "Pod" | "Namespace" | "ReplicationController" => ("", "v1"),
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
                .insert("istio.io/dataplane-mode".into(), "ambient".into());
        }
        f
    }

    fn run(req: &AdmissionRequest<DynamicObject>, f: &Facts) -> (AdmissionResponse, Verdict) {
        decide(req, f, &config(), &SecretsPolicy::new().expect("policy"))
    }

    #[test]
    fn an_existing_pod_is_judged_as_its_create_would_be() {
        let secrets = SecretsPolicy::new().expect("policy");
        let env =
            json!([{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db", "key": "p"}}}]);
        let mut f = facts(true);
        let found = findings_in_pod(
            &pod("default", env.clone()),
            "legacy",
            &f,
            &config(),
            &secrets,
        )
        .expect("a pod");
        assert_eq!(found.pull_secrets, Vec::<String>::new());
        assert_eq!(
            found.images.keys().collect::<Vec<_>>(),
            [&"r/a:1".to_owned()]
        );
        let found = found.findings;
        let rules: Vec<(&str, Mode)> = found.iter().map(|c| (c.rule.as_str(), c.mode)).collect();
        assert_eq!(
            rules,
            [
                ("workload-identity", Mode::Enforce),
                ("secrets-in-env/env-from-secret", Mode::Warn)
            ]
        );
        assert!(found[1].text.contains("Secret \"db\""), "{}", found[1].text);
        // The namespace label lowers both modes, as it does at admission.
        f.namespace_labels
            .insert(ENFORCEMENT_LABEL.into(), "Audit".into());
        let found = findings_in_pod(&pod("default", env), "shop", &f, &config(), &secrets)
            .expect("a pod")
            .findings;
        assert!(found.iter().all(|c| c.mode == Mode::Audit), "{found:?}");
        assert!(
            findings_in_pod(
                &pod("orders", json!([])),
                "shop",
                &facts(true),
                &config(),
                &secrets
            )
            .expect("a pod")
            .findings
            .is_empty()
        );
        assert!(findings_in_pod(&json!({"kind": "Pod"}), "shop", &f, &config(), &secrets).is_err());
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

    /// A Deployment's or a ReplicationController's template is refused before any pod of it
    /// is created, the finding placed at its path.
    #[test]
    fn workload_templates_are_checked_with_their_path() {
        let template = json!({"metadata": {}, "spec": {"serviceAccountName": "orders",
            "containers": [{"name": "app", "env": [{"name": "K", "value": "AKIAIOSFODNN7EXAMPLE"}]}]}});
        for (kind, api_version) in [("Deployment", "apps/v1"), ("ReplicationController", "v1")] {
            let object = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "web"},
                "spec": {"selector": {}, "template": template}});
            let (resp, _) = run(&request(kind, "shop", object), &facts(true));
            assert!(!resp.allowed, "{kind}");
            assert!(
                resp.result
                    .message
                    .contains("spec.template.spec.containers"),
                "{kind}: {}",
                resp.result.message
            );
        }
    }

    #[test]
    fn warn_mode_admits_with_warnings() {
        let env = json!([{"name": "K", "value": "AKIAIOSFODNN7EXAMPLE"}]);
        let (resp, v) = run(&request("Pod", "legacy", pod("orders", env)), &facts(true));
        assert!(resp.allowed);
        assert_eq!(v.verdict, "warn");
        assert_eq!(resp.warnings.as_ref().map(Vec::len), Some(1));
    }

    /// A pod with neither identity nor a clean environment, in `namespace` labelled `label`.
    fn staged(namespace: &str, label: Option<&str>, cfg: &Config) -> (AdmissionResponse, Verdict) {
        let env =
            json!([{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]);
        let mut f = facts(false);
        if let Some(l) = label {
            f.namespace_labels
                .insert(ENFORCEMENT_LABEL.into(), l.into());
        }
        decide(
            &request("Pod", namespace, pod("default", env)),
            &f,
            cfg,
            &SecretsPolicy::new().expect("policy"),
        )
    }

    #[test]
    fn each_check_has_its_mode_and_the_namespace_label_comes_first() {
        let cfg = Config::parse(
            "listen: 127.0.0.1:0\ntls: {certFile: c, keyFile: k}\n\
             identity: {mode: Enforce, namespaces: {batch: Audit, legacy: Warn}}\n\
             secretsInEnv: {mode: Enforce, namespaces: {batch: Audit}}\n",
        )
        .expect("config");
        // Audit: admitted, nothing told, both findings recorded.
        let (resp, v) = staged("batch", None, &cfg);
        assert!(resp.allowed, "{}", resp.result.message);
        assert_eq!(resp.warnings, None);
        assert_eq!(v.verdict, "audit");
        assert_eq!(v.audited.len(), 2, "{:?}", v.audited);
        // Identity warns, secrets still enforce: refused, and the warning is kept.
        let (resp, v) = staged("legacy", None, &cfg);
        assert!(!resp.allowed);
        assert!(
            resp.result.message.contains("env DB"),
            "{}",
            resp.result.message
        );
        assert!(
            !resp.result.message.contains("spiffe://"),
            "{}",
            resp.result.message
        );
        assert_eq!(v.verdict, "deny");
        // The label sets every check of its namespace, either way.
        let (resp, v) = staged("shop", Some("Warn"), &cfg);
        assert!(resp.allowed);
        assert_eq!(resp.warnings.as_ref().map(Vec::len), Some(2));
        assert_eq!(v.verdict, "warn");
        let (resp, _) = staged("batch", Some("Enforce"), &cfg);
        assert!(!resp.allowed, "the label raises an audited namespace too");
        // A value that names no mode enforces.
        for odd in ["audit", "Disabled", "", "Audit "] {
            let (resp, v) = staged("batch", Some(odd), &cfg);
            assert!(!resp.allowed, "{odd:?} admitted");
            assert_eq!(v.verdict, "deny");
        }
    }

    #[test]
    fn an_unreadable_image_reference_is_refused_in_every_mode() {
        let mut p = pod("orders", json!([]));
        p["spec"]["containers"][0]["image"] = json!("r/a:1@sha256:nothex");
        let mut f = facts(true);
        f.namespace_labels
            .insert(ENFORCEMENT_LABEL.into(), "Audit".into());
        let (resp, v) = decide(
            &request("Pod", "shop", p),
            &f,
            &config(),
            &SecretsPolicy::new().expect("policy"),
        );
        assert!(!resp.allowed);
        assert_eq!(v.rules, vec!["image-reference"]);
    }

    /// A Namespace request by `user` in `groups`, its label going from `old` to `new`.
    fn relabel(
        user: &str,
        groups: &[&str],
        old: Option<&str>,
        new: Option<&str>,
    ) -> (AdmissionResponse, Verdict) {
        let ns = |v: Option<&str>| {
            let mut labels = json!({"kubernetes.io/metadata.name": "shop", "team": "a"});
            if let Some(v) = v {
                labels[ENFORCEMENT_LABEL] = json!(v);
            }
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": labels}})
        };
        let mut req = request("Namespace", "", ns(new));
        req.name = "shop".into();
        req.user_info.username = Some(user.into());
        req.user_info.groups = Some(groups.iter().map(|g| (*g).to_owned()).collect());
        if old != Some("<create>") {
            req.operation = Operation::Update;
            req.old_object = Some(serde_json::from_value(ns(old)).expect("old"));
        }
        run(&req, &facts(false))
    }

    #[test]
    fn only_editors_create_a_namespace_under_an_exempt_name() {
        let create = |name: &str, user: &str, groups: &[&str]| {
            let mut req = request(
                "Namespace",
                "",
                json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name}}),
            );
            req.name = name.into();
            req.user_info.username = Some(user.into());
            req.user_info.groups = Some(groups.iter().map(|g| (*g).to_owned()).collect());
            run(&req, &facts(false))
        };
        // config() exempts kube-system and palisade-system.
        let (resp, v) = create("palisade-system", "alice", &["tenants"]);
        assert!(!resp.allowed);
        assert!(
            resp.result.message.contains("exempt"),
            "{}",
            resp.result.message
        );
        assert_eq!(v.rules, vec!["exempt-namespace"]);
        let (resp, _) = create("palisade-system", "root", &["system:masters"]);
        assert!(resp.allowed, "{}", resp.result.message);
        let (resp, _) = create("team-a", "alice", &["tenants"]);
        assert!(resp.allowed, "an ordinary namespace");
    }

    #[test]
    fn only_the_configured_editors_change_a_namespace_s_enforcement() {
        let tenant = ("alice", &["system:authenticated", "shop-admins"][..]);
        let admin = ("root", &["system:masters", "system:authenticated"][..]);
        // A namespace owner can neither lower, remove, raise nor create with the label ...
        for (old, new) in [
            (Some("Enforce"), Some("Audit")),
            (Some("Enforce"), None),
            (None, Some("Warn")),
            (Some("<create>"), Some("Audit")),
            (Some("Audit"), Some("Enforce")),
        ] {
            let (resp, v) = relabel(tenant.0, tenant.1, old, new);
            assert!(!resp.allowed, "{old:?} -> {new:?} admitted for a tenant");
            assert!(
                resp.result.message.contains("\"alice\" is not allowed"),
                "{}",
                resp.result.message
            );
            assert_eq!(v.rules, vec!["enforcement-label"]);
        }
        // ... but may change everything else about it.
        let (resp, _) = relabel(tenant.0, tenant.1, Some("Audit"), Some("Audit"));
        assert!(resp.allowed);
        let (resp, _) = relabel(tenant.0, tenant.1, Some("<create>"), None);
        assert!(resp.allowed);
        // An administrator may, with a value that names a mode.
        let (resp, v) = relabel(admin.0, admin.1, Some("Enforce"), Some("Audit"));
        assert!(resp.allowed, "{}", resp.result.message);
        assert_eq!(v.rules, vec!["enforcement-label"]);
        let (resp, _) = relabel(admin.0, admin.1, Some("Enforce"), Some("Off"));
        assert!(!resp.allowed);
        assert!(
            resp.result.message.contains("is not a mode"),
            "{}",
            resp.result.message
        );
        // Users can be named too.
        let cfg = Config::parse(
            "listen: 127.0.0.1:0\ntls: {certFile: c, keyFile: k}\n\
             enforcementLabelEditors: {users: [alice], groups: []}\n",
        )
        .expect("config");
        let mut req = request(
            "Namespace",
            "",
            json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "x", "labels": {(ENFORCEMENT_LABEL): "Warn"}}}),
        );
        req.user_info.groups = Some(vec!["system:masters".into()]);
        let (resp, _) = decide(&req, &facts(false), &cfg, &SecretsPolicy::new().expect("p"));
        assert!(resp.allowed, "alice is named");
        req.user_info.username = Some("bob".into());
        let (resp, _) = decide(&req, &facts(false), &cfg, &SecretsPolicy::new().expect("p"));
        assert!(
            !resp.allowed,
            "the default group no longer applies once groups are set"
        );
    }

    /// An UPDATE of `kind` from `old` to `new` (`sub`: its subresource).
    fn update(
        kind: &str,
        old: serde_json::Value,
        new: serde_json::Value,
        sub: Option<&str>,
    ) -> AdmissionRequest<DynamicObject> {
        let mut req = request(kind, "shop", new);
        req.operation = Operation::Update;
        req.old_object = Some(serde_json::from_value(old).expect("old"));
        req.sub_resource = sub.map(str::to_owned);
        req
    }

    #[test]
    fn controllers_can_finish_what_a_later_policy_refuses() {
        // A pod from before the policy: default ServiceAccount and a Secret in env.
        let env =
            json!([{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]);
        let old = pod("default", env.clone());
        // The Job controller removes its finalizer; the garbage collector its owner.
        let mut unfinalized = old.clone();
        unfinalized["metadata"]["finalizers"] = json!([]);
        unfinalized["metadata"]["labels"] = json!({"x": "y"});
        let (resp, _) = run(
            &update("Pod", old.clone(), unfinalized, None),
            &facts(false),
        );
        assert!(resp.allowed, "{}", resp.result.message);
        // Status and scale changes are never judged.
        for sub in ["status", "scale"] {
            let (resp, _) = run(
                &update("Pod", old.clone(), old.clone(), Some(sub)),
                &facts(false),
            );
            assert!(resp.allowed, "{sub}");
        }
        // A terminating object loses fields on its way out.
        let mut terminating = old.clone();
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        terminating["spec"]["activeDeadlineSeconds"] = json!(5);
        let (resp, _) = run(
            &update("Pod", old.clone(), terminating, None),
            &facts(false),
        );
        assert!(resp.allowed, "{}", resp.result.message);
        // An old ReplicaSet is scaled down: its template is unchanged.
        let rs = |replicas: i32| {
            json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web"},
              "spec": {"replicas": replicas, "selector": {}, "template": {"metadata": {},
                "spec": {"containers": [{"name": "app", "image": "r/a:1", "env": env}]}}}})
        };
        let (resp, _) = run(&update("ReplicaSet", rs(3), rs(0), None), &facts(false));
        assert!(resp.allowed, "{}", resp.result.message);
    }

    #[test]
    fn an_update_is_judged_on_what_it_changes() {
        let old = pod("orders", json!([]));
        // An image swap on a running pod: only the new image is checked.
        let mut swapped = old.clone();
        swapped["spec"]["containers"][0]["image"] = json!("r/evil:1");
        let (resp, v) = run(&update("Pod", old.clone(), swapped, None), &facts(true));
        assert!(resp.allowed);
        assert_eq!(v.images.keys().collect::<Vec<_>>(), vec!["r/evil:1"]);
        // A new ephemeral container is checked, the running ones are not.
        let mut debugged = old.clone();
        debugged["spec"]["ephemeralContainers"] = json!([{"name": "dbg", "image": "busybox", "env": [{"name": "K", "value": "AKIAIOSFODNN7EXAMPLE"}]}]);
        let (resp, v) = run(
            &update("Pod", old.clone(), debugged, Some("ephemeralcontainers")),
            &facts(true),
        );
        assert!(!resp.allowed, "a new secret in env is refused");
        assert!(
            resp.result.message.contains("ephemeralContainers"),
            "{}",
            resp.result.message
        );
        assert_eq!(v.images.keys().collect::<Vec<_>>(), vec!["busybox"]);
        // A new finding on an update is refused like on a create.
        let mut leaky = old.clone();
        leaky["spec"]["containers"][0]["env"] =
            json!([{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]);
        let (resp, _) = run(&update("Pod", old.clone(), leaky, None), &facts(true));
        assert!(!resp.allowed);
        // Moving a compliant pod to the default ServiceAccount is a new identity finding.
        let mut anonymous = old.clone();
        anonymous["spec"]["serviceAccountName"] = json!("default");
        let (resp, _) = run(&update("Pod", old, anonymous, None), &facts(true));
        assert!(!resp.allowed);
    }

    #[test]
    fn every_image_must_parse_and_image_volumes_are_images() {
        let mut p = pod("orders", json!([]));
        p["spec"]["containers"][0]["image"] = json!("Registry.example.com/Shop/app:1");
        let (resp, v) = run(&request("Pod", "shop", p), &facts(true));
        assert!(!resp.allowed);
        assert!(
            resp.result.message.contains("does not parse"),
            "{}",
            resp.result.message
        );
        assert_eq!(v.rules, vec!["image-reference"]);
        let mut p = pod("orders", json!([]));
        p["spec"]["volumes"] =
            json!([{"name": "models", "image": {"reference": "registry.example.com/ml/model:3"}}]);
        let (resp, v) = run(&request("Pod", "shop", p), &facts(true));
        assert!(resp.allowed);
        assert_eq!(
            v.images.get("registry.example.com/ml/model:3"),
            Some(&vec![r#"volumes "models""#.to_owned()])
        );
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
