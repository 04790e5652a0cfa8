//! Whether a live object already holds everything Palisade wants in it.
//!
//! Palisade applies with server-side apply, so the API server keeps fields other managers set
//! and fills in defaults. A desired object is therefore satisfied when it is a *subset* of the
//! live one: every field Palisade sets is present with the same value. This is what makes a
//! no-op resync write nothing, and a hand edit of a Palisade-owned field show up as drift.

use std::fmt::Write as _;

use serde_json::Value;

/// `true` when every field of `desired` is present in `live` with an equal value. Maps compare
/// key by key (extra live keys are fine: defaults, other managers); lists compare element-wise
/// and must have the same length (server-side apply replaces atomic lists whole).
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d
            .iter()
            .all(|(k, dv)| l.get(k).is_some_and(|lv| is_subset(dv, lv))),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(dv, lv)| is_subset(dv, lv))
        }
        (Value::Number(d), Value::Number(l)) => d.as_f64() == l.as_f64(),
        (d, l) => d == l,
    }
}

/// The first path at which `desired` is not a subset of `live`, for drift messages.
pub fn first_difference(desired: &Value, live: &Value) -> Option<String> {
    fn walk(d: &Value, l: &Value, path: &mut String) -> bool {
        match (d, l) {
            (Value::Object(dm), Value::Object(lm)) => {
                for (k, dv) in dm {
                    let len = path.len();
                    path.push('.');
                    path.push_str(k);
                    match lm.get(k) {
                        Some(lv) if walk(dv, lv, path) => path.truncate(len),
                        _ => return false,
                    }
                }
                true
            }
            (Value::Array(da), Value::Array(la)) if da.len() == la.len() => {
                for (i, (dv, lv)) in da.iter().zip(la).enumerate() {
                    let len = path.len();
                    let _ = write!(path, "[{i}]");
                    if !walk(dv, lv, path) {
                        return false;
                    }
                    path.truncate(len);
                }
                true
            }
            _ => is_subset(d, l),
        }
    }
    let mut path = String::new();
    (!walk(desired, live, &mut path)).then_some(if path.is_empty() { ".".into() } else { path })
}

/// Kinds whose every `spec` field decides what the mesh enforces: a field Palisade does not set
/// there (a selector on a namespace-wide policy, `rules` on a policy that has none,
/// `portLevelMtls`, a label in a selector, `ipBlocks` in a source) changes the meaning.
const MEANINGFUL_SPEC: &[&str] = &[
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
];

/// Metadata that makes Istio ignore an object or read it as a dry run.
const DISABLING: &[(&str, &str)] = &[
    ("annotations", "istio.io/dry-run"),
    ("labels", "istio.io/rev"),
];

/// One repair of a live generated object: the JSON Pointer, the live value there (tested before
/// the change), and what replaces it (`None`: removed).
pub type Repair = (String, Value, Option<Value>);

/// What someone else added to a live generated object that changes what it enforces, as
/// repairs. For the mesh security kinds the live `spec` must hold nothing Palisade did not set,
/// at any depth (an extra label in a selector, an `ipBlocks` in a rule's source, an inline
/// `jwks` beside `jwksUri` all change the meaning): otherwise the whole `spec` is replaced with
/// Palisade's. The metadata that disables an Istio object is removed. Server-side apply keeps
/// another manager's fields, so the subset check alone would never see these.
pub fn foreign_fields(desired: &Value, live: &Value) -> Vec<Repair> {
    let mut out = Vec::new();
    let kind = desired["kind"].as_str().unwrap_or_default();
    if MEANINGFUL_SPEC.contains(&kind) && !is_subset(&live["spec"], &desired["spec"]) {
        out.push((
            "/spec".into(),
            live["spec"].clone(),
            Some(desired["spec"].clone()),
        ));
    }
    if kind.ends_with("Policy") || kind.ends_with("Authentication") || kind == "EnvoyFilter" {
        for (field, key) in DISABLING {
            if let Some(v) = live["metadata"][field].get(*key)
                && desired["metadata"][field].get(*key).is_none()
            {
                out.push((
                    format!("/metadata/{field}/{}", escape(key)),
                    v.clone(),
                    None,
                ));
            }
        }
    }
    out
}

/// A JSON Pointer reference token (RFC 6901).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_and_foreign_fields_are_fine() {
        let desired = json!({"spec": {"action": "ALLOW", "rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]}});
        let live = json!({"spec": {"action": "ALLOW", "provider": null,
            "rules": [{"to": [{"operation": {"paths": ["/a"], "hosts": []}}]}]},
            "metadata": {"resourceVersion": "7"}});
        assert!(is_subset(&desired, &live));
        assert_eq!(first_difference(&desired, &live), None);
    }

    #[test]
    fn changed_values_and_list_lengths_are_drift() {
        let desired = json!({"spec": {"rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]}});
        let edited = json!({"spec": {"rules": [{"to": [{"operation": {"paths": ["/b"]}}]}]}});
        let added = json!({"spec": {"rules": [{"to": [{"operation": {"paths": ["/a", "/b"]}}]}]}});
        assert!(!is_subset(&desired, &edited));
        assert!(!is_subset(&desired, &added));
        assert_eq!(
            first_difference(&desired, &edited).as_deref(),
            Some(".spec.rules[0].to[0].operation.paths[0]")
        );
        assert_eq!(
            first_difference(&desired, &added).as_deref(),
            Some(".spec.rules[0].to[0].operation.paths")
        );
    }

    /// What another manager added that changes the meaning is found, at any depth of a mesh
    /// security object's spec; what only describes the object is not.
    #[test]
    fn foreign_fields_that_change_meaning() {
        let desired = json!({"kind": "AuthorizationPolicy",
            "metadata": {"labels": {"app.kubernetes.io/managed-by": "palisade"}},
            "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "orders"}},
                     "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}});
        let live = json!({"kind": "AuthorizationPolicy",
            "metadata": {"labels": {"app.kubernetes.io/managed-by": "palisade", "istio.io/rev": "none", "team": "x"},
                         "annotations": {"istio.io/dry-run": "true", "note": "y"}},
            "spec": desired["spec"].clone()});
        let paths = |live: &Value| -> Vec<String> {
            foreign_fields(&desired, live)
                .into_iter()
                .map(|(p, _, _)| p)
                .collect()
        };
        assert_eq!(
            paths(&live),
            [
                "/metadata/annotations/istio.io~1dry-run",
                "/metadata/labels/istio.io~1rev"
            ]
        );
        assert!(foreign_fields(&desired, &desired).is_empty());
        // Added at any depth: a selector label, a source field, a top-level key.
        for (pointer, value) in [
            ("/spec/selector/matchLabels/zz", json!("none")),
            (
                "/spec/rules/0/from/0/source/ipBlocks",
                json!(["192.0.2.1/32"]),
            ),
            (
                "/spec/rules/0/when",
                json!([{"key": "request.headers[x]", "values": ["q"]}]),
            ),
            (
                "/spec/targetRefs",
                json!([{"kind": "Gateway", "name": "x"}]),
            ),
        ] {
            let mut tampered = desired.clone();
            let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
            tampered
                .pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .expect("an object")
                .insert(key.into(), value);
            let found = foreign_fields(&desired, &tampered);
            assert_eq!(found.len(), 1, "{pointer}");
            assert_eq!(found[0].0, "/spec");
            assert_eq!(found[0].2.as_ref(), Some(&desired["spec"]), "{pointer}");
        }
        // Other kinds: only the disabling metadata counts (server defaults fill their specs).
        let btp = json!({"kind": "BackendTrafficPolicy", "spec": {"rateLimit": {}}});
        let live_btp =
            json!({"kind": "BackendTrafficPolicy", "spec": {"rateLimit": {}, "mergeType": "x"}});
        assert!(foreign_fields(&btp, &live_btp).is_empty());
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(is_subset(&json!({"n": 100}), &json!({"n": 100.0})));
        assert!(!is_subset(&json!({"n": 100}), &json!({"n": 101})));
    }
}
