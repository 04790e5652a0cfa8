//! The webhook's configuration file (YAML), e.g.
//!
//! ```yaml
//! listen: 127.0.0.1:8443
//! tls: {certFile: /etc/palisade/tls.crt, keyFile: /etc/palisade/tls.key}
//! trustDomain: cluster.local
//! identitySource: Istio              # or Spire
//! exemptNamespaces: [kube-system, palisade-system]
//! secretsInEnv: {mode: Enforce, namespaces: {legacy: Warn}}
//! maxBodyBytes: 3145728
//! ```

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use crate::identity::IdentitySource;

/// Webhook settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Address to serve HTTPS on.
    pub listen: SocketAddr,
    /// Serving certificate and key (PEM), reloaded when both change.
    pub tls: TlsFiles,
    /// SPIFFE trust domain.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Identity source.
    #[serde(default = "default_source")]
    pub identity_source: IdentitySource,
    /// Namespaces no check applies to.
    #[serde(default = "default_exempt")]
    pub exempt_namespaces: Vec<String>,
    /// What to do with secrets in environment variables.
    #[serde(default)]
    pub secrets_in_env: SecretsInEnv,
    /// Largest request body accepted.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

/// Certificate and key files.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// Enforce or warn, per namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum Mode {
    /// Refuse.
    #[default]
    Enforce,
    /// Admit with a warning.
    Warn,
}

/// Secrets-in-env settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretsInEnv {
    /// Default mode.
    #[serde(default)]
    pub mode: Mode,
    /// Per-namespace modes.
    #[serde(default)]
    pub namespaces: BTreeMap<String, Mode>,
}

impl SecretsInEnv {
    /// The mode for `namespace`.
    pub fn mode_for(&self, namespace: &str) -> Mode {
        self.namespaces.get(namespace).copied().unwrap_or(self.mode)
    }
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_source() -> IdentitySource {
    IdentitySource::Istio
}

fn default_exempt() -> Vec<String> {
    vec!["kube-system".into(), "palisade-system".into()]
}

fn default_max_body() -> usize {
    3 * 1024 * 1024
}

impl Config {
    /// Parses configuration text; unknown keys are errors.
    pub fn parse(text: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }
}
