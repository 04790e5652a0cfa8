//! Status conditions from a reconcile's outcome, kstatus style, written only when they change.
//!
//! `Accepted` says whether the spec was understood and is in force (False with `Conflicted` for
//! a RateLimitPolicy that lost its target); `Ready` whether every generated object is applied;
//! `Warning` and `Unsupported` carry translation notes; `Stalled` (progress needs the user) and
//! `Reconciling` (retried on its own) are abnormal-true and follow from `Ready=False`
//! ([`palisade_api::common::with_kstatus`]); `Conflicted` names the winning policy.

use palisade_api::common::GeneratedRef;
pub use palisade_api::common::{Cond, build};

use crate::translate::{Note, Severity};

/// Conditions for the translation notes: one `Warning` and one `Unsupported` condition, each
/// listing every note of its kind.
pub fn note_conditions(notes: &[Note]) -> Vec<Cond> {
    let mut out = Vec::new();
    for (type_, severity) in [
        ("Warning", Severity::Warning),
        ("Unsupported", Severity::Unsupported),
    ] {
        let of_kind: Vec<&Note> = notes.iter().filter(|n| n.severity == severity).collect();
        if let Some(first) = of_kind.first() {
            let message = of_kind
                .iter()
                .map(|n| n.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            out.push(Cond::new(type_, true, first.reason, message));
        }
    }
    out
}

/// A status value with every `lastTransitionTime` removed, to compare content alone.
pub fn without_times(status: &serde_json::Value) -> serde_json::Value {
    let mut v = status.clone();
    if let Some(conds) = v
        .get_mut("conditions")
        .and_then(serde_json::Value::as_array_mut)
    {
        for c in conds {
            if let Some(m) = c.as_object_mut() {
                m.remove("lastTransitionTime");
            }
        }
    }
    v
}

/// References to generated objects, from their JSON.
pub fn generated_refs(objects: &[serde_json::Value]) -> Vec<GeneratedRef> {
    objects
        .iter()
        .map(|o| GeneratedRef {
            api_version: o["apiVersion"].as_str().unwrap_or_default().to_owned(),
            kind: o["kind"].as_str().unwrap_or_default().to_owned(),
            name: o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            namespace: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use palisade_api::common::CommonStatus;

    fn at(s: &str) -> Time {
        Time(s.parse().expect("timestamp"))
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let conds = [Cond::new("Ready", true, "Enforced", "3 objects applied")];
        let first = build(
            &CommonStatus::default(),
            Some(1),
            &conds,
            &at("2026-01-01T00:00:00Z"),
        );
        let again = build(&first, Some(1), &conds, &at("2026-01-02T00:00:00Z"));
        assert_eq!(first, again, "no change, no new timestamp");
        let changed = [Cond::new("Ready", false, "ApplyFailed", "boom")];
        let third = build(&again, Some(1), &changed, &at("2026-01-03T00:00:00Z"));
        assert_eq!(
            third.conditions[0].last_transition_time,
            at("2026-01-03T00:00:00Z")
        );
    }

    #[test]
    fn notes_group_by_severity() {
        let notes = vec![
            Note {
                reason: "A",
                message: "a".into(),
                severity: Severity::Warning,
            },
            Note {
                reason: "B",
                message: "b".into(),
                severity: Severity::Warning,
            },
            Note {
                reason: "C",
                message: "c".into(),
                severity: Severity::Unsupported,
            },
        ];
        let c = note_conditions(&notes);
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].type_, c[0].reason.as_str(), c[0].message.as_str()),
            ("Warning", "A", "a; b")
        );
        assert_eq!((c[1].type_, c[1].reason.as_str()), ("Unsupported", "C"));
    }
}
