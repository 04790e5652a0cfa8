//! Policy reports: what the checks find in the pods that already run, as one
//! `wgpolicyk8s.io/v1alpha2` PolicyReport per namespace (named `palisade`), the kind Kyverno's
//! ecosystem reads (Policy Reporter, its dashboards). Every pod of a judged namespace gets one
//! result per check: `pass`, `fail` (with the message a denial would give and the mode the check
//! is in there, so Audit and Warn namespaces are measured before they are enforced) or `error`.
//!
//! Building a report is pure; [`crate::scan`] lists the pods and writes the reports.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::{config::Mode, decide::CheckFinding};

/// The name of Palisade's report in each namespace.
pub const REPORT_NAME: &str = "palisade";
/// The `policy` and `source` of every result.
pub const POLICY: &str = "palisade";
/// Label that marks the reports Palisade owns (and may delete).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "palisade-webhook");

/// Results listed in one report at most (etcd keeps objects under 1.5 MiB): failures and errors
/// first, so a namespace with many pods cannot push a failure out with passes.
pub const MAX_RESULTS: usize = 600;
/// Bytes of one result's message at most.
pub const MAX_MESSAGE: usize = 1024;
/// Annotation that says how many results the report does not list.
pub const NOT_LISTED: &str = "palisade.dev/results-not-listed";

/// `text` cut to [`MAX_MESSAGE`] bytes (at a character boundary), saying so.
fn bounded(text: String) -> String {
    if text.len() <= MAX_MESSAGE {
        return text;
    }
    let mut end = MAX_MESSAGE - 20;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} … (cut)", &text[..end])
}

/// The checks every pod gets a result for.
pub const CHECKS: &[&str] = &["workload-identity", "secrets-in-env"];

/// What the scan found in one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFindings {
    /// The pod's name.
    pub name: String,
    /// Its uid.
    pub uid: String,
    /// The findings, or why the pod could not be judged.
    pub findings: Result<Vec<CheckFinding>, String>,
    /// Whether its images were checked against the ImagePolicies.
    pub images: ImageCheck,
}

/// The image-signature check of one pod in a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ImageCheck {
    /// No ImagePolicy covers any of its images (or image checks are off): no result.
    #[default]
    NotCovered,
    /// Checked: a `pass` unless a finding says otherwise.
    Checked,
    /// Covered, but not checked in this scan, and why: a `skip`.
    Skipped(String),
}

/// The rule of the image-signature check.
pub const IMAGE_CHECK: &str = "image-signature";

/// The check a rule belongs to (`secrets-in-env/env-from-secret` → `secrets-in-env`).
fn check_of(rule: &str) -> &str {
    rule.split('/').next().unwrap_or(rule)
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "Enforce",
        Mode::Warn => "Warn",
        Mode::Audit => "Audit",
    }
}

/// One pod's result per check: `(result, message, mode)`.
fn per_check(pod: &PodFindings) -> BTreeMap<&str, (&'static str, String, Option<Mode>)> {
    let mut per_check: BTreeMap<&str, (&str, String, Option<Mode>)> = BTreeMap::new();
    match &pod.findings {
        Err(why) => {
            for check in CHECKS {
                per_check.insert(
                    check,
                    ("error", format!("cannot judge the pod: {why}"), None),
                );
            }
        }
        Ok(findings) => {
            for check in CHECKS {
                per_check.insert(check, ("pass", format!("{check}: no finding"), None));
            }
            match &pod.images {
                ImageCheck::NotCovered => {}
                ImageCheck::Checked => {
                    per_check.insert(
                        IMAGE_CHECK,
                        (
                            "pass",
                            format!("{IMAGE_CHECK}: every image satisfies its policies"),
                            None,
                        ),
                    );
                }
                ImageCheck::Skipped(why) => {
                    per_check.insert(IMAGE_CHECK, ("skip", why.clone(), None));
                }
            }
            for f in findings {
                let check = check_of(&f.rule);
                let result = if f.rule.ends_with("/error") {
                    "error"
                } else {
                    "fail"
                };
                let entry = per_check
                    .entry(check)
                    .or_insert(("pass", String::new(), None));
                if matches!(entry.0, "pass" | "skip") {
                    *entry = (result, f.text.clone(), Some(f.mode));
                } else {
                    entry.1.push_str("; ");
                    entry.1.push_str(&f.text);
                    // The strongest mode among the check's findings is what the pod meets.
                    entry.2 = entry.2.max(Some(f.mode));
                    // An error outranks a failure.
                    if result == "error" {
                        entry.0 = "error";
                    }
                }
            }
        }
    }
    per_check
}

/// The PolicyReport of `namespace` for `pods`, its results stamped `now` (Unix seconds).
pub fn policy_report(namespace: &str, pods: &[PodFindings], now: i64) -> Value {
    let mut results = Vec::new();
    let mut summary: BTreeMap<&str, u64> = ["pass", "fail", "warn", "error", "skip"]
        .into_iter()
        .map(|k| (k, 0))
        .collect();
    for pod in pods {
        let resource = json!([{
            "apiVersion": "v1", "kind": "Pod", "namespace": namespace,
            "name": pod.name, "uid": pod.uid,
        }]);
        for (check, (result, message, mode)) in per_check(pod) {
            *summary.entry(result).or_default() += 1;
            let message = bounded(message);
            let mut properties = serde_json::Map::new();
            if let Some(mode) = mode {
                properties.insert("mode".into(), Value::String(mode_name(mode).into()));
            }
            results.push(json!({
                "policy": POLICY,
                "rule": check,
                "source": POLICY,
                "result": result,
                "scored": true,
                "severity": "high",
                "category": "Palisade admission checks",
                "message": message,
                "properties": properties,
                "resources": resource,
                "timestamp": {"seconds": now, "nanos": 0},
            }));
        }
    }
    // Errors and failures first (stable: pods stay in name order within each).
    results.sort_by_key(|r| match r["result"].as_str() {
        Some("error") => 0,
        Some("fail") => 1,
        _ => 2,
    });
    let not_listed = results.len().saturating_sub(MAX_RESULTS);
    results.truncate(MAX_RESULTS);
    let mut metadata = json!({
        "name": REPORT_NAME,
        "namespace": namespace,
        "labels": {MANAGED_BY.0: MANAGED_BY.1},
    });
    if not_listed > 0 {
        metadata["annotations"] = json!({NOT_LISTED: not_listed.to_string()});
    }
    json!({
        "apiVersion": "wgpolicyk8s.io/v1alpha2",
        "kind": "PolicyReport",
        "metadata": metadata,
        "summary": summary,
        "results": results,
    })
}

/// What a report says: its summary and results, without their timestamps.
pub fn content(report: &Value) -> Value {
    let mut results = report["results"].clone();
    if let Some(list) = results.as_array_mut() {
        for r in list {
            if let Some(m) = r.as_object_mut() {
                m.remove("timestamp");
            }
        }
    }
    json!({
        "summary": report["summary"],
        "results": results,
        "labels": report["metadata"]["labels"],
        "annotations": report["metadata"]["annotations"][NOT_LISTED],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(rule: &str, mode: Mode, text: &str) -> CheckFinding {
        CheckFinding {
            rule: rule.into(),
            mode,
            text: text.into(),
        }
    }

    #[test]
    fn each_pod_gets_a_result_per_check_with_its_mode() {
        let pods = [
            PodFindings {
                name: "good".into(),
                uid: "u1".into(),
                findings: Ok(vec![]),
                images: ImageCheck::NotCovered,
            },
            PodFindings {
                name: "leaky".into(),
                uid: "u2".into(),
                findings: Ok(vec![
                    finding("secrets-in-env/env-from-secret", Mode::Audit, "env A"),
                    finding("secrets-in-env/aws-access-key", Mode::Audit, "env B"),
                    finding("workload-identity", Mode::Warn, "default SA"),
                ]),
                images: ImageCheck::NotCovered,
            },
            PodFindings {
                name: "broken".into(),
                uid: "u3".into(),
                findings: Err("no spec".into()),
                images: ImageCheck::NotCovered,
            },
        ];
        let report = policy_report("shop", &pods, 100);
        assert_eq!(report["metadata"]["name"], "palisade");
        assert_eq!(
            report["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "palisade-webhook"
        );
        assert_eq!(
            report["summary"],
            json!({"pass": 2, "fail": 2, "warn": 0, "error": 2, "skip": 0})
        );
        let results = report["results"].as_array().expect("results");
        assert_eq!(results.len(), 6);
        let leaky_secrets = results
            .iter()
            .find(|r| r["resources"][0]["name"] == "leaky" && r["rule"] == "secrets-in-env")
            .expect("leaky's secrets result");
        assert_eq!(leaky_secrets["result"], "fail");
        assert_eq!(leaky_secrets["message"], "env A; env B");
        assert_eq!(leaky_secrets["properties"]["mode"], "Audit");
        assert_eq!(leaky_secrets["resources"][0]["uid"], "u2");
        let identity = results
            .iter()
            .find(|r| r["resources"][0]["name"] == "leaky" && r["rule"] == "workload-identity")
            .expect("leaky's identity result");
        assert_eq!(
            (
                identity["result"].as_str(),
                identity["properties"]["mode"].as_str()
            ),
            (Some("fail"), Some("Warn"))
        );
    }

    #[test]
    fn image_checks_pass_fail_in_the_policy_s_mode_or_skip() {
        let pod = |name: &str, findings, images| PodFindings {
            name: name.into(),
            uid: name.into(),
            findings: Ok(findings),
            images,
        };
        let pods = [
            pod("signed", vec![], ImageCheck::Checked),
            pod(
                "unsigned",
                vec![
                    finding("image-signature/release", Mode::Audit, "app: no signature"),
                    finding("image-signature/base", Mode::Warn, "init: no signature"),
                ],
                ImageCheck::Checked,
            ),
            pod(
                "later",
                vec![],
                ImageCheck::Skipped("not checked in this scan".into()),
            ),
            pod("uncovered", vec![], ImageCheck::NotCovered),
        ];
        let report = policy_report("shop", &pods, 1);
        let image = |name: &str| {
            report["results"]
                .as_array()
                .expect("results")
                .iter()
                .find(|r| r["resources"][0]["name"] == name && r["rule"] == IMAGE_CHECK)
                .cloned()
        };
        assert_eq!(image("signed").expect("a result")["result"], "pass");
        let unsigned = image("unsigned").expect("a result");
        assert_eq!(unsigned["result"], "fail");
        // The strongest of the failing policies' modes.
        assert_eq!(unsigned["properties"]["mode"], "Warn");
        assert_eq!(unsigned["message"], "app: no signature; init: no signature");
        assert_eq!(image("later").expect("a result")["result"], "skip");
        assert_eq!(image("uncovered"), None);
        assert_eq!(
            report["summary"],
            json!({"pass": 9, "fail": 1, "warn": 0, "error": 0, "skip": 1})
        );
    }

    #[test]
    fn a_report_stays_under_etcd_s_limit_and_lists_failures_first() {
        // 12,000 findings on one pod, and 1,000 compliant pods named before it.
        let huge: Vec<CheckFinding> = (0..12_000)
            .map(|i| {
                finding(
                    "secrets-in-env/env-from-secret",
                    Mode::Audit,
                    &format!("env E{i} takes a Secret"),
                )
            })
            .collect();
        let mut pods: Vec<PodFindings> = (0..1000)
            .map(|i| PodFindings {
                name: format!("a{i:04}"),
                uid: format!("u{i}"),
                findings: Ok(vec![]),
                images: ImageCheck::NotCovered,
            })
            .collect();
        pods.push(PodFindings {
            name: "zz-leaky".into(),
            uid: "z".into(),
            findings: Ok(huge),
            images: ImageCheck::NotCovered,
        });
        let report = policy_report("ns", &pods, 0);
        let bytes = serde_json::to_vec(&report).expect("json").len();
        assert!(bytes < 1_000_000, "{bytes} bytes");
        let results = report["results"].as_array().expect("results");
        assert_eq!(results.len(), MAX_RESULTS);
        assert_eq!(results[0]["resources"][0]["name"], "zz-leaky");
        assert_eq!(results[0]["result"], "fail");
        assert!(
            results[0]["message"]
                .as_str()
                .expect("message")
                .ends_with("(cut)")
        );
        assert_eq!(report["summary"]["pass"], 2001);
        assert_eq!(report["summary"]["fail"], 1);
        assert_eq!(
            report["metadata"]["annotations"][NOT_LISTED],
            (2002 - MAX_RESULTS).to_string()
        );
    }

    #[test]
    fn an_evaluation_error_is_an_error_and_timestamps_are_not_content() {
        let pods = [PodFindings {
            name: "p".into(),
            uid: "u".into(),
            findings: Ok(vec![
                finding("secrets-in-env/env-from-secret", Mode::Enforce, "env A"),
                finding("secrets-in-env/error", Mode::Enforce, "policy failed"),
            ]),
            images: ImageCheck::NotCovered,
        }];
        let a = policy_report("ns", &pods, 1);
        let b = policy_report("ns", &pods, 2);
        assert_ne!(a, b);
        assert_eq!(content(&a), content(&b));
        // What the API server returns has more in it (metadata): still the same content.
        let mut live = a.clone();
        live["metadata"]["uid"] = json!("x");
        live["metadata"]["resourceVersion"] = json!("7");
        assert_eq!(content(&live), content(&b));
        // An edited result, or a dropped label, is not.
        let mut edited = live.clone();
        edited["results"][0]["result"] = json!("pass");
        assert_ne!(content(&edited), content(&b));
        let mut unlabelled = live;
        unlabelled["metadata"]["labels"] = json!({});
        assert_ne!(content(&unlabelled), content(&b));
        let secrets = a["results"]
            .as_array()
            .expect("results")
            .iter()
            .find(|r| r["rule"] == "secrets-in-env")
            .expect("secrets result")
            .clone();
        assert_eq!(secrets["result"], "error");
    }
}
