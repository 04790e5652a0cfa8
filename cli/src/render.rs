//! `palisade render`: what the operator generates for a set of resources, with the notes it
//! would put in their status (hazards, parts the backend cannot express, AuthPolicies that widen
//! each other). The operator's own translation functions; cluster facts the operator also reads
//! (ambient enrolment, Gateways, live Vault state) are not known offline.

use std::{fmt::Write as _, sync::Arc};

use anyhow::{Context as _, Result};
use palisade_api::{AuthPolicy, RateLimitPolicy, SecretBinding};
use palisade_operator::{
    translate::{self, Context, Note, Severity},
    vault::VaultSettings,
};
use serde::Serialize;
use serde_json::Value;

use crate::input::Object;

/// What one resource produces.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Section {
    /// `AuthPolicy shop/payments`.
    pub source: String,
    /// The Kubernetes objects generated.
    pub objects: Vec<Value>,
    /// Notes, as the status conditions would carry them.
    pub notes: Vec<Note>,
    /// A SecretBinding's Vault policy (HCL) and role, when the Vault settings are known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultOut>,
    /// Why the operator would refuse the resource.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The Vault side of a SecretBinding.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultOut {
    /// Policy name.
    pub policy_name: String,
    /// Policy text.
    pub policy: String,
    /// The Kubernetes auth role, as written to Vault.
    pub role: Value,
}

impl Section {
    fn new(kind: &str, ns: &str, name: &str) -> Self {
        Section {
            source: format!("{kind} {ns}/{name}"),
            objects: Vec::new(),
            notes: Vec::new(),
            vault: None,
            refused: None,
        }
    }

    /// Whether the operator would report part of this resource as not enforced, or refuse it.
    pub fn unenforced(&self) -> bool {
        self.refused.is_some()
            || self
                .notes
                .iter()
                .any(|n| n.severity == Severity::Unsupported)
    }
}

fn typed<T: serde::de::DeserializeOwned>(o: &Object, default_ns: &str) -> Result<T> {
    let mut v = o.value.clone();
    v["metadata"]["namespace"] = Value::String(o.namespace(default_ns).to_owned());
    serde_json::from_value(v).with_context(|| {
        format!(
            "{}: {} {} does not match its schema",
            o.file.display(),
            o.kind(),
            o.name()
        )
    })
}

/// Renders every Palisade resource in `objects` (others are skipped). `vault`: the operator's
/// Vault settings, without which SecretBindings get a note instead of a policy.
pub fn render(
    objects: &[Object],
    ctx: &Context,
    vault: Option<&VaultSettings>,
    default_ns: &str,
) -> Result<Vec<Section>> {
    let ours = |o: &&Object| o.group() == "palisade.dev";
    let auth: Vec<Arc<AuthPolicy>> = objects
        .iter()
        .filter(ours)
        .filter(|o| o.kind() == "AuthPolicy")
        .map(|o| typed(o, default_ns).map(Arc::new))
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for policy in &auth {
        let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
        let name = policy.metadata.name.as_deref().unwrap_or_default();
        let mut s = Section::new("AuthPolicy", ns, name);
        let desired = translate::auth::translate(policy, ctx);
        s.objects = desired.objects;
        s.notes = desired.notes;
        s.notes.extend(translate::auth::widenings(
            policy,
            &auth,
            &ctx.mesh_root_namespace,
        ));
        out.push(s);
    }
    for o in objects.iter().filter(ours) {
        let ns = o.namespace(default_ns);
        match o.kind() {
            "RateLimitPolicy" => {
                let policy: RateLimitPolicy = typed(o, default_ns)?;
                let mut s = Section::new("RateLimitPolicy", ns, o.name());
                let desired = translate::ratelimit::translate(&policy, ctx);
                s.objects = desired.objects;
                s.notes = desired.notes;
                out.push(s);
            }
            "SecretBinding" => {
                let binding: SecretBinding = typed(o, default_ns)?;
                let mut s = Section::new("SecretBinding", ns, o.name());
                match vault {
                    Some(settings) => {
                        let naming = settings.naming();
                        match translate::vault::translate(&binding, &settings.grants(&naming)) {
                            Ok(d) => {
                                s.vault = Some(VaultOut {
                                    policy_name: d.policy.name.clone(),
                                    policy: d.policy.hcl(),
                                    role: d.role.request(),
                                });
                            }
                            Err(r) => s.refused = Some(format!("{}: {}", r.reason, r.message)),
                        }
                    }
                    None => s.notes.push(Note {
                        reason: "VaultNotConfigured",
                        message: "the Vault policy and role depend on the operator's vault \
                                  settings: pass the operator's configuration (--operator-config)"
                            .to_owned(),
                        severity: Severity::Warning,
                    }),
                }
                out.push(s);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The sections as one YAML stream: a comment header per resource (its notes, its Vault policy),
/// then its objects as documents, without their owner references.
pub fn to_yaml(sections: &[Section]) -> Result<String> {
    let mut out = String::new();
    for s in sections {
        let _ = writeln!(out, "# {}", s.source);
        if let Some(r) = &s.refused {
            let _ = writeln!(out, "# Refused: {r}");
        }
        for n in &s.notes {
            let _ = writeln!(out, "# {:?} {}: {}", n.severity, n.reason, n.message);
        }
        if let Some(v) = &s.vault {
            let _ = writeln!(out, "# Vault policy {}:", v.policy_name);
            for line in v.policy.lines() {
                let _ = writeln!(out, "#   {line}");
            }
            let _ = writeln!(out, "# Vault role: {}", serde_json::to_string(&v.role)?);
        }
        for o in &s.objects {
            // Owner references name the resource's uid, which only the cluster knows.
            let mut o = o.clone();
            if let Some(m) = o["metadata"].as_object_mut() {
                m.remove("ownerReferences");
            }
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&o)?);
        }
    }
    Ok(out)
}
