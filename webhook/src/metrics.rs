//! The webhook's Prometheus metrics (`/metrics`, OpenMetrics text), every one with `# HELP`:
//! admission requests by hook, operation, kind and verdict; findings by check and mode; the
//! decision latency; malformed requests; registry requests and errors; verdict-cache hits and
//! misses; the serving certificate's expiry; namespaces by enforcement mode; whether this
//! replica leads; the build. Label values come from fixed sets (kinds outside the judged ones
//! are `other`), so a hostile request cannot grow the series.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use prometheus_client::{
    encoding::text::{encode_eof, encode_registry},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::config::Mode;

/// A label set of `N` labels (an array: looked up without an allocation).
type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Upper bounds (seconds) of the decision-latency histogram buckets.
pub const BUCKETS: [f64; 11] = [
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The kinds the webhook judges; any other kind is counted as `other`.
const KINDS: &[&str] = &[
    "Pod",
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
    "ReplicationController",
    "Namespace",
];

/// The checks a rule belongs to (the part of a rule before `/`).
const CHECKS: &[&str] = &[
    "workload-identity",
    "secrets-in-env",
    "image-signature",
    "image-reference",
    "enforcement-label",
    "exempt-namespace",
    "malformed",
];

/// The metrics the request handlers update; scrape-time values come from the rest of the state.
pub struct Counters {
    registry: Registry,
    decisions: Family<Labels<1>, Counter>,
    admissions: Family<Labels<4>, Counter>,
    findings: Family<Labels<2>, Counter>,
    latency: Histogram,
    malformed: Counter,
    /// Set when the server is shutting down.
    pub draining: AtomicBool,
    /// The serving certificate, for its expiry.
    pub certificate: OnceLock<Arc<crate::tls::ServingCert>>,
}

impl Default for Counters {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("palisade_webhook");
        let decisions = Family::<Labels<1>, Counter>::default();
        registry.register(
            "decisions",
            "Validating decisions by verdict (allow, deny, warn, audit)",
            decisions.clone(),
        );
        let admissions = Family::<Labels<4>, Counter>::default();
        registry.register(
            "admission_requests",
            "Admission requests by hook (validate, mutate), operation, kind and verdict",
            admissions.clone(),
        );
        let findings = Family::<Labels<2>, Counter>::default();
        registry.register(
            "findings",
            "What the checks found, by check and by the mode it was handled in (enforce, warn, audit)",
            findings.clone(),
        );
        let latency = Histogram::new(BUCKETS);
        registry.register(
            "decision_duration_seconds",
            "Time to decide a validating request, image checks included",
            latency.clone(),
        );
        let malformed = Counter::default();
        registry.register(
            "malformed_requests",
            "Requests refused before a decision: not an AdmissionReview, too large, a forged timeout",
            malformed.clone(),
        );
        // The main series exist from the start: "0 denials" is a reading, not an absence.
        for verdict in ["allow", "deny", "warn", "audit"] {
            let _ = decisions.get_or_create(&[("verdict", verdict)]);
            for hook in ["validate", "mutate"] {
                let _ = admissions.get_or_create(&[
                    ("hook", hook),
                    ("operation", "CREATE"),
                    ("kind", "Pod"),
                    ("verdict", verdict),
                ]);
            }
        }
        for check in CHECKS {
            for mode in ["enforce", "warn", "audit"] {
                let _ = findings.get_or_create(&[("check", *check), ("mode", mode)]);
            }
        }
        Counters {
            registry,
            decisions,
            admissions,
            findings,
            latency,
            malformed,
            draining: AtomicBool::new(false),
            certificate: OnceLock::new(),
        }
    }
}

/// The label value of `kind`.
fn kind_label(kind: &str) -> &'static str {
    KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("other")
}

/// The label value of `verdict`.
fn verdict_label(verdict: &str) -> &'static str {
    ["allow", "deny", "warn", "audit"]
        .into_iter()
        .find(|v| *v == verdict)
        .unwrap_or("other")
}

impl Counters {
    /// Records one validating decision: its verdict, latency and the rules that fired with the
    /// modes they were handled in.
    pub fn decided(
        &self,
        operation: &str,
        kind: &str,
        verdict: &str,
        findings: &[(String, Mode)],
        took: std::time::Duration,
    ) {
        let verdict = verdict_label(verdict);
        self.decisions.get_or_create(&[("verdict", verdict)]).inc();
        self.admitted("validate", operation, kind, verdict);
        self.latency.observe(took.as_secs_f64());
        for (rule, mode) in findings {
            let check = rule.split('/').next().unwrap_or_default();
            let check = CHECKS
                .iter()
                .find(|c| **c == check)
                .copied()
                .unwrap_or("other");
            let mode = match mode {
                Mode::Enforce => "enforce",
                Mode::Warn => "warn",
                Mode::Audit => "audit",
            };
            self.findings
                .get_or_create(&[("check", check), ("mode", mode)])
                .inc();
        }
    }

    /// Records one admission request of `hook` (`validate` or `mutate`).
    pub fn admitted(&self, hook: &'static str, operation: &str, kind: &str, verdict: &str) {
        let operation = ["CREATE", "UPDATE", "DELETE", "CONNECT"]
            .into_iter()
            .find(|o| o.eq_ignore_ascii_case(operation))
            .unwrap_or("other");
        self.admissions
            .get_or_create(&[
                ("hook", hook),
                ("operation", operation),
                ("kind", kind_label(kind)),
                ("verdict", verdict_label(verdict)),
            ])
            .inc();
    }

    /// Records one malformed request.
    pub fn malformed(&self) {
        self.malformed.inc();
    }

    /// The metrics as OpenMetrics text: these, then the values read at scrape time.
    pub fn render(&self, scrape: &Scrape) -> String {
        let mut now = Registry::with_prefix("palisade_webhook");
        let build = Family::<Vec<(&'static str, String)>, Gauge>::default();
        let (version, commit) = crate::VERSION;
        build
            .get_or_create(&vec![
                ("version", version.to_owned()),
                ("commit", commit.to_owned()),
            ])
            .set(1);
        now.register(
            "build_info",
            "Always 1, labelled with the running build's version and source commit",
            build,
        );
        let namespaces = Family::<Labels<1>, Gauge>::default();
        for (mode, label) in [
            (Mode::Enforce, "Enforce"),
            (Mode::Warn, "Warn"),
            (Mode::Audit, "Audit"),
        ] {
            let n = scrape.namespaces.get(&mode).copied().unwrap_or(0);
            namespaces
                .get_or_create(&[("mode", label)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        now.register(
            "namespace_enforcement",
            "Namespaces by the mode their palisade.dev/enforcement label sets",
            namespaces,
        );
        if let Some(leading) = scrape.leading {
            now.register(
                "leading",
                "1 on the replica holding the Lease that writes ImagePolicy status",
                ConstGauge::new(i64::from(leading)),
            );
        }
        if let Some(images) = &scrape.images {
            now.register(
                "registry_requests",
                "HTTP requests to image registries",
                ConstCounter::new(images.registry_requests),
            );
            now.register(
                "registry_errors",
                "Registry requests that failed: no answer, a body over its limit, or a 5xx status",
                ConstCounter::new(images.registry_errors),
            );
            now.register(
                "verdict_cache_hits",
                "Image verdicts answered from the cache",
                ConstCounter::new(images.cache_hits),
            );
            now.register(
                "verdict_cache_misses",
                "Image verdicts that had to be computed",
                ConstCounter::new(images.cache_misses),
            );
        }
        if let Some(expiry) = self.certificate.get().and_then(|c| c.not_after()) {
            now.register(
                "serving_certificate_expiry_timestamp_seconds",
                "When the certificate the webhook serves expires (Unix time)",
                ConstGauge::new(expiry),
            );
        }
        let mut out = String::new();
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &now);
        let _ = encode_eof(&mut out);
        out
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Values read when scraped.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    /// Namespaces by the mode of their label.
    pub namespaces: std::collections::BTreeMap<Mode, usize>,
    /// Whether this replica leads (`None` without an election).
    pub leading: Option<bool>,
    /// Image-check counters, when image checks run.
    pub images: Option<ImageStats>,
}

/// Counters of the image checks.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImageStats {
    /// Registry requests.
    pub registry_requests: u64,
    /// Failed registry requests.
    pub registry_errors: u64,
    /// Verdict-cache hits.
    pub cache_hits: u64,
    /// Verdict-cache misses.
    pub cache_misses: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_come_from_fixed_sets() {
        let c = Counters::default();
        // A hostile request names any kind and operation it likes.
        for i in 0..50 {
            c.admitted("validate", &format!("OP{i}"), &format!("Kind{i}"), "maybe");
        }
        c.decided(
            "Create",
            "Deployment",
            "audit",
            &[
                ("secrets-in-env/env-from-secret".into(), Mode::Audit),
                ("image-signature/shop".into(), Mode::Enforce),
                ("made-up/rule".into(), Mode::Warn),
            ],
            std::time::Duration::from_millis(3),
        );
        let text = c.render(&Scrape::default());
        assert!(
            text.contains(
                "palisade_webhook_admission_requests_total{hook=\"validate\",operation=\"other\",kind=\"other\",verdict=\"other\"} 50"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "palisade_webhook_admission_requests_total{hook=\"validate\",operation=\"CREATE\",kind=\"Deployment\",verdict=\"audit\"} 1"
            ),
            "{text}"
        );
        for line in [
            "palisade_webhook_findings_total{check=\"secrets-in-env\",mode=\"audit\"} 1",
            "palisade_webhook_findings_total{check=\"image-signature\",mode=\"enforce\"} 1",
            "palisade_webhook_findings_total{check=\"other\",mode=\"warn\"} 1",
            "palisade_webhook_decisions_total{verdict=\"audit\"} 1",
            "palisade_webhook_decisions_total{verdict=\"deny\"} 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(!text.contains("OP1") && !text.contains("Kind1"), "{text}");
        // Every metric has its help, and the text ends as OpenMetrics requires.
        for t in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = t.split(' ').nth(2).unwrap_or_default();
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
