//! The background scan: every `policyReports.intervalSeconds`, the replica that leads lists the
//! pods of the cluster, judges each one of a judged namespace as a CREATE of it would be judged
//! now (identity, secrets in environment variables, image references; [`findings_in_pod`]; and
//! its images against the ImagePolicies covering them, [`image_findings`]), and server-side
//! applies one PolicyReport per namespace ([`crate::report`]) — only when its content changed —
//! and deletes Palisade's reports of namespaces left with no judged pod. Pods admitted under
//! `Audit` or `Warn`, and pods that ran before Palisade (or a policy) came, are reported this
//! way.
//!
//! Image checks go through the admission path's verifier and its cache, once per image,
//! namespace, credentials and owner in a scan, a pod of each namespace in turn (a namespace with
//! slow images spends its share, not the others'); they get at most half the interval
//! ([`image_budget`]; a check begun inside it may finish after it), a pod's images at most
//! [`IMAGE_CHECK_TIMEOUT`] in all (a check begun inside it gets its whole time). What the
//! budget leaves unchecked is reported `skip`, with why, and checked at the next scan.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    },
};
use serde_json::Value;

use crate::{
    decide::{CheckFinding, Facts, findings_in_pod},
    images::{
        admit::{controller_of, image_findings},
        check::Scope,
        reference,
    },
    report::{self, ImageCheck, PodFindings},
    server::AppState,
};

/// Pods listed per request.
const PAGE: u32 = 25;
/// Images a pod may name for the scan to check them (admission checks any number).
pub const MAX_SCAN_IMAGES: usize = 32;
/// One image check's time at most.
pub const IMAGE_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The time a scan gives image checks: half the interval, at most five minutes.
pub fn image_budget(every: Duration) -> Duration {
    (every / 2).min(Duration::from_mins(5))
}

/// The PolicyReport kind.
fn policy_reports() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("wgpolicyk8s.io", "v1alpha2", "PolicyReport"),
        "policyreports",
    )
}

/// Runs the scan every `every` for the life of the process; a scan that fails is logged and
/// tried again at the next interval.
pub async fn run(client: Client, state: Arc<AppState>, every: Duration) {
    let mut last_error = String::new();
    let mut scans: usize = 0;
    loop {
        if !state.facts.ready() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if state.facts.leading() == Some(false) {
            // Another replica writes.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        scans += 1;
        match scan_once(&client, &state, image_budget(every), scans).await {
            Ok((pods, written)) => {
                tracing::debug!(pods, written, "background scan done");
                last_error.clear();
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(error = %e, "background scan failed; trying again at the next interval");
                }
                last_error = e;
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Whether `pod` runs or will: not finished. A pod being deleted is judged too: it may run for
/// its whole grace period, which its owner chooses.
fn live(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// One scan: the number of pods judged and of reports written. A report is written when what
/// it says differs from what the API server holds (so an edited or forged report is put right
/// at the next scan), and Palisade's reports of namespaces with no judged pod are deleted.
async fn scan_once(
    client: &Client,
    state: &Arc<AppState>,
    image_budget: Duration,
    rotation: usize,
) -> anyhow::Result<(usize, usize)> {
    let pods: Api<Pod> = Api::all(client.clone());
    let mut images = ImagePhase::new(state, image_budget, rotation);
    // Page by page, keeping only what was found: a pod can be over a megabyte (env values,
    // args), so neither the listed pods nor a large page are held longer than their judging.
    let mut judged: BTreeMap<String, Vec<PodFindings>> = BTreeMap::new();
    // Pods with images to check, by namespace: (index in `judged`, what the check needs).
    let mut pending: BTreeMap<String, VecDeque<(usize, ImageWork)>> = BTreeMap::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = pods.list(&params).await?;
        let next = page.metadata.continue_.clone().filter(|t| !t.is_empty());
        let listed: Vec<Pod> = page.items.into_iter().filter(live).collect();
        let state = Arc::clone(state);
        let found = tokio::task::spawn_blocking(move || judge(&state, &listed)).await?;
        for (namespace, pods) in found {
            let listed = judged.entry(namespace.clone()).or_default();
            for (pod, work) in pods {
                if let Some(work) = work {
                    pending
                        .entry(namespace.clone())
                        .or_default()
                        .push_back((listed.len(), work));
                }
                listed.push(pod);
            }
        }
        match next {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    images.check_in_turns(&mut judged, pending).await;
    for pods in judged.values_mut() {
        pods.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let count = judged.values().map(Vec::len).sum();
    let dynamic = policy_reports();
    // What the cluster holds now: every report named `palisade` (Palisade's or not).
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &dynamic);
    let held: BTreeMap<String, Value> = all
        .list(&ListParams::default().fields(&format!("metadata.name={}", report::REPORT_NAME)))
        .await
        .map_err(|e| match e {
            kube::Error::Api(ref r) if r.code == 404 => anyhow::anyhow!(
                "the cluster does not serve wgpolicyk8s.io/v1alpha2 PolicyReport: install its CRD for policy reports"
            ),
            e => e.into(),
        })?
        .items
        .into_iter()
        .filter_map(|o| {
            let namespace = o.metadata.namespace.clone()?;
            Some((namespace, serde_json::to_value(o).ok()?))
        })
        .collect();
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let mut written = 0;
    // One namespace that refuses the write (being deleted, say) does not stop the others.
    let mut failed = Vec::new();
    for (namespace, pods) in &judged {
        let body = report::policy_report(namespace, pods, now);
        if held.get(namespace).map(report::content) == Some(report::content(&body)) {
            continue;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &dynamic);
        let apply = PatchParams::apply("palisade-webhook").force();
        match api
            .patch(report::REPORT_NAME, &apply, &Patch::Apply(&body))
            .await
        {
            Ok(_) => written += 1,
            Err(e) => failed.push(format!("{namespace}: {e}")),
        }
    }
    // Palisade's reports of namespaces with no judged pod now (or exempt since) go; that of a
    // namespace being deleted is left to its deletion, which takes it after the pods it reports.
    for (namespace, old) in &held {
        let ours = old["metadata"]["labels"][report::MANAGED_BY.0] == report::MANAGED_BY.1;
        if !ours || judged.contains_key(namespace) || state.facts.namespace_terminating(namespace) {
            continue;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &dynamic);
        match api
            .delete(report::REPORT_NAME, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(r)) if r.code == 404 => {}
            Err(e) => failed.push(format!("{namespace}: deleting: {e}")),
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("PolicyReports not written: {}", failed.join("; "));
    }
    Ok((count, written))
}

/// What a pod's image check needs, from its judging.
struct ImageWork {
    /// Its namespace's labels.
    labels: BTreeMap<String, String>,
    /// Its images (references that parse) with who uses them.
    images: BTreeMap<String, Vec<String>>,
    /// The scope its images are read in (namespace, pull secrets, owner, every image).
    scope: Scope,
}

/// Keeps of a pod's `images` only those a policy covers (`covers`), and none when the pod names
/// more than [`MAX_SCAN_IMAGES`] images in all (`all`): what the scan holds stays in proportion
/// to what it checks. Returns why covered images are not checked, if so.
fn images_to_scan(
    images: &mut BTreeMap<String, Vec<String>>,
    all: usize,
    covers: impl Fn(&str) -> bool,
) -> Option<String> {
    images.retain(|image, _| covers(image));
    if images.is_empty() || all <= MAX_SCAN_IMAGES {
        return None;
    }
    images.clear();
    Some(format!(
        "not checked: the pod names {all} images; the scan checks pods of at most \
         {MAX_SCAN_IMAGES} (admission checks every image)"
    ))
}

/// The findings of every live pod of a judged namespace, by namespace (sorted by pod name),
/// each with what its image check needs when it has images.
fn judge(
    state: &AppState,
    pods: &[Pod],
) -> BTreeMap<String, Vec<(PodFindings, Option<ImageWork>)>> {
    let spire = state.facts.spire_registrations();
    let policies = state.facts.image_policies();
    let mut out: BTreeMap<String, Vec<(PodFindings, Option<ImageWork>)>> = BTreeMap::new();
    for pod in pods {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        if state.config.exempt_namespaces.contains(&namespace) {
            continue;
        }
        // A namespace the cache does not know yet is judged at the next scan; one being
        // deleted is not judged at all: the API server refuses a new report in it, and its
        // deletion takes its pods, then its report.
        let Some(namespace_labels) = state.facts.namespace_labels(&namespace) else {
            continue;
        };
        if state.facts.namespace_terminating(&namespace) {
            continue;
        }
        let facts = Facts {
            namespace_labels: namespace_labels.clone(),
            spire: spire.clone(),
        };
        let judged = serde_json::to_value(pod)
            .map_err(|e| e.to_string())
            .and_then(|v| findings_in_pod(&v, &namespace, &facts, &state.config, &state.secrets));
        let mut images = ImageCheck::NotCovered;
        let (findings, work) = match judged {
            Ok(mut j) => {
                if state.images.is_none() {
                    j.images.clear();
                }
                if let Some(why) = images_to_scan(&mut j.images, j.all_images.len(), |image| {
                    reference::parse(image)
                        .is_ok_and(|r| policies.iter().any(|p| p.covers(&r, &namespace_labels)))
                }) {
                    images = ImageCheck::Skipped(why);
                }
                let work = (!j.images.is_empty()).then(|| {
                    let mut scope = Scope::new(
                        &namespace,
                        j.pull_secrets,
                        controller_of(&namespace, &pod.metadata),
                    );
                    scope.own_uid.clone_from(&pod.metadata.uid);
                    scope.images = j.all_images;
                    ImageWork {
                        labels: namespace_labels,
                        images: j.images,
                        scope,
                    }
                });
                (Ok(j.findings), work)
            }
            Err(e) => (Err(e), None),
        };
        out.entry(namespace).or_default().push((
            PodFindings {
                name: pod.metadata.name.clone().unwrap_or_default(),
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                findings,
                images,
            },
            work,
        ));
    }
    out
}

/// The image checks of one scan: the ImagePolicies as the scan began, a deadline for all of
/// them, and what was found per image, namespace, credentials and owner (pods of one workload
/// share their images; each is checked once).
struct ImagePhase {
    verifier: Option<Arc<crate::images::check::ImageVerifier>>,
    policies: Vec<Arc<crate::images::policy::CompiledImagePolicy>>,
    until: std::time::Instant,
    budget: Duration,
    /// One pod's images' time in all.
    pod_time: Duration,
    /// The scan's number: where its turns start ([`in_turns`]).
    rotation: usize,
    seen: BTreeMap<(String, String, String, String), Vec<CheckFinding>>,
}

impl ImagePhase {
    fn new(state: &AppState, budget: Duration, rotation: usize) -> Self {
        ImagePhase {
            verifier: state.images.clone(),
            policies: state.facts.image_policies(),
            until: std::time::Instant::now() + budget,
            budget,
            pod_time: IMAGE_CHECK_TIMEOUT,
            rotation,
            seen: BTreeMap::new(),
        }
    }

    /// Checks the `pending` pods' images ([`in_turns`]) and records the outcomes in `judged`.
    async fn check_in_turns(
        &mut self,
        judged: &mut BTreeMap<String, Vec<PodFindings>>,
        pending: BTreeMap<String, VecDeque<(usize, ImageWork)>>,
    ) {
        for (namespace, index, work) in in_turns(pending, self.rotation) {
            if let Some(pod) = judged.get_mut(&namespace).and_then(|p| p.get_mut(index)) {
                self.check(&namespace, pod, work).await;
            }
        }
    }

    /// Checks the images of `pod` (in `namespace`) and records the outcome in it.
    async fn check(&mut self, namespace: &str, pod: &mut PodFindings, work: ImageWork) {
        let Some(verifier) = self.verifier.clone() else {
            return;
        };
        let covered = work.images.keys().any(|image| {
            reference::parse(image)
                .is_ok_and(|r| self.policies.iter().any(|p| p.covers(&r, &work.labels)))
        });
        if !covered {
            return;
        }
        let owner = work
            .scope
            .owner
            .as_ref()
            .map(|o| o.uid.clone())
            .unwrap_or_default();
        let credentials = work.scope.credential_scope();
        let mut found = Vec::new();
        let started = std::time::Instant::now();
        let mut skipped = None;
        let mut checked_any = false;
        for (image, users) in &work.images {
            let key = (
                namespace.to_owned(),
                image.clone(),
                credentials.clone(),
                owner.clone(),
            );
            if let Some(known) = self.seen.get(&key) {
                found.extend(known.iter().map(|f| for_users(f, users)));
                continue;
            }
            let now = std::time::Instant::now();
            if now >= self.until {
                skipped = Some(format!(
                    "{image}: not checked in this scan: image checks had {} s of it and used \
                     them (checked at the next scan)",
                    self.budget.as_secs()
                ));
                break;
            }
            // One pod's images get one check's time in all, as at admission (its first image
            // always gets a check).
            if checked_any && now.duration_since(started) >= self.pod_time {
                skipped = Some(format!(
                    "{image}: not checked in this scan: the pod's other images took its {} s \
                     (checked at the next scan)",
                    self.pod_time.as_secs()
                ));
                break;
            }
            // A check begun inside the budget gets its whole time: cut short, it would read as
            // a registry failure.
            let deadline = now + IMAGE_CHECK_TIMEOUT;
            let one = BTreeMap::from([(image.clone(), users.clone())]);
            let (mut these, _) = image_findings(
                &verifier,
                &self.policies,
                &one,
                &work.labels,
                &work.scope,
                deadline,
                true,
            )
            .await;
            checked_any = true;
            self.seen.insert(key, these.clone());
            found.append(&mut these);
        }
        // What was found stays found: a failure outranks the skip of the images after it.
        if let Ok(findings) = pod.findings.as_mut() {
            findings.append(&mut found);
        }
        pod.images = match skipped {
            Some(why) => ImageCheck::Skipped(why),
            None => ImageCheck::Checked,
        };
    }
}

/// `pending` (by namespace: each pod's index and what its check needs) in the order the checks
/// run: a pod of each namespace in turn, so a namespace whose images are slow to check (a
/// registry that does not answer) takes its share of the budget, not the others'. Scan number
/// `rotation` starts the turns at another namespace and each namespace at another pod, so
/// what one scan's budget leaves unchecked comes first in a later one.
fn in_turns<T>(
    pending: BTreeMap<String, VecDeque<(usize, T)>>,
    rotation: usize,
) -> Vec<(String, usize, T)> {
    let mut queues: VecDeque<(String, VecDeque<(usize, T)>)> = pending
        .into_iter()
        .map(|(namespace, mut queue)| {
            let len = queue.len().max(1);
            queue.rotate_left(rotation % len);
            (namespace, queue)
        })
        .collect();
    let len = queues.len().max(1);
    queues.rotate_left(rotation % len);
    let mut order = Vec::new();
    while !queues.is_empty() {
        queues.retain_mut(|(namespace, queue)| {
            if let Some((index, work)) = queue.pop_front() {
                order.push((namespace.clone(), index, work));
            }
            !queue.is_empty()
        });
    }
    order
}

/// A finding made for one pod's use of `image`, told for another pod whose `users` use it.
fn for_users(f: &CheckFinding, users: &[String]) -> CheckFinding {
    let text = match f.text.split_once(": image policy ") {
        Some((_, rest)) => format!("{}: image policy {rest}", users.join(", ")),
        None => f.text.clone(),
    };
    CheckFinding {
        rule: f.rule.clone(),
        mode: f.mode,
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(image: &str, user: &str) -> ImageWork {
        let mut scope = Scope::new("shop", vec![], None);
        scope.images = std::collections::BTreeSet::from([image.to_owned()]);
        ImageWork {
            labels: BTreeMap::new(),
            images: BTreeMap::from([(image.to_owned(), vec![user.to_owned()])]),
            scope,
        }
    }

    fn judged(name: &str) -> PodFindings {
        PodFindings {
            name: name.into(),
            uid: name.into(),
            findings: Ok(vec![]),
            images: ImageCheck::NotCovered,
        }
    }

    #[test]
    fn namespaces_take_turns() {
        let pending = BTreeMap::from([
            (
                "a-many".to_owned(),
                VecDeque::from([(0, ()), (1, ()), (2, ())]),
            ),
            ("b-one".to_owned(), VecDeque::from([(0, ())])),
            ("c-two".to_owned(), VecDeque::from([(4, ()), (7, ())])),
        ]);
        let order: Vec<(String, usize)> = in_turns(pending.clone(), 0)
            .into_iter()
            .map(|(n, i, ())| (n, i))
            .collect();
        let want = [
            ("a-many", 0),
            ("b-one", 0),
            ("c-two", 4),
            ("a-many", 1),
            ("c-two", 7),
            ("a-many", 2),
        ];
        assert_eq!(order, want.map(|(n, i)| (n.to_owned(), i)).to_vec());
        // The next scan starts at the next namespace, each namespace at its next pod.
        let order: Vec<(String, usize)> = in_turns(pending, 1)
            .into_iter()
            .map(|(n, i, ())| (n, i))
            .collect();
        let want = [
            ("b-one", 0),
            ("c-two", 7),
            ("a-many", 1),
            ("c-two", 4),
            ("a-many", 2),
            ("a-many", 0),
        ];
        assert_eq!(order, want.map(|(n, i)| (n.to_owned(), i)).to_vec());
    }

    /// An image is checked once per scan (the other pods using it get the same findings, told
    /// with their own containers), an image no policy covers gets no check, and once the budget
    /// is spent a pod's unchecked image is a skip, with no registry call.
    #[tokio::test]
    async fn images_are_checked_once_per_scan_within_the_budget() {
        use crate::images::{
            check::ImageVerifier, policy::CompiledImagePolicy, registry::Registry,
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let verifier = Arc::new(ImageVerifier::new(
            Registry::new(&[]).expect("registry"),
            Duration::from_mins(1),
            Duration::from_secs(1),
        ));
        let policy: palisade_api::ImagePolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "ImagePolicy",
            "metadata": {"name": "release", "uid": "u", "generation": 1},
            "spec": {"images": [{"glob": "registry.invalid/shop/**"}], "mode": "Audit",
                     "authorities": [{"name": "k", "key": {"publicKey": "x"}}]}
        }))
        .expect("policy");
        let mut phase = ImagePhase {
            verifier: Some(Arc::clone(&verifier)),
            policies: vec![Arc::new(CompiledImagePolicy::compile(&policy, &|_| None))],
            until: std::time::Instant::now() + Duration::from_mins(1),
            budget: Duration::from_mins(1),
            pod_time: IMAGE_CHECK_TIMEOUT,
            rotation: 0,
            seen: BTreeMap::new(),
        };
        let image = "registry.invalid/shop/web:1";
        let mut first = judged("web-a");
        phase
            .check("shop", &mut first, work(image, "containers \"app\""))
            .await;
        assert_eq!(first.images, ImageCheck::Checked);
        let found = first.findings.clone().expect("findings");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].rule, "image-signature/release");
        assert_eq!(found[0].mode, crate::config::Mode::Audit);
        assert!(
            found[0]
                .text
                .starts_with("containers \"app\": image policy release not satisfied"),
            "{}",
            found[0].text
        );
        let requests = verifier.registry_requests();
        assert!(requests > 0, "the first check made no registry request");
        let mut second = judged("web-b");
        phase
            .check("shop", &mut second, work(image, "containers \"sidecar\""))
            .await;
        let again = second.findings.expect("findings");
        assert!(
            again[0]
                .text
                .starts_with("containers \"sidecar\": image policy release"),
            "{}",
            again[0].text
        );
        assert_eq!(
            verifier.registry_requests(),
            requests,
            "the image was checked twice"
        );
        let mut uncovered = judged("other");
        phase
            .check(
                "shop",
                &mut uncovered,
                work("other.invalid/x:1", "containers \"app\""),
            )
            .await;
        assert_eq!(uncovered.images, ImageCheck::NotCovered);
        phase.until = std::time::Instant::now();
        let mut late = judged("api");
        phase
            .check(
                "shop",
                &mut late,
                work("registry.invalid/shop/api:1", "containers \"app\""),
            )
            .await;
        assert!(
            matches!(&late.images, ImageCheck::Skipped(why) if why.contains("next scan")),
            "{:?}",
            late.images
        );
        assert_eq!(verifier.registry_requests(), requests);
        assert_eq!(
            image_budget(Duration::from_mins(5)),
            Duration::from_secs(150)
        );
        assert_eq!(
            image_budget(Duration::from_hours(1)),
            Duration::from_mins(5)
        );
        // A pod whose second image is reached after its time: the first image's failure stays,
        // the second is a skip.
        phase.until = std::time::Instant::now() + Duration::from_mins(1);
        phase.pod_time = Duration::ZERO;
        let mut two = judged("two");
        let mut both = work("registry.invalid/shop/a:1", "containers \"a\"");
        both.images.insert(
            "registry.invalid/shop/b:1".into(),
            vec!["containers \"b\"".into()],
        );
        phase.check("shop", &mut two, both).await;
        let kept = two.findings.clone().expect("findings");
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(
            kept[0].text.contains("registry.invalid/shop/a:1"),
            "{}",
            kept[0].text
        );
        assert!(
            matches!(&two.images, ImageCheck::Skipped(why) if why.contains("shop/b:1")),
            "{:?}",
            two.images
        );
        let report = crate::report::policy_report("shop", &[two], 0);
        let image = report["results"]
            .as_array()
            .expect("results")
            .iter()
            .find(|r| r["rule"] == crate::report::IMAGE_CHECK)
            .cloned()
            .expect("an image result");
        assert_eq!(image["result"], "fail", "{image}");
    }

    #[test]
    fn pods_being_deleted_are_judged_finished_ones_not() {
        let pod = |extra: serde_json::Value| -> Pod {
            let mut v = serde_json::json!({"metadata": {"name": "p", "namespace": "shop"},
                "spec": {"containers": [{"name": "app", "image": "r/a:1"}]},
                "status": {"phase": "Running"}});
            json_patch::merge(&mut v, &extra);
            serde_json::from_value(v).expect("a pod")
        };
        assert!(live(&pod(serde_json::json!({}))));
        // A year's grace period: it runs on, so it is reported on.
        assert!(live(&pod(serde_json::json!({"metadata": {
            "deletionTimestamp": "2026-01-01T00:00:00Z", "deletionGracePeriodSeconds": 31_536_000}}))));
        for phase in ["Succeeded", "Failed"] {
            assert!(!live(&pod(serde_json::json!({"status": {"phase": phase}}))));
        }
    }

    /// Only covered images are kept; a pod of more than MAX_SCAN_IMAGES images keeps none and
    /// says why, unless none of its images is covered (then there is nothing to skip).
    #[test]
    fn only_covered_images_of_pods_within_the_cap_are_scanned() {
        let images = |names: &[&str]| -> BTreeMap<String, Vec<String>> {
            names
                .iter()
                .map(|n| ((*n).to_owned(), vec!["app".to_owned()]))
                .collect()
        };
        let covers = |i: &str| i.starts_with("reg/shop/");
        let mut small = images(&["reg/shop/a:1", "reg/other/b:1"]);
        assert_eq!(images_to_scan(&mut small, 2, covers), None);
        assert_eq!(small.keys().collect::<Vec<_>>(), ["reg/shop/a:1"]);

        let mut at_cap = images(&["reg/shop/a:1"]);
        assert_eq!(images_to_scan(&mut at_cap, MAX_SCAN_IMAGES, covers), None);
        assert_eq!(at_cap.len(), 1);

        let mut over = images(&["reg/shop/a:1", "reg/other/b:1"]);
        let why = images_to_scan(&mut over, MAX_SCAN_IMAGES + 1, covers).expect("skipped");
        assert!(over.is_empty());
        assert!(
            why.contains("33 images") && why.contains("at most 32"),
            "{why}"
        );

        let mut uncovered = images(&["reg/other/b:1"]);
        assert_eq!(
            images_to_scan(&mut uncovered, MAX_SCAN_IMAGES + 1, covers),
            None
        );
        assert!(uncovered.is_empty());
    }
}
