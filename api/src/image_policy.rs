//! `ImagePolicy` (cluster-scoped): which images must carry which cosign signatures and
//! attestations before a pod may run them. Enforced by the admission webhook.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{common::CommonStatus, glob::ImageGlob};

/// Requires images matching `images` to be signed by the listed authorities (and to carry the
/// listed attestations) before pods in the selected namespaces may run them.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "ImagePolicy",
    status = "ImagePolicyStatus",
    shortname = "imgpol",
    category = "palisade",
    doc = "ImagePolicy (cluster-scoped) requires matching images to carry cosign signatures and attestations from the listed authorities before pods may run them; the admission webhook enforces it.",
    cel,
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Require", type_ = "string", json_path = ".spec.require"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.require == 'AtLeast' ? (has(self.atLeast) && self.atLeast <= size(self.authorities)) : !has(self.atLeast)")
    .message("atLeast is required with require: AtLeast (and at most the number of authorities), and not allowed otherwise"))]
#[serde(rename_all = "camelCase")]
pub struct ImagePolicySpec {
    /// Images this policy covers, matched against the reference without tag or digest.
    #[schemars(length(min = 1, max = 64))]
    pub images: Vec<ImagePattern>,

    /// Namespaces whose pods the policy applies to. All namespaces when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// `Enforce` (default) refuses pods that fail; `Warn` admits them with a warning; `Audit`
    /// admits them and only records the failure.
    #[serde(default)]
    pub mode: EnforcementMode,

    /// How many authorities must verify an image: `All` (default), `Any`, or `AtLeast` with
    /// `atLeast`.
    #[serde(default)]
    pub require: Requirement,

    /// With `require: AtLeast`, the number of authorities that must verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("must be >= 1"))]
    pub at_least: Option<i32>,

    /// Who may sign the images.
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("spec.authorities must name at least one authority"))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.name == a.name))").message("authority names must be unique"))]
    pub authorities: Vec<Authority>,

    /// In-toto attestations the images must carry, each signed by one of `authorities` and
    /// checked by its policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub attestations: Vec<AttestationRequirement>,

    /// Rewrites tags in admitted pods to the verified digests (pods only, so workloads stored in
    /// Git keep their tags and never show drift).
    #[serde(default)]
    pub pin_digest: bool,
}

/// An image glob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePattern {
    /// E.g. `registry.example.com/shop/**`.
    pub glob: ImageGlob,
}

/// What the webhook does with a pod that fails the policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EnforcementMode {
    /// Refuse the pod.
    #[default]
    Enforce,
    /// Admit the pod with a warning shown to the client.
    Warn,
    /// Admit the pod and record the failure only.
    Audit,
}

/// How many authorities must verify an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Requirement {
    /// Every authority must verify the image.
    #[default]
    All,
    /// One authority is enough.
    Any,
    /// At least `atLeast` authorities.
    AtLeast,
}

/// A signer: a public key, or keyless signing identities under a trust root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.key) != has(self.keyless)")
    .message("each authority must set exactly one of key or keyless"))]
pub struct Authority {
    /// Name of the authority, used in denials and status.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("must be a lower-case DNS label (letters, digits, '-')"))]
    pub name: String,

    /// A cosign public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyRef>,

    /// Keyless (Fulcio-style certificate) signing identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyless: Option<Keyless>,

    /// Whether signatures must have a transparency-log entry. `Ignore` suits air-gapped
    /// clusters that sign with `--tlog-upload=false`. Defaults to `Require`.
    #[serde(default)]
    pub transparency_log: TransparencyLog,
}

/// Where a public key comes from. Exactly one field is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.publicKey) != has(self.secretRef)")
    .message("key must set exactly one of publicKey or secretRef"))]
pub struct KeyRef {
    /// The PEM-encoded public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    #[x_kube(validation = Rule::new("self.trim().startsWith('-----BEGIN PUBLIC KEY-----') && self.trim().endsWith('-----END PUBLIC KEY-----')")
        .message("must be a PEM public key (-----BEGIN PUBLIC KEY----- ... -----END PUBLIC KEY-----)"))]
    pub public_key: Option<String>,

    /// A Secret holding the PEM public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeySelector>,
}

/// A key of a Secret in a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Secret namespace. Defaults to Palisade's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Key in the Secret's data. Defaults to `cosign.pub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// Keyless signing: certificate identities issued under a trust root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Keyless {
    /// Accepted signer identities; any one may match.
    #[schemars(length(min = 1, max = 16))]
    pub identities: Vec<Identity>,
    /// A ConfigMap holding the PEM certificate chain of the issuing CA (Fulcio root), for
    /// air-gapped clusters with their own CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_root_ref: Option<ConfigMapKeySelector>,
}

/// A certificate identity as in cosign and sigstore policy-controller: the OIDC issuer and the
/// subject (SAN) of the signing certificate, each exact or by regular expression.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.issuer) != has(self.issuerRegExp)")
    .message("set exactly one of issuer or issuerRegExp"))]
#[x_kube(validation = Rule::new("has(self.subject) != has(self.subjectRegExp)")
    .message("set exactly one of subject or subjectRegExp"))]
pub struct Identity {
    /// Exact OIDC issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub issuer: Option<String>,
    /// OIDC issuer regular expression (RE2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub issuer_reg_exp: Option<String>,
    /// Exact certificate subject (e-mail or URI SAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub subject: Option<String>,
    /// Certificate subject regular expression (RE2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub subject_reg_exp: Option<String>,
}

/// A key of a ConfigMap in a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeySelector {
    /// ConfigMap name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// ConfigMap namespace. Defaults to Palisade's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Key in the ConfigMap. Defaults to `ca.pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// Whether a transparency-log entry is required.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TransparencyLog {
    /// A signature without a verifiable log entry fails.
    #[default]
    Require,
    /// Log entries are not checked.
    Ignore,
}

/// An attestation the images must carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttestationRequirement {
    /// Name, used in denials and status.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The in-toto predicate type, e.g. `https://slsa.dev/provenance/v1`.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("isURL(self)").message("must be a URI such as https://slsa.dev/provenance/v1"))]
    pub predicate_type: String,
    /// A policy the attestation's predicate must satisfy. Without one, a valid signed
    /// attestation of the type is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PredicatePolicy>,
}

/// A predicate check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PredicatePolicy {
    /// A Rego module; the attestation passes when its `allow` rule is true for
    /// `input = {"predicateType": ..., "predicate": ...}`. Its `deny` set, if any, explains
    /// failures.
    Rego(#[schemars(length(min = 1, max = 65536))] String),
}

/// Observed state of an ImagePolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePolicyStatus {
    /// Generation, conditions (`Accepted`, `Ready`).
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Per authority: whether its key or trust root is loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorities: Vec<AuthorityStatus>,
}

/// Whether one authority's key material is loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorityStatus {
    /// Authority name.
    pub name: String,
    /// Whether the key or trust root parsed and is in use.
    pub loaded: bool,
    /// Why it is not loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
