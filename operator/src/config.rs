//! The operator's configuration file (YAML), e.g.
//!
//! ```yaml
//! trustDomain: cluster.local
//! identitySource: Istio            # or Spire
//! defaultRateLimitBackend: EnvoyGateway
//! envoyGatewayRateLimit: Global    # or Local
//! leaderElection: {enabled: true, leaseName: palisade-operator, leaseNamespace: palisade-system}
//! metricsAddress: 127.0.0.1:9090
//! concurrency: 32                  # reconciles in flight per controller
//! vault: {...}                     # SecretBindings: see vault::VaultSettings
//! ```

use std::{net::SocketAddr, path::Path};

use serde::Deserialize;

use crate::translate::Context;

/// Operator settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Translation settings: every top-level key other than the ones below.
    #[serde(skip)]
    pub context: Context,
    /// Leader election on a Lease.
    #[serde(default = "default_leader_election")]
    pub leader_election: LeaderElection,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: SocketAddr,
    /// Reconciles in flight at once, per controller.
    #[serde(default = "default_concurrency")]
    pub concurrency: u16,
    /// Vault/OpenBao for SecretBindings; without it SecretBindings are reported as not
    /// configured and nothing is written.
    #[serde(default)]
    pub vault: Option<crate::vault::VaultSettings>,
    /// The webhook's serving certificate, generated and rotated here; off when absent (the
    /// certificate then comes from cert-manager or elsewhere).
    #[serde(default)]
    pub webhook_certificate: Option<crate::certs::CertSettings>,
}

fn default_concurrency() -> u16 {
    32
}

pub use palisade_lease::LeaderElection;

fn default_leader_election() -> LeaderElection {
    LeaderElection::named("palisade-operator")
}

fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_defaults() {
        let c = Config::parse("trustDomain: prod.example\nidentitySource: Spire\nleaderElection: {enabled: false, leaseName: l, leaseNamespace: n, leaseSeconds: 10}\n")
            .expect("valid");
        assert_eq!(c.context.trust_domain, "prod.example");
        assert!(!c.leader_election.enabled);
        assert_eq!(c.metrics_address.port(), 9090);
        let empty = Config::parse("{}").expect("valid");
        assert_eq!(empty.context, Context::default());
    }

    #[test]
    fn vault_settings_parse_and_refuse_plain_http_off_loopback() {
        let base = "vault:\n  role: palisade_operator\n  serviceAccount: {namespace: palisade-system, name: palisade-operator}\n";
        let c = Config::parse(&format!("{base}  address: https://vault.example:8200\n  tenancy: {{kv: [{{mount: secret, version: 2, pathPrefix: \"{{namespace}}/\"}}]}}\n"))
            .expect("valid");
        let v = c.vault.expect("vault section");
        assert_eq!(v.auth_mount, "kubernetes");
        assert_eq!(v.cleanup_timeout_seconds, 120);
        assert_eq!(v.tenancy.kv.len(), 1);
        assert!(Config::parse(&format!("{base}  address: http://127.0.0.1:8200\n")).is_ok());
        let err = Config::parse(&format!("{base}  address: http://vault.example:8200\n"))
            .expect_err("plain http off loopback");
        assert!(err.to_string().contains("https://"), "{err}");
        let err = Config::parse(&format!(
            "{base}  address: https://v\n  tenancy: {{kv: [{{mount: s}}]}}\n"
        ))
        .expect_err("incomplete area");
        assert!(err.to_string().contains("version"), "{err}");
    }

    #[test]
    fn typos_are_errors() {
        let err = Config::parse("trustDomian: x\n").expect_err("unknown key");
        assert!(err.to_string().contains("trustDomian"), "{err}");
        assert!(Config::parse("identitySource: Vault\n").is_err());
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            context: Context::default(),
            leader_election: default_leader_election(),
            metrics_address: default_metrics_address(),
            concurrency: default_concurrency(),
            vault: None,
            webhook_certificate: None,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid configuration.
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        /// File path.
        path: String,
        /// Cause.
        source: serde_yaml::Error,
    },
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses configuration text. Unknown keys are errors, so a typo is never silently ignored.
    pub fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        let mut all: serde_yaml::Mapping = serde_yaml::from_str(text)?;
        let mut own = serde_yaml::Mapping::new();
        for key in [
            "leaderElection",
            "metricsAddress",
            "concurrency",
            "vault",
            "webhookCertificate",
        ] {
            if let Some(v) = all.remove(key) {
                own.insert(key.into(), v);
            }
        }
        let mut config: Config = serde_yaml::from_value(serde_yaml::Value::Mapping(own))?;
        config.context = serde_yaml::from_value(serde_yaml::Value::Mapping(all))?;
        if let Some(v) = &config.vault {
            v.validate()
                .map_err(<serde_yaml::Error as serde::de::Error>::custom)?;
        }
        Ok(config)
    }
}
