//! `palisade who-can`: the effective authorization of one workload across every AuthPolicy that
//! applies to it, and, for a given caller and request, the decision — by the model the semantic
//! tests hold equal to what Istio decides for the generated objects (mutual TLS, then DENY, then
//! any ALLOW: Istio allows what any ALLOW policy on the workload allows).

use std::{collections::BTreeMap, sync::Arc};

use anyhow::Result;
use palisade_api::AuthPolicy;
use palisade_operator::{
    model::{self, Request},
    translate::{self, Note},
};
use serde::Serialize;
use serde_json::Value;

use crate::input::Object;

/// The workload and, optionally, one request to it.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// The workload's namespace.
    pub namespace: String,
    /// Its pod labels.
    pub labels: BTreeMap<String, String>,
    /// A request to decide.
    pub request: Option<Probe>,
}

/// One request to the workload, without a token.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    /// The caller's `(namespace, service account)`; `None`: plain text, no mesh identity.
    pub from: Option<(String, String)>,
    /// The destination port.
    pub port: u16,
    /// HTTP method and path; `None`: plain TCP.
    pub http: Option<(String, String)>,
}

/// What applies to the workload.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `namespace/name` of each AuthPolicy that applies, with what it says.
    pub policies: Vec<Applying>,
    /// AuthPolicies that name the workload's namespace but apply only through `targetRefs`
    /// (a waypoint or a gateway), not to the workload's own proxy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub through_target_refs: Vec<String>,
    /// Widening between the policies that apply (`WidenedBy`/`Widens`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<Note>,
    /// The decision on the query's request, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<bool>,
}

/// One AuthPolicy that applies.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Applying {
    /// `namespace/name`.
    pub name: String,
    /// Its `mtls`, `jwt`, `rules` and `deny`, as written.
    pub spec: Value,
}

/// The report for `query` over the AuthPolicies in `objects`.
pub fn who_can(
    objects: &[Object],
    query: &Query,
    trust_domain: &str,
    root_namespace: &str,
    default_ns: &str,
) -> Result<Report> {
    let mut all = Vec::new();
    for o in objects
        .iter()
        .filter(|o| o.group() == "palisade.dev" && o.kind() == "AuthPolicy")
    {
        let mut v = o.value.clone();
        v["metadata"]["namespace"] = Value::String(o.namespace(default_ns).to_owned());
        all.push(Arc::new(serde_json::from_value::<AuthPolicy>(v)?));
    }
    let mut applying = Vec::new();
    let mut through_target_refs = Vec::new();
    for p in &all {
        let ns = p.metadata.namespace.as_deref().unwrap_or_default();
        if ns != query.namespace && ns != root_namespace {
            continue;
        }
        let name = format!("{ns}/{}", p.metadata.name.as_deref().unwrap_or_default());
        if p.spec.target_refs.is_some() {
            through_target_refs.push(name);
            continue;
        }
        let selected = p.spec.selector.as_ref().is_none_or(|s| {
            s.match_labels
                .iter()
                .all(|(k, v)| query.labels.get(k) == Some(v))
        });
        if selected {
            applying.push(Arc::clone(p));
        }
    }
    let mut notes = Vec::new();
    for p in &applying {
        notes.extend(translate::auth::widenings(p, &applying, root_namespace));
    }
    let allowed = query.request.as_ref().map(|probe| {
        let req = Request {
            peer: probe.from.clone(),
            port: probe.port,
            http: probe.http.clone(),
            token: None,
        };
        let policies: Vec<AuthPolicy> = applying.iter().map(|p| (**p).clone()).collect();
        model::combined(&policies, trust_domain, &req)
    });
    let policies = applying
        .iter()
        .map(|p| Applying {
            name: format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            ),
            spec: serde_json::json!({
                "mtls": p.spec.mtls,
                "jwt": p.spec.jwt,
                "rules": p.spec.rules,
                "deny": p.spec.deny,
            }),
        })
        .collect();
    Ok(Report {
        policies,
        through_target_refs,
        notes,
        allowed,
    })
}
