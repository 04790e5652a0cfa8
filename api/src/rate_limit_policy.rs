//! `RateLimitPolicy`: requests per period for a Gateway API route or gateway.
//!
//! The operator turns one RateLimitPolicy into gateway configuration: an Envoy Gateway
//! `BackendTrafficPolicy` (backend `EnvoyGateway`) or an Istio `EnvoyFilter` with Envoy's local
//! token-bucket rate limit (backend `IstioLocal`). A limit the chosen backend cannot express is
//! reported in status, never dropped.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    auth_policy::{HttpMethod, PathPattern},
    common::{CommonStatus, Duration, GeneratedRef, TargetRef},
};

/// Rate limits for one Gateway API HTTPRoute or Gateway. When two RateLimitPolicies target the
/// same object, the oldest wins and the other reports `Conflicted`.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    namespaced,
    status = "RateLimitPolicyStatus",
    shortname = "rlp",
    category = "palisade",
    doc = "RateLimitPolicy limits the requests a Gateway API HTTPRoute or Gateway accepts, per client IP, header, JWT claim or caller identity, and becomes Envoy Gateway or Istio gateway configuration.",
    cel,
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(name = "Backend", type_ = "string", json_path = ".status.backend"),
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
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    /// The HTTPRoute or Gateway (gateway.networking.k8s.io, same namespace) the limits apply to.
    #[x_kube(validation = Rule::new("self.group == 'gateway.networking.k8s.io' && (self.kind == 'HTTPRoute' || self.kind == 'Gateway')")
        .message("targetRef must name a gateway.networking.k8s.io HTTPRoute or Gateway"))]
    pub target_ref: TargetRef,

    /// Which gateway enforces the limits. Defaults to the operator's configured backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<RateLimitBackend>,

    /// The limits. A request is refused when any limit it falls under is exhausted.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.all(l, self.exists_one(m, m.name == l.name))")
        .message("limit names must be unique"))]
    pub limits: Vec<Limit>,
}

/// The gateway implementation that enforces a RateLimitPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RateLimitBackend {
    /// Envoy Gateway `BackendTrafficPolicy` (global limits when the gateway has a rate-limit
    /// service, local otherwise).
    EnvoyGateway,
    /// Istio `EnvoyFilter` with Envoy's local rate limit filter (a token bucket per proxy).
    IstioLocal,
}

/// One limit: at most `requests` per `per`, with up to `burst` extra requests absorbed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.requests + (has(self.burst) ? self.burst : 0) <= 4294967295")
    .message("requests + burst must fit a token bucket (at most 4294967295)"))]
pub struct Limit {
    /// A name for the limit, unique within the policy; appears in status and in metrics.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("must be a lower-case DNS label (letters, digits, '-')"))]
    pub name: String,

    /// Requests allowed per period.
    #[x_kube(validation = Rule::new("self > 0").message("must be > 0"))]
    pub requests: i64,

    /// The period, e.g. `1s`, `1m`, `1h`.
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("must be at least 1s"))]
    pub per: Duration,

    /// Extra requests a client may send at once above the steady rate (token bucket size minus
    /// `requests`). Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("must be >= 0"))]
    pub burst: Option<i64>,

    /// What requests are counted by. When unset, all requests to the target share one counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<LimitKey>,

    /// Restricts the limit to matching requests; all requests when unset.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "match")]
    pub match_: Option<LimitMatch>,
}

/// What requests are counted by: each distinct value gets its own counter. Exactly one field is
/// set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.clientIP) ? 1 : 0) + (has(self.header) ? 1 : 0) + (has(self.jwtClaim) ? 1 : 0) + (has(self.sourceIdentity) ? 1 : 0) == 1",
    "message": "key must set exactly one of clientIP, header, jwtClaim or sourceIdentity"
}]))]
pub enum LimitKey {
    /// The client's IP address as seen by the gateway.
    #[serde(rename = "clientIP")]
    ClientIp(Empty),
    /// The value of this request header, e.g. `x-api-key`.
    Header(
        #[schemars(
            length(min = 1, max = 256),
            regex(pattern = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
        )]
        String,
    ),
    /// The value of this claim of the validated JWT, e.g. `sub`.
    JwtClaim(#[schemars(length(min = 1, max = 253))] String),
    /// The caller's mesh identity (SPIFFE ID from its mTLS certificate).
    SourceIdentity(Empty),
}

/// An empty object, used where a key kind takes no parameters (`clientIP: {}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Empty {}

/// Which requests a limit counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitMatch {
    /// Request paths: exact (`/api/orders`) or prefix (`/api/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 1024)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^/[^*]*[*]?$'))")
        .message("paths must be exact (/api/orders) or a prefix (/api/*)"))]
    pub paths: Vec<PathPattern>,
    /// HTTP methods; any one may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 9))]
    pub methods: Vec<HttpMethod>,
}

/// Observed state of a RateLimitPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicyStatus {
    /// Generation, conditions (`Accepted`, `Ready`, `Conflicted`, `Unsupported`).
    #[serde(flatten)]
    pub common: CommonStatus,
    /// The backend that enforces the limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<RateLimitBackend>,
    /// The gateway objects generated from this policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generated: Vec<GeneratedRef>,
}
