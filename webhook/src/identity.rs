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
    /// Its `spec.className` (empty when unset).
    pub class_name: String,
    /// Why a selector did not parse: such a registration selects nothing (the controller
    /// manager would refuse it).
    pub invalid: Option<SelectorError>,
}

/// Why a ClusterSPIFFEID's selector does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// It is not a label selector at all.
    #[error("spec.{field} does not parse: {why}")]
    Shape {
        /// `podSelector` or `namespaceSelector`.
        field: String,
        /// The decoder's words.
        why: String,
    },
    /// An expression the API server would refuse.
    #[error("spec.{field} does not parse: {key} {operator} {problem}")]
    Expression {
        /// `podSelector` or `namespaceSelector`.
        field: String,
        /// The expression's key.
        key: String,
        /// Its operator.
        operator: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl SpireRegistration {
    /// A registration from a ClusterSPIFFEID as JSON.
    pub fn from_object(name: &str, object: &serde_json::Value) -> Self {
        let mut invalid = None;
        let mut selector = |key: &str| -> Option<LabelSelector> {
            let v = object.pointer(&format!("/spec/{key}"))?;
            if v.is_null() {
                return None;
            }
            match serde_json::from_value::<LabelSelector>(v.clone())
                .map_err(|e| SelectorError::Shape {
                    field: key.to_owned(),
                    why: e.to_string(),
                })
                .and_then(|s| valid_selector(key, &s).map(|()| s))
            {
                Ok(s) => Some(s),
                Err(e) => {
                    invalid = Some(e);
                    None
                }
            }
        };
        let pod_selector = selector("podSelector");
        let namespace_selector = selector("namespaceSelector");
        SpireRegistration {
            name: name.to_owned(),
            pod_selector,
            namespace_selector,
            class_name: object
                .pointer("/spec/className")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            invalid,
        }
    }

    /// Whether the SPIRE controller manager with `settings` serves this registration.
    pub fn served_by(&self, settings: &SpireSettings) -> bool {
        self.invalid.is_none()
            && (self.class_name == settings.class_name
                || (self.class_name.is_empty() && settings.watch_classless))
    }
}

/// How Istio is installed: whether ambient mode (ztunnel, istio-cni) is, and which images the
/// injected proxy runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioSettings {
    /// Whether the ambient mesh is installed, so that `istio.io/dataplane-mode=ambient` gives an
    /// identity.
    #[serde(default = "yes")]
    pub ambient: bool,
    /// Image globs of the injected proxy (`istio-proxy`); a container of that name running
    /// anything else, or with its command replaced, is no proxy.
    #[serde(default = "default_proxy_images")]
    pub proxy_images: Vec<palisade_api::glob::ImageGlob>,
}

fn yes() -> bool {
    true
}

fn default_proxy_images() -> Vec<palisade_api::glob::ImageGlob> {
    ["docker.io/istio/proxyv2", "gcr.io/istio-release/proxyv2"]
        .iter()
        .filter_map(|g| g.parse().ok())
        .collect()
}

impl Default for IstioSettings {
    fn default() -> Self {
        IstioSettings {
            ambient: true,
            proxy_images: default_proxy_images(),
        }
    }
}

/// Which ClusterSPIFFEIDs the cluster's SPIRE controller manager serves (its `className` and
/// `watchClassless` settings).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpireSettings {
    /// The controller manager's class (empty: none configured).
    #[serde(default)]
    pub class_name: String,
    /// Whether it also serves ClusterSPIFFEIDs without a class.
    #[serde(default)]
    pub watch_classless: bool,
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
    /// What is missing, each saying what to change.
    pub missing: Vec<IdentityGap>,
}

/// One reason a pod has no usable identity; its text says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityGap {
    /// It runs as the namespace's shared `default` ServiceAccount.
    #[error(
        "it runs as the namespace's `default` ServiceAccount, which every pod shares: set \
         spec.serviceAccountName to a ServiceAccount of its own"
    )]
    DefaultServiceAccount,
    /// A ClusterSPIFFEID selects it, but its class is not one the controller manager serves.
    #[error(
        "ClusterSPIFFEID {name} selects it, but its className {class:?} is not served by the \
         SPIRE controller manager (class {served:?}{}): set spec.className to {served:?}",
        if *.classless { ", and classless ones" } else { "" }
    )]
    SpireClassNotServed {
        /// The ClusterSPIFFEID.
        name: String,
        /// Its class.
        class: String,
        /// The class served.
        served: String,
        /// Whether classless ones are served too.
        classless: bool,
    },
    /// No ClusterSPIFFEID selects it.
    #[error(
        "no SPIRE ClusterSPIFFEID selects it (none of {count} matches its labels and namespace): \
         add an AuthPolicy selecting it, or a ClusterSPIFFEID{}",
        if .unparsable.is_empty() { String::new() } else {
            format!("; ignored because a selector does not parse: {}", .unparsable.join(", "))
        }
    )]
    NoSpireRegistration {
        /// ClusterSPIFFEIDs known.
        count: usize,
        /// Those ignored, with why (`name: reason`).
        unparsable: Vec<String>,
    },
    /// The namespace turns injection off.
    #[error(
        "namespace {0} is labelled istio-injection=disabled, so Istio injects no pod in it, whatever the pod's labels say"
    )]
    NamespaceInjectionDisabled(String),
    /// The pod's label turns injection off.
    #[error("its label {INJECT}=false turns the Istio sidecar off: remove it")]
    PodLabelInjectionOff,
    /// Neither the namespace nor the pod asks for the mesh.
    #[error(
        "namespace {0} has neither istio-injection=enabled, an istio.io/rev label nor \
         istio.io/dataplane-mode=ambient, and the pod is not labelled {INJECT}=true: label the \
         namespace (kubectl label namespace {0} istio-injection=enabled, or \
         istio.io/dataplane-mode=ambient)"
    )]
    NotEnrolled(String),
    /// Host-network pods get no sidecar.
    #[error(
        "it uses hostNetwork: true, and Istio never injects a sidecar into host-network pods: remove hostNetwork"
    )]
    HostNetworkSidecar,
    /// Istio never injects pods in this namespace.
    #[error("Istio never injects pods in {0}")]
    NeverInjected(String),
    /// The label or annotation turns injection off.
    #[error("its {INJECT}: {0:?} turns the Istio sidecar off: remove it")]
    InjectionOff(String),
    /// Neither the namespace nor the pod is in the ambient mesh.
    #[error("not in the ambient mesh")]
    NotAmbient,
    /// The pod opts out of the ambient mesh.
    #[error("its label {DATAPLANE_MODE}=none takes it out of the ambient mesh: remove it")]
    AmbientOptOut,
    /// Host-network pods are not captured by ambient.
    #[error("it uses hostNetwork: true, which the ambient mesh cannot capture: remove hostNetwork")]
    HostNetworkAmbient,
    /// Injection rules select it, but the proxy is not there.
    #[error(
        "Istio's injection rules select it, but it has no istio-proxy container from the proxy \
         images ({0}) run as `proxy sidecar`, and no {SIDECAR_STATUS} annotation: the sidecar \
         injector did not run (is istiod up, and its webhook registered?)"
    )]
    NoProxy(String),
}

impl std::fmt::Display for IdentityDenial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod would run as {} but has no workload identity: {}",
            self.spiffe_id,
            self.missing
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    }
}

/// Decides whether the pod in `namespace` (whose labels are `namespace_labels`) has a workload
/// identity under `source`. A Pod is judged as admitted, after Istio's injection: a sidecar
/// counts only when the proxy is really there; a pod template is judged by Istio's own
/// injection rules.
pub fn check(
    source: IdentitySource,
    trust_domain: &str,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    pod: &PodView,
    spire: &[SpireRegistration],
    settings: (&IstioSettings, &SpireSettings),
) -> Result<Coverage, IdentityDenial> {
    let (istio_settings, spire_settings) = settings;
    let sa = pod.service_account();
    let spiffe_id = SpiffeId::for_service_account(trust_domain, namespace, sa).map_or_else(
        |_| format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}"),
        |id| id.to_string(),
    );
    let mut missing = Vec::new();
    if sa == "default" {
        missing.push(IdentityGap::DefaultServiceAccount);
    }
    let coverage = match source {
        IdentitySource::Istio => istio_coverage(namespace, namespace_labels, pod, istio_settings),
        IdentitySource::Spire => spire_coverage(namespace_labels, pod, spire, spire_settings),
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

fn spire_coverage(
    namespace_labels: &BTreeMap<String, String>,
    pod: &PodView,
    spire: &[SpireRegistration],
    settings: &SpireSettings,
) -> Result<Coverage, IdentityGap> {
    let selecting: Vec<&SpireRegistration> = spire
        .iter()
        .filter(|r| {
            r.invalid.is_none()
                && selects(r.namespace_selector.as_ref(), namespace_labels)
                && selects(r.pod_selector.as_ref(), &pod.labels)
        })
        .collect();
    if let Some(r) = selecting.iter().find(|r| r.served_by(settings)) {
        return Ok(Coverage::Spire(r.name.clone()));
    }
    if let Some(r) = selecting.first() {
        return Err(IdentityGap::SpireClassNotServed {
            name: r.name.clone(),
            class: r.class_name.clone(),
            served: settings.class_name.clone(),
            classless: settings.watch_classless,
        });
    }
    Err(IdentityGap::NoSpireRegistration {
        count: spire.len(),
        unparsable: spire
            .iter()
            .filter_map(|r| r.invalid.as_ref().map(|why| format!("{}: {why}", r.name)))
            .collect(),
    })
}

fn get<'a>(m: &'a BTreeMap<String, String>, k: &str) -> Option<&'a str> {
    m.get(k).map(String::as_str)
}

/// The label and annotation Istio reads to opt a pod in or out of injection.
const INJECT: &str = "sidecar.istio.io/inject";
/// The annotation the injector writes on a pod it injected.
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// The pod annotations the identity check reads (with the pod's labels).
pub const IDENTITY_ANNOTATIONS: &[&str] = &[INJECT, SIDECAR_STATUS];
/// The dataplane-mode label (ambient enrolment), on namespaces and pods.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Namespaces Istio never injects into.
const NEVER_INJECTED: &[&str] = &["kube-system", "kube-public"];

/// Whether Istio's sidecar injector would inject a pod with `pod`'s labels, annotations and
/// network mode in a namespace with `ns_labels`: the injector's webhook selectors (the
/// namespace's `istio-injection` / `istio.io/rev` labels, or the pod's own
/// `sidecar.istio.io/inject=true` / `istio.io/rev` label where the namespace has neither), then
/// its own rules (never host-network pods or system namespaces; the pod's label, else its
/// annotation, decides: `y`, `yes`, `true`, `on` inject, an empty value follows the default
/// policy, anything else does not). `Err` says why not.
fn istio_injects(
    namespace: &str,
    ns_labels: &BTreeMap<String, String>,
    pod: &PodView,
) -> Result<(), IdentityGap> {
    let ns_inject = get(ns_labels, "istio-injection");
    let ns_rev = ns_labels.contains_key("istio.io/rev");
    let pod_label = get(&pod.labels, INJECT);
    let selected = match ns_inject {
        Some("enabled") => pod_label != Some("false"),
        Some(_) => false,
        None if ns_rev => pod_label != Some("false"),
        None => pod_label == Some("true") || pod.labels.contains_key("istio.io/rev"),
    };
    if !selected {
        return Err(if ns_inject == Some("disabled") {
            IdentityGap::NamespaceInjectionDisabled(namespace.to_owned())
        } else if pod_label == Some("false") {
            IdentityGap::PodLabelInjectionOff
        } else {
            IdentityGap::NotEnrolled(namespace.to_owned())
        });
    }
    if pod.spec.host_network == Some(true) {
        return Err(IdentityGap::HostNetworkSidecar);
    }
    if NEVER_INJECTED.contains(&namespace) {
        return Err(IdentityGap::NeverInjected(namespace.to_owned()));
    }
    let decided = pod_label.or_else(|| get(&pod.annotations, INJECT));
    match decided.map(str::to_ascii_lowercase).as_deref() {
        None | Some("" | "y" | "yes" | "true" | "on") => Ok(()),
        Some(other) => Err(IdentityGap::InjectionOff(other.to_owned())),
    }
}

/// Whether the pod really carries Istio's proxy: a container `istio-proxy` (or a native
/// sidecar of that name, an init container that keeps running) from one of the proxy images,
/// run as the injector runs it (its command not replaced, its arguments `proxy sidecar …`).
fn has_proxy(pod: &PodView, settings: &IstioSettings) -> bool {
    // Istio's injection template runs the image's own entrypoint with `proxy sidecar …`.
    let genuine =
        |image: Option<&str>, command: Option<&Vec<String>>, args: Option<&Vec<String>>| {
            command.is_none_or(Vec::is_empty)
                && args.is_some_and(|a| injector_args(a))
                && image
                    .and_then(|i| crate::images::reference::parse(i).ok())
                    .is_some_and(|r| {
                        settings
                            .proxy_images
                            .iter()
                            .any(|g| crate::images::reference::glob_covers(g, &r.repository))
                    })
        };
    pod.spec.containers.iter().any(|c| {
        c.name == "istio-proxy" && genuine(c.image.as_deref(), c.command.as_ref(), c.args.as_ref())
    }) || pod.spec.init_containers.iter().flatten().any(|c| {
        c.name == "istio-proxy"
            && c.restart_policy.as_deref() == Some("Always")
            && genuine(c.image.as_deref(), c.command.as_ref(), c.args.as_ref())
    })
}

/// What a flag's value must look like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagValue {
    /// Words (a domain, log levels): any value not starting with `-`.
    Text,
    /// A number (`pilot-agent` exits on anything else).
    Number,
    /// A boolean flag: bare, or `=true`/`=false`.
    Bool,
}

/// Flags of `pilot-agent proxy` that Istio's injection templates write, and their values.
/// Flags that redirect the agent elsewhere (`templateFile`, `tokenManagerPlugin`) are left out.
const PROXY_FLAGS: &[(&str, FlagValue)] = &[
    ("domain", FlagValue::Text),
    ("proxyLogLevel", FlagValue::Text),
    ("proxyComponentLogLevel", FlagValue::Text),
    ("log_output_level", FlagValue::Text),
    ("log_as_json", FlagValue::Bool),
    ("log_caller", FlagValue::Text),
    ("log_stacktrace_level", FlagValue::Text),
    ("log_target", FlagValue::Text),
    ("stsPort", FlagValue::Number),
    ("outlierLogPath", FlagValue::Text),
    ("concurrency", FlagValue::Number),
    ("serviceCluster", FlagValue::Text),
];

/// Whether `args` are the proxy's as the injector writes them: `proxy sidecar` and then only
/// flags the injection templates use (with their values). Anything else — `--help`,
/// `version`, an unknown flag — makes the agent print and exit, leaving the pod without a
/// proxy, so it is not one.
fn injector_args(args: &[String]) -> bool {
    let [first, second, rest @ ..] = args else {
        return false;
    };
    if first != "proxy" || second != "sidecar" {
        return false;
    }
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            return false;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (flag, None),
        };
        let Some((_, kind)) = PROXY_FLAGS.iter().find(|(n, _)| *n == name) else {
            return false;
        };
        let value = match (kind, inline) {
            (FlagValue::Bool, v) => v.unwrap_or("true"),
            (_, Some(v)) => v,
            (_, None) => match rest.next() {
                Some(v) => v.as_str(),
                None => return false,
            },
        };
        let ok = match kind {
            FlagValue::Text => !value.is_empty() && !value.starts_with('-'),
            FlagValue::Number => !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()),
            FlagValue::Bool => matches!(value, "true" | "false"),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether any container is named `istio-proxy` (genuine or not): such a pod is not captured
/// by ambient.
fn names_proxy(pod: &PodView) -> bool {
    pod.spec.containers.iter().any(|c| c.name == "istio-proxy")
        || pod
            .spec
            .init_containers
            .iter()
            .flatten()
            .any(|c| c.name == "istio-proxy")
}

/// Whether Istio's ambient mesh captures the pod: the namespace or the pod is labelled
/// `istio.io/dataplane-mode=ambient`, the pod does not opt out with `none`, has no sidecar
/// and does not use the host's network.
fn istio_ambient(ns_labels: &BTreeMap<String, String>, pod: &PodView) -> Result<(), IdentityGap> {
    let pod_mode = get(&pod.labels, DATAPLANE_MODE);
    let ns_mode = get(ns_labels, DATAPLANE_MODE);
    if pod_mode != Some("ambient") && ns_mode != Some("ambient") {
        return Err(IdentityGap::NotAmbient);
    }
    if pod_mode == Some("none") {
        return Err(IdentityGap::AmbientOptOut);
    }
    if pod.spec.host_network == Some(true) {
        return Err(IdentityGap::HostNetworkAmbient);
    }
    Ok(())
}

fn istio_coverage(
    namespace: &str,
    ns_labels: &BTreeMap<String, String>,
    pod: &PodView,
    settings: &IstioSettings,
) -> Result<Coverage, IdentityGap> {
    let is_pod = pod.kind == "Pod";
    // A pod with a sidecar (or the injector's mark) is never captured by ambient as well.
    let sidecar_marked = names_proxy(pod) || pod.annotations.contains_key(SIDECAR_STATUS);
    if !sidecar_marked && settings.ambient {
        match istio_ambient(ns_labels, pod) {
            Ok(()) => return Ok(Coverage::IstioAmbient),
            Err(IdentityGap::NotAmbient) => {}
            Err(why) => return Err(why),
        }
    }
    istio_injects(namespace, ns_labels, pod)?;
    if is_pod && !(has_proxy(pod, settings) && pod.annotations.contains_key(SIDECAR_STATUS)) {
        return Err(IdentityGap::NoProxy(
            settings
                .proxy_images
                .iter()
                .map(palisade_api::glob::ImageGlob::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    Ok(Coverage::IstioSidecar)
}

/// Whether a label selector is one the API server would accept: `In`/`NotIn` with values,
/// `Exists`/`DoesNotExist` without, no other operator.
fn valid_selector(field: &str, s: &LabelSelector) -> Result<(), SelectorError> {
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let problem = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => "needs values",
            "Exists" | "DoesNotExist" if !values.is_empty() => "takes no values",
            "In" | "NotIn" | "Exists" | "DoesNotExist" => continue,
            _ => "is not an operator",
        };
        return Err(SelectorError::Expression {
            field: field.to_owned(),
            key: e.key.clone(),
            operator: e.operator.clone(),
            problem,
        });
    }
    Ok(())
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

    /// A Pod as the validating hook sees it after injection (with Istio's proxy).
    fn pod(sa: Option<&str>, pod_labels: &[(&str, &str)]) -> PodView {
        view(
            sa,
            pod_labels,
            json!({"containers": [{"name": "app", "image": "r/app:1"},
                                  {"name": "istio-proxy", "image": "istio/proxyv2:1.31.0", "args": ["proxy", "sidecar"]}]}),
        )
    }

    /// A Pod view; one with an `istio-proxy` carries the injector's status annotation.
    fn view(sa: Option<&str>, pod_labels: &[(&str, &str)], mut spec: serde_json::Value) -> PodView {
        if let Some(sa) = sa {
            spec["serviceAccountName"] = json!(sa);
        }
        let annotations = if spec.to_string().contains("istio-proxy") {
            json!({SIDECAR_STATUS: "{}"})
        } else {
            json!({})
        };
        pod_of(
            "Pod",
            &json!({"metadata": {"labels": labels(pod_labels), "annotations": annotations}, "spec": spec}),
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
            (&IstioSettings::default(), &SpireSettings::default()),
        )
    }

    #[test]
    fn a_sidecar_counts_only_when_istio_would_inject_and_the_proxy_is_there() {
        let injected = [("istio-injection", "enabled")];
        // Selected by the namespace, but the injector never ran: no proxy, no identity.
        let bare = view(
            Some("orders"),
            &[],
            json!({"containers": [{"name": "app", "image": "r/a:1"}]}),
        );
        let d = istio(&injected, &bare).expect_err("no proxy");
        assert!(d.to_string().contains("no istio-proxy container"), "{d}");
        // A native sidecar counts; an init container that exits does not.
        let native = view(
            Some("orders"),
            &[],
            json!({"containers": [{"name": "app", "image": "r/a:1"}],
            "initContainers": [{"name": "istio-proxy", "image": "istio/proxyv2:1.31.0", "args": ["proxy", "sidecar"], "restartPolicy": "Always"}]}),
        );
        assert_eq!(istio(&injected, &native), Ok(Coverage::IstioSidecar));
        let init = view(
            Some("orders"),
            &[],
            json!({"containers": [{"name": "app", "image": "r/a:1"}],
            "initContainers": [{"name": "istio-proxy", "image": "istio/proxyv2:1.31.0", "args": ["proxy", "sidecar"]}]}),
        );
        assert!(istio(&injected, &init).is_err());
        // Istio never injects host-network pods, whatever the labels say.
        let host = view(
            Some("orders"),
            &[],
            json!({"hostNetwork": true,
            "containers": [{"name": "app", "image": "r/a:1"}, {"name": "istio-proxy", "image": "istio/proxyv2:1.31.0", "args": ["proxy", "sidecar"]}]}),
        );
        assert!(
            istio(&injected, &host)
                .expect_err("host network")
                .to_string()
                .contains("hostNetwork")
        );
        // The annotation opts out too (the label wins when both are set).
        let mut annotated = pod(Some("orders"), &[]);
        annotated.annotations.insert(INJECT.into(), "false".into());
        assert!(istio(&injected, &annotated).is_err());
        annotated.labels.insert(INJECT.into(), "true".into());
        assert_eq!(istio(&injected, &annotated), Ok(Coverage::IstioSidecar));
        // A namespace labelled disabled is never injected, even for a pod asking for it.
        let asking = pod(Some("orders"), &[(INJECT, "true")]);
        let d = istio(&[("istio-injection", "disabled")], &asking).expect_err("disabled");
        assert!(d.to_string().contains("istio-injection=disabled"), "{d}");
        // Templates are judged by the rules alone: their pods are checked after injection.
        let template = pod_of("Deployment", &json!({"spec": {"template": {"metadata": {},
            "spec": {"serviceAccountName": "orders", "containers": [{"name": "app", "image": "r/a:1"}]}}}}))
            .expect("valid").expect("template");
        assert_eq!(istio(&injected, &template), Ok(Coverage::IstioSidecar));
        assert!(istio(&[], &template).is_err());
    }

    #[test]
    fn a_container_named_istio_proxy_is_not_a_proxy() {
        let injected = [("istio-injection", "enabled")];
        let fake = |image: &str, command: serde_json::Value| {
            let mut proxy =
                json!({"name": "istio-proxy", "image": image, "args": ["proxy", "sidecar"]});
            if !command.is_null() {
                proxy["command"] = command;
            }
            view(
                Some("orders"),
                &[],
                json!({"containers": [{"name": "app", "image": "r/a:1"}, proxy]}),
            )
        };
        assert!(istio(&injected, &fake("r.example/fake-proxy:1", json!(null))).is_err());
        assert!(
            istio(
                &injected,
                &fake("istio/proxyv2:1.31.0", json!(["sleep", "infinity"]))
            )
            .is_err()
        );
        assert_eq!(
            istio(
                &injected,
                &fake("gcr.io/istio-release/proxyv2:1.31.0", json!(null))
            ),
            Ok(Coverage::IstioSidecar)
        );
        // The injector's status annotation is part of a real injection.
        let mut unmarked = fake("istio/proxyv2:1.31.0", json!(null));
        unmarked.annotations.clear();
        assert!(istio(&injected, &unmarked).is_err());
        // Without ambient installed, its label gives no identity.
        let plain = view(
            Some("orders"),
            &[("istio.io/dataplane-mode", "ambient")],
            json!({"containers": [{"name": "app", "image": "r/a:1"}]}),
        );
        let no_ambient = IstioSettings {
            ambient: false,
            ..IstioSettings::default()
        };
        let got = check(
            IdentitySource::Istio,
            "cluster.local",
            "shop",
            &BTreeMap::new(),
            &plain,
            &[],
            (&no_ambient, &SpireSettings::default()),
        );
        assert!(got.is_err());
    }

    #[test]
    fn ambient_enrolment_follows_istio() {
        let app = json!({"containers": [{"name": "app", "image": "r/a:1"}]});
        let ambient = [("istio.io/dataplane-mode", "ambient")];
        assert_eq!(
            istio(&ambient, &view(Some("o"), &[], app.clone())),
            Ok(Coverage::IstioAmbient)
        );
        // The pod's own label enrols it in a namespace that is not ambient.
        let labelled = view(
            Some("o"),
            &[("istio.io/dataplane-mode", "ambient")],
            app.clone(),
        );
        assert_eq!(istio(&[], &labelled), Ok(Coverage::IstioAmbient));
        let mut host = app.clone();
        host["hostNetwork"] = json!(true);
        assert!(istio(&ambient, &view(Some("o"), &[], host)).is_err());
        let out = view(Some("o"), &[("istio.io/dataplane-mode", "none")], app);
        assert!(istio(&ambient, &out).is_err());
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
        // With a sidecar, ambient does not capture the pod; without one it does.
        assert!(istio(&[("istio.io/dataplane-mode", "ambient")], &p).is_err());
        let plain = view(
            Some("orders"),
            &[],
            json!({"containers": [{"name": "app", "image": "r/a:1"}]}),
        );
        assert_eq!(
            istio(&[("istio.io/dataplane-mode", "ambient")], &plain),
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
            ..SpireRegistration::default()
        };
        let ns = labels(&[("kubernetes.io/metadata.name", "shop")]);
        let yes = pod(Some("orders"), &[("app", "orders")]);
        let no = pod(Some("orders"), &[("app", "web")]);
        let spire = |p: &PodView, reg: &SpireRegistration, settings: &SpireSettings| {
            check(
                IdentitySource::Spire,
                "td",
                "shop",
                &ns,
                p,
                std::slice::from_ref(reg),
                (&IstioSettings::default(), settings),
            )
        };
        let none = SpireSettings::default();
        assert_eq!(
            spire(&yes, &reg, &none),
            Ok(Coverage::Spire("palisade-shop-orders-id".into()))
        );
        let d = spire(&no, &reg, &none).expect_err("not selected");
        assert!(d.to_string().contains("ClusterSPIFFEID"), "{d}");
        // A registration of another class is not served: no identity.
        let classed = SpireSettings {
            class_name: "prod".into(),
            watch_classless: false,
        };
        let d = spire(&yes, &reg, &classed).expect_err("classless, not served");
        assert!(d.to_string().contains("className"), "{d}");
        let watching = SpireSettings {
            class_name: "prod".into(),
            watch_classless: true,
        };
        assert!(spire(&yes, &reg, &watching).is_ok());
        let mut other = reg.clone();
        other.class_name = "dev".into();
        assert!(spire(&yes, &other, &classed).is_err());
        // A selector that does not parse selects nothing (never everything).
        let broken = SpireRegistration::from_object(
            "broken",
            &json!({"spec": {"podSelector": {"matchLabels": "app=orders"}}}),
        );
        assert!(broken.invalid.is_some());
        let d = spire(&yes, &broken, &none).expect_err("unparsable selector");
        assert!(d.to_string().contains("does not parse"), "{d}");
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
