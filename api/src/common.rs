//! Types shared by the four kinds: durations, workload selectors, policy target references,
//! and the kstatus-style status block every Palisade object carries.

use std::{borrow::Cow, collections::BTreeMap, fmt, str::FromStr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::{JsonSchema, json_schema};
use serde::{Deserialize, Serialize};

/// The API group of every Palisade kind.
pub const GROUP: &str = "palisade.dev";
/// The served and stored version of every Palisade kind.
pub const VERSION: &str = "v1alpha1";

/// The regular expression a [`Duration`] must match: one or more `<integer><unit>` groups with
/// units `ms`, `s`, `m`, `h` (a subset of Go's `time.ParseDuration`; no signs, no fractions).
pub const DURATION_PATTERN: &str = "^([0-9]{1,9}(ms|s|m|h))+$";

/// A positive duration written as in Go and Kubernetes (`90s`, `15m`, `1h30m`).
///
/// The text is kept exactly as the user wrote it, so objects read back and written again are
/// byte-identical; [`Duration::as_secs`] gives the normalised value used for comparisons.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Duration {
    text: String,
    millis: u64,
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {text:?}: {why} (expected e.g. 30s, 15m, 1h30m)")]
pub struct DurationError {
    text: String,
    why: &'static str,
}

impl Duration {
    /// The duration in whole seconds, rounded down.
    pub fn as_secs(&self) -> u64 {
        self.millis / 1000
    }

    /// The duration in milliseconds.
    pub fn as_millis(&self) -> u64 {
        self.millis
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A duration of `secs` seconds, written in the shortest exact unit (`3600` → `1h`).
    pub fn from_secs(secs: u64) -> Self {
        let text = if secs > 0 && secs.is_multiple_of(3600) {
            format!("{}h", secs / 3600)
        } else if secs > 0 && secs.is_multiple_of(60) {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        };
        Duration {
            text,
            millis: secs.saturating_mul(1000),
        }
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| DurationError {
            text: text.to_owned(),
            why,
        };
        if text.is_empty() {
            return Err(err("empty"));
        }
        let bytes = text.as_bytes();
        let mut millis: u64 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if i == start {
                return Err(err("a number must precede each unit"));
            }
            if i - start > 9 {
                return Err(err("a number has more than 9 digits"));
            }
            let n: u64 = text[start..i].parse().map_err(|_| err("not a number"))?;
            let unit_start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let per = match &text[unit_start..i] {
                "ms" => 1,
                "s" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                "" => return Err(err("missing unit")),
                _ => return Err(err("unknown unit (use ms, s, m or h)")),
            };
            millis = millis
                .checked_add(n.checked_mul(per).ok_or_else(|| err("too large"))?)
                .ok_or_else(|| err("too large"))?;
        }
        Ok(Duration {
            text: text.to_owned(),
            millis,
        })
    }
}

impl TryFrom<String> for Duration {
    type Error = DurationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Duration> for String {
    fn from(d: Duration) -> String {
        d.text
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        json_schema!({
            "type": "string",
            "maxLength": 32,
            "pattern": DURATION_PATTERN,
        })
    }
}

/// Selects workloads (pods) in the policy's own namespace by their labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Pods carrying all of these labels are selected. An empty map selects every pod in the
    /// namespace.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 32))]
    pub match_labels: BTreeMap<String, String>,
}

/// The state of one condition.
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition as StatusCondition;

/// Condition types every Palisade kind reports.
pub mod condition {
    /// The object was understood and is consistent; `False` with a reason when it is not.
    pub const ACCEPTED: &str = "Accepted";
    /// Everything the object asks for exists and is enforced (kstatus `Ready`).
    pub const READY: &str = "Ready";
    /// The controller is still working towards the desired state (kstatus abnormal-true).
    pub const RECONCILING: &str = "Reconciling";
    /// The controller cannot make progress without a change from the user (kstatus abnormal-true).
    pub const STALLED: &str = "Stalled";
}

/// A reference to an object another system owns (Gateway API `LocalPolicyTargetReference`),
/// always in the policy's own namespace.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, KubeSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// API group of the target, e.g. `gateway.networking.k8s.io`; empty for the core group.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub group: String,
    /// Kind of the target, e.g. `Gateway` or `HTTPRoute`.
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// Name of the target, in the policy's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// A section of the target, such as a Gateway listener name. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub section_name: Option<String>,
}

/// The status block shared by every Palisade kind (kstatus conventions: `observedGeneration`,
/// `Ready`, and abnormal-true `Reconciling`/`Stalled`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommonStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions (`Accepted`, `Ready` and kind-specific ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A Palisade kind whose status carries the [`CommonStatus`].
pub trait HasCommonStatus {
    /// The common status block, if the object has a status.
    fn common_status(&self) -> Option<&CommonStatus>;

    /// Whether `Ready` is `True` for the object's current generation.
    fn is_ready(&self, generation: Option<i64>) -> bool {
        self.common_status().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == "Ready" && c.status == "True" && c.observed_generation == generation
            })
        })
    }
}

macro_rules! has_common_status {
    ($($kind:ty),*) => {$(
        impl HasCommonStatus for $kind {
            fn common_status(&self) -> Option<&CommonStatus> {
                self.status.as_ref().map(|s| &s.common)
            }
        }
    )*};
}

has_common_status!(
    crate::AuthPolicy,
    crate::RateLimitPolicy,
    crate::SecretBinding,
    crate::ImagePolicy
);

/// A reference to an object Palisade generated from a policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedRef {
    /// `apiVersion` of the generated object.
    pub api_version: String,
    /// Kind of the generated object.
    pub kind: String,
    /// Name of the generated object (in the policy's namespace unless `namespace` says otherwise).
    pub name: String,
    /// Namespace of the generated object, when it differs from the policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One condition to report, before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    /// Type.
    pub type_: &'static str,
    /// Whether it holds.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Explanation.
    pub message: String,
}

impl Cond {
    /// A condition.
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Cond {
            type_,
            status,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// `Ready=False` reasons the controllers retry on their own: kstatus `Reconciling`. Any other
/// `Ready=False` waits for a change from the user: kstatus `Stalled`.
pub const RETRIED_REASONS: &[&str] = &[
    "ApiError",
    "VaultUnavailable",
    "VaultError",
    "TokenRequestFailed",
    // Applied; the gateway's controller has not yet accepted it (its status write wakes the
    // policy).
    "AwaitingGateway",
];

/// `conds` with the kstatus abnormal-true conditions that `Ready=False` implies (unless one is
/// already there): `Reconciling=True` when the controller retries by itself, `Stalled=True`
/// when it cannot progress without the user. Both carry `Ready`'s reason and message, so
/// kstatus readers (Flux, kpt, Argo CD's health of unknown kinds) see `InProgress` or `Failed`
/// rather than `Current` for a policy that is not enforced.
pub fn with_kstatus(conds: &[Cond]) -> Vec<Cond> {
    let mut out = conds.to_vec();
    let abnormal = |t: &str| conds.iter().any(|c| c.type_ == t && c.status);
    if abnormal(condition::STALLED) || abnormal(condition::RECONCILING) {
        return out;
    }
    if let Some(ready) = conds
        .iter()
        .find(|c| c.type_ == condition::READY && !c.status)
    {
        let type_ = if RETRIED_REASONS.contains(&ready.reason.as_str()) {
            condition::RECONCILING
        } else {
            condition::STALLED
        };
        let abnormal = Cond::new(type_, true, &ready.reason, ready.message.clone());
        // One condition per type: a False one of the same type gives way.
        match out.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => *c = abnormal,
            None => out.push(abnormal),
        }
    }
    out
}

/// The status to write: `conds` (with [`with_kstatus`]) stamped with `now`, except that a
/// condition whose status is unchanged keeps its previous transition time (Kubernetes'
/// convention: it moves only when the status does) — so an unchanged reconcile produces an
/// identical status and no write.
pub fn build(
    previous: &CommonStatus,
    generation: Option<i64>,
    conds: &[Cond],
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> CommonStatus {
    let conditions = with_kstatus(conds)
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let old = previous.conditions.iter().find(|o| o.type_ == c.type_);
            let unchanged = old.is_some_and(|o| o.status == status);
            Condition {
                type_: c.type_.to_owned(),
                status: status.to_owned(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time: match old {
                    Some(o) if unchanged => o.last_transition_time.clone(),
                    _ => now.clone(),
                },
            }
        })
        .collect();
    CommonStatus {
        observed_generation: generation,
        conditions,
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(s.parse().expect("timestamp"))
    }

    #[test]
    fn transition_times_move_only_when_the_status_does() {
        let first = build(
            &CommonStatus::default(),
            Some(1),
            &[Cond::new("Ready", false, "VaultUnavailable", "sealed")],
            &at("2026-01-01T00:00:00Z"),
        );
        // Another reason and message, another generation, the same status: the time stays.
        let second = build(
            &first,
            Some(2),
            &[Cond::new("Ready", false, "VaultDenied", "403")],
            &at("2026-01-02T00:00:00Z"),
        );
        assert_eq!(
            second.conditions[0].last_transition_time,
            at("2026-01-01T00:00:00Z")
        );
        assert_eq!(second.conditions[0].reason, "VaultDenied");
        assert_eq!(second.conditions[0].observed_generation, Some(2));
        let third = build(
            &second,
            Some(2),
            &[Cond::new("Ready", true, "Synced", "")],
            &at("2026-01-03T00:00:00Z"),
        );
        assert_eq!(
            third.conditions[0].last_transition_time,
            at("2026-01-03T00:00:00Z")
        );
    }

    #[test]
    fn not_ready_is_reconciling_when_retried_and_stalled_otherwise() {
        let kinds = |conds: &[Cond]| -> Vec<(String, bool, String)> {
            with_kstatus(conds)
                .into_iter()
                .map(|c| (c.type_.to_owned(), c.status, c.reason))
                .collect()
        };
        let retried = kinds(&[Cond::new("Ready", false, "VaultUnavailable", "sealed")]);
        assert_eq!(
            retried[1],
            (
                "Reconciling".to_owned(),
                true,
                "VaultUnavailable".to_owned()
            )
        );
        for reason in [
            "PartiallyEnforced",
            "Conflicted",
            "NotLoaded",
            "Drifted",
            "VaultDenied",
        ] {
            let stalled = kinds(&[
                Cond::new("Accepted", true, "Accepted", ""),
                Cond::new("Ready", false, reason, "why"),
            ]);
            assert_eq!(stalled.len(), 3, "{reason}");
            assert_eq!(stalled[2], ("Stalled".to_owned(), true, reason.to_owned()));
        }
        // Ready: neither; an explicit Stalled: nothing added.
        assert_eq!(kinds(&[Cond::new("Ready", true, "Enforced", "")]).len(), 1);
        let explicit = kinds(&[
            Cond::new("Ready", false, "BackendMissing", "m"),
            Cond::new("Stalled", true, "BackendMissing", "m"),
        ]);
        assert_eq!(explicit.len(), 2);
        // An explicit False does not stand in for the abnormal-true condition.
        let with_false = kinds(&[
            Cond::new("Ready", false, "PartiallyEnforced", "m"),
            Cond::new("Stalled", false, "Done", ""),
        ]);
        assert_eq!(
            with_false,
            [
                ("Ready".to_owned(), false, "PartiallyEnforced".to_owned()),
                ("Stalled".to_owned(), true, "PartiallyEnforced".to_owned())
            ]
        );
    }

    #[test]
    fn ready_means_ready_for_the_current_generation() {
        let policy = |observed: i64, status: &str| -> crate::AuthPolicy {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "palisade.dev/v1alpha1",
                "kind": "AuthPolicy",
                "metadata": {"name": "a", "namespace": "n", "generation": 2},
                "spec": {"mtls": "Strict"},
                "status": {"conditions": [{
                    "type": "Ready", "status": status, "reason": "Enforced", "message": "",
                    "observedGeneration": observed,
                    "lastTransitionTime": "2026-01-01T00:00:00Z"
                }]}
            }))
            .expect("an AuthPolicy")
        };
        assert!(policy(2, "True").is_ready(Some(2)));
        assert!(
            !policy(1, "True").is_ready(Some(2)),
            "an older generation's Ready"
        );
        assert!(!policy(2, "False").is_ready(Some(2)));
        let mut none = policy(2, "True");
        none.status = None;
        assert!(!none.is_ready(Some(2)), "no status");
    }

    #[test]
    fn durations_parse_like_go_for_the_supported_subset() {
        for (text, millis) in [
            ("0s", 0),
            ("250ms", 250),
            ("30s", 30_000),
            ("15m", 900_000),
            ("1h30m", 5_400_000),
            ("2h0m5s", 7_205_000),
        ] {
            let d: Duration = text.parse().expect("valid");
            assert_eq!(d.as_millis(), millis, "{text}");
            assert_eq!(d.to_string(), text, "text kept as written");
        }
    }

    #[test]
    fn durations_refuse_what_vault_and_envoy_would_misread() {
        for bad in ["", "15", "m", "1d", "-5s", "1.5h", "1h 30m", "10000000000s"] {
            let err = bad.parse::<Duration>().expect_err(bad);
            assert!(err.to_string().contains("invalid duration"), "{err}");
        }
    }

    #[test]
    fn duration_pattern_agrees_with_parser() {
        let re = regex::Regex::new(DURATION_PATTERN).expect("pattern compiles");
        for s in ["1s", "1h30m", "0ms", "15", "1d", "-1s", "1.5s", "1h 2m", ""] {
            assert_eq!(re.is_match(s), s.parse::<Duration>().is_ok(), "{s}");
        }
    }

    #[test]
    fn from_secs_picks_the_largest_exact_unit() {
        assert_eq!(Duration::from_secs(3600).as_str(), "1h");
        assert_eq!(Duration::from_secs(900).as_str(), "15m");
        assert_eq!(Duration::from_secs(61).as_str(), "61s");
        assert_eq!(Duration::from_secs(0).as_str(), "0s");
    }
}
