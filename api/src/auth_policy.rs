//! `AuthPolicy`: who may call a set of workloads, by SPIFFE identity, method, path and JWT scope.
//!
//! The operator turns one AuthPolicy into Istio `security.istio.io/v1` objects: an ALLOW
//! `AuthorizationPolicy` for `rules`, a DENY one for `deny`, a CUSTOM one for `external`, a
//! `RequestAuthentication` for `jwt` and a STRICT `PeerAuthentication` for `mtls: Strict`.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    common::{CommonStatus, Duration, GeneratedRef, TargetRef, WorkloadSelector},
    identity::SpiffeId,
};

/// Who may call the selected workloads. Rules follow Istio's semantics: a request matches a rule
/// when it matches one `from` entry, one `to` entry and every `when` entry; CUSTOM (external)
/// checks run first, then `deny`, then `rules`.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "AuthPolicy",
    namespaced,
    status = "AuthPolicyStatus",
    shortname = "authpol",
    category = "palisade",
    doc = "AuthPolicy declares who may call a set of workloads (by SPIFFE identity, method, path and JWT claims) and becomes Istio AuthorizationPolicies, a RequestAuthentication and a PeerAuthentication.",
    cel,
    printcolumn(name = "mTLS", type_ = "string", json_path = ".spec.mtls"),
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
#[x_kube(validation = Rule::new("!has(self.selector) || !has(self.targetRefs)")
    .message("spec.selector and spec.targetRefs are mutually exclusive: select pods by label, or attach to Gateways/Services, not both"))]
#[x_kube(validation = Rule::new("has(self.rules) || has(self.deny) || has(self.external) || has(self.jwt) || self.mtls != 'Inherit'")
    .message("an AuthPolicy must declare at least one of rules, deny, external, jwt or mtls"))]
#[x_kube(validation = Rule::new("!has(self.external) || has(self.jwt)")
    .message("external needs jwt: the authorizer verifies tokens of the issuer jwt names, and trusts no other"))]
#[x_kube(validation = Rule::new("has(self.jwt) || ((!has(self.rules) || self.rules.all(r, !has(r.when) || size(r.when) == 0)) && (!has(self.deny) || self.deny.all(r, !has(r.when) || size(r.when) == 0)))")
    .message("when conditions read a validated token: set jwt to name its issuer"))]
#[serde(rename_all = "camelCase")]
pub struct AuthPolicySpec {
    /// Pods in this namespace the policy protects, by label. When neither `selector` nor
    /// `targetRefs` is set, the policy protects every workload in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,

    /// Gateway API Gateways or Services (same namespace) the policy attaches to instead of a
    /// pod selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(t, (t.group == 'gateway.networking.k8s.io' && t.kind == 'Gateway') || ((!has(t.group) || t.group == '') && t.kind == 'Service'))")
        .message("targetRefs may name only a gateway.networking.k8s.io Gateway or a core Service"))]
    pub target_refs: Option<Vec<TargetRef>>,

    /// Mutual TLS for the selected workloads. `Strict` (default) refuses plain-text traffic, which
    /// identity rules (`serviceAccount`, `spiffeId`, `namespace`) need to be meaningful;
    /// `Permissive` accepts both; `Inherit` leaves the mesh's setting alone.
    #[serde(default)]
    pub mtls: MtlsMode,

    /// Validates JWTs presented by callers (becomes an Istio RequestAuthentication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSpec>,

    /// Callers allowed in. When set, a request that matches no rule is refused; an empty list
    /// refuses every request. When unset, nothing is refused on this policy's account except by
    /// `deny` and `external`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub rules: Option<Vec<AuthRule>>,

    /// Requests always refused, whatever `rules` says. Evaluated before `rules`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub deny: Option<Vec<AuthRule>>,

    /// Delegates the decision to an external authorizer (OPA via Envoy ext_authz), evaluated
    /// before `deny` and `rules`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalAuthz>,
}

/// Mutual TLS mode for the selected workloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MtlsMode {
    /// Only mutual TLS connections are accepted (PeerAuthentication STRICT).
    #[default]
    Strict,
    /// Both mutual TLS and plain text are accepted (PeerAuthentication PERMISSIVE).
    Permissive,
    /// No PeerAuthentication is generated; the namespace or mesh default applies.
    Inherit,
}

/// JWT validation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtSpec {
    /// The `iss` claim tokens must carry.
    #[schemars(length(min = 1, max = 512))]
    pub issuer: String,

    /// Where the issuer publishes its signing keys. Must be https. When unset, keys are found by
    /// OpenID Connect discovery from the issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() == 'https'")
        .message("must be an https:// URL"))]
    pub jwks_uri: Option<String>,

    /// Accepted `aud` values; any one must be present. When empty, the audience is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 512)))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(a, !a.contains('*'))",
        "message": "audiences are literals: Istio would read '*' as a wildcard"
    }]))]
    pub audiences: Vec<String>,

    /// The longest lifetime (`exp` - `iat`) an access token may have; longer-lived tokens are
    /// refused by the external authorizer. Defaults to 15m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('24h')")
        .message("must be between 1s and 24h"))]
    pub max_token_lifetime: Option<Duration>,

    /// Whether a request without any token is refused (default true). Invalid tokens are always
    /// refused.
    #[serde(default = "default_true")]
    pub require_token: bool,
}

fn default_true() -> bool {
    true
}

/// One rule: matches when the request matches one `from` entry, one `to` entry and every `when`
/// entry. An empty `from` matches any caller; an empty `to` matches any operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthRule {
    /// Callers the rule applies to; any one may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub from: Vec<Source>,
    /// Operations the rule applies to; any one may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to: Vec<Operation>,
    /// Extra conditions on the request; all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub when: Vec<When>,
}

/// A caller, by mesh identity. Exactly one of the fields is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.serviceAccount) ? 1 : 0) + (has(self.spiffeId) ? 1 : 0) + (has(self.__namespace__) ? 1 : 0) == 1",
    "message": "each from entry must set exactly one of serviceAccount, spiffeId or namespace"
}]))]
pub enum Source {
    /// Workloads running as this ServiceAccount.
    ServiceAccount(ServiceAccountRef),
    /// A workload with exactly this SPIFFE ID.
    SpiffeId(SpiffeId),
    /// Any workload in this namespace.
    Namespace(
        #[schemars(length(min = 1, max = 63))]
        #[schemars(extend("x-kubernetes-validations" = [{
            "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
            "message": "must be a namespace name (a lower-case DNS label): Istio would read '*' as a wildcard"
        }]))]
        String,
    ),
}

/// A ServiceAccount, by name and namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// ServiceAccount name.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')",
        "message": "must be a ServiceAccount name (a lower-case DNS subdomain): Istio would read '*' as a wildcard"
    }]))]
    pub name: String,
    /// ServiceAccount namespace; defaults to the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
        "message": "must be a namespace name (a lower-case DNS label): Istio would read '*' as a wildcard"
    }]))]
    pub namespace: Option<String>,
}

/// An operation on the protected workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// HTTP methods; any one may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 9))]
    pub methods: Vec<HttpMethod>,
    /// Request paths: exact (`/api/orders`), prefix (`/api/*`), suffix (`*.json`) or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 256)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^([*]|/[^*]*[*]?|[*][^*]+)$'))")
        .message("paths must be exact (/api/orders), a prefix (/api/*), a suffix (*.json) or *"))]
    #[x_kube(validation = Rule::new("self.all(p, !p.contains('{') && !p.contains('}'))")
        .message("paths may not contain { or }: Istio reads them as path templates"))]
    pub paths: Vec<PathPattern>,
    /// Destination ports; any one may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ports: Vec<Port>,
}

/// A request path pattern: exact, `prefix*`, `*suffix` or `*`.
pub type PathPattern = String;

/// A TCP port number, 1–65535.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self >= 1 && self <= 65535",
    "message": "must be a port number between 1 and 65535"
}]))]
pub struct Port(pub i32);

/// An HTTP method.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs, clippy::upper_case_acronyms)]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Connect,
    Trace,
}

impl HttpMethod {
    /// The method as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Trace => "TRACE",
        }
    }
}

/// A condition on the request's validated JWT. Exactly one of the fields is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.jwtScopes) ? 1 : 0) + (has(self.claim) ? 1 : 0) == 1",
    "message": "each when entry must set exactly one of jwtScopes or claim"
}]))]
pub enum When {
    /// The token's `scope` claim must contain every one of these scopes.
    JwtScopes(
        #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
        #[schemars(extend("x-kubernetes-validations" = [{
            "rule": "self.all(s, !s.contains('*'))",
            "message": "scopes are literals: Istio would read '*' as a wildcard"
        }]))]
        Vec<String>,
    ),
    /// A claim must hold one of the listed values.
    Claim(ClaimMatch),
}

/// A JWT claim and its accepted values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimMatch {
    /// Claim name, e.g. `groups`. Nested claims use `.`: `realm_access.roles`.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[A-Za-z0-9_:-]+([.][A-Za-z0-9_:-]+)*$')",
        "message": "must be a claim name (letters, digits, _ : -), nested with ."
    }]))]
    pub name: String,
    /// Accepted values; any one may match.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 1024)))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(v, size(v) > 0 && !v.contains('*'))",
        "message": "claim values are non-empty literals: Istio would read '*' as a wildcard"
    }]))]
    pub values: Vec<String>,
}

/// An external authorizer (Envoy ext_authz) that decides before `deny` and `rules`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAuthz {
    /// The extension provider name as configured in the mesh (`meshConfig.extensionProviders`).
    #[schemars(length(min = 1, max = 253))]
    pub provider: String,
    /// The Rego decision the authorizer evaluates, e.g. `palisade/authz/allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub policy: Option<String>,
    /// Operations sent to the authorizer; all requests when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub to: Vec<Operation>,
}

/// Observed state of an AuthPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthPolicyStatus {
    /// Generation, conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// The Istio objects generated from this policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generated: Vec<GeneratedRef>,
}
