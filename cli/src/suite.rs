//! `palisade test DIR`: expected outcomes, checked. `DIR/palisade-test.yaml`:
//!
//! ```yaml
//! manifests: [../policies, namespaces.yaml]  # always loaded (AuthPolicies, Namespaces, ...)
//! webhookConfig: webhook.yaml                # optional: the webhook's configuration
//! operatorConfig: operator.yaml              # optional: the operator's (context, vault)
//! admit:
//!   - file: pods/secret-in-env.yaml          # every object with a pod in it
//!     expect: deny                           # allow, deny, warn or audit
//!     messageContains: ["env DB_PASSWORD"]
//! render:
//!   - file: policies/payments.yaml
//!     expectFile: golden/payments.yaml       # `palisade render` output, exactly
//! whoCan:
//!   - {namespace: shop, labels: {app: payments}, from: shop/orders, port: 8080,
//!      method: POST, path: /pay, expect: allow}   # from: ns/sa, or plaintext
//! ```
//!
//! Paths are relative to `DIR`. Every case reports PASS or FAIL; the run fails if any does.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::{admit, input, render, who_can};

/// The test file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Suite {
    #[serde(default)]
    manifests: Vec<PathBuf>,
    #[serde(default)]
    webhook_config: Option<PathBuf>,
    #[serde(default)]
    operator_config: Option<PathBuf>,
    #[serde(default)]
    admit: Vec<AdmitCase>,
    #[serde(default)]
    render: Vec<RenderCase>,
    #[serde(default)]
    who_can: Vec<WhoCanCase>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AdmitCase {
    file: PathBuf,
    expect: String,
    #[serde(default)]
    message_contains: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RenderCase {
    file: PathBuf,
    expect_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WhoCanCase {
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    from: String,
    port: u16,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    expect: String,
}

/// One case's result.
#[derive(Debug)]
pub struct CaseResult {
    /// What was checked.
    pub name: String,
    /// Why it failed; `None` when it passed.
    pub failure: Option<String>,
}

/// `base` and those of `extra` it does not have already (by kind, namespace and name).
fn merged(base: &[input::Object], extra: &[input::Object]) -> Vec<input::Object> {
    let key = |o: &input::Object| {
        (
            o.kind().to_owned(),
            o.namespace("default").to_owned(),
            o.name().to_owned(),
        )
    };
    let mut all = base.to_vec();
    for o in extra {
        if !base.iter().any(|b| key(b) == key(o)) {
            all.push(o.clone());
        }
    }
    all
}

/// The caller a `from` names: `plaintext` or `namespace/serviceaccount`.
pub fn caller(from: &str) -> Result<Option<(String, String)>> {
    if from == "plaintext" {
        return Ok(None);
    }
    let Some((ns, sa)) = from.split_once('/') else {
        bail!("from {from:?}: write namespace/serviceaccount, or plaintext");
    };
    Ok(Some((ns.to_owned(), sa.to_owned())))
}

/// Runs the suite in `dir`.
pub fn run(dir: &Path) -> Result<Vec<CaseResult>> {
    let file = dir.join("palisade-test.yaml");
    let suite: Suite = serde_yaml::from_str(
        &std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?,
    )
    .with_context(|| format!("{}", file.display()))?;
    let at = |p: &PathBuf| dir.join(p);
    let base = input::load(&suite.manifests.iter().map(at).collect::<Vec<_>>())?;
    let webhook = match &suite.webhook_config {
        Some(p) => Some(std::fs::read_to_string(at(p))?),
        None => None,
    };
    let webhook = admit::config(webhook.as_deref())?;
    let operator = match &suite.operator_config {
        Some(p) => palisade_operator::config::Config::load(&at(p))?,
        None => palisade_operator::config::Config::default(),
    };
    let mut results = Vec::new();
    admit_cases(&suite, &base, &webhook, dir, &mut results)?;
    render_cases(&suite, &base, &operator, dir, &mut results)?;
    who_can_cases(&suite, &base, &operator, &mut results)?;
    Ok(results)
}

fn admit_cases(
    suite: &Suite,
    base: &[input::Object],
    webhook: &palisade_webhook::config::Config,
    dir: &Path,
    results: &mut Vec<CaseResult>,
) -> Result<()> {
    let at = |p: &PathBuf| dir.join(p);
    for case in &suite.admit {
        let objects = input::load(&[at(&case.file)])?;
        let all = merged(base, &objects);
        let outcomes = admit::admit(&all, webhook, "default")?;
        let judged: Vec<_> = outcomes
            .iter()
            .filter(|o| {
                objects.iter().any(|x| {
                    o.object.ends_with(&format!("/{}", x.name())) && o.object.starts_with(x.kind())
                })
            })
            .collect();
        let mut failure = None;
        if judged.is_empty() {
            failure = Some("no object with a pod in it".to_owned());
        }
        for o in judged {
            let text = format!("{} {}", o.message, o.warnings.join(" "));
            if o.verdict != case.expect {
                failure = Some(format!(
                    "{}: {} (expected {}) {text}",
                    o.object, o.verdict, case.expect
                ));
            } else if let Some(m) = case
                .message_contains
                .iter()
                .find(|m| !text.contains(m.as_str()))
            {
                failure = Some(format!("{}: the message lacks {m:?}: {text}", o.object));
            }
        }
        results.push(CaseResult {
            name: format!("admit {} expect {}", case.file.display(), case.expect),
            failure,
        });
    }
    Ok(())
}

fn render_cases(
    suite: &Suite,
    base: &[input::Object],
    operator: &palisade_operator::config::Config,
    dir: &Path,
    results: &mut Vec<CaseResult>,
) -> Result<()> {
    let at = |p: &PathBuf| dir.join(p);
    for case in &suite.render {
        let objects = input::load(&[at(&case.file)])?;
        let all = merged(base, &objects);
        let only: Vec<_> = objects
            .iter()
            .map(|o| format!("{} {}/{}", o.kind(), o.namespace("default"), o.name()))
            .collect();
        let sections: Vec<_> =
            render::render(&all, &operator.context, operator.vault.as_ref(), "default")?
                .into_iter()
                .filter(|s| only.contains(&s.source))
                .collect();
        let got = render::to_yaml(&sections)?;
        let want = std::fs::read_to_string(at(&case.expect_file))
            .with_context(|| format!("{}", case.expect_file.display()))?;
        results.push(CaseResult {
            name: format!("render {}", case.file.display()),
            failure: (got != want).then(|| {
                format!(
                    "differs from {}; `palisade render` now gives:\n{got}",
                    case.expect_file.display()
                )
            }),
        });
    }
    Ok(())
}

fn who_can_cases(
    suite: &Suite,
    base: &[input::Object],
    operator: &palisade_operator::config::Config,
    results: &mut Vec<CaseResult>,
) -> Result<()> {
    for case in &suite.who_can {
        let http = match (&case.method, &case.path) {
            (Some(m), Some(p)) => Some((m.clone(), p.clone())),
            (None, None) => None,
            _ => bail!("whoCan: give both method and path, or neither"),
        };
        let query = who_can::Query {
            namespace: case.namespace.clone(),
            labels: case.labels.clone(),
            request: Some(who_can::Probe {
                from: caller(&case.from)?,
                port: case.port,
                http,
            }),
        };
        let report = who_can::who_can(
            base,
            &query,
            &operator.context.trust_domain,
            &operator.context.mesh_root_namespace,
            "default",
        )?;
        let got = if report.allowed == Some(true) {
            "allow"
        } else {
            "deny"
        };
        results.push(CaseResult {
            name: format!(
                "whoCan {} -> {}/{:?} port {} {}",
                case.from,
                case.namespace,
                case.labels,
                case.port,
                case.method.as_deref().unwrap_or("tcp")
            ),
            failure: (got != case.expect).then(|| {
                format!(
                    "{got} (expected {}); policies applying: {}",
                    case.expect,
                    report
                        .policies
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        });
    }
    Ok(())
}
