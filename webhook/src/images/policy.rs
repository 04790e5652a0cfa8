//! ImagePolicies compiled for admission: globs, namespace selector, signers and attestation
//! checks parsed once per policy generation. A policy whose key material or predicate policy
//! cannot be loaded is kept, with the reason, and fails closed for the images it covers.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use palisade_api::{
    ImagePolicy, ImagePolicyStatus,
    common::{Cond, build},
    glob::ImageGlob,
    image_policy::{
        AuthorityStatus, ConfigMapKeySelector, EnforcementMode, Keyless, PredicatePolicy,
        Requirement, SecretKeySelector, TransparencyLog,
    },
};
use regorus::{CompiledPolicy, Engine, Value};

use super::{
    reference::{ImageRef, canonical_glob},
    verify::{IdentityMatcher, Matcher, Signer},
};
use crate::identity::selects;

/// The rule a predicate policy must define.
pub const PREDICATE_RULE: &str = "data.palisade.attestation.allow";

/// One authority, loaded or not.
#[derive(Clone, Debug)]
pub struct LoadedAuthority {
    /// Name.
    pub name: String,
    /// The signer, or why it could not be loaded.
    pub signer: Result<Signer, String>,
}

/// One attestation requirement.
#[derive(Clone)]
pub struct LoadedAttestation {
    /// Name.
    pub name: String,
    /// In-toto predicate type.
    pub predicate_type: String,
    /// Compiled predicate policy (`None`: any signed attestation of the type), or why it does
    /// not compile.
    pub policy: Result<Option<CompiledPolicy>, String>,
}

/// An ImagePolicy ready for admission.
#[derive(Clone)]
pub struct CompiledImagePolicy {
    /// Name.
    pub name: String,
    /// `metadata.generation`.
    pub generation: i64,
    /// What its verdicts depend on: uid, generation and the key material it was compiled
    /// with, so a rotated key or trust root invalidates what the old one verified at once.
    pub fingerprint: String,
    /// Its image globs in canonical form, each glob as all the canonical globs it stands for
    /// (see [`super::reference::canonical_glob`]).
    pub globs: Vec<ImageGlob>,
    /// The policy as written.
    pub policy: ImagePolicy,
    /// Authorities.
    pub authorities: Vec<LoadedAuthority>,
    /// Attestations.
    pub attestations: Vec<LoadedAttestation>,
}

impl CompiledImagePolicy {
    /// Compiles `policy`, reading referenced Secrets and ConfigMaps through `material` (see
    /// [`material_refs`]; `None`: not fetched yet).
    pub fn compile(policy: &ImagePolicy, material: MaterialLookup<'_>) -> Self {
        // Every lookup (and its outcome) goes into the fingerprint.
        let seen = std::cell::RefCell::new(Vec::<u8>::new());
        let recording = |r: &str| {
            let v = material(r);
            let mut seen = seen.borrow_mut();
            seen.extend_from_slice(r.as_bytes());
            match &v {
                Some(Ok(bytes)) => {
                    seen.extend_from_slice(b"\x00ok\x00");
                    seen.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
                    seen.extend_from_slice(bytes);
                }
                Some(Err(e)) => {
                    seen.extend_from_slice(b"\x00err\x00");
                    seen.extend_from_slice(e.to_string().as_bytes());
                }
                None => seen.extend_from_slice(b"\x00unread\x00"),
            }
            seen.push(0);
            v
        };
        let material: MaterialLookup<'_> = &recording;
        let authorities = policy
            .spec
            .authorities
            .iter()
            .map(|a| {
                let signer = if a.transparency_log == TransparencyLog::Require {
                    Err("transparencyLog: Require needs a transparency log, which this webhook does not query; set transparencyLog: Ignore to trust the signature alone".to_owned())
                } else if let Some(key) = &a.key {
                    match (&key.public_key, &key.secret_ref) {
                        (Some(pem), _) => {
                            let s = Signer::Key(pem.as_bytes().to_vec());
                            s.validate().map(|()| s).map_err(|e| e.to_string())
                        }
                        (None, Some(r)) => fetched(material, &secret_ref(r)).and_then(|pem| {
                            let s = Signer::Key(pem);
                            s.validate().map(|()| s).map_err(|e| e.to_string())
                        }),
                        (None, None) => Err("key has neither publicKey nor secretRef".to_owned()),
                    }
                } else if let Some(k) = &a.keyless {
                    keyless_signer(k, material)
                } else {
                    Err("neither key nor keyless".to_owned())
                };
                LoadedAuthority {
                    name: a.name.clone(),
                    signer,
                }
            })
            .collect();
        let attestations = policy
            .spec
            .attestations
            .iter()
            .map(|a| LoadedAttestation {
                name: a.name.clone(),
                predicate_type: a.predicate_type.clone(),
                policy: match &a.policy {
                    None => Ok(None),
                    Some(PredicatePolicy::Rego(text)) => compile_rego(&a.name, text).map(Some),
                },
            })
            .collect();
        let generation = policy.metadata.generation.unwrap_or_default();
        let mut hashed = ring::digest::Context::new(&ring::digest::SHA256);
        hashed.update(
            policy
                .metadata
                .uid
                .as_deref()
                .unwrap_or_default()
                .as_bytes(),
        );
        hashed.update(&generation.to_be_bytes());
        hashed.update(&seen.borrow());
        let fingerprint = hex(hashed.finish().as_ref());
        CompiledImagePolicy {
            name: policy.metadata.name.clone().unwrap_or_default(),
            generation,
            fingerprint,
            globs: policy
                .spec
                .images
                .iter()
                .flat_map(|i| canonical_glob(&i.glob))
                .collect(),
            policy: policy.clone(),
            authorities,
            attestations,
        }
    }

    /// Whether the policy covers `image` in a namespace with `labels`.
    pub fn covers(&self, image: &ImageRef, labels: &BTreeMap<String, String>) -> bool {
        self.globs.iter().any(|g| g.matches(&image.repository))
            && self
                .policy
                .spec
                .namespace_selector
                .as_ref()
                .is_none_or(|s| selects(Some(s), labels))
    }

    /// The enforcement mode.
    pub fn mode(&self) -> EnforcementMode {
        self.policy.spec.mode
    }

    /// The status this policy should report: per authority whether its key material is loaded,
    /// `Ready` when everything is (otherwise the images it covers fail closed, and `Ready=False`
    /// says why).
    pub fn status(&self, previous: &ImagePolicyStatus, now: &Time) -> ImagePolicyStatus {
        let authorities: Vec<AuthorityStatus> = self
            .authorities
            .iter()
            .map(|a| AuthorityStatus {
                name: a.name.clone(),
                loaded: a.signer.is_ok(),
                message: a.signer.as_ref().err().cloned(),
            })
            .collect();
        let mut problems: Vec<String> = self
            .authorities
            .iter()
            .filter_map(|a| {
                a.signer
                    .as_ref()
                    .err()
                    .map(|e| format!("authority {}: {e}", a.name))
            })
            .collect();
        problems.extend(
            self.attestations
                .iter()
                .filter_map(|a| a.policy.as_ref().err().cloned()),
        );
        let ready = if problems.is_empty() {
            Cond::new(
                "Ready",
                true,
                "Loaded",
                "every authority and predicate policy is loaded",
            )
        } else {
            Cond::new(
                "Ready",
                false,
                "NotLoaded",
                format!(
                    "images this policy covers are refused until fixed: {}",
                    problems.join("; ")
                ),
            )
        };
        let conds = [
            Cond::new(
                "Accepted",
                true,
                "Accepted",
                "enforced by the admission webhook",
            ),
            ready,
        ];
        ImagePolicyStatus {
            common: build(
                &previous.common,
                self.policy.metadata.generation,
                &conds,
                now,
            ),
            authorities,
        }
    }

    /// How many verified authorities suffice.
    pub fn needed(&self) -> usize {
        match self.policy.spec.require {
            Requirement::All => self.authorities.len(),
            Requirement::Any => 1,
            Requirement::AtLeast => usize::try_from(self.policy.spec.at_least.unwrap_or(1))
                .unwrap_or(1)
                .max(1),
        }
    }
}

/// Reads a referenced key (`secret|configmap/<ns>/<name>/<key>`): `None` when not fetched yet.
pub type MaterialLookup<'a> = &'a dyn Fn(&str) -> Option<Result<Vec<u8>, crate::FactError>>;

/// Palisade's own namespace, where references without a namespace point.
pub const OWN_NAMESPACE: &str = "palisade-system";

fn secret_ref(r: &SecretKeySelector) -> String {
    format!(
        "secret/{}/{}/{}",
        r.namespace.as_deref().unwrap_or(OWN_NAMESPACE),
        r.name,
        r.key.as_deref().unwrap_or("cosign.pub")
    )
}

fn config_map_ref(r: &ConfigMapKeySelector) -> String {
    format!(
        "configmap/{}/{}/{}",
        r.namespace.as_deref().unwrap_or(OWN_NAMESPACE),
        r.name,
        r.key.as_deref().unwrap_or("ca.pem")
    )
}

/// The Secrets and ConfigMaps a policy reads, as `secret/<ns>/<name>/<key>` and
/// `configmap/<ns>/<name>/<key>`.
pub fn material_refs(policy: &ImagePolicy) -> Vec<String> {
    let mut out = Vec::new();
    for a in &policy.spec.authorities {
        if let Some(r) = a.key.as_ref().and_then(|k| k.secret_ref.as_ref()) {
            out.push(secret_ref(r));
        }
        if let Some(r) = a.keyless.as_ref().and_then(|k| k.trust_root_ref.as_ref()) {
            out.push(config_map_ref(r));
        }
    }
    out
}

fn fetched(material: MaterialLookup<'_>, r: &str) -> Result<Vec<u8>, String> {
    material(r)
        .unwrap_or_else(|| Err(crate::FactError::NotReadYet(r.to_owned())))
        .map_err(|e| e.to_string())
}

fn keyless_signer(k: &Keyless, material: MaterialLookup<'_>) -> Result<Signer, String> {
    let Some(root_ref) = &k.trust_root_ref else {
        return Err("keyless without trustRootRef needs the public Sigstore trust root, which an air-gapped webhook cannot fetch; set trustRootRef to your CA".to_owned());
    };
    let roots = fetched(material, &config_map_ref(root_ref))?;
    let matcher = |exact: &Option<String>, re: &Option<String>| match (exact, re) {
        (Some(e), _) => Ok(Matcher::Exact(e.clone())),
        (None, Some(r)) => Matcher::pattern(r),
        (None, None) => Err("identity without issuer or subject".to_owned()),
    };
    let identities = k
        .identities
        .iter()
        .map(|i| {
            Ok(IdentityMatcher {
                issuer: matcher(&i.issuer, &i.issuer_reg_exp)?,
                subject: matcher(&i.subject, &i.subject_reg_exp)?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let s = Signer::Keyless { roots, identities };
    s.validate().map(|()| s).map_err(|e| e.to_string())
}

fn compile_rego(name: &str, text: &str) -> Result<CompiledPolicy, String> {
    let mut engine = Engine::new();
    engine
        .add_policy(format!("{name}.rego"), text.to_owned())
        .map_err(|e| format!("attestation {name}: policy does not parse: {e}"))?;
    engine
        .compile_with_entrypoint(&PREDICATE_RULE.into())
        .map_err(|e| format!("attestation {name}: policy has no usable {PREDICATE_RULE}: {e}"))
}

/// Whether a predicate satisfies a compiled predicate policy.
pub fn predicate_allowed(
    policy: &CompiledPolicy,
    predicate_type: &str,
    predicate: &serde_json::Value,
) -> Result<bool, String> {
    let input = serde_json::json!({"predicateType": predicate_type, "predicate": predicate});
    let out = policy
        .eval_with_input(Value::from(input))
        .map_err(|e| e.to_string())?;
    Ok(out == Value::Bool(true))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(s: &str) -> ImageRef {
        super::super::reference::parse(s).expect("reference")
    }

    #[test]
    fn unloadable_material_is_kept_with_its_reason() {
        let policy: ImagePolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "ImagePolicy",
            "metadata": {"name": "p", "generation": 3},
            "spec": {"images": [{"glob": "registry.example.com/shop/**"}],
                     "authorities": [
                        {"name": "bad-key", "transparencyLog": "Ignore", "key": {"publicKey": "nonsense"}},
                        {"name": "tlog", "key": {"publicKey": "nonsense"}}],
                     "attestations": [{"name": "prov", "predicateType": "https://slsa.dev/provenance/v1",
                                       "policy": {"rego": "package palisade.attestation\nallow if {"}}]}
        }))
        .expect("policy");
        let c = CompiledImagePolicy::compile(&policy, &|_| None);
        assert_eq!(c.generation, 3);
        assert!(
            c.authorities[0]
                .signer
                .as_ref()
                .is_err_and(|e| e.contains("public key"))
        );
        assert!(
            c.authorities[1]
                .signer
                .as_ref()
                .is_err_and(|e| e.contains("transparencyLog"))
        );
        assert!(
            c.attestations[0]
                .policy
                .as_ref()
                .is_err_and(|e| e.contains("does not parse"))
        );
        assert!(c.covers(&img("registry.example.com/shop/app:v1"), &BTreeMap::new()));
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let status = c.status(&ImagePolicyStatus::default(), &now);
        assert_eq!(status.common.observed_generation, Some(3));
        let ready = status
            .common
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NotLoaded")
        );
        assert!(
            ready.message.contains("authority bad-key"),
            "{}",
            ready.message
        );
        assert_eq!(status.authorities.len(), 2);
        assert!(!status.authorities[0].loaded);
        // The same input again: the same status, timestamps included (no write).
        assert_eq!(
            c.status(&status, &Time(k8s_openapi::jiff::Timestamp::MAX)),
            status
        );
        assert!(!c.covers(&img("registry.example.com/other/app:v1"), &BTreeMap::new()));
    }

    #[test]
    fn predicate_policies_decide_on_the_predicate() {
        let p = compile_rego(
            "prov",
            "package palisade.attestation\nimport rego.v1\ndefault allow := false\nallow if input.predicate.builder.id == \"https://ci.example/builder\"\n",
        )
        .expect("compiles");
        let good = serde_json::json!({"builder": {"id": "https://ci.example/builder"}});
        let bad = serde_json::json!({"builder": {"id": "https://evil.example"}});
        assert_eq!(predicate_allowed(&p, "t", &good), Ok(true));
        assert_eq!(predicate_allowed(&p, "t", &bad), Ok(false));
    }

    #[test]
    fn keyless_authorities_read_their_trust_root_and_identities() {
        let policy: ImagePolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "ImagePolicy",
            "metadata": {"name": "p"},
            "spec": {"images": [{"glob": "r.example/**"}],
                     "authorities": [{"name": "ci", "transparencyLog": "Ignore",
                        "keyless": {"identities": [{"issuer": "https://issuer.example",
                                                    "subjectRegExp": "[a-z]+@example[.]com"}],
                                    "trustRootRef": {"name": "fulcio", "namespace": "sec"}}}]}
        }))
        .expect("policy");
        assert_eq!(material_refs(&policy), ["configmap/sec/fulcio/ca.pem"]);
        let missing = CompiledImagePolicy::compile(&policy, &|_| None);
        assert!(
            missing.authorities[0]
                .signer
                .as_ref()
                .is_err_and(|e| e.contains("configmap/sec/fulcio/ca.pem not read yet"))
        );
        let ca = {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.self_signed(&key).expect("ca").pem()
        };
        let loaded = CompiledImagePolicy::compile(&policy, &|r| {
            (r == "configmap/sec/fulcio/ca.pem").then(|| Ok(ca.clone().into_bytes()))
        });
        assert!(loaded.authorities[0].signer.is_ok());
    }

    #[test]
    fn the_example_policy_loads() {
        let text = include_str!("../../../examples/50-imagepolicy-shop.yaml");
        let value: serde_json::Value = serde_yaml::from_str(text).expect("YAML");
        let policy: ImagePolicy = serde_json::from_value(value).expect("ImagePolicy");
        let c = CompiledImagePolicy::compile(&policy, &|_| None);
        for a in &c.authorities {
            assert!(a.signer.is_ok(), "{}: {:?}", a.name, a.signer);
        }
        for a in &c.attestations {
            assert!(
                a.policy.is_ok(),
                "{}: {:?}",
                a.name,
                a.policy.as_ref().err()
            );
        }
        assert!(c.covers(
            &img("registry.example.com/shop/orders:1.4.2"),
            &BTreeMap::from([("kubernetes.io/metadata.name".into(), "shop".into())])
        ));
    }
}
