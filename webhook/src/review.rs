//! Reading an AdmissionReview into `kube`'s [`AdmissionRequest`], field for field as
//! `kube`'s own `AdmissionReview<DynamicObject>` reads it, without serde's `flatten`.
//!
//! `DynamicObject` flattens its type fields and its data, and serde reads a flattened struct by
//! first copying every key it does not know (the whole `spec` and `status`) into a buffer of its
//! own, then reading the object again from that buffer. Here the object's keys go straight into
//! its data: one pass, the same result. `review::tests::reads_as_kube_reads` (a property test)
//! holds the two readers to the same request, or the same refusal, on generated reviews (objects
//! with keys in any order, repeated, of any shape); the one deliberate difference is the refusal
//! of serde_json's raw-value key (see [`parse`]).

use k8s_openapi::{api::authentication::v1::UserInfo, apimachinery::pkg::runtime::RawExtension};
use kube::core::{
    DynamicObject, GroupVersionKind, GroupVersionResource, ObjectMeta, TypeMeta,
    admission::{AdmissionRequest, AdmissionResponse, Operation},
};
use serde::{Deserialize, de};
use serde_json::Value;

/// An AdmissionReview as `kube` reads it: its type fields required (flattened as `kube` has
/// them, so a review is an object, and keys it does not know are read whole and refused when
/// malformed, as `kube` refuses them), its request optional and read directly. A `response`
/// (which the API server never sends to a webhook) is read and checked, not kept.
#[derive(Deserialize)]
struct Review {
    #[serde(flatten)]
    types: TypeMeta,
    request: Option<RequestFields>,
    #[serde(default, rename = "response")]
    _response: Option<AdmissionResponse>,
}

/// The key with which `serde_json` (its `raw_value` feature, which the workspace enables) reads a
/// map as the JSON text held in its value: a map whose first key is this one is read as that
/// text, whatever else it holds. No Kubernetes object needs it, and a review carrying it would
/// be judged on other content than the API server stores, so such a review is refused whole.
/// `serde_json` compares a key after reading its escapes, but the API server's encoder writes
/// `$`, `:` and letters as they are, so the byte string finds the key in every review it sends for
/// the kinds the webhook is registered for: none of them has a field whose JSON the API server
/// passes on as it was written (`managedFields` it rebuilds, keeping only its own key forms). A
/// kind with such a field (a `RawExtension`, a CRD's unvalidated JSON) needs this looked at again.
/// The string anywhere is refused, a value too: a pod holding it cannot be created or updated.
const RAW_VALUE_KEY: &[u8] = b"$serde_json::private::RawValue";

/// `kube`'s `AdmissionRequest`, its fields with the same names, types and defaults.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestFields {
    uid: String,
    kind: GroupVersionKind,
    resource: GroupVersionResource,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    request_kind: Option<GroupVersionKind>,
    #[serde(default)]
    request_resource: Option<GroupVersionResource>,
    #[serde(default)]
    request_sub_resource: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    operation: Operation,
    user_info: UserInfo,
    object: Option<Object>,
    old_object: Option<Object>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    options: Option<RawExtension>,
}

/// A `DynamicObject` read in one pass: `metadata` as `ObjectMeta` (at most once), `apiVersion`
/// and `kind` as its type fields (see [`TypeFields`]), every other key into its data.
struct Object(DynamicObject);

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectVisitor)
    }
}

struct ObjectVisitor;

impl<'de> de::Visitor<'de> for ObjectVisitor {
    type Value = Object;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
        let mut metadata: Option<ObjectMeta> = None;
        let mut types = TypeFields::default();
        let mut data = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "metadata" {
                if metadata.is_some() {
                    return Err(de::Error::duplicate_field("metadata"));
                }
                metadata = Some(map.next_value()?);
                continue;
            }
            let value: Value = map.next_value()?;
            if let Some((key, value)) = types.take(key, value) {
                data.insert(key, value);
            }
        }
        Ok(Object(DynamicObject {
            types: types.finish(),
            metadata: metadata.unwrap_or_default(),
            data: Value::Object(data),
        }))
    }
}

/// The type fields of an object, read as serde reads a flattened `Option<TypeMeta>`: in the
/// object's order, each `apiVersion` and `kind` is taken out of the data until one is not a
/// string or comes twice; that one is taken too and the type fields are `None`, and the ones
/// after it stay in the data.
#[derive(Default)]
struct TypeFields {
    api_version: Option<String>,
    kind: Option<String>,
    failed: bool,
}

impl TypeFields {
    /// Takes `key` if it is a type field still read; otherwise gives it back, for the data.
    fn take(&mut self, key: String, value: Value) -> Option<(String, Value)> {
        let slot = match key.as_str() {
            "apiVersion" => &mut self.api_version,
            "kind" => &mut self.kind,
            _ => return Some((key, value)),
        };
        if self.failed {
            return Some((key, value));
        }
        match value {
            Value::String(v) if slot.is_none() => *slot = Some(v),
            _ => self.failed = true,
        }
        None
    }

    fn finish(self) -> Option<TypeMeta> {
        match (self.failed, self.api_version, self.kind) {
            (false, Some(api_version), Some(kind)) => Some(TypeMeta { api_version, kind }),
            _ => None,
        }
    }
}

/// Reads `body` as an AdmissionReview and returns its request, as `kube` would (its type fields
/// copied into the request's); an error names what is wrong.
pub fn parse(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    if memchr::memmem::find(body, RAW_VALUE_KEY).is_some() {
        return Err(format!(
            "not an AdmissionReview this webhook reads: the key {} is refused anywhere in a review",
            String::from_utf8_lossy(RAW_VALUE_KEY)
        ));
    }
    let review: Review =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let Some(r) = review.request else {
        return Err("AdmissionReview without a usable request: it has no request".to_owned());
    };
    Ok(AdmissionRequest {
        types: review.types,
        uid: r.uid,
        kind: r.kind,
        resource: r.resource,
        sub_resource: r.sub_resource,
        request_kind: r.request_kind,
        request_resource: r.request_resource,
        request_sub_resource: r.request_sub_resource,
        name: r.name,
        namespace: r.namespace,
        operation: r.operation,
        user_info: r.user_info,
        object: r.object.map(|o| o.0),
        old_object: r.old_object.map(|o| o.0),
        dry_run: r.dry_run,
        options: r.options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::admission::AdmissionReview;
    use proptest::prelude::*;
    use serde_json::json;

    /// `kube`'s reading of `body`: the request, or that it refused.
    fn kube_reads(body: &[u8]) -> Option<AdmissionRequest<DynamicObject>> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).ok()?;
        review.try_into().ok()
    }

    /// The whole of a request, its type fields included (`types` is not serialized).
    fn whole(req: &AdmissionRequest<DynamicObject>) -> Value {
        json!({"types": req.types, "request": req, "objectTypes": [
            req.object.as_ref().map(|o| &o.types),
            req.old_object.as_ref().map(|o| &o.types),
        ]})
    }

    fn same(body: &str) {
        let kube = kube_reads(body.as_bytes());
        let ours = parse(body.as_bytes());
        match (&kube, &ours) {
            (Some(k), Ok(o)) => assert_eq!(whole(k), whole(o), "{body}"),
            (None, Err(_)) => {}
            _ => panic!(
                "kube {}, this reader {} for {body}",
                if kube.is_some() { "reads" } else { "refuses" },
                if ours.is_ok() { "reads" } else { "refuses" }
            ),
        }
    }

    fn review(object: &str) -> String {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","kind":{{"group":"","version":"v1","kind":"Pod"}},"resource":{{"group":"","version":"v1","resource":"pods"}},"operation":"CREATE","userInfo":{{"username":"a"}},"object":{object}}}}}"#
        )
    }

    #[test]
    fn edge_cases_read_as_kube_reads() {
        for object in [
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[]}}"#,
            r#"{"kind":"Pod","spec":{}}"#,
            r#"{"apiVersion":"v1","spec":{}}"#,
            r#"{"apiVersion":5,"kind":"Pod"}"#,
            r#"{"apiVersion":"v1","kind":"Pod","apiVersion":"v2"}"#,
            r#"{"apiVersion":"v1","apiVersion":"v2","kind":"Pod"}"#,
            r#"{"kind":5,"apiVersion":"v1","spec":{}}"#,
            r#"{"kind":"Pod","apiVersion":null,"x":1}"#,
            r#"{"metadata":{"name":"a"},"metadata":{"name":"b"}}"#,
            r#"{"spec":{"a":1},"spec":{"b":2}}"#,
            r#"{"metadata":null}"#,
            r#"{"metadata":5}"#,
            "{}",
            "null",
            "5",
            "[]",
            r#""pod""#,
        ] {
            same(&review(object));
        }
        for body in [
            r#"{"kind":"AdmissionReview"}"#,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":null}"#,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#,
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"u","allowed":true}}"#,
            "[]",
            "",
        ] {
            same(body);
        }
        // Not an object; keys the review does not know, malformed (kube reads them whole).
        for extra in [
            r#""x":1e400"#,
            r#""x":"\ud800""#,
            &format!(r#""x":{}1{}"#, "[".repeat(200), "]".repeat(200)),
        ] {
            let body = review(r#"{"spec":{}}"#);
            same(&format!("{{{extra},{}", &body[1..]));
        }
        same(
            r#"["admission.k8s.io/v1","AdmissionReview",{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","userInfo":{"username":"a"},"object":{}}]"#,
        );
        // A response beside the request: read (and refused when malformed), never kept.
        let with_request = review(r#"{"spec":{}}"#);
        let without_end = &with_request[..with_request.len() - 1];
        for response in [r#"{"uid":"u","allowed":true}"#, "5", r#"{"allowed":"yes"}"#] {
            same(&format!(r#"{without_end},"response":{response}}}"#));
        }
    }

    /// `serde_json` reads a map whose first key is its raw-value key as the JSON text in its
    /// value: a pod would be judged on a volume's attributes, or a spec, of the attacker's
    /// choosing rather than the ones stored. Wherever the key is, the review is refused.
    #[test]
    fn the_raw_value_key_is_refused_anywhere() {
        let token = "$serde_json::private::RawValue";
        for object in [
            format!(
                r#"{{"apiVersion":"v1","kind":"Pod","{token}":"{{\"spec\":{{}}}}","spec":{{"containers":[{{"name":"c","image":"evil"}}]}}}}"#
            ),
            format!(
                r#"{{"spec":{{"volumes":[{{"name":"v","csi":{{"driver":"d","volumeAttributes":{{"{token}":"{{}}"}}}}}}]}}}}"#
            ),
            format!(r#"{{"metadata":{{"annotations":{{"{token}":"5"}}}}}}"#),
        ] {
            let body = review(&object);
            assert!(
                serde_json::from_str::<Value>(&body).is_ok(),
                "valid JSON: {body}"
            );
            let refused = parse(body.as_bytes()).expect_err("a review with the raw-value key");
            assert!(refused.contains(token), "{refused}");
        }
        // What kube's reader makes of the first: the spec of the string, not the stored one.
        let first = review(&format!(
            r#"{{"apiVersion":"v1","kind":"Pod","{token}":"{{\"spec\":{{}}}}","spec":{{"containers":[]}}}}"#
        ));
        let misread = kube_reads(first.as_bytes()).expect("kube reads it");
        assert_eq!(misread.object.expect("object").data, json!({"spec": {}}));
    }

    /// JSON values small enough to be read quickly, deep enough to nest.
    fn values() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("apiVersion".to_owned()),
                        Just("kind".to_owned()),
                        Just("metadata".to_owned()),
                        Just("name".to_owned()),
                        Just("labels".to_owned()),
                        "[a-z]{1,5}"
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// An object as JSON text, its keys in any order and possibly repeated, as no JSON value
    /// can hold them: type fields and metadata of every shape among other keys.
    fn object_text() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("apiVersion"),
            Just("kind"),
            Just("metadata"),
            Just("spec"),
            Just("status")
        ];
        let value = prop_oneof![
            Just(json!("v1")),
            Just(json!("Pod")),
            Just(json!({"name": "p", "labels": {"a": "b"}})),
            values(),
        ];
        prop::collection::vec((key, value), 0..6).prop_map(|entries| {
            let fields: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::from(*k)))
                .collect();
            format!("{{{}}}", fields.join(","))
        })
    }

    proptest! {
        #[test]
        fn reads_as_kube_reads(
            object in prop_oneof![object_text(), values().prop_map(|v| v.to_string())],
            old in prop_oneof![object_text(), Just("null".to_owned())],
            operation in prop_oneof![Just("CREATE"), Just("UPDATE"), Just("DELETE"), Just("BOGUS")],
            dry_run in prop::option::of(any::<bool>()),
        ) {
            let dry_run = dry_run.map(|d| format!(r#","dryRun":{d}"#)).unwrap_or_default();
            let body = format!(
                r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","name":"n","namespace":"shop","operation":"{operation}","kind":{{"group":"","version":"v1","kind":"Pod"}},"resource":{{"group":"","version":"v1","resource":"pods"}},"userInfo":{{"username":"a","groups":["g"]}},"object":{object},"oldObject":{old}{dry_run}}}}}"#
            );
            same(&body);
        }
    }
}
