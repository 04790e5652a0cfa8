//! Workload identity: a pod may run only under a ServiceAccount of its own and covered by the
//! cluster's identity source, so that it has the SPIFFE ID AuthPolicies name.
//!
//! Pure: the namespace's labels and the SPIRE registrations come in as values; the decision
//! names the SPIFFE ID the pod would have had and everything that is missing.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use palisade_api::SpiffeId;

use crate::workload::PodView;

/// Which identity source the cluster uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub enum IdentitySource {
    /// Istio issues identities to pods with a sidecar or in ambient mode.
    Istio,
    /// SPIRE issues identities to pods a `ClusterSPIFFEID` selects.
    Spire,
}

/// A SPIRE registration: which pods a `ClusterSPIFFEID` selects.
#[derive(Clone, Debug, Default)]
pub struct SpireRegistration {
    /// Name of the ClusterSPIFFEID.
    pub name: String,
    /// Its pod selector (all pods when unset).
    pub pod_selector: Option<LabelSelector>,
    /// Its namespace selector (all namespaces when unset).
    pub namespace_selector: Option<LabelSelector>,
}

/// How a pod gets its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// An Istio sidecar is injected.
    IstioSidecar,
    /// The pod is in Istio's ambient mesh.
    IstioAmbient,
    /// A SPIRE `ClusterSPIFFEID` selects it.
    Spire(String),
}

/// Why a pod has no usable identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityDenial {
    /// The SPIFFE ID the pod would have had.
    pub spiffe_id: String,
    /// What is missing, each with what to change.
    pub missing: Vec<String>,
}

impl std::fmt::Display for IdentityDenial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod would run as {} but has no workload identity: {}",
            self.spiffe_id,
            self.missing.join("; ")
        )
    }
}

/// Decides whether the pod in `namespace` (whose labels are `namespace_labels`) has a workload
/// identity under `source`.
pub fn check(
    source: IdentitySource,
    trust_domain: &str,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    pod: &PodView,
    spire: &[SpireRegistration],
) -> Result<Coverage, IdentityDenial> {
    let sa = pod.service_account();
    let spiffe_id = SpiffeId::for_service_account(trust_domain, namespace, sa).map_or_else(
        |_| format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}"),
        |id| id.to_string(),
    );
    let mut missing = Vec::new();
    if sa == "default" {
        missing.push(
            "it runs as the namespace's `default` ServiceAccount, which every pod shares: \
             set spec.serviceAccountName to a ServiceAccount of its own"
                .to_owned(),
        );
    }
    let coverage = match source {
        IdentitySource::Istio => istio_coverage(namespace, namespace_labels, &pod.labels),
        IdentitySource::Spire => spire
            .iter()
            .find(|r| {
                selects(r.namespace_selector.as_ref(), namespace_labels)
                    && selects(r.pod_selector.as_ref(), &pod.labels)
            })
            .map(|r| Coverage::Spire(r.name.clone()))
            .ok_or_else(|| {
                format!(
                    "no SPIRE ClusterSPIFFEID selects it (none of {} matches its labels and \
                     namespace): add an AuthPolicy selecting it, or a ClusterSPIFFEID",
                    spire.len()
                )
            }),
    };
    match coverage {
        Ok(c) if missing.is_empty() => Ok(c),
        Ok(_) => Err(IdentityDenial { spiffe_id, missing }),
        Err(why) => {
            missing.push(why);
            Err(IdentityDenial { spiffe_id, missing })
        }
    }
}

fn get<'a>(m: &'a BTreeMap<String, String>, k: &str) -> Option<&'a str> {
    m.get(k).map(String::as_str)
}

fn istio_coverage(
    namespace: &str,
    ns_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> Result<Coverage, String> {
    let pod_mode = get(pod_labels, "istio.io/dataplane-mode");
    let ns_mode = get(ns_labels, "istio.io/dataplane-mode");
    if pod_mode == Some("ambient") || (ns_mode == Some("ambient") && pod_mode != Some("none")) {
        return Ok(Coverage::IstioAmbient);
    }
    let pod_inject = get(pod_labels, "sidecar.istio.io/inject");
    let ns_inject = get(ns_labels, "istio-injection");
    let ns_rev = ns_labels.contains_key("istio.io/rev");
    if pod_inject == Some("false") {
        return Err(
            "its label sidecar.istio.io/inject=false turns the Istio sidecar off: remove it"
                .to_owned(),
        );
    }
    if pod_inject == Some("true")
        || ns_inject == Some("enabled")
        || (ns_rev && ns_inject != Some("disabled"))
    {
        return Ok(Coverage::IstioSidecar);
    }
    Err(format!(
        "namespace {namespace} has neither istio-injection=enabled, an istio.io/rev label nor \
         istio.io/dataplane-mode=ambient, and the pod is not labelled sidecar.istio.io/inject=true: \
         label the namespace (kubectl label namespace {namespace} istio-injection=enabled)"
    ))
}

/// Whether a Kubernetes label selector matches `labels` (an unset selector matches all).
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else { return true };
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // An operator the API server would have refused: select nothing rather than all.
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use serde_json::json;

    use super::*;
    use crate::workload::pod_of;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod(sa: Option<&str>, pod_labels: &[(&str, &str)]) -> PodView {
        let mut spec = json!({"containers": [{"name": "app", "image": "r/app:1"}]});
        if let Some(sa) = sa {
            spec["serviceAccountName"] = json!(sa);
        }
        pod_of(
            "Pod",
            &json!({"metadata": {"labels": labels(pod_labels)}, "spec": spec}),
        )
        .expect("valid")
        .expect("pod")
    }

    fn istio(ns_labels: &[(&str, &str)], p: &PodView) -> Result<Coverage, IdentityDenial> {
        check(
            IdentitySource::Istio,
            "cluster.local",
            "shop",
            &labels(ns_labels),
            p,
            &[],
        )
    }

    #[test]
    fn injected_namespace_and_own_service_account_is_covered() {
        let p = pod(Some("orders"), &[]);
        assert_eq!(
            istio(&[("istio-injection", "enabled")], &p),
            Ok(Coverage::IstioSidecar)
        );
        assert_eq!(
            istio(&[("istio.io/rev", "1-31")], &p),
            Ok(Coverage::IstioSidecar)
        );
        assert_eq!(
            istio(&[("istio.io/dataplane-mode", "ambient")], &p),
            Ok(Coverage::IstioAmbient)
        );
        let labelled = pod(Some("orders"), &[("sidecar.istio.io/inject", "true")]);
        assert_eq!(istio(&[], &labelled), Ok(Coverage::IstioSidecar));
    }

    #[test]
    fn default_service_account_is_denied_with_the_would_be_id() {
        for p in [pod(None, &[]), pod(Some("default"), &[])] {
            let d = istio(&[("istio-injection", "enabled")], &p).expect_err("default SA");
            assert_eq!(d.spiffe_id, "spiffe://cluster.local/ns/shop/sa/default");
            assert!(d.to_string().contains("serviceAccountName"), "{d}");
        }
    }

    #[test]
    fn uncovered_namespace_names_the_label_to_add() {
        let d = istio(&[], &pod(Some("orders"), &[])).expect_err("no mesh");
        assert_eq!(d.spiffe_id, "spiffe://cluster.local/ns/shop/sa/orders");
        assert!(d.to_string().contains("istio-injection=enabled"), "{d}");
        assert_eq!(d.missing.len(), 1);
    }

    #[test]
    fn opting_out_is_denied() {
        let p = pod(Some("orders"), &[("sidecar.istio.io/inject", "false")]);
        let d = istio(&[("istio-injection", "enabled")], &p).expect_err("opted out");
        assert!(d.to_string().contains("inject=false"), "{d}");
        let p = pod(Some("orders"), &[("istio.io/dataplane-mode", "none")]);
        assert!(istio(&[("istio.io/dataplane-mode", "ambient")], &p).is_err());
    }

    #[test]
    fn both_problems_are_reported_together() {
        let d = istio(&[], &pod(None, &[])).expect_err("two problems");
        assert_eq!(d.missing.len(), 2);
    }

    #[test]
    fn spire_registrations_select_by_pod_and_namespace() {
        let reg = SpireRegistration {
            name: "palisade-shop-orders-id".into(),
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels(&[("app", "orders")])),
                ..LabelSelector::default()
            }),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".into(),
                    operator: "In".into(),
                    values: Some(vec!["shop".into()]),
                }]),
                ..LabelSelector::default()
            }),
        };
        let ns = labels(&[("kubernetes.io/metadata.name", "shop")]);
        let yes = pod(Some("orders"), &[("app", "orders")]);
        let no = pod(Some("orders"), &[("app", "web")]);
        let spire = |p: &PodView| {
            check(
                IdentitySource::Spire,
                "td",
                "shop",
                &ns,
                p,
                std::slice::from_ref(&reg),
            )
        };
        assert_eq!(
            spire(&yes),
            Ok(Coverage::Spire("palisade-shop-orders-id".into()))
        );
        let d = spire(&no).expect_err("not selected");
        assert!(d.to_string().contains("ClusterSPIFFEID"), "{d}");
    }

    #[test]
    fn selector_operators() {
        let l = labels(&[("a", "1")]);
        let req = |op: &str, vals: &[&str]| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: op.into(),
                values: Some(vals.iter().map(|s| (*s).to_owned()).collect()),
            }]),
            ..LabelSelector::default()
        };
        assert!(selects(None, &l));
        assert!(selects(Some(&req("In", &["1", "2"])), &l));
        assert!(!selects(Some(&req("NotIn", &["1"])), &l));
        assert!(selects(Some(&req("Exists", &[])), &l));
        assert!(!selects(Some(&req("DoesNotExist", &[])), &l));
        assert!(!selects(Some(&req("Bogus", &[])), &l));
    }
}
