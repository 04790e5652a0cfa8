//! The cached form of a generated object: metadata, plus its `spec` (or a ConfigMap's `data`)
//! kept as compact JSON text rather than a tree of values, so thousands of cached Istio and
//! Envoy Gateway objects cost little memory. It is parsed only when its policy is reconciled.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, api::ApiResource, core::DynamicResourceScope};
use serde::{Deserialize, Serialize};
use serde_json::{Value, value::RawValue};

/// A generated object as cached by the operator.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct GeneratedObject {
    /// Metadata (managed fields dropped).
    pub metadata: ObjectMeta,
    /// `spec`, as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Box<RawValue>>,
    /// `data` (ConfigMaps), as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// `status`, as JSON text: what the enforcer's controller says of the object (Envoy
    /// Gateway's `ancestors`); never compared with anything Palisade wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<RawValue>>,
}

impl GeneratedObject {
    /// The object as a JSON value comparable with a desired object.
    pub fn to_value(&self, resource: &ApiResource) -> Result<Value, serde_json::Error> {
        let mut v = serde_json::json!({
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": serde_json::to_value(&self.metadata)?,
        });
        for (key, raw) in [("spec", &self.spec), ("data", &self.data)] {
            if let (Some(raw), Value::Object(map)) = (raw, &mut v) {
                map.insert(key.into(), serde_json::from_str(raw.get())?);
            }
        }
        Ok(v)
    }
}

impl Resource for GeneratedObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }

    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }

    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }

    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use kube::api::GroupVersionKind;

    use super::*;

    #[test]
    fn round_trips_to_a_comparable_value() {
        let obj: GeneratedObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"action": "ALLOW", "rules": [{}]},
        }))
        .expect("parses");
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "security.istio.io",
            "v1",
            "AuthorizationPolicy",
        ));
        let v = obj.to_value(&ar).expect("value");
        assert_eq!(v["spec"]["action"], "ALLOW");
        assert_eq!(v["apiVersion"], "security.istio.io/v1");
        assert_eq!(v["kind"], "AuthorizationPolicy");
        assert_eq!(v["metadata"]["name"], "p");
    }
}
