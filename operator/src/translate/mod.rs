//! Pure translation: a Palisade object and a [`Context`] in, the objects it should produce out.
//!
//! No client, no clock, no I/O: the controllers read their caches, call a translator, apply what
//! it returns and write status from its [`Note`]s. Output is deterministic — same input, same
//! bytes — because every object is a `serde_json::Value` whose maps are ordered by key and whose
//! lists follow the input's order.

pub mod auth;
pub mod ratelimit;
pub mod vault;

use palisade_api::rate_limit_policy::RateLimitBackend;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The label every generated object carries, naming the field manager that owns it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "palisade";
/// Label naming the kind of the Palisade object a generated object came from.
pub const OWNER_KIND_LABEL: &str = "palisade.dev/owner-kind";
/// Label naming the Palisade object a generated object came from.
pub const OWNER_NAME_LABEL: &str = "palisade.dev/owner-name";
/// Label naming the namespace of the owner, on cluster-scoped generated objects.
pub const OWNER_NAMESPACE_LABEL: &str = "palisade.dev/owner-namespace";

/// Cluster facts and operator settings a translation depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Context {
    /// The mesh trust domain (`cluster.local` by default in Istio).
    pub trust_domain: String,
    /// Who issues workload identities.
    pub identity_source: IdentitySource,
    /// Backend for RateLimitPolicies that do not name one.
    pub default_rate_limit_backend: RateLimitBackend,
    /// Envoy Gateway rate limit type: `Global` needs Envoy Gateway's rate-limit service.
    pub envoy_gateway_rate_limit: EnvoyGatewayRateLimit,
    /// The class of the SPIRE controller manager (`className` in its configuration): generated
    /// ClusterSPIFFEIDs carry it, so a controller manager configured with a class serves them.
    /// Empty: none (they are served only by one that watches classless ones).
    pub spire_class_name: String,
    /// The mesh's root namespace (`meshConfig.rootNamespace`): Istio applies policies there to
    /// every workload of the mesh.
    pub mesh_root_namespace: String,
    /// Whether AuthPolicies may live in the root namespace (and so apply mesh-wide).
    pub allow_root_namespace_policies: bool,
    /// How the mesh normalises request paths before authorization
    /// (`meshConfig.pathNormalization`).
    pub mesh_path_normalization: PathNormalization,
}

/// Istio's request path normalisation (`meshConfig.pathNormalization.normalization`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// RFC 3986 normalisation only (Istio's default): `//` and `%2F` stay as they are.
    #[default]
    Base,
    /// Also merges `//` into `/`.
    MergeSlashes,
    /// Also decodes `%2F`/`%5C` and merges slashes.
    DecodeAndMergeSlashes,
}

impl Default for Context {
    fn default() -> Self {
        Context {
            trust_domain: "cluster.local".into(),
            identity_source: IdentitySource::Istio,
            default_rate_limit_backend: RateLimitBackend::EnvoyGateway,
            envoy_gateway_rate_limit: EnvoyGatewayRateLimit::Global,
            spire_class_name: String::new(),
            mesh_root_namespace: "istio-system".into(),
            allow_root_namespace_policies: false,
            mesh_path_normalization: PathNormalization::Base,
        }
    }
}

/// Where workload identities come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdentitySource {
    /// Istio's CA issues `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` certificates.
    Istio,
    /// SPIRE issues them; Palisade also writes `ClusterSPIFFEID`s for the selected workloads.
    Spire,
}

/// Envoy Gateway rate limit flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnvoyGatewayRateLimit {
    /// Counters shared by every gateway replica (needs the rate-limit service).
    Global,
    /// Counters per gateway replica.
    Local,
}

/// Something the user should know about a translation: a hazard that was let through, or a part
/// of the spec the backend cannot express (which is then left out, never silently).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Note {
    /// Short CamelCase reason, used as the condition reason and the Event reason.
    pub reason: &'static str,
    /// What happened, where, and what to change.
    pub message: String,
    /// `Unsupported` notes mean part of the spec is not enforced.
    pub severity: Severity,
}

/// How serious a [`Note`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Severity {
    /// Enforced as written, but probably not what was meant.
    Warning,
    /// Not enforced: the backend cannot express it.
    Unsupported,
}

/// The result of a translation.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Desired {
    /// Objects to apply, in a stable order.
    pub objects: Vec<Value>,
    /// Hazards and unsupported parts.
    pub notes: Vec<Note>,
}

impl Desired {
    pub(crate) fn warn(&mut self, reason: &'static str, message: String) {
        self.notes.push(Note {
            reason,
            message,
            severity: Severity::Warning,
        });
    }

    pub(crate) fn unsupported(&mut self, reason: &'static str, message: String) {
        self.notes.push(Note {
            reason,
            message,
            severity: Severity::Unsupported,
        });
    }
}

/// The identity of the Palisade object being translated, for metadata of what it generates.
#[derive(Clone, Debug)]
pub struct Owner<'a> {
    /// `palisade.dev/v1alpha1`.
    pub api_version: &'a str,
    /// Kind, e.g. `AuthPolicy`.
    pub kind: &'a str,
    /// Name.
    pub name: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// UID, for owner references.
    pub uid: &'a str,
}

impl Owner<'_> {
    fn labels(&self) -> Map<String, Value> {
        let mut labels = Map::new();
        labels.insert(MANAGED_BY_LABEL.into(), json!(MANAGED_BY));
        labels.insert(OWNER_KIND_LABEL.into(), json!(self.kind));
        labels.insert(OWNER_NAME_LABEL.into(), json!(self.name));
        labels
    }

    /// A namespaced object owned (and garbage-collected with) the Palisade object.
    pub fn object(&self, api_version: &str, kind: &str, name: &str, spec: Value) -> Value {
        let mut object = json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": self.labels(),
                "ownerReferences": [{
                    "apiVersion": self.api_version,
                    "kind": self.kind,
                    "name": self.name,
                    "uid": self.uid,
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
        });
        with_body(&mut object, spec);
        object
    }

    /// A cluster-scoped object: it cannot carry a namespaced owner reference, so it is labelled
    /// with its owner and removed by the owner's finalizer.
    pub fn cluster_object(&self, api_version: &str, kind: &str, name: &str, spec: Value) -> Value {
        let mut labels = self.labels();
        labels.insert(OWNER_NAMESPACE_LABEL.into(), json!(self.namespace));
        let mut object = json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"name": name, "labels": labels},
        });
        with_body(&mut object, spec);
        object
    }
}

/// Sets `spec`, or for kinds without one (ConfigMap) merges the body's top-level fields.
fn with_body(object: &mut Value, body: Value) {
    let Value::Object(o) = object else { return };
    match body {
        Value::Object(fields) if fields.contains_key("data") => o.extend(fields),
        Value::Null => {}
        spec => {
            o.insert("spec".into(), spec);
        }
    }
}

/// Inserts `key: value` unless `value` is an empty array or object.
pub(crate) fn put(map: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Null => true,
        _ => false,
    };
    if !empty {
        map.insert(key.to_owned(), value);
    }
}
