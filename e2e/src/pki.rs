//! Fresh certificates for one control plane: a CA, the API server's serving certificate (SAN
//! 127.0.0.1 and localhost), an admin client certificate in `system:masters`, and the
//! ServiceAccount token signing key. Nothing is reused between runs.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Paths of the PEM files written by [`Pki::write`].
#[derive(Clone, Debug)]
pub struct Pki {
    /// CA certificate (trusted by clients and used as the client CA).
    pub ca_cert: PathBuf,
    /// CA private key (for components that sign, and for test servers such as the webhook).
    pub ca_key: PathBuf,
    /// API server serving certificate and key.
    pub server_cert: PathBuf,
    /// API server serving key.
    pub server_key: PathBuf,
    /// Admin client certificate (CN=palisade-admin, O=system:masters).
    pub admin_cert: PathBuf,
    /// Admin client key.
    pub admin_key: PathBuf,
    /// ServiceAccount token signing key (private, PKCS#8).
    pub sa_key: PathBuf,
    /// ServiceAccount token verification key (public).
    pub sa_pub: PathBuf,
}

impl Pki {
    /// Generates every key and certificate into `dir`.
    pub fn write(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Pki {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("apiserver.crt"),
            server_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
        };

        let ca_key = KeyPair::generate()?;
        let ca_pem_key = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params()?, ca_key)?;
        write(&pki.ca_cert, &ca.pem())?;
        write(&pki.ca_key, &ca_pem_key)?;

        // The `kubernetes` Service's address and the node's, for a control plane that runs on a
        // node (pods reach it through the Service).
        let node_ip = crate::netns::NODE_IP.to_string();
        let (cert, key) = leaf(
            &ca,
            "kube-apiserver",
            None,
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.0.0.1",
                &node_ip,
            ],
            true,
        )?;
        write(&pki.server_cert, &cert)?;
        write(&pki.server_key, &key)?;

        let (cert, key) = leaf(&ca, "palisade-admin", Some("system:masters"), &[], false)?;
        write(&pki.admin_cert, &cert)?;
        write(&pki.admin_key, &key)?;

        let sa = KeyPair::generate()?;
        write(&pki.sa_key, &sa.serialize_pem())?;
        write(&pki.sa_pub, &sa.public_key_pem())?;
        Ok(pki)
    }
}

/// Issues a serving certificate for 127.0.0.1 and `names` from the CA whose key is `ca_key`;
/// returns (certificate PEM, key PEM). Used for test servers the API server calls (webhooks).
pub fn issue_serving_cert(ca_key: &Path, names: &[&str]) -> Result<(String, String)> {
    let key = KeyPair::from_pem(&std::fs::read_to_string(ca_key)?)?;
    // The CA's subject and key identify it; rebuilding the same parameters around the same key
    // yields an issuer whose signatures chain to the certificate in `ca_cert`.
    let ca = rcgen::Issuer::new(ca_params()?, key);
    leaf(
        &ca,
        names.first().copied().unwrap_or("localhost"),
        None,
        names,
        true,
    )
}

fn ca_params() -> Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "palisade-local-ca");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

fn leaf(
    issuer: &rcgen::Issuer<'_, KeyPair>,
    common_name: &str,
    organization: Option<&str>,
    dns_names: &[&str],
    server: bool,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(
        dns_names
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>(),
    )?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        params.distinguished_name.push(DnType::OrganizationName, o);
    }
    if server {
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
