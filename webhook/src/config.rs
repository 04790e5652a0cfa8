//! The webhook's configuration file (YAML), e.g.
//!
//! ```yaml
//! listen: 127.0.0.1:8443
//! metricsListen: 127.0.0.1:9091      # optional: /metrics over plain HTTP here, not on `listen`
//! tls: {certFile: /etc/palisade/tls.crt, keyFile: /etc/palisade/tls.key,
//!       clientCAFile: /etc/palisade/apiserver-client-ca.crt}   # optional: only the API server
//! # or an X.509-SVID from the SPIFFE Workload API:
//! # tls: {workloadApiSocket: unix:///run/spire/agent-sockets/spire-agent.sock}
//! trustDomain: cluster.local
//! identitySource: Istio              # or Spire
//! exemptNamespaces: [kube-system, palisade-system]
//! secretsInEnv: {mode: Enforce, namespaces: {legacy: Warn}}
//! identity: {mode: Enforce, namespaces: {batch: Audit}}
//! # who may set, change or remove a namespace's palisade.dev/enforcement label
//! enforcementLabelEditors: {groups: ["system:masters"], users: []}
//! maxBodyBytes: 3145728
//! images: {insecureRegistries: ["127.0.0.1:5000"], cacheTTLSeconds: 600, negativeCacheTTLSeconds: 30,
//!          materialRefreshSeconds: 5,
//!          registryCAFiles: {"registry.corp.example": /etc/palisade/registry-ca/0.pem}}
//! policyReports: {enabled: true, intervalSeconds: 300}   # the background scan (PolicyReports)
//! spire: {className: prod, watchClassless: false}   # the SPIRE controller manager's class
//! istio: {ambient: true, proxyImages: ["docker.io/istio/proxyv2"]}
//! leaderElection: {enabled: true, leaseName: palisade-webhook, leaseNamespace: palisade-system,
//!                  leaseSeconds: 15}        # one replica writes ImagePolicy status
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
    /// Address to serve `/metrics` on, over plain HTTP; when set, the HTTPS port does not serve
    /// them (so its NetworkPolicy can admit the API server alone).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where the serving certificate comes from.
    pub tls: Tls,
    /// The background scan that writes PolicyReports.
    #[serde(default)]
    pub policy_reports: PolicyReports,
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
    pub secrets_in_env: CheckModes,
    /// What to do with pods without a workload identity.
    #[serde(default)]
    pub identity: CheckModes,
    /// Who may set, change or remove a namespace's [`ENFORCEMENT_LABEL`].
    #[serde(default)]
    pub enforcement_label_editors: LabelEditors,
    /// Largest request body accepted.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Image signature verification.
    #[serde(default)]
    pub images: ImageSettings,
    /// Which ClusterSPIFFEIDs the SPIRE controller manager serves (identity source Spire).
    #[serde(default)]
    pub spire: crate::identity::SpireSettings,
    /// How Istio is installed (identity source Istio).
    #[serde(default)]
    pub istio: crate::identity::IstioSettings,
    /// The Lease that picks the one replica writing ImagePolicy status (every replica serves).
    #[serde(default = "default_leader_election")]
    pub leader_election: palisade_lease::LeaderElection,
    /// After SIGTERM: seconds during which `/readyz` fails but every request, new connections
    /// included, is still served, so the API server and kube-proxy stop sending here before the
    /// listener closes. In-flight requests are finished after that.
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: u64,
}

fn default_drain_seconds() -> u64 {
    5
}

fn default_leader_election() -> palisade_lease::LeaderElection {
    palisade_lease::LeaderElection::named("palisade-webhook")
}

/// The background scan ([`crate::scan`]): off unless enabled (the chart enables it).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyReports {
    /// Whether the replica that leads scans the cluster's pods and writes PolicyReports.
    #[serde(default)]
    pub enabled: bool,
    /// Seconds between two scans.
    #[serde(default = "default_scan_interval")]
    pub interval_seconds: u64,
}

impl Default for PolicyReports {
    fn default() -> Self {
        PolicyReports {
            enabled: false,
            interval_seconds: default_scan_interval(),
        }
    }
}

fn default_scan_interval() -> u64 {
    300
}

/// Image signature verification settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSettings {
    /// Registries (`host:port`) spoken to over plain HTTP.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Registries (`host[:port]`, as images name them) whose certificates chain to a private
    /// CA: the PEM bundle to trust for each, beside the system's roots (as containerd's
    /// `hosts.toml` `ca` and Docker's `certs.d/<host>/ca.crt` do).
    #[serde(default, rename = "registryCAFiles")]
    pub registry_ca_files: BTreeMap<String, PathBuf>,
    /// How long a verified (digest, policy) stays verified.
    #[serde(default = "default_cache_ttl", rename = "cacheTTLSeconds")]
    pub cache_ttl_seconds: u64,
    /// How long a failed verification is remembered.
    #[serde(default = "default_negative_ttl", rename = "negativeCacheTTLSeconds")]
    pub negative_cache_ttl_seconds: u64,
    /// How often the keys and trust roots ImagePolicies reference (Secrets, ConfigMaps) are
    /// re-read: a rotated or revoked key stops verifying within this time.
    #[serde(default = "default_material_refresh")]
    pub material_refresh_seconds: u64,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            insecure_registries: Vec::new(),
            registry_ca_files: BTreeMap::new(),
            cache_ttl_seconds: default_cache_ttl(),
            negative_cache_ttl_seconds: default_negative_ttl(),
            material_refresh_seconds: default_material_refresh(),
        }
    }
}

fn default_cache_ttl() -> u64 {
    600
}

fn default_negative_ttl() -> u64 {
    30
}

fn default_material_refresh() -> u64 {
    5
}

/// Serving certificate: files (`certFile` and `keyFile`, reloaded when both change) or the SPIFFE
/// Workload API (`workloadApiSocket`), exactly one of the two.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// SPIFFE Workload API endpoint, `unix:///path/agent.sock` (a bare path is accepted too).
    #[serde(default)]
    pub workload_api_socket: Option<String>,
    /// PEM CA certificates: when set, only clients presenting a certificate one of them signed
    /// are served (the API server, given a client certificate for webhooks in its admission
    /// configuration), so nothing else on the network can post reviews.
    #[serde(default, rename = "clientCAFile")]
    pub client_ca_file: Option<PathBuf>,
}

/// Why the configuration cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The YAML does not match the settings (an unknown key, a wrong type).
    #[error("{0}")]
    Syntax(String),
    /// `tls` names no certificate source, or two.
    #[error("tls: {0}")]
    TlsSource(&'static str),
    /// `tls.clientCAFile` cannot be read or holds no usable certificate.
    #[error("tls.clientCAFile {path}: {why}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A period of zero (the refresher would stop, and revoked keys keep verifying).
    #[error("images.materialRefreshSeconds must be at least 1")]
    NoMaterialRefresh,
}

/// The CA certificates in `pem`, the content of the file at `path` (named in errors); at least
/// one.
pub fn parse_roots(
    path: &std::path::Path,
    pem: &[u8],
) -> Result<rustls::RootCertStore, ConfigError> {
    {
        use rustls_pki_types::{CertificateDer, pem::PemObject};
        let failed = |why: String| ConfigError::ClientCa {
            path: path.to_path_buf(),
            why,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| failed(e.to_string()))?;
            roots.add(cert).map_err(|e| failed(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(failed("holds no certificate".to_owned()));
        }
        Ok(roots)
    }
}

/// Where the serving certificate comes from, once validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// Files on disk.
    Files(TlsFiles),
    /// The SPIFFE Workload API endpoint.
    WorkloadApi(String),
}

impl Tls {
    /// The one source configured, or why the settings are unusable.
    pub fn source(&self) -> Result<TlsSource, ConfigError> {
        match (&self.cert_file, &self.key_file, &self.workload_api_socket) {
            (Some(cert), Some(key), None) => Ok(TlsSource::Files(TlsFiles {
                cert_file: cert.clone(),
                key_file: key.clone(),
            })),
            (None, None, Some(socket)) if !socket.trim().is_empty() => {
                let endpoint = if socket.contains("://") || socket.starts_with("unix:") {
                    socket.clone()
                } else {
                    format!("unix://{socket}")
                };
                Ok(TlsSource::WorkloadApi(endpoint))
            }
            (None, None, Some(_)) => Err(ConfigError::TlsSource("workloadApiSocket is empty")),
            (_, _, Some(_)) => Err(ConfigError::TlsSource(
                "set either certFile and keyFile, or workloadApiSocket, not both",
            )),
            (Some(_), None, None) => Err(ConfigError::TlsSource(
                "certFile is set without tls.keyFile",
            )),
            (None, Some(_), None) => Err(ConfigError::TlsSource(
                "keyFile is set without tls.certFile",
            )),
            (None, None, None) => Err(ConfigError::TlsSource(
                "set certFile and keyFile, or workloadApiSocket",
            )),
        }
    }
}

/// Certificate and key files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// The namespace label that sets the mode of every check in its namespace (`Enforce`, `Warn`
/// or `Audit`): the staged rollout of a namespace, and the audited break-glass. Only the
/// [`LabelEditors`] may set, change or remove it.
pub const ENFORCEMENT_LABEL: &str = "palisade.dev/enforcement";

/// What a check does with what it finds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub enum Mode {
    /// Admit and record (the security event log); the client is told nothing.
    Audit,
    /// Admit with a warning to the client, and record.
    Warn,
    /// Refuse.
    #[default]
    Enforce,
}

impl Mode {
    /// The mode a label value names; `None` for anything else.
    pub fn parse(value: &str) -> Option<Mode> {
        match value {
            "Enforce" => Some(Mode::Enforce),
            "Warn" => Some(Mode::Warn),
            "Audit" => Some(Mode::Audit),
            _ => None,
        }
    }

    /// The mode a namespace with `labels` sets: its [`ENFORCEMENT_LABEL`], read fail-closed (a
    /// value that names no mode enforces); `None` without the label.
    pub fn of_namespace(labels: &BTreeMap<String, String>) -> Option<Mode> {
        labels
            .get(ENFORCEMENT_LABEL)
            .map(|v| Mode::parse(v).unwrap_or(Mode::Enforce))
    }
}

/// A check's mode: a default and per-namespace modes. A namespace's [`ENFORCEMENT_LABEL`]
/// comes before both.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckModes {
    /// Default mode.
    #[serde(default)]
    pub mode: Mode,
    /// Per-namespace modes.
    #[serde(default)]
    pub namespaces: BTreeMap<String, Mode>,
}

impl CheckModes {
    /// The mode in `namespace`, whose labels are `labels`.
    pub fn mode_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Mode {
        Mode::of_namespace(labels)
            .or_else(|| self.namespaces.get(namespace).copied())
            .unwrap_or(self.mode)
    }
}

/// Who may set, change or remove the [`ENFORCEMENT_LABEL`] of a namespace (by the user and
/// groups the API server authenticated): lowering a namespace to `Audit` turns every check off
/// there, so it is a cluster administrator's act, not a namespace owner's.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelEditors {
    /// Groups whose members may.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Users who may.
    #[serde(default)]
    pub users: Vec<String>,
}

impl Default for LabelEditors {
    fn default() -> Self {
        LabelEditors {
            groups: vec!["system:masters".into()],
            users: Vec::new(),
        }
    }
}

impl LabelEditors {
    /// Whether `user` (in `groups`) is one of them.
    pub fn admits(&self, user: &str, groups: &[String]) -> bool {
        self.users.iter().any(|u| u == user) || groups.iter().any(|g| self.groups.contains(g))
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
    /// Parses configuration text; unknown keys and an unusable `tls` section are errors.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        config.tls.source()?;
        if config.images.material_refresh_seconds == 0 {
            return Err(ConfigError::NoMaterialRefresh);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_material_is_refreshed_at_least_every_so_often() {
        let base = "listen: 127.0.0.1:0\ntls: {certFile: c, keyFile: k}\n";
        let err = Config::parse(&format!("{base}images: {{materialRefreshSeconds: 0}}\n"))
            .expect_err("zero refused");
        assert_eq!(err, ConfigError::NoMaterialRefresh);
        let ok = Config::parse(&format!("{base}images: {{materialRefreshSeconds: 1}}\n"))
            .expect("one second");
        assert_eq!(ok.images.material_refresh_seconds, 1);
    }

    #[test]
    fn tls_takes_files_or_the_workload_api_but_not_both() {
        let files =
            Config::parse("listen: 127.0.0.1:0\ntls: {certFile: c, keyFile: k}\n").expect("files");
        assert!(matches!(files.tls.source(), Ok(TlsSource::Files(_))));
        let svid =
            Config::parse("listen: 127.0.0.1:0\ntls: {workloadApiSocket: /run/agent.sock}\n")
                .expect("socket");
        assert_eq!(
            svid.tls.source(),
            Ok(TlsSource::WorkloadApi("unix:///run/agent.sock".into()))
        );
        for (tls, why) in [
            ("{certFile: c}", "without tls.keyFile"),
            ("{}", "set certFile and keyFile, or workloadApiSocket"),
            (
                "{certFile: c, keyFile: k, workloadApiSocket: s}",
                "not both",
            ),
            ("{workloadApiSocket: ' '}", "is empty"),
            ("{certFile: c, keyFile: k, socket: s}", "unknown field"),
        ] {
            let err = Config::parse(&format!("listen: 127.0.0.1:0\ntls: {tls}\n"))
                .expect_err(tls)
                .to_string();
            assert!(err.contains(why), "{tls}: {err}");
        }
    }
}
