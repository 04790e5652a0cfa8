//! The background scan: every `policyReports.intervalSeconds`, the replica that leads lists the
//! pods of the cluster, judges each one of a judged namespace as a CREATE of it would be judged
//! now (identity, secrets in environment variables, image references; [`findings_in_pod`]), and
//! server-side applies one PolicyReport per namespace ([`crate::report`]) — only when its
//! content changed — and deletes Palisade's reports of namespaces left with no judged pod.
//! Pods admitted under `Audit` or `Warn`, and pods that ran before Palisade (or a policy) came,
//! are reported this way.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    },
};
use serde_json::Value;

use crate::{
    decide::{Facts, findings_in_pod},
    report::{self, PodFindings},
    server::AppState,
};

/// Pods listed per request.
const PAGE: u32 = 25;

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
        match scan_once(&client, &state).await {
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
async fn scan_once(client: &Client, state: &Arc<AppState>) -> anyhow::Result<(usize, usize)> {
    let pods: Api<Pod> = Api::all(client.clone());
    // Page by page, keeping only what was found: a pod can be over a megabyte (env values,
    // args), so neither the listed pods nor a large page are held longer than their judging.
    let mut judged: BTreeMap<String, Vec<PodFindings>> = BTreeMap::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = pods.list(&params).await?;
        let next = page.metadata.continue_.clone().filter(|t| !t.is_empty());
        let listed: Vec<Pod> = page.items.into_iter().filter(live).collect();
        let state = Arc::clone(state);
        let found = tokio::task::spawn_blocking(move || judge(&state, &listed)).await?;
        for (namespace, mut pods) in found {
            judged.entry(namespace).or_default().append(&mut pods);
        }
        match next {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
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
    // Palisade's reports of namespaces with no judged pod now (or exempt since) go.
    for (namespace, old) in &held {
        let ours = old["metadata"]["labels"][report::MANAGED_BY.0] == report::MANAGED_BY.1;
        if !ours || judged.contains_key(namespace) {
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

/// The findings of every live pod of a judged namespace, by namespace (sorted by pod name).
fn judge(state: &AppState, pods: &[Pod]) -> BTreeMap<String, Vec<PodFindings>> {
    let spire = state.facts.spire_registrations();
    let mut out: BTreeMap<String, Vec<PodFindings>> = BTreeMap::new();
    for pod in pods {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        if state.config.exempt_namespaces.contains(&namespace) {
            continue;
        }
        // A namespace the cache does not know yet is judged at the next scan.
        let Some(namespace_labels) = state.facts.namespace_labels(&namespace) else {
            continue;
        };
        let facts = Facts {
            namespace_labels,
            spire: spire.clone(),
        };
        let findings = serde_json::to_value(pod)
            .map_err(|e| e.to_string())
            .and_then(|v| findings_in_pod(&v, &namespace, &facts, &state.config, &state.secrets));
        out.entry(namespace).or_default().push(PodFindings {
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            findings,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
