//! SPIFFE identities: the one identity model from which Istio principals, SPIRE ClusterSPIFFEID
//! templates and the webhook's "would-be identity" messages all derive.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, json_schema};
use serde::{Deserialize, Serialize};

/// The CEL rule the API server applies to every SPIFFE ID field. Kept identical to
/// [`SpiffeId::from_str`]; a unit test checks both on the same corpus.
pub const SPIFFE_ID_CEL: &str =
    r"self.matches('^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+$') && !self.matches('/[.][.]?(/|$)')";

/// A SPIFFE ID naming one workload: `spiffe://<trust-domain>/<path>`.
///
/// The trust domain is lower-case letters, digits, `.`, `-` and `_`; the path has at least one
/// segment of letters, digits, `.`, `-` and `_`, and no `.` or `..` segments (SPIFFE ID spec).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId(String);

/// Why a SPIFFE ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {id:?}: {why} (expected spiffe://trust-domain/path)")]
pub struct SpiffeIdError {
    id: String,
    why: &'static str,
}

impl SpiffeId {
    /// The identity Istio and SPIRE give a pod running as `service_account` in `namespace`:
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn for_service_account(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split('/').next().unwrap_or_default()
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        &rest[self.trust_domain().len()..]
    }

    /// The form Istio's `source.principals` expects: the ID without the `spiffe://` scheme.
    pub fn istio_principal(&self) -> &str {
        &self.0["spiffe://".len()..]
    }

    /// The full ID.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let err = |why| SpiffeIdError {
            id: id.to_owned(),
            why,
        };
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("must start with spiffe://"))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| err("a workload ID needs a path after the trust domain"))?;
        if domain.is_empty() {
            return Err(err("empty trust domain"));
        }
        if !domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(err(
                "trust domain may hold only lower-case letters, digits, '.', '-' and '_'",
            ));
        }
        for segment in path.split('/') {
            if segment.is_empty() {
                return Err(err("empty path segment"));
            }
            if segment == "." || segment == ".." {
                return Err(err("'.' and '..' path segments are not allowed"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(err(
                    "path segments may hold only letters, digits, '.', '-' and '_'",
                ));
            }
        }
        Ok(SpiffeId(id.to_owned()))
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for SpiffeId {
    fn schema_name() -> Cow<'static, str> {
        "SpiffeId".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        json_schema!({
            "type": "string",
            "maxLength": 512,
            "x-kubernetes-validations": [{
                "rule": SPIFFE_ID_CEL,
                "message": "must be a SPIFFE ID of the form spiffe://trust-domain/path \
                            (lower-case trust domain, no empty, '.' or '..' path segments)",
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const CORPUS: &[(&str, bool)] = &[
        ("spiffe://cluster.local/ns/shop/sa/orders", true),
        ("spiffe://example.org/payments", true),
        ("spiffe://td_1-x.y/a.b/c-d/e_f", true),
        ("spiffe://cluster.local", false),
        ("spiffe://cluster.local/", false),
        ("spiffe://Cluster.local/ns/a", false),
        ("spiffe:///ns/a", false),
        ("spiffe://td/ns//a", false),
        ("spiffe://td/ns/../a", false),
        ("spiffe://td/./a", false),
        ("spiffe://td/a/..", false),
        ("spiffe://td/a/sa*", false),
        ("http://td/a", false),
        ("cluster.local/ns/shop/sa/orders", false),
        ("spiffe://td/a?b", false),
    ];

    #[test]
    fn parser_accepts_and_refuses_per_spec() {
        for (id, ok) in CORPUS {
            assert_eq!(id.parse::<SpiffeId>().is_ok(), *ok, "{id}");
        }
    }

    #[test]
    fn cel_rule_agrees_with_parser() {
        use kube::core::cel::{ValidationErrors, Validator};
        let schema = serde_json::to_value(schemars::schema_for!(SpiffeId)).expect("schema");
        for (id, ok) in CORPUS {
            let result: Result<(), ValidationErrors> =
                Validator::new().validate(&schema, &serde_json::json!(id), None);
            assert_eq!(result.is_ok(), *ok, "{id}: {result:?}");
        }
    }

    #[test]
    fn service_account_identity_and_istio_principal() {
        let id = SpiffeId::for_service_account("cluster.local", "shop", "orders").expect("valid");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/orders");
        assert_eq!(id.istio_principal(), "cluster.local/ns/shop/sa/orders");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/orders");
        assert!(SpiffeId::for_service_account("cluster.local", "shop", "").is_err());
    }
}
